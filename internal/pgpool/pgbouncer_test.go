package pgpool

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/meshguard/meshguard/internal/pgtest"
)

// startPgBouncer runs a real PgBouncer in transaction mode in front of pg
// and returns it.
func startPgBouncer(t *testing.T) *pgtest.PgBouncer { return pgtest.StartPgBouncer(t, pg) }

// bouncerURL is a fresh database on pg, reached through PgBouncer.
func bouncerURL(t *testing.T, b *pgtest.PgBouncer) string { return b.URL(t, pg.NewDatabase(t)) }

// TestRealPgBouncer: through a real PgBouncer in transaction mode, pgx's
// default statement cache collides (42P05) and a statement_timeout startup
// parameter is refused; PgBouncer mode runs concurrent queries with
// arguments, transactions and the audit sink's COPY cleanly and leaves no
// prepared statement on the shared server session.
func TestRealPgBouncer(t *testing.T) {
	needPG(t)
	bouncer := startPgBouncer(t)

	t.Run("normal mode collides", func(t *testing.T) {
		cfg := testConfig(bouncerURL(t, bouncer))
		cfg.Pool.StatementTimeout = 0
		cfg.Pool.MaxConns = 2
		p, _ := open(t, cfg, nil)
		<-p.done
		c1, err := p.Pool().Acquire(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		defer c1.Release()
		c2, err := p.Pool().Acquire(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Release()
		if _, err := c1.Exec(t.Context(), "SELECT $1::int", 1); err != nil {
			t.Fatal(err)
		}
		_, err = c2.Exec(t.Context(), "SELECT $1::int", 2)
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42P05" {
			t.Fatalf("second client's cached statement: err = %v, want 42P05 (already exists)", err)
		}
	})

	t.Run("statement_timeout refused", func(t *testing.T) {
		cfg := testConfig(bouncerURL(t, bouncer))
		cfg.Startup.Attempts = 0
		p, _ := open(t, cfg, nil)
		h := p.Health(t.Context())
		if h.Err == nil || !strings.Contains(h.Err.Error(), "statement_timeout") {
			t.Fatalf("Health = %+v, want PgBouncer to refuse statement_timeout", h)
		}
		if !strings.Contains(h.Err.Error(), "unsupported startup parameter") {
			t.Errorf("Health error = %v", h.Err)
		}
	})

	t.Run("pgbouncer mode", func(t *testing.T) {
		cfg := testConfig(bouncerURL(t, bouncer))
		cfg.PgBouncer = true
		cfg.Pool.MaxConns = 4
		p, _ := open(t, cfg, nil)
		if h := p.Health(t.Context()); h.Err != nil {
			t.Fatal(h.Err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for w := range 8 {
			wg.Go(func() {
				for i := range 8 {
					var n int
					if err := p.Pool().QueryRow(t.Context(), "SELECT $1::int * $2::int", w, i).Scan(&n); err != nil || n != w*i {
						errs <- fmt.Errorf("worker %d: %d, %v", w, n, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if n := preparedStatements(t, p); n != 0 {
			t.Errorf("%d prepared statements on the server session behind PgBouncer", n)
		}
	})
}
