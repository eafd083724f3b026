package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/meshguard/meshguard/auditsink"
)

// auditStore is what the binary needs of either audit store (PostgreSQL or
// the embedded SQLite file).
type auditStore interface {
	List(ctx context.Context, f auditsink.Filter, cur auditsink.Cursor, limit int) ([]auditsink.Record, auditsink.Cursor, error)
	Scan(ctx context.Context, f auditsink.Filter, fn func(*auditsink.Record) error) error
	Migrate(ctx context.Context) error
	Prune(ctx context.Context, now time.Time) ([]string, error)
	RunRetention(ctx context.Context) error
	Close()
}

// openAuditStore opens the PostgreSQL store on the shared pool when a
// database is configured, else the SQLite file at audit.sqlite_path. It
// does not migrate.
func openAuditStore(ctx context.Context, log *slog.Logger, cfg auditsink.Config, db *database) (auditStore, string, error) {
	if db != nil {
		s, err := auditsink.OpenPostgres(ctx, log, db.pool.Pool(), cfg)
		if err != nil {
			return nil, "", fmt.Errorf("opening the PostgreSQL audit store: %w", err)
		}
		return s, "postgres", nil
	}
	s, err := auditsink.OpenSQLite(ctx, log, cfg.SQLitePath, cfg)
	if err != nil {
		return nil, "", fmt.Errorf("opening the SQLite audit store: %w", err)
	}
	return s, "sqlite", nil
}

// migrateAtStartTimeout bounds the schema migration during start-up. When
// the database is not reachable yet, serve starts anyway (the writer
// spools) and the migration is retried in the background.
const migrateAtStartTimeout = 10 * time.Second

// setupAuditsink builds the audit trail: the store (migrated at start), the
// writer that batches into it, the AccessLogService, POST /v1/csp-reports
// and the admin API under /v1/audit.
func setupAuditsink(ctx context.Context, a *app) (*component, error) {
	log := a.log.With("component", "auditsink")
	cfg := a.cfg.Audit
	store, kind, err := openAuditStore(ctx, log, cfg, a.db)
	if err != nil {
		return nil, err
	}
	migrated := &migrationState{}
	mctx, cancel := context.WithTimeout(ctx, migrateAtStartTimeout)
	err = store.Migrate(mctx)
	cancel()
	if err != nil {
		if kind == "sqlite" {
			store.Close()
			return nil, fmt.Errorf("migrating the audit store: %w", err)
		}
		log.Error("audit schema migration failed at start; retrying in the background", "err", err)
	} else {
		migrated.set()
	}

	sink, err := newAuditWriter(log, a, cfg, store)
	if err != nil {
		store.Close()
		return nil, err
	}
	srv, err := auditsink.New(log, a.reg, cfg, sink)
	if err != nil {
		sink.close(ctx)
		store.Close()
		return nil, err
	}
	api, err := auditsink.NewAPI(log.With("api", "admin"), a.reg, cfg, store, sink)
	if err != nil {
		sink.close(ctx)
		store.Close()
		return nil, err
	}
	csp := srv.CSPReportHandler()
	return &component{
		name: "auditsink",
		grpc: srv.Register,
		http: func(mux *http.ServeMux) {
			mux.Handle("POST /v1/csp-reports", csp)
			api.Register(mux)
		},
		checks: []readinessCheck{{name: "audit", required: false, check: func(ctx context.Context) dependencyStatus {
			st := sink.status(ctx)
			if !migrated.done() {
				st.Healthy = false
				st.Error = "audit schema not migrated yet"
			}
			return st
		}}},
		run: func(ctx context.Context) error {
			var wg sync.WaitGroup
			errc := make(chan error, 2)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if !migrated.done() && !retryMigrate(ctx, log, store) {
					return
				}
				migrated.set()
				if err := store.RunRetention(ctx); err != nil && ctx.Err() == nil {
					errc <- fmt.Errorf("audit retention: %w", err)
				}
			}()
			err := sink.run(ctx)
			wg.Wait()
			close(errc)
			return errors.Join(err, <-errc)
		},
		shutdown: func(ctx context.Context) error {
			err := sink.close(ctx)
			store.Close()
			return err
		},
	}, nil
}

// migrationState records whether the schema is in place.
type migrationState struct {
	mu sync.Mutex
	ok bool
}

func (m *migrationState) set() { m.mu.Lock(); m.ok = true; m.mu.Unlock() }

func (m *migrationState) done() bool { m.mu.Lock(); defer m.mu.Unlock(); return m.ok }

// retryMigrate retries the migration with backoff until it succeeds (true)
// or ctx is done (false).
func retryMigrate(ctx context.Context, log *slog.Logger, store auditStore) bool {
	delay := time.Second
	for {
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
		mctx, cancel := context.WithTimeout(ctx, migrateAtStartTimeout)
		err := store.Migrate(mctx)
		cancel()
		if err == nil {
			log.Info("audit schema migrated")
			return true
		}
		log.Error("audit schema migration failed; retrying", "err", err, "retry_in", delay)
		delay = min(2*delay, time.Minute)
	}
}

// auditWriter is the record sink serve runs: Enqueue for the ALS server,
// CSP reports and the admin API; run until ctx is done; close to drain.
type auditWriter struct {
	enqueue func(ctx context.Context, recs []auditsink.Record) error
	run     func(ctx context.Context) error
	close   func(ctx context.Context) error
	status  func(ctx context.Context) dependencyStatus
}

// Enqueue implements the auditsink record sink.
func (w *auditWriter) Enqueue(ctx context.Context, recs []auditsink.Record) error {
	return w.enqueue(ctx, recs)
}

// errWriterMissing is returned while auditsink has no batch writer.
var errWriterMissing = errors.New("audit writer not available in this build")

// newAuditWriter builds the batch writer over store.
//
// TODO(wiring): auditsink.NewWriter(log, reg, cfg, store) is not in the tree
// yet; until it is, records are refused with errWriterMissing (the ALS
// server counts them, the CSP endpoint and the admin API answer 503), and
// /readyz reports the audit dependency unhealthy.
func newAuditWriter(_ *slog.Logger, _ *app, _ auditsink.Config, _ auditStore) (*auditWriter, error) {
	return &auditWriter{
		enqueue: func(context.Context, []auditsink.Record) error { return errWriterMissing },
		run:     func(ctx context.Context) error { <-ctx.Done(); return nil },
		close:   func(context.Context) error { return nil },
		status: func(context.Context) dependencyStatus {
			return dependencyStatus{Healthy: false, Error: errWriterMissing.Error()}
		},
	}, nil
}
