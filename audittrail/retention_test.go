package audittrail

import (
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestPrune(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Retention = 60 * 24 * time.Hour
	now := time.Date(2026, 11, 15, 12, 0, 0, 0, time.UTC)
	freshStores(t, cfg, func(t *testing.T, mk func(t *testing.T) (testStore, execer)) {
		s, exec := mk(t)
		// July to November, one record every 40 minutes, with event times
		// out of seq order (every 5th record a day early), so month
		// boundaries cut the chain into interleaved runs.
		start := time.Date(2026, 7, 10, 0, 0, 0, 0, time.UTC)
		var recs []Record
		for ts := start; ts.Before(now); ts = ts.Add(40 * time.Minute) {
			r := genRecords(1, ts, "p")[0]
			r.RequestID = ts.Format(time.RFC3339)
			if len(recs)%5 == 0 {
				r.CreatedAt = r.CreatedAt.Add(-24 * time.Hour)
			}
			recs = append(recs, r)
		}
		c := newChain("p", testKey)
		for b := range slices.Chunk(recs, 1000) {
			mustWrite(t, s, c, b)
		}
		before := checkVerifies(t, s)

		dropped, err := s.Prune(t.Context(), now, testKeyring)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{"audit_logs_p202607", "audit_logs_p202608"}
		if !slices.Equal(dropped, want) {
			t.Fatalf("Prune dropped %v, want %v", dropped, want)
		}
		cutoff := time.Date(2026, 9, 1, 0, 0, 0, 0, time.UTC)
		kept := 0
		for _, r := range recs {
			if !r.CreatedAt.Before(cutoff) {
				kept++
			}
		}
		after := checkVerifies(t, s)
		if after.Rows != int64(kept) || after.Pruned != before.Rows-int64(kept) {
			t.Fatalf("after prune: %d rows, %d pruned; want %d rows, %d pruned", after.Rows, after.Pruned, kept, before.Rows-int64(kept))
		}
		if again, err := s.Prune(t.Context(), now, testKeyring); err != nil || len(again) != 0 {
			t.Fatalf("second Prune = %v, %v; want nothing", again, err)
		}

		// The checkpoints are evidence too: altering one's note breaks
		// verification.
		exec(t, "UPDATE audit_chain_checkpoints SET note = replace(note, 'partition', 'partitioN') WHERE first_seq = (SELECT max(first_seq) FROM audit_chain_checkpoints)")
		rep, err := Verify(t.Context(), s, VerifyOptions{Keys: testKeyring})
		if err != nil {
			t.Fatal(err)
		}
		if rep.OK || !strings.Contains(rep.Break.Reason, "retention checkpoint does not verify") {
			t.Fatalf("Verify after altering a checkpoint = %+v, want a break", rep.Break)
		}
	})
}

func TestRetentionLoop(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	var calls atomic.Int32
	done := make(chan error)
	go func() {
		done <- retentionLoop(ctx, discardLog, 5*time.Millisecond, func(context.Context, time.Time) error {
			if calls.Add(1) == 3 {
				cancel()
			}
			return context.DeadlineExceeded // failures are logged, the loop goes on
		})
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if calls.Load() < 3 {
		t.Fatalf("step ran %d times, want 3", calls.Load())
	}
}

func TestPruneCutoff(t *testing.T) {
	cases := []struct {
		now       string
		retention time.Duration
		want      string
	}{
		{"2026-11-15T12:00:00Z", 60 * 24 * time.Hour, "2026-09-01T00:00:00Z"},
		{"2026-03-01T00:00:00Z", 24 * time.Hour, "2026-02-01T00:00:00Z"},
		{"2026-01-31T23:00:00Z", 8760 * time.Hour, "2025-01-01T00:00:00Z"},
	}
	for _, tc := range cases {
		t.Run(tc.now, func(t *testing.T) {
			now, _ := time.Parse(time.RFC3339, tc.now)
			if got := pruneCutoff(now, tc.retention).Format(time.RFC3339); got != tc.want {
				t.Errorf("pruneCutoff = %s, want %s", got, tc.want)
			}
		})
	}
}

// TestPruneRefusesWhatItCannotVouchFor: the pruner signs retention
// checkpoints only for rows whose MACs it checked, so a row an insider
// edited (or one MAC'd with a key it does not hold) stops the prune: nothing
// is dropped, no checkpoint is recorded, and verify still shows the edit.
func TestPruneRefusesWhatItCannotVouchFor(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Retention = 60 * 24 * time.Hour
	now := time.Date(2026, 11, 15, 12, 0, 0, 0, time.UTC)
	freshStores(t, cfg, func(t *testing.T, mk func(t *testing.T) (testStore, execer)) {
		s, exec := mk(t)
		c := newChain("refuse", testKey)
		mustWrite(t, s, c, genRecords(100, time.Date(2026, 7, 10, 0, 0, 0, 0, time.UTC), "old"))
		mustWrite(t, s, c, genRecords(100, time.Date(2026, 10, 10, 0, 0, 0, 0, time.UTC), "kept"))
		checkVerifies(t, s)
		unchanged := func(t *testing.T) {
			t.Helper()
			n := 0
			if err := s.Scan(t.Context(), Filter{}, func(*Record) error { n++; return nil }); err != nil {
				t.Fatal(err)
			}
			notes, err := s.retentionNotes(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if n != 200 || len(notes) != 0 {
				t.Fatalf("after a refused prune: %d rows, %d retention checkpoints; want 200 and none", n, len(notes))
			}
		}

		// A key that is not the rows': nothing it could vouch for.
		other, err := LoadKeyring(KeySource{Key: func() string { k, _, _ := GenerateKey("other"); return k }()}, false)
		if err != nil {
			t.Fatal(err)
		}
		if dropped, err := s.Prune(t.Context(), now, other); err == nil || !strings.Contains(err.Error(), "which is not configured") || len(dropped) != 0 {
			t.Fatalf("Prune with another key = %v, %v; want a refusal naming the key", dropped, err)
		}
		unchanged(t)

		// An edited old row.
		exec(t, "UPDATE audit_logs SET status = 500 WHERE chain_id = ? AND seq = 50", "refuse")
		if dropped, err := s.Prune(t.Context(), now, testKeyring); err == nil || !strings.Contains(err.Error(), "MAC does not verify") || len(dropped) != 0 {
			t.Fatalf("Prune over an edited row = %v, %v; want a refusal", dropped, err)
		}
		unchanged(t)
		rep, err := Verify(t.Context(), s, VerifyOptions{Keys: testKeyring})
		if err != nil {
			t.Fatal(err)
		}
		if rep.OK || rep.Break.Seq != 50 || !strings.Contains(rep.Break.Reason, "MAC does not verify") {
			t.Fatalf("Verify after a refused prune = %+v, want the edit at seq 50", rep.Break)
		}
	})
}
