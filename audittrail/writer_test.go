package audittrail

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// writerConfig is a quick config for tests: small batches, short timeouts.
func writerConfig(t testing.TB) Config {
	cfg := DefaultConfig()
	cfg.SpoolDir = filepath.Join(t.TempDir(), "spool")
	cfg.BatchSize = 500
	cfg.BatchInterval = 20 * time.Millisecond
	cfg.QueueSize = 5000
	cfg.WriteTimeout = 2 * time.Second
	cfg.CheckpointInterval = 50 * time.Millisecond
	cfg.WitnessDir = filepath.Join(t.TempDir(), "witness")
	return cfg
}

// startWriter builds a Writer and runs it until the test ends (or the
// returned stop is called, which closes it with a deadline).
func startWriter(t testing.TB, cfg Config, store BatchStore, opts ...WriterOption) (*Writer, *prometheus.Registry, func(ctx context.Context)) {
	t.Helper()
	reg := prometheus.NewRegistry()
	w, err := NewWriter(discardLog, reg, cfg, store, testKeyring, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	stop := func(cctx context.Context) {
		once.Do(func() {
			if err := w.Close(cctx); err != nil {
				t.Errorf("Close: %v", err)
			}
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(func() { stop(context.Background()) })
	return w, reg, stop
}

// produce enqueues n records from streams goroutines, 20 per call (one ALS
// message), tagging request ids with tag. It returns the ids accepted.
func produce(t testing.TB, w *Writer, streams, n int, tag string, pause func(i int)) map[string]bool {
	t.Helper()
	var mu sync.Mutex
	accepted := map[string]bool{}
	var wg sync.WaitGroup
	per := n / streams
	for s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			base := time.Now().Add(-time.Hour)
			for i := 0; i < per; i += 20 {
				recs := genRecords(min(20, per-i), base, fmt.Sprintf("%s-%d-%d", tag, s, i))
				if err := w.Enqueue(context.Background(), recs); err != nil {
					t.Errorf("Enqueue: %v", err)
					return
				}
				mu.Lock()
				for _, r := range recs {
					accepted[r.RequestID] = true
				}
				mu.Unlock()
				if pause != nil && s == 0 {
					pause(i)
				}
			}
		}()
	}
	wg.Wait()
	return accepted
}

// checkExactlyOnce fails unless the store holds every id of want once and
// nothing else.
func checkExactlyOnce(t testing.TB, s recordReader, want map[string]bool) {
	t.Helper()
	seen := map[string]int{}
	if err := s.Scan(context.Background(), Filter{}, func(r *Record) error { seen[r.RequestID]++; return nil }); err != nil {
		t.Fatal(err)
	}
	missing, dups, extra := 0, 0, 0
	for id := range want {
		switch seen[id] {
		case 0:
			missing++
		case 1:
		default:
			dups++
		}
	}
	for id := range seen {
		if !want[id] {
			extra++
		}
	}
	if missing+dups+extra > 0 || len(want) == 0 {
		t.Fatalf("store holds %d distinct of %d accepted: %d missing, %d duplicated, %d unexpected", len(seen), len(want), missing, dups, extra)
	}
}

// checkVerifies fails unless s verifies with the test key, against the
// checkpoints in witnessDir when given.
func checkVerifies(t testing.TB, s recordReader, witnessDir ...string) VerifyReport {
	t.Helper()
	opts := VerifyOptions{Keys: testKeyring}
	for _, dir := range witnessDir {
		cps, err := ReadWitness(dir, testKeyring.Verifiers())
		if err != nil {
			t.Fatal(err)
		}
		opts.Witness = append(opts.Witness, cps...)
	}
	rep, err := Verify(context.Background(), s, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK {
		t.Fatalf("Verify: %v", rep.Break)
	}
	return rep
}

// spooledIDs returns the request ids held in the spool segments of dir.
func spooledIDs(t testing.TB, dir string) map[string]int {
	t.Helper()
	sp, err := openSpool(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.close()
	ids := map[string]int{}
	for _, seg := range sp.segs {
		recs, err := sp.read(seg)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			ids[r.RequestID]++
		}
	}
	return ids
}

// TestWriterExactlyOnce: every accepted record is, after Close, either in
// the store or in the spool (on a busy machine a write may time out and its
// batch, and every one after it, go to the spool, as the contract allows),
// never both and never twice; a second writer's replay then brings the
// spool into the store, and the chain matches its checkpoint.
func TestWriterExactlyOnce(t *testing.T) {
	bothStores(t, Config{}, func(t *testing.T, s testStore) {
		cfg := writerConfig(t)
		w, reg, stop := startWriter(t, cfg, s)
		want := produce(t, w, 8, 40000, "x", nil)
		stop(context.Background())

		stored := map[string]int{}
		if err := s.Scan(t.Context(), Filter{}, func(r *Record) error { stored[r.RequestID]++; return nil }); err != nil {
			t.Fatal(err)
		}
		spooled := spooledIDs(t, cfg.SpoolDir)
		for id := range want {
			if n := stored[id] + spooled[id]; n != 1 {
				t.Fatalf("record %s is %d times in the store and %d in the spool, want once in all", id, stored[id], spooled[id])
			}
		}
		if len(stored)+len(spooled) != len(want) {
			t.Fatalf("store %d + spool %d records, want %d", len(stored), len(spooled), len(want))
		}
		direct := storeMetric(t, w.m.stored.WithLabelValues("direct")) + storeMetric(t, w.m.stored.WithLabelValues("replay"))
		if int(direct) != len(stored) || int(storeMetric(t, w.m.spooled)) < len(spooled) {
			t.Errorf("metrics: stored %v (store holds %d), spooled %v (spool holds %d)", direct, len(stored), storeMetric(t, w.m.spooled), len(spooled))
		}
		if len(spooled) > 0 {
			// The replay is what is tested now, not the write timeout: give
			// each write the default time, and the whole spool minutes.
			t.Logf("%d records were left in the spool by Close (busy machine); replaying them", len(spooled))
			rcfg := cfg
			rcfg.WriteTimeout = DefaultConfig().WriteTimeout
			w2, _, stop2 := startWriter(t, rcfg, s)
			servertest.WaitUntil(t, 5*time.Minute, "the spool to drain", func() bool { _, n := w2.spool.size(); return n == 0 })
			stop2(context.Background())
		}
		checkExactlyOnce(t, s, want)
		rep := checkVerifies(t, s, cfg.WitnessDir)
		if rep.Rows != 40000 || rep.Heads[0].Seq != 40000 || rep.Witnessed != rep.Chains {
			t.Errorf("Verify report = %+v, want 40000 rows in the first chain, every chain witnessed", rep)
		}
		if n, err := testutil.GatherAndCount(reg, "meshguard_auditsink_spool_segments"); err != nil || n == 0 {
			t.Error("meshguard_auditsink_spool_segments not exported")
		}
	})
}

// TestWriterPostgresKilled: PostgreSQL is SIGKILLed mid-stream and later
// restarted; batches go to the spool meanwhile and are replayed once.
func TestWriterPostgresKilled(t *testing.T) {
	srv := pgtest.Start(t)
	s, _ := openPG(t, srv, Config{})
	cfg := writerConfig(t)
	cfg.WriteTimeout = 500 * time.Millisecond
	w, _, stop := startWriter(t, cfg, s)

	var killOnce, restartOnce sync.Once
	want := produce(t, w, 4, 30000, "k", func(i int) {
		switch {
		case i >= 1500 && i < 4000:
			killOnce.Do(srv.Kill)
		case i >= 4000:
			restartOnce.Do(func() {
				servertest.WaitUntil(t, 30*time.Second, "batches in the spool", func() bool { _, n := w.spool.size(); return n > 0 })
				srv.Restart(t)
			})
		}
		time.Sleep(200 * time.Microsecond)
	})
	servertest.WaitUntil(t, 30*time.Second, "the spool to drain", func() bool { _, n := w.spool.size(); return n == 0 })
	stop(context.Background())
	if storeMetric(t, w.m.spooled) == 0 || storeMetric(t, w.m.stored.WithLabelValues("replay")) == 0 {
		t.Fatalf("expected the outage to spool and replay: spooled=%v replayed=%v",
			storeMetric(t, w.m.spooled), storeMetric(t, w.m.stored.WithLabelValues("replay")))
	}
	checkExactlyOnce(t, s, want)
	checkVerifies(t, s, cfg.WitnessDir)
}

// TestWriterCloseMidStream: SIGTERM while records are queued and the
// database is unreachable: Close spools them; a new writer on the same spool
// dir replays them, exactly once.
func TestWriterCloseMidStream(t *testing.T) {
	bothStores(t, Config{}, func(t *testing.T, s testStore) {
		cfg := writerConfig(t)
		cfg.BatchInterval = time.Hour // nothing leaves the queue but full batches and Close
		w1, _, stop1 := startWriter(t, cfg, s)
		want := produce(t, w1, 2, 3990, "a", nil) // leaves 490 queued records
		if w1.queueLen() == 0 {
			t.Fatal("expected records still queued")
		}
		expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
		cancel()
		stop1(expired) // past deadline: everything queued goes to the spool
		if _, n := w1.spool.size(); n == 0 {
			t.Fatal("Close with an expired deadline left nothing in the spool")
		}
		if err := w1.Enqueue(context.Background(), genRecords(1, time.Now(), "late")); !errors.Is(err, ErrWriterClosed) {
			t.Fatalf("Enqueue after Close = %v, want ErrWriterClosed", err)
		}

		cfg.BatchInterval = 20 * time.Millisecond
		w2, _, stop2 := startWriter(t, cfg, s)
		for id := range produce(t, w2, 2, 2000, "b", nil) {
			want[id] = true
		}
		servertest.WaitUntil(t, 30*time.Second, "the spool to drain", func() bool { _, n := w2.spool.size(); return n == 0 })
		stop2(context.Background())
		checkExactlyOnce(t, s, want)
		if rep := checkVerifies(t, s, cfg.WitnessDir); rep.Chains != 2 || rep.Witnessed != 2 {
			t.Errorf("Verify saw %d chains, want 2 (one per writer)", rep.Chains)
		}
	})
}

// TestWriterReplayDuplicate: a segment whose batch was already committed
// (crash between commit and segment removal) is skipped on replay.
func TestWriterReplayDuplicate(t *testing.T) {
	bothStores(t, Config{}, func(t *testing.T, s testStore) {
		cfg := writerConfig(t)
		recs := genRecords(100, time.Now().Add(-time.Minute), "dup")
		newChain("crashed", testKey).link(recs)
		if _, err := s.writeBatch(t.Context(), recs); err != nil {
			t.Fatal(err)
		}
		sp, err := openSpool(cfg.SpoolDir)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sp.append(recs); err != nil {
			t.Fatal(err)
		}
		sp.close()
		w, _, stop := startWriter(t, cfg, s)
		servertest.WaitUntil(t, 30*time.Second, "the spool to drain", func() bool { _, n := w.spool.size(); return n == 0 })
		stop(context.Background())
		if got := storeMetric(t, w.m.duplicates); got != 1 {
			t.Errorf("duplicates = %v, want 1", got)
		}
		want := map[string]bool{}
		for _, r := range recs {
			want[r.RequestID] = true
		}
		checkExactlyOnce(t, s, want)
	})
}

// TestWriterSpoolFull: with PostgreSQL down the spool fills; policy block
// stalls Enqueue, policy drop refuses with a count; both report not ready,
// and after the database is back everything accepted is stored once.
func TestWriterSpoolFull(t *testing.T) {
	srv := pgtest.Start(t)
	for _, policy := range []string{SpoolFullBlock, SpoolFullDrop} {
		t.Run(policy, func(t *testing.T) {
			s, _ := openPG(t, srv, Config{})
			cfg := writerConfig(t)
			cfg.SpoolFullPolicy = policy
			cfg.SpoolMaxBytes = 1 << 20
			cfg.BatchSize = 100
			cfg.QueueSize = 1000
			cfg.WriteTimeout = 300 * time.Millisecond
			w, _, stop := startWriter(t, cfg, s)
			srv.Kill()
			restarted := false
			t.Cleanup(func() {
				if !restarted {
					srv.Restart(t)
				}
			})

			want := map[string]bool{}
			var refused error
			for i := 0; i < 200 && refused == nil; i++ {
				recs := genRecords(100, time.Now(), fmt.Sprintf("f%d", i))
				for j := range recs {
					recs[j].UserAgent = string(make([]byte, 2000)) // ~2 KiB per record fills 1 MiB fast
				}
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				err := w.Enqueue(ctx, recs)
				cancel()
				if err != nil {
					refused = err
					break
				}
				for _, r := range recs {
					want[r.RequestID] = true
				}
			}
			switch policy {
			case SpoolFullBlock:
				if !errors.Is(refused, context.DeadlineExceeded) {
					t.Fatalf("Enqueue with a full spool (block) = %v, want the context deadline", refused)
				}
			case SpoolFullDrop:
				if !errors.Is(refused, ErrSpoolFull) && !errors.Is(refused, ErrQueueFull) {
					t.Fatalf("Enqueue with a full spool (drop) = %v, want ErrSpoolFull", refused)
				}
				if storeMetric(t, w.m.dropped.WithLabelValues("spool_full"))+storeMetric(t, w.m.dropped.WithLabelValues("queue_full")) == 0 {
					t.Error("dropped records not counted")
				}
			}
			servertest.WaitUntil(t, 30*time.Second, "the spool to report full", func() bool { return w.Status().SpoolFull })
			if err := w.Ready(); err == nil {
				t.Error("Ready() = nil with a full spool")
			}

			srv.Restart(t)
			restarted = true
			servertest.WaitUntil(t, 30*time.Second, "the spool to drain", func() bool { _, n := w.spool.size(); return n == 0 && w.queueLen() == 0 })
			if err := w.Ready(); err != nil {
				t.Errorf("Ready() after recovery = %v", err)
			}
			stop(context.Background())
			checkExactlyOnce(t, s, want)
			checkVerifies(t, s, cfg.WitnessDir)
		})
	}
}

// TestSpoolCorruptSegment: a segment that fails its checksum is moved aside
// and counted; later segments still replay.
func TestSpoolCorruptSegment(t *testing.T) {
	s := openSQLite(t, Config{})
	cfg := writerConfig(t)
	sp, err := openSpool(cfg.SpoolDir)
	if err != nil {
		t.Fatal(err)
	}
	c := newChain("c", testKey)
	bad, good := genRecords(10, time.Now(), "bad"), genRecords(10, time.Now(), "good")
	c.link(bad)
	c.link(good)
	for _, b := range [][]Record{bad, good} {
		if _, err := sp.append(b); err != nil {
			t.Fatal(err)
		}
	}
	seg, _ := sp.oldest()
	sp.close()
	corruptFile(t, sp.path(seg.seq))

	w, _, stop := startWriter(t, cfg, s)
	servertest.WaitUntil(t, 30*time.Second, "the spool to drain", func() bool { _, n := w.spool.size(); return n == 0 })
	stop(context.Background())
	if got := storeMetric(t, w.m.corrupt); got != 1 {
		t.Errorf("corrupt segments = %v, want 1", got)
	}
	if m, _ := filepath.Glob(filepath.Join(cfg.SpoolDir, "*.corrupt")); len(m) != 1 {
		t.Errorf("corrupt segment not kept aside: %v", m)
	}
	want := map[string]bool{}
	for _, r := range good {
		want[r.RequestID] = true
	}
	checkExactlyOnce(t, s, want)
}

func TestSpoolLocked(t *testing.T) {
	dir := t.TempDir()
	sp, err := openSpool(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.close()
	if _, err := openSpool(dir); err == nil {
		t.Fatal("a second openSpool of the same dir succeeded")
	}
}

// TestWriterRejectedSegment: a batch the database refuses as data (here a
// CHECK constraint an operator added) is retried, then set aside whole as
// *.rejected with a metric, and the batches behind it are stored; Verify
// shows the gap its rows leave.
func TestWriterRejectedSegment(t *testing.T) {
	srv := pgtest.Start(t)
	s, pool := openPG(t, srv, Config{})
	if _, err := pool.Exec(t.Context(), "ALTER TABLE audit_logs ADD CONSTRAINT no_evil CHECK (action <> 'EVIL')"); err != nil {
		t.Fatal(err)
	}
	cfg := writerConfig(t)
	cfg.BatchSize = 100
	w, _, stop := startWriter(t, cfg, s)
	want := map[string]bool{}
	send := func(tag string, evil bool) {
		recs := genRecords(100, time.Now().Add(-time.Minute), tag)
		if evil {
			recs[50].Action = "EVIL"
		} else {
			for _, r := range recs {
				want[r.RequestID] = true
			}
		}
		if err := w.Enqueue(t.Context(), recs); err != nil {
			t.Fatal(err)
		}
		servertest.WaitUntil(t, 30*time.Second, "the batch to leave the queue", func() bool { return w.queueLen() == 0 })
	}
	send("good1", false)
	servertest.WaitUntil(t, 30*time.Second, "the first batch", func() bool { return storeMetric(t, w.m.stored) == 100 })
	send("evil", true)
	send("good2", false)
	servertest.WaitUntil(t, 30*time.Second, "the batch behind the refused one", func() bool { return storeMetric(t, w.m.stored) == 200 })
	stop(context.Background())
	if got := storeMetric(t, w.m.rejected); got != 1 {
		t.Errorf("rejected segments = %v, want 1", got)
	}
	if m, _ := filepath.Glob(filepath.Join(cfg.SpoolDir, "*.rejected")); len(m) != 1 {
		t.Errorf("refused segment not kept: %v", m)
	}
	checkExactlyOnce(t, s, want)
	rep, err := Verify(t.Context(), s, VerifyOptions{Keys: testKeyring})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK || rep.Break.Seq != 201 || !strings.Contains(rep.Break.Reason, "rows 101..200 are missing") {
		t.Fatalf("Verify = %+v, want the gap of the refused batch", rep.Break)
	}
}

// TestWriterNoGoroutineLeak: Run's goroutines (loop, committer, replayer)
// are gone once Close and Run have returned.
func TestWriterNoGoroutineLeak(t *testing.T) {
	s := openSQLite(t, Config{})
	before := runtime.NumGoroutine()
	cfg := writerConfig(t)
	w, _, stop := startWriter(t, cfg, s)
	produce(t, w, 2, 2000, "leak", nil)
	stop(context.Background())
	servertest.WaitUntil(t, 30*time.Second, "the writer's goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}

// TestWriterChainFull: a batch that would take the chain past maxChainSeq
// (the seq bits of row ids) begins a new chain at seq 1 instead, so row ids
// stay unique; the new chain is stored, witnessed and verifies.
func TestWriterChainFull(t *testing.T) {
	s := openSQLite(t, Config{})
	cfg := writerConfig(t)
	cfg.BatchSize = 100
	w, _, stop := startWriter(t, cfg, s)
	full := w.ChainID()
	w.wmu.Lock()
	w.chain.seq = maxChainSeq - 50 // as if 2^32-51 rows had gone before
	w.wmu.Unlock()
	recs := genRecords(100, time.Now().Add(-time.Minute), "full")
	want := map[string]bool{}
	for _, r := range recs {
		want[r.RequestID] = true
	}
	if err := w.Enqueue(t.Context(), recs); err != nil {
		t.Fatal(err)
	}
	servertest.WaitUntil(t, 30*time.Second, "the batch to be durable", func() bool { return w.Head().Seq == 100 })
	stop(context.Background())
	if h := w.Head(); h.ChainID == full {
		t.Fatalf("head %+v is still on the full chain %q", h, full)
	}
	checkExactlyOnce(t, s, want)
	rep := checkVerifies(t, s, cfg.WitnessDir)
	if rep.Chains != 1 || rep.Witnessed != 1 || rep.Heads[0].ChainID == full || rep.Heads[0].Seq != 100 {
		t.Fatalf("Verify report = %+v, want one witnessed chain of 100 rows, not %q", rep, full)
	}
}
