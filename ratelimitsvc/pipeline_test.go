package ratelimitsvc

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/servertest"
)

// testCounter is one sliding-window counter of a minute, for calling a
// store's evaluate directly.
func testCounter(id string, limit uint64, hits int64) counterReq {
	h := fnv.New64a()
	h.Write([]byte(id))
	return counterReq{id: []byte(id), hash: h.Sum64(), window: 60_000, limit: limit, hits: hits}
}

// decide runs one counter through the store and returns what it saw.
func decide(t *testing.T, rs *RedisStore, c counterReq) (counterRes, bool, error) {
	t.Helper()
	res := make([]counterRes, 1)
	ok, err := rs.evaluate(t.Context(), time.Now().UnixMilli(), []counterReq{c}, res)
	return res[0], ok, err
}

// waitPipeline waits until rs's pipeline has inflight calls in flight and
// queued calls waiting.
func waitPipeline(t *testing.T, rs *RedisStore, inflight, queued int) {
	t.Helper()
	servertest.WaitFor(t, 10*time.Second, func() error {
		if st := rs.pipe.status(); st.Inflight != inflight || st.Queued != queued {
			return fmt.Errorf("pipeline %+v: want %d calls in flight, %d queued", st, inflight, queued)
		}
		return nil
	})
}

// TestPipelineAuthAndDatabase: a URL's username, password and database
// number are used by the decision pipeline's own connections; a wrong
// password fails decisions without the password showing in the error.
func TestPipelineAuthAndDatabase(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	const pw = "pipeline-pw-5ecret"
	if _, err := srv.Do("ACL", "SETUSER", "meshguard", "on", ">"+pw, "~*", "+@all"); err != nil {
		t.Fatal(err)
	}
	url := "redis://meshguard:" + pw + "@" + srv.Addr() + "/3"
	rs := newTestRedis(t, RedisConfig{URL: secret.URL(url), Autopipeline: true})
	for i := range 3 {
		got, ok, err := decide(t, rs, testCounter("auth-db", 10, 1))
		if err != nil || !ok || got.cur != int64(i) {
			t.Fatalf("decision %d: %+v %v %v, want cur=%d admitted", i, got, ok, err, i)
		}
	}
	info, err := srv.Do("INFO", "keyspace")
	if err != nil || !strings.Contains(info, "db3:keys=1") {
		t.Errorf("keyspace %q (%v): want the counter in database 3", info, err)
	}

	bad := newTestRedis(t, RedisConfig{URL: secret.URL("redis://meshguard:wrong-" + pw + "@" + srv.Addr() + "/3"), Autopipeline: true})
	_, _, err = decide(t, bad, testCounter("auth-db", 10, 1))
	if err == nil || !strings.Contains(err.Error(), "WRONGPASS") {
		t.Errorf("wrong password: err %v, want WRONGPASS", err)
	}
	if err != nil && strings.Contains(err.Error(), pw) {
		t.Errorf("the error shows the password: %v", err)
	}
}

// TestPipelineSkipsAbandonedCalls: decisions whose callers gave up while
// queued behind a batch Redis has not answered are never sent, so a hung
// Redis that comes back does not count hits whose callers already had
// their answer.
func TestPipelineSkipsAbandonedCalls(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
	const timeout = 300 * time.Millisecond
	rs := newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Timeout: timeout, Autopipeline: true})
	c := testCounter("abandoned", 1000, 1)
	if _, ok, err := decide(t, rs, c); err != nil || !ok {
		t.Fatalf("healthy: %v %v", ok, err)
	}
	srv.Pause()
	// The first call goes out and hangs; two more queue behind it and their
	// callers give up there.
	first := make(chan error, 1)
	go func() {
		_, _, err := decide(t, rs, c)
		first <- err
	}()
	waitPipeline(t, rs, 1, 0)
	ctx, cancel := context.WithCancel(t.Context())
	gaveUp := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := rs.evaluate(ctx, time.Now().UnixMilli(), []counterReq{c}, make([]counterRes, 1))
			gaveUp <- err
		}()
	}
	waitPipeline(t, rs, 1, 2)
	cancel()
	for range 2 {
		if err := <-gaveUp; !errors.Is(err, context.Canceled) {
			t.Errorf("caller that gave up: %v, want its context's error", err)
		}
	}
	if err := <-first; err == nil || classifyStoreError(err) != "timeout" {
		t.Errorf("call in flight with Redis hung: %v, want a timeout", err)
	}
	srv.Resume()
	got, ok, err := decide(t, rs, c)
	if err != nil || !ok {
		t.Fatalf("after resume: %v %v", ok, err)
	}
	// Counted: the healthy call and the one that was in flight; not the two
	// abandoned in the queue.
	if got.cur != 2 {
		t.Errorf("counter before this call = %d, want 2 (abandoned calls must not be sent)", got.cur)
	}
}

// TestPipelineConcurrentCallers: many callers at once each get their own
// reply (replies are matched to callers in order), through batches.
func TestPipelineConcurrentCallers(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	rs := newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Autopipeline: true})
	const callers, each = 40, 25
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Every caller has its own counter, so the count it sees
			// before its hit must be exactly its previous calls.
			c := testCounter("caller-"+string(rune('A'+g)), 1_000_000, 1)
			for i := range each {
				res := make([]counterRes, 1)
				ok, err := rs.evaluate(context.Background(), time.Now().UnixMilli(), []counterReq{c}, res)
				if err != nil || !ok || res[0].cur != int64(i) {
					errs <- errors.New("caller " + string(rune('A'+g)) + ": got another caller's reply or none")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := rs.pipe.status(); st.Commands != callers*each || st.Batches > st.Commands || st.Inflight != 0 || st.Queued != 0 {
		t.Errorf("pipeline after the load: %+v, want every call sent once, nothing pending", st)
	}
}

// TestPipelineCallerContext: a caller whose context ends stops waiting.
func TestPipelineCallerContext(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
	rs := newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Timeout: 5 * time.Second, Autopipeline: true})
	srv.Pause()
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	res := make([]counterRes, 1)
	_, err := rs.evaluate(ctx, time.Now().UnixMilli(), []counterReq{testCounter("ctx", 10, 1)}, res)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > time.Second {
		t.Errorf("err %v after %s, want the caller's deadline", err, time.Since(start))
	}
}

// TestBuildCallMatchesBuildGroup: the pipeline's script call carries
// exactly the keys and arguments of the go-redis path.
func TestBuildCallMatchesBuildGroup(t *testing.T) {
	s := &RedisStore{prefix: "mg:rl:"}
	reqs := []counterReq{testCounter("a", 5, 1), testCounter("b\x00c", 1<<40, 0), testCounter("d", 7, -3)}
	reqs[1].fixed, reqs[1].shadow = true, true
	reqs[2].quota = true
	now := int64(1_700_000_123_456)
	var g group
	g.idx = []int{0, 1, 2}
	s.buildGroup(&g, reqs, now, true, nil)
	want := []string{"evalsha", evaluateSHA, strconv.Itoa(len(g.keys))}
	want = append(want, g.keys...)
	for _, a := range g.args {
		want = append(want, fmt.Sprint(a))
	}
	c := getCall()
	s.buildCall(c, reqs, now)
	var got []string
	for _, a := range c.args {
		switch v := a.(type) {
		case *string:
			got = append(got, *v)
		case *int64:
			got = append(got, strconv.FormatInt(*v, 10))
		default:
			got = append(got, fmt.Sprint(v))
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("script call (-go-redis path +pipeline):\n%s", diff)
	}
	if n := testing.AllocsPerRun(100, func() { s.buildCall(c, reqs, now) }); n > 1 {
		t.Errorf("buildCall allocates %v times, want only the keys' text", n)
	}
}

// TestPipelineClose: closing the store answers waiting callers at once,
// refuses later calls, and leaves no goroutine of the pipeline or go-redis
// behind.
func TestPipelineClose(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	cfg := RedisConfig{URL: secret.URL(srv.URL()), Timeout: 10 * time.Second, Autopipeline: true, KeyPrefix: "mg:rl:"}
	rs, err := NewRedisStore(discardLogger(), nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := decide(t, rs, testCounter("close", 10, 1)); err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	errs := make(chan error, 3)
	call := func() {
		_, _, err := decide(t, rs, testCounter("close", 10, 1))
		errs <- err
	}
	// One call in flight, then two queued behind it.
	go call()
	waitPipeline(t, rs, 1, 0)
	go call()
	go call()
	waitPipeline(t, rs, 1, 2)
	start := time.Now()
	rs.Close()
	for range 3 {
		if err := <-errs; !errors.Is(err, errPipelineClosed) {
			t.Errorf("waiting caller: %v, want %v", err, errPipelineClosed)
		}
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("callers answered %s after Close", took)
	}
	if _, _, err := decide(t, rs, testCounter("close", 10, 1)); !errors.Is(err, errPipelineClosed) {
		t.Errorf("after Close: %v", err)
	}
}

// TestClusterPipelines: in Cluster mode the pipeline sends each call to
// its slot's master, and when a slot moves, go-redis follows the MOVED
// reply; counting goes on where it was.
func TestClusterPipelines(t *testing.T) {
	skipShort(t)
	cl := redistest.StartCluster(t)
	rs := newTestRedis(t, RedisConfig{Cluster: cl.Addrs(), Autopipeline: true})
	// Counters on every master.
	for i := range 30 {
		if _, ok, err := decide(t, rs, testCounter("spread-"+string(rune('a'+i)), 100, 1)); err != nil || !ok {
			t.Fatalf("decision %d: %v %v", i, ok, err)
		}
	}
	var holding int
	for _, n := range cl.Nodes {
		if keys, err := n.Do("DBSIZE"); err == nil && keys != "0" {
			holding++
		}
	}
	if holding != 3 {
		t.Fatalf("counters on %d masters, want 3: the pipeline routes each call to its slot's master", holding)
	}

	c := testCounter("moving", 100, 1)
	for i := range 2 {
		if got, _, err := decide(t, rs, c); err != nil || got.cur != int64(i) {
			t.Fatalf("before the move: %+v %v", got, err)
		}
	}
	// Move the counter's slot to another master, keys and all.
	slot := strconv.Itoa(int(keySlot(c.hash)))
	var from, to *redistest.Server
	for _, n := range cl.Nodes {
		if keys, err := n.Do("CLUSTER", "COUNTKEYSINSLOT", slot); err == nil && keys != "0" {
			from = n
		}
	}
	if from == nil {
		t.Fatal("no node holds the counter's slot")
	}
	for _, n := range cl.Nodes {
		if n != from {
			to = n
			break
		}
	}
	id := func(n *redistest.Server) string {
		v, err := n.Do("CLUSTER", "MYID")
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	fromID, toID := id(from), id(to)
	mustDo := func(n *redistest.Server, args ...string) {
		t.Helper()
		if _, err := n.Do(args...); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
	}
	mustDo(to, "CLUSTER", "SETSLOT", slot, "IMPORTING", fromID)
	mustDo(from, "CLUSTER", "SETSLOT", slot, "MIGRATING", toID)
	keys, err := from.Do("CLUSTER", "GETKEYSINSLOT", slot, "100")
	if err != nil || keys == "" {
		t.Fatalf("keys in slot %s: %q %v", slot, keys, err)
	}
	host, port, _ := strings.Cut(to.Addr(), ":")
	mustDo(from, append([]string{"MIGRATE", host, port, "", "0", "5000", "KEYS"}, strings.Split(keys, "\n")...)...)
	for _, n := range cl.Nodes {
		mustDo(n, "CLUSTER", "SETSLOT", slot, "NODE", toID)
	}
	for i := 2; i < 5; i++ {
		got, ok, err := decide(t, rs, c)
		if err != nil || !ok || got.cur != int64(i) {
			t.Fatalf("after the move, decision %d: %+v %v %v, want cur=%d", i, got, ok, err, i)
		}
	}
	if n, err := to.Do("CLUSTER", "COUNTKEYSINSLOT", slot); err != nil || n == "0" {
		t.Errorf("the new master holds %q keys of the slot (%v)", n, err)
	}
}

// TestPipelineCallersGivingUp: callers whose contexts end at random points
// (before queueing, while queued, while in flight) and calls that time out
// while Redis is paused never get another caller's reply, and the calls
// they leave behind are never recycled while the pipeline holds them (the
// race detector watches the pool).
func TestPipelineCallersGivingUp(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
	const timeout = 100 * time.Millisecond
	rs := newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Timeout: timeout, Autopipeline: true})
	const callers, minCalls, maxCalls, span = 16, 150, 20_000, 1_000_000
	// Each caller's counter starts in its own range of values, so a reply
	// meant for another caller cannot pass for its own. Set once, before
	// any fault: a set-up increment that timed out may still have landed.
	// Seeded through a store with a generous timeout (same Redis and key
	// prefix): the first call dials and loads the script, which can take
	// longer than the 100 ms under test on a busy machine.
	seed := newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Timeout: 10 * time.Second, Autopipeline: true})
	counters := make([]counterReq, callers)
	for g := range counters {
		c := testCounter("giving-up-"+strconv.Itoa(g), 1<<50, int64(g+1)*span)
		if _, _, err := decide(t, seed, c); err != nil {
			t.Fatalf("seeding counter %d: %v", g, err)
		}
		c.hits = 1
		counters[g] = c
	}
	var answered, gaveUp, timeouts atomic.Int64
	pauses := make(chan struct{})
	go func() {
		defer close(pauses)
		for range 2 {
			// Pause while callers are busy: after some more answers (or,
			// should they stall, 10 s).
			start := time.Now()
			for n := answered.Load(); answered.Load() < n+50 && time.Since(start) < 10*time.Second; {
				runtime.Gosched()
			}
			srv.Pause()
			time.Sleep(timeout + 50*time.Millisecond) // the fault's length
			srv.Resume()
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for g, c := range counters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			base := int64(g+1) * span
			last := base - 1
			for i := 0; i < maxCalls; i++ {
				if i >= minCalls {
					select {
					case <-pauses:
						return
					default:
					}
				}
				// Up to 1.5 ms, or (one call in seven) longer than the
				// store's timeout, which then answers while Redis is paused.
				wait := time.Duration(i%7) * 300 * time.Microsecond
				if i%7 == 6 {
					wait = 10 * timeout
				}
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				res := make([]counterRes, 1)
				_, err := rs.evaluate(ctx, time.Now().UnixMilli(), []counterReq{c}, res)
				gone := ctx.Err() != nil
				cancel()
				switch {
				case err == nil:
					answered.Add(1)
					if res[0].cur <= last || res[0].cur > base+maxCalls {
						errs <- fmt.Errorf("caller %d: reply %d outside its own range after %d", g, res[0].cur, last)
						return
					}
					last = res[0].cur
				case gone:
					gaveUp.Add(1)
				case classifyStoreError(err) == "timeout":
					timeouts.Add(1)
				default:
					errs <- fmt.Errorf("caller %d: %v", g, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	<-pauses
	srv.Resume()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("answered %d, gave up %d, timed out %d", answered.Load(), gaveUp.Load(), timeouts.Load())
	if answered.Load() == 0 || gaveUp.Load() == 0 || timeouts.Load() == 0 {
		t.Errorf("the test did not exercise every path: answered %d, gave up %d, timed out %d", answered.Load(), gaveUp.Load(), timeouts.Load())
	}
	// Whatever was left behind drains: nothing queued or in flight.
	servertest.WaitFor(t, 5*time.Second, func() error {
		if _, _, err := decide(t, rs, testCounter("drain", 1<<50, 1)); err != nil {
			return err
		}
		if st := rs.pipe.status(); st.Inflight != 0 || st.Queued != 0 {
			return fmt.Errorf("pipeline did not drain: %+v", st)
		}
		return nil
	})
}
