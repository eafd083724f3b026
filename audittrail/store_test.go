package audittrail

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/meshguard/meshguard/internal/pgtest"
)

var discardLog = func() *slog.Logger {
	if os.Getenv("AUDIT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}()

// testStore is a store under test with the handles tests need.
type testStore interface {
	recordReader
	chainReader
	BatchStore
	pruner
	Migrate(ctx context.Context) error
}

// openPG returns a migrated PGStore on a fresh database of srv, and its pool.
func openPG(t testing.TB, srv *pgtest.Server, cfg Config) (*PGStore, *pgxpool.Pool) {
	t.Helper()
	pool, err := pgxpool.New(t.Context(), srv.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	s, err := OpenPostgres(t.Context(), discardLog, pool, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	return s, pool
}

func openSQLite(t testing.TB, cfg Config) *SQLiteStore {
	t.Helper()
	s, err := OpenSQLite(t.Context(), discardLog, filepath.Join(t.TempDir(), "audit.db"), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	return s
}

// bothStores runs fn against a fresh PostgreSQL store and a fresh SQLite store.
func bothStores(t *testing.T, cfg Config, fn func(t *testing.T, s testStore)) {
	srv := pgtest.Start(t)
	t.Run("postgres", func(t *testing.T) {
		s, _ := openPG(t, srv, cfg)
		fn(t, s)
	})
	t.Run("sqlite", func(t *testing.T) { fn(t, openSQLite(t, cfg)) })
}

// genRecords returns n distinct records, one second apart from start.
func genRecords(n int, start time.Time, tag string) []Record {
	actions := []string{"LOGIN_FAILURE", "CREATE", "UPDATE", "PERMISSION_DENIED"}
	recs := make([]Record, n)
	for i := range recs {
		recs[i] = Record{
			CreatedAt:  start.Add(time.Duration(i) * time.Second),
			Action:     actions[i%len(actions)],
			Severity:   SeverityLow,
			EntityType: "invoice",
			EntityID:   fmt.Sprint(i % 10),
			UserID:     fmt.Sprintf("user-%d", i%7),
			IPAddress:  "10.0.0.1",
			UserAgent:  "curl/8",
			Method:     "POST",
			Path:       "/api/v1/invoices",
			Status:     200 + i%5,
			RequestID:  fmt.Sprintf("%s-%d", tag, i),
			Tenant:     []string{"", "t1"}[i%2],
			Metadata:   json.RawMessage(fmt.Sprintf(`{"n": %d, "b": "x", "a": [1, 2.50]}`, i)),
		}
	}
	return recs
}

func mustWrite(t testing.TB, s BatchStore, c *chain, recs []Record) {
	t.Helper()
	c.link(recs)
	dup, err := s.writeBatch(context.Background(), recs)
	if err != nil || dup {
		t.Fatalf("writeBatch: dup=%v err=%v", dup, err)
	}
}

func TestStoreListScan(t *testing.T) {
	bothStores(t, DefaultConfig(), func(t *testing.T, s testStore) {
		start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
		recs := genRecords(2500, start, "r")
		mustWrite(t, s, newChain("c1", testKey), recs)

		// Scan: everything ascending, exactly what was written.
		var got []Record
		if err := s.Scan(t.Context(), Filter{}, func(r *Record) error { got = append(got, *r); return nil }); err != nil {
			t.Fatal(err)
		}
		if len(got) != len(recs) {
			t.Fatalf("Scan: %d rows, want %d", len(got), len(recs))
		}
		for i := range got {
			if got[i].ID != rowID(got[0].ID>>idSeqBits, got[i].Seq) {
				t.Fatalf("row %d: id %d is not chain number << 32 | seq", i, got[i].ID)
			}
		}
		if d := cmp.Diff(recs, got); d != "" {
			t.Fatalf("Scan rows differ from written (-want +got):\n%s", d)
		}

		// List: keyset pages newest first under a filter.
		f := Filter{Actions: []string{"CREATE", "UPDATE"}, Tenant: "t1", From: start.Add(10 * time.Second), To: start.Add(2000 * time.Second)}
		var want []string
		for i := len(recs) - 1; i >= 0; i-- {
			r := recs[i]
			if (r.Action == "CREATE" || r.Action == "UPDATE") && r.Tenant == "t1" && !r.CreatedAt.Before(f.From) && r.CreatedAt.Before(f.To) {
				want = append(want, r.RequestID)
			}
		}
		var ids []string
		var cur Cursor
		for pages := 0; ; pages++ {
			page, next, err := s.List(t.Context(), f, cur, 100)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range page {
				ids = append(ids, r.RequestID)
			}
			if next == (Cursor{}) {
				break
			}
			cur = next
			if pages > 100 {
				t.Fatal("List does not end")
			}
		}
		if d := cmp.Diff(want, ids); d != "" {
			t.Fatalf("List (-want +got):\n%s", d)
		}

		cases := []struct {
			name string
			f    Filter
			want int
		}{
			{"user", Filter{UserID: "user-3"}, 357},
			{"entity", Filter{EntityType: "invoice", EntityID: "4"}, 250},
			{"status", Filter{Status: 204}, 500},
			{"severity none", Filter{Severity: SeverityHigh}, 0},
			{"to only", Filter{To: start.Add(100 * time.Second)}, 100},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				n := 0
				if err := s.Scan(t.Context(), tc.f, func(*Record) error { n++; return nil }); err != nil {
					t.Fatal(err)
				}
				if n != tc.want {
					t.Errorf("Scan(%+v) = %d rows, want %d", tc.f, n, tc.want)
				}
			})
		}
	})
}

func TestStoreDuplicateBatch(t *testing.T) {
	bothStores(t, DefaultConfig(), func(t *testing.T, s testStore) {
		start := time.Now().Add(-time.Hour)
		recs := genRecords(50, start, "d")
		mustWrite(t, s, newChain("dup", testKey), recs)
		dup, err := s.writeBatch(t.Context(), recs)
		if err != nil || !dup {
			t.Fatalf("second writeBatch of the same batch: dup=%v err=%v, want dup=true", dup, err)
		}
		// Same chain id and seqs, different rows: two writers claimed one
		// chain. That is not a replay and must not pass for stored. (In
		// PostgreSQL the unique key includes created_at, the partition key;
		// same-time rows collide, others would show as repeated seqs in
		// Verify. Chain ids carry the writer's start time, so two writers
		// never share one.)
		other := genRecords(50, start, "other")
		newChain("dup", testKey).link(other)
		if dup, err := s.writeBatch(t.Context(), other); !errors.Is(err, errChainConflict) || dup {
			t.Fatalf("conflicting batch: dup=%v err=%v, want errChainConflict", dup, err)
		}
		n := 0
		if err := s.Scan(t.Context(), Filter{}, func(*Record) error { n++; return nil }); err != nil {
			t.Fatal(err)
		}
		if n != 50 {
			t.Fatalf("%d rows after replaying a batch, want 50", n)
		}
	})
}

// TestStorePgBouncerMode: with the pool in exec mode (what database.pgbouncer
// selects: no server-side prepared statements), COPY and the reads work and
// leave no prepared statement behind on the connection.
func TestStorePgBouncerMode(t *testing.T) {
	srv := pgtest.Start(t)
	pcfg, err := pgxpool.ParseConfig(srv.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	pcfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
	pcfg.ConnConfig.StatementCacheCapacity = 0
	pcfg.ConnConfig.DescriptionCacheCapacity = 0
	pcfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(t.Context(), pcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	s, err := OpenPostgres(t.Context(), discardLog, pool, Config{PartitionsAhead: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, s, newChain("b", testKey), genRecords(1000, time.Now().Add(-time.Hour), "b"))
	recs, _, err := s.List(t.Context(), Filter{UserID: "user-1"}, Cursor{}, 10)
	if err != nil || len(recs) != 10 {
		t.Fatalf("List: %d rows, %v", len(recs), err)
	}
	checkVerifies(t, s)
	var prepared int
	if err := pool.QueryRow(t.Context(), "SELECT count(*) FROM pg_prepared_statements").Scan(&prepared); err != nil {
		t.Fatal(err)
	}
	if prepared != 0 {
		t.Fatalf("%d named prepared statements left on the connection, want 0", prepared)
	}
}
