package ratelimitsvc

import (
	"bufio"
	"context"
	"errors"
	"hash/fnv"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/secret"
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

// TestPipelineSkipsAbandonedCalls: decisions that gave up while queued
// behind a batch Redis has not answered are never sent, so a hung Redis that
// comes back does not count hits whose callers already had their answer.
func TestPipelineSkipsAbandonedCalls(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
	const timeout = 100 * time.Millisecond
	rs := newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Timeout: timeout, Autopipeline: true})
	c := testCounter("abandoned", 1000, 1)
	if _, ok, err := decide(t, rs, c); err != nil || !ok {
		t.Fatalf("healthy: %v %v", ok, err)
	}
	srv.Pause()
	// The first call goes out and hangs; the next two queue behind it and
	// time out there. All within staleAfter, so the connection stays.
	for i := range 3 {
		start := time.Now()
		_, _, err := decide(t, rs, c)
		if !errors.Is(err, errCallTimeout) {
			t.Fatalf("call %d with Redis hung: %v, want a timeout", i, err)
		}
		if took := time.Since(start); took > timeout+300*time.Millisecond {
			t.Errorf("call %d took %s, timeout %s", i, took, timeout)
		}
	}
	if st := rs.pipe.status(); st.Inflight != 1 || st.Stale != 0 {
		t.Fatalf("pipeline %+v: want the one hung call in flight, no stale close", st)
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

// TestPipelineStaleConnection: when Redis stops answering for longer than
// staleAfter, the connection is closed (its callers fail at once instead of
// each waiting), and after Redis resumes a new one carries decisions.
func TestPipelineStaleConnection(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
	const timeout = 100 * time.Millisecond
	reg := prometheus.NewRegistry()
	cfg := DefaultRedisConfig()
	cfg.URL, cfg.Timeout = secret.URL(srv.URL()), timeout
	rs, err := NewRedisStore(discardLogger(), reg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close() })
	c := testCounter("stale", 1000, 1)
	if _, _, err := decide(t, rs, c); err != nil {
		t.Fatal(err)
	}
	srv.Pause()
	if _, _, err := decide(t, rs, c); !errors.Is(err, errCallTimeout) {
		t.Fatalf("hung: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for rs.pipe.status().Stale == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no stale close after %s; pipeline %+v", 5*time.Second, rs.pipe.status())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := metricValue(t, reg, "meshguard_ratelimitsvc_redis_pipeline_stale_closes_total"); n != 1 {
		t.Errorf("stale closes metric = %v", n)
	}
	srv.Resume()
	deadline = time.Now().Add(5 * time.Second)
	for {
		if _, ok, err := decide(t, rs, c); err == nil && ok {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no recovery: %v %v", ok, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st := rs.pipe.status(); st.Connections != 1 || st.Dials < 2 {
		t.Errorf("pipeline %+v: want a second connection", st)
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
	if st := rs.pipe.status(); st.Dials != 1 || st.Inflight != 0 || st.Queued != 0 {
		t.Errorf("pipeline after the load: %+v, want one connection, nothing pending", st)
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

// TestReadIntArray: replies are parsed whole, whatever their type, so the
// connection stays in step; only integer arrays are results.
func TestReadIntArray(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []int64
		replyErr string // substring
		connErr  bool
		rest     string // what must remain unread
	}{
		{name: "ints", in: "*3\r\n:1\r\n:-2\r\n:0\r\nNEXT", want: []int64{1, -2, 0}, rest: "NEXT"},
		{name: "empty array", in: "*0\r\nNEXT", rest: "NEXT"},
		{name: "null array", in: "*-1\r\nNEXT", rest: "NEXT"},
		{name: "error", in: "-NOSCRIPT No matching script\r\nNEXT", replyErr: "NOSCRIPT No matching script", rest: "NEXT"},
		{name: "status", in: "+OK\r\nNEXT", replyErr: "want an array", rest: "NEXT"},
		{name: "bulk", in: "$5\r\nhello\r\nNEXT", replyErr: "want an array", rest: "NEXT"},
		{name: "null bulk", in: "$-1\r\nNEXT", replyErr: "want an array", rest: "NEXT"},
		{name: "mixed array", in: "*3\r\n:1\r\n$2\r\nab\r\n*2\r\n:1\r\n+x\r\nNEXT", want: []int64{1}, replyErr: "element", rest: "NEXT"},
		{name: "bad int", in: "*1\r\n:x1\r\n", connErr: true},
		{name: "bad header", in: "*z\r\n", connErr: true},
		{name: "huge array", in: "*99999999\r\n", connErr: true},
		{name: "huge bulk", in: "*1\r\n$999999999999\r\n", connErr: true},
		{name: "no CR", in: "*1\n", connErr: true},
		{name: "unknown type", in: "!oops\r\n", connErr: true},
		{name: "truncated", in: "*2\r\n:1\r\n", connErr: true},
		{name: "empty", in: "", connErr: true},
		{name: "long line", in: ":" + strings.Repeat("9", 20000) + "\r\n", connErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			br := bufio.NewReaderSize(strings.NewReader(tc.in), 4096)
			got, replyErr, err := readIntArray(br, nil)
			if (err != nil) != tc.connErr {
				t.Fatalf("connection error %v, want %v", err, tc.connErr)
			}
			if tc.connErr {
				return
			}
			if tc.replyErr == "" && replyErr != nil || tc.replyErr != "" && (replyErr == nil || !strings.Contains(replyErr.Error(), tc.replyErr)) {
				t.Errorf("reply error %v, want %q", replyErr, tc.replyErr)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Errorf("got %v, want %v", got, tc.want)
				}
			}
			rest := make([]byte, 64)
			n, _ := br.Read(rest)
			if string(rest[:n]) != tc.rest {
				t.Errorf("left %q unread, want %q", rest[:n], tc.rest)
			}
		})
	}
}

// FuzzReadIntArray: no input makes the reply parser panic, loop or claim
// more integers than the input holds.
func FuzzReadIntArray(f *testing.F) {
	for _, s := range []string{"*2\r\n:1\r\n:2\r\n", "-ERR x\r\n", "*1\r\n*1\r\n$3\r\nabc\r\n", "$-1\r\n", "*-1\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		br := bufio.NewReaderSize(strings.NewReader(string(in)), 4096)
		got, _, _ := readIntArray(br, nil)
		if len(got) > len(in)/4 {
			t.Fatalf("%d integers from %d bytes", len(got), len(in))
		}
	})
}

// TestAppendEvalshaMatchesBuildGroup: the pipeline's hand-encoded command
// carries exactly the keys and arguments of the go-redis path.
func TestAppendEvalshaMatchesBuildGroup(t *testing.T) {
	s := &RedisStore{prefix: "mg:rl:"}
	reqs := []counterReq{testCounter("a", 5, 1), testCounter("b\x00c", 1<<40, 0), testCounter("d", 7, -3)}
	reqs[1].fixed, reqs[1].shadow = true, true
	reqs[2].quota = true
	now := int64(1_700_000_123_456)
	var g group
	g.idx = []int{0, 1, 2}
	s.buildGroup(&g, reqs, now, true, nil)
	var want []byte
	args := append([]any{"EVALSHA", evaluateSHA, len(g.keys)}, func() []any {
		var a []any
		for _, k := range g.keys {
			a = append(a, k)
		}
		return append(a, g.args...)
	}()...)
	want = appendArrayHeader(want, len(args))
	for _, a := range args {
		switch v := a.(type) {
		case string:
			want = appendBulk(want, v)
		case int:
			want = appendBulkInt(want, int64(v))
		case int64:
			want = appendBulkInt(want, v)
		case uint64:
			want = appendBulkInt(want, int64(v))
		default:
			t.Fatalf("argument %T", a)
		}
	}
	if got := s.appendEvalsha(nil, reqs, now); string(got) != string(want) {
		t.Errorf("encoded\n%q\nwant\n%q", got, want)
	}
}

// TestPipelineClose: closing the store answers waiting callers at once and
// refuses later calls.
func TestPipelineClose(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
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
	for range 3 {
		go func() {
			_, _, err := decide(t, rs, testCounter("close", 10, 1))
			errs <- err
		}()
	}
	time.Sleep(100 * time.Millisecond) // one in flight, two queued
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

// TestClusterPipelines: in Cluster mode each master gets its own pipeline,
// and when a slot moves, the MOVED reply sends the decision through
// go-redis, which follows it; counting goes on where it was.
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
	if st := rs.pipelineStatus(); st.Connections != 3 || st.Dials != 3 {
		t.Fatalf("pipelines %+v: want one connection per master", st)
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
// they leave behind are recycled only once both sides are done with them
// (the race detector watches the pool).
func TestPipelineCallersGivingUp(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
	const timeout = 100 * time.Millisecond
	rs := newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Timeout: timeout, Autopipeline: true})
	const callers, each, span = 16, 150, 1_000_000
	stop := make(chan struct{})
	pauses := make(chan struct{})
	go func() {
		defer close(pauses)
		for range 2 {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			srv.Pause()
			time.Sleep(timeout + 50*time.Millisecond)
			srv.Resume()
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	var timeouts, gaveUp, answered sync.Map
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := "giving-up-" + strconv.Itoa(g)
			// Each caller's counter lives in its own range of values, so a
			// reply meant for another caller cannot pass for its own.
			base := int64(g+1) * span
			c := testCounter(name, 1<<50, base)
			for {
				if _, _, err := decide(t, rs, c); err == nil {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			c.hits = 1
			last := base - 1
			for i := range each {
				// Up to 1.5 ms, or (one call in seven) longer than the
				// store's timeout, which then answers while Redis is paused.
				wait := time.Duration(i%7) * 300 * time.Microsecond
				if i%7 == 6 {
					wait = 10 * timeout
				}
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				res := make([]counterRes, 1)
				_, err := rs.evaluate(ctx, time.Now().UnixMilli(), []counterReq{c}, res)
				cancel()
				switch {
				case err == nil:
					answered.Store(name+strconv.Itoa(i), true)
					if res[0].cur <= last || res[0].cur > base+each {
						errs <- errors.New(name + ": reply " + strconv.FormatInt(res[0].cur, 10) + " outside its own range after " + strconv.FormatInt(last, 10))
						return
					}
					last = res[0].cur
				case errors.Is(err, errCallTimeout):
					timeouts.Store(name+strconv.Itoa(i), true)
				case errors.Is(err, context.DeadlineExceeded):
					gaveUp.Store(name+strconv.Itoa(i), true)
				default:
					errs <- errors.New(name + ": " + err.Error())
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-pauses
	srv.Resume()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	count := func(m *sync.Map) (n int) {
		m.Range(func(any, any) bool { n++; return true })
		return n
	}
	t.Logf("answered %d, gave up %d, timed out %d", count(&answered), count(&gaveUp), count(&timeouts))
	if count(&answered) == 0 || count(&gaveUp) == 0 || count(&timeouts) == 0 {
		t.Errorf("the test did not exercise every path: answered %d, gave up %d, timed out %d", count(&answered), count(&gaveUp), count(&timeouts))
	}
	// Whatever was left behind drains: nothing queued or in flight.
	deadline := time.Now().Add(2 * time.Second)
	for {
		st := rs.pipe.status()
		if st.Inflight == 0 && st.Queued == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pipeline did not drain: %+v", st)
		}
		if _, _, err := decide(t, rs, testCounter("drain", 1<<50, 1)); err != nil {
			t.Logf("drain call: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
