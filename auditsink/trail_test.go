package auditsink

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/audittrail"
	"github.com/meshguard/meshguard/internal/pgtest"
)

// The ingest tests' handles on the real trail, through its exported API.

// trailStore is either store of the trail.
type trailStore interface {
	audittrail.BatchStore
	Scan(ctx context.Context, f audittrail.Filter, fn func(*audittrail.Record) error) error
}

// testKeys is a signing key for the writers these tests start.
var testKeys = func() *audittrail.Keyring {
	skey, _, err := audittrail.GenerateKey("ingest-test")
	if err != nil {
		panic(err)
	}
	kr, err := audittrail.LoadKeyring(audittrail.KeySource{Key: skey}, false)
	if err != nil {
		panic(err)
	}
	return kr
}()

// openTrailPG returns a migrated PostgreSQL store on a fresh database of srv.
func openTrailPG(t testing.TB, srv *pgtest.Server) (*audittrail.PGStore, *pgxpool.Pool) {
	t.Helper()
	pool, err := pgxpool.New(t.Context(), srv.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	cfg := audittrail.DefaultConfig()
	cfg.PartitionsAhead = 1
	s, err := audittrail.OpenPostgres(t.Context(), discardLogger(), pool, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	return s, pool
}

// trailStores runs fn against a fresh PostgreSQL store and a fresh SQLite store.
func trailStores(t *testing.T, fn func(t *testing.T, s trailStore)) {
	srv := pgtest.Start(t)
	t.Run("postgres", func(t *testing.T) {
		s, _ := openTrailPG(t, srv)
		fn(t, s)
	})
	t.Run("sqlite", func(t *testing.T) {
		s, err := audittrail.OpenSQLite(t.Context(), discardLogger(), filepath.Join(t.TempDir(), "audit.db"), audittrail.DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		if err := s.Migrate(t.Context()); err != nil {
			t.Fatal(err)
		}
		fn(t, s)
	})
}

// startTrailWriter runs a Writer over s with its own spool; stop closes it
// within ctx and ends its Run loop.
func startTrailWriter(t testing.TB, s audittrail.BatchStore) (*audittrail.Writer, func(ctx context.Context)) {
	t.Helper()
	cfg := audittrail.DefaultConfig()
	cfg.SpoolDir = filepath.Join(t.TempDir(), "spool")
	cfg.BatchInterval = 20 * time.Millisecond
	cfg.WriteTimeout = 2 * time.Second // Close writes directly while its deadline leaves this much
	w, err := audittrail.NewWriter(discardLogger(), prometheus.NewRegistry(), cfg, s, testKeys)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	stopped := false
	stop := func(cctx context.Context) {
		if stopped {
			return
		}
		stopped = true
		if err := w.Close(cctx); err != nil {
			t.Errorf("Close: %v", err)
		}
		cancel()
		<-done
	}
	t.Cleanup(func() { stop(context.Background()) })
	return w, stop
}
