package auditsink

import (
	"context"
	"database/sql"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/meshguard/meshguard/internal/pgtest"
)

// execer runs tampering SQL against a store's database, as an attacker with
// write access to the table would.
type execer func(t testing.TB, q string, args ...any)

// freshStores calls fn once per store kind with a constructor of fresh
// stores and a way to run raw SQL on the store it made.
func freshStores(t *testing.T, cfg Config, fn func(t *testing.T, mk func(t *testing.T) (testStore, execer))) {
	srv := pgtest.Start(t)
	t.Run("postgres", func(t *testing.T) {
		fn(t, func(t *testing.T) (testStore, execer) {
			s, pool := openPG(t, srv, cfg)
			return s, pgExec(pool)
		})
	})
	t.Run("sqlite", func(t *testing.T) {
		fn(t, func(t *testing.T) (testStore, execer) {
			s := openSQLite(t, cfg)
			return s, sqliteExec(s.db)
		})
	})
}

func pgExec(pool *pgxpool.Pool) execer {
	return func(t testing.TB, q string, args ...any) {
		t.Helper()
		q = strings.ReplaceAll(q, "?", "$1")
		if _, err := pool.Exec(context.Background(), q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

func sqliteExec(db *sql.DB) execer {
	return func(t testing.TB, q string, args ...any) {
		t.Helper()
		if _, err := db.Exec(q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

// rowBySeq reads one row of chain c.
func rowBySeq(t testing.TB, s testStore, c string, seq int64) Record {
	t.Helper()
	var out []Record
	if err := s.scanChain(context.Background(), c, seq-1, seq, func(r *Record) error { out = append(out, *r); return nil }); err != nil || len(out) != 1 {
		t.Fatalf("reading seq %d: %v (%d rows)", seq, err, len(out))
	}
	return out[0]
}

func TestVerifyDetectsTampering(t *testing.T) {
	const n = 3000
	cases := []struct {
		name    string
		tamper  func(t *testing.T, s testStore, exec execer) []ChainHead
		wantSeq int64
		want    string // substring of the reason; "" means Verify passes
	}{
		{name: "untouched"},
		{
			name: "row modified",
			tamper: func(t *testing.T, s testStore, exec execer) []ChainHead {
				exec(t, "UPDATE audit_logs SET status = 500 WHERE seq = 1234")
				return nil
			},
			wantSeq: 1234, want: "row modified",
		},
		{
			name: "metadata modified",
			tamper: func(t *testing.T, s testStore, exec execer) []ChainHead {
				exec(t, `UPDATE audit_logs SET metadata = NULL WHERE seq = 77`)
				return nil
			},
			wantSeq: 77, want: "row modified",
		},
		{
			name: "row deleted",
			tamper: func(t *testing.T, s testStore, exec execer) []ChainHead {
				exec(t, "DELETE FROM audit_logs WHERE seq = 1500")
				return nil
			},
			wantSeq: 1501, want: "rows 1500..1500 are missing",
		},
		{
			name: "first row deleted",
			tamper: func(t *testing.T, s testStore, exec execer) []ChainHead {
				exec(t, "DELETE FROM audit_logs WHERE seq = 1")
				return nil
			},
			wantSeq: 2, want: "rows 1..1 are missing",
		},
		{
			name: "rows reordered",
			tamper: func(t *testing.T, s testStore, exec execer) []ChainHead {
				exec(t, "UPDATE audit_logs SET seq = -10 WHERE seq = 10")
				exec(t, "UPDATE audit_logs SET seq = 10 WHERE seq = 11")
				exec(t, "UPDATE audit_logs SET seq = 11 WHERE seq = -10")
				return nil
			},
			wantSeq: 10, want: "row modified",
		},
		{
			name: "row modified and rehashed",
			tamper: func(t *testing.T, s testStore, exec execer) []ChainHead {
				r := rowBySeq(t, s, "c", 2000)
				r.Status = 201
				h, _ := rowHash(&r, nil)
				exec(t, "UPDATE audit_logs SET status = 201 WHERE seq = 2000")
				exec(t, "UPDATE audit_logs SET hash = ? WHERE seq = 2000", h)
				return nil
			},
			wantSeq: 2001, want: "prev_hash does not match",
		},
		{
			name: "tail deleted, caught by the published head",
			tamper: func(t *testing.T, s testStore, exec execer) []ChainHead {
				head := rowBySeq(t, s, "c", n)
				exec(t, "DELETE FROM audit_logs WHERE seq > 2990")
				return []ChainHead{{ChainID: "c", Seq: n, Hash: head.Hash}}
			},
			wantSeq: n, want: "published head seq 3000 is missing",
		},
		{
			name: "whole chain rewritten, caught by the published head",
			tamper: func(t *testing.T, s testStore, exec execer) []ChainHead {
				head := rowBySeq(t, s, "c", n)
				exec(t, "DELETE FROM audit_logs")
				recs := genRecords(n, time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC), "forged")
				newChain("c").link(recs)
				if _, err := s.writeBatch(context.Background(), recs); err != nil {
					t.Fatal(err)
				}
				return []ChainHead{{ChainID: "c", Seq: n, Hash: head.Hash}}
			},
			wantSeq: n, want: "differs from the published chain head",
		},
	}
	freshStores(t, Config{}, func(t *testing.T, mk func(t *testing.T) (testStore, execer)) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				s, exec := mk(t)
				mustWrite(t, s, newChain("c"), genRecords(n, time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC), "v"))
				var heads []ChainHead
				if tc.tamper != nil {
					heads = tc.tamper(t, s, exec)
				}
				rep, err := VerifyHeads(t.Context(), s, time.Time{}, time.Time{}, heads)
				if err != nil {
					t.Fatal(err)
				}
				if tc.want == "" {
					if !rep.OK || rep.Rows != n {
						t.Fatalf("Verify = %+v, want OK over %d rows", rep, n)
					}
					return
				}
				if rep.OK || rep.Break == nil {
					t.Fatalf("Verify passed after tampering: %+v", rep)
				}
				if rep.Break.Seq != tc.wantSeq || !strings.Contains(rep.Break.Reason, tc.want) {
					t.Fatalf("Verify break = %v, want seq %d with %q", rep.Break, tc.wantSeq, tc.want)
				}
			})
		}
	})
}

func TestVerifyWindow(t *testing.T) {
	bothStores(t, Config{}, func(t *testing.T, s testStore) {
		start := time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC)
		recs := genRecords(2000, start, "w")
		// Event times are not monotonic in seq: streams deliver out of order.
		for i := range recs {
			if i%7 == 0 {
				recs[i].CreatedAt = recs[i].CreatedAt.Add(-30 * time.Second)
			}
		}
		mustWrite(t, s, newChain("w"), recs)
		rep, err := Verify(t.Context(), s, start.Add(500*time.Second), start.Add(1500*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if !rep.OK || rep.Rows < 1000 || rep.Rows > 1040 {
			t.Fatalf("windowed Verify = %+v, want OK over about 1000 rows", rep)
		}
	})
}

func TestReadChainHeads(t *testing.T) {
	cfg := writerConfig(t)
	cfg.ChainHeadFile = t.TempDir() + "/heads.jsonl"
	s := openSQLite(t, Config{})
	w, _, stop := startWriter(t, cfg, s)
	for i := range 3 {
		if err := w.Enqueue(t.Context(), genRecords(10, time.Now(), string(rune('a'+i)))); err != nil {
			t.Fatal(err)
		}
		storeWaitUntil(t, "the head to be published", func() bool {
			heads, _ := ReadChainHeads(cfg.ChainHeadFile)
			return len(heads) == 1 && heads[0].Seq == int64(10*(i+1))
		})
	}
	stop(context.Background())
	heads, err := ReadChainHeads(cfg.ChainHeadFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(heads) != 1 || heads[0].ChainID != w.ChainID() || heads[0].Seq != 30 {
		t.Fatalf("heads = %+v, want one head at seq 30 of %s", heads, w.ChainID())
	}
	rep, err := VerifyHeads(t.Context(), s, time.Time{}, time.Time{}, heads)
	if err != nil || !rep.OK {
		t.Fatalf("VerifyHeads = %+v, %v", rep, err)
	}
}
