package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/auditapi"
	"github.com/meshguard/meshguard/auditsink"
	"github.com/meshguard/meshguard/audittrail"
)

// auditConfig is the `audit:` section: one YAML section, three packages'
// parts (the trail's, promoted; ingest's rules; the admin API's token).
type auditConfig struct {
	audittrail.Config `yaml:",inline"`
	Ingest            auditsink.Config `yaml:",inline"`
	API               auditapi.Config  `yaml:",inline"`
}

func defaultAuditConfig() auditConfig {
	return auditConfig{Config: audittrail.DefaultConfig(), Ingest: auditsink.DefaultConfig(), API: auditapi.DefaultConfig()}
}

// Validate reports every invalid field of the section.
func (c auditConfig) Validate() error {
	return errors.Join(c.Config.Validate(), c.Ingest.Validate(), c.API.Validate())
}

// auditStore is what the binary needs of either audit store (PostgreSQL or
// the embedded SQLite file).
type auditStore interface {
	List(ctx context.Context, f audittrail.Filter, cur audittrail.Cursor, limit int) ([]audittrail.Record, audittrail.Cursor, error)
	Scan(ctx context.Context, f audittrail.Filter, fn func(*audittrail.Record) error) error
	HourlyCounts(ctx context.Context, f audittrail.Filter, by string) ([]audittrail.HourCount, error)
	Migrate(ctx context.Context) error
	Prune(ctx context.Context, now time.Time, keys *audittrail.Keyring) ([]string, error)
	RunRetention(ctx context.Context, keys *audittrail.Keyring) error
	Close()
}

// openAuditStore opens the PostgreSQL store on the shared pool when a
// database is configured, else the SQLite file at audit.sqlite_path, and
// says which ("postgres" or "sqlite"). It does not migrate.
func openAuditStore(ctx context.Context, log *slog.Logger, cfg audittrail.Config, db *database) (auditStore, string, error) {
	if db != nil {
		s, err := audittrail.OpenPostgres(ctx, log, db.pool.Pool(), cfg)
		if err != nil {
			return nil, "", fmt.Errorf("opening the PostgreSQL audit store: %w", err)
		}
		return s, "postgres", nil
	}
	s, err := audittrail.OpenSQLite(ctx, log, cfg.SQLitePath, cfg)
	if err != nil {
		return nil, "", fmt.Errorf("opening the SQLite audit store: %w", err)
	}
	return s, "sqlite", nil
}

// newAuditWriter builds the batch writer over store, which must be one of
// the two stores (the writer needs their unexported batch method).
func newAuditWriter(log *slog.Logger, reg prometheus.Registerer, cfg audittrail.Config, store auditStore, keys *audittrail.Keyring, opts ...audittrail.WriterOption) (*audittrail.Writer, error) {
	switch s := store.(type) {
	case *audittrail.PGStore:
		return audittrail.NewWriter(log, reg, cfg, s, keys, opts...)
	case *audittrail.SQLiteStore:
		return audittrail.NewWriter(log, reg, cfg, s, keys, opts...)
	}
	return nil, fmt.Errorf("audit store %T has no writer", store)
}

// migrateAtStartTimeout bounds the schema migration during start-up. When
// the database is not reachable yet, serve starts anyway (the writer
// spools) and the migration is retried in the background.
var (
	migrateAtStartTimeout = 10 * time.Second
	migrateRetryDelay     = time.Second // first retry; doubles up to a minute
)

// setupAuditsink builds the audit trail: the store (migrated at start), the
// writer that batches into it, the AccessLogService, POST /v1/csp-reports
// the admin API under /v1/audit and the audit console under /console/.
func setupAuditsink(ctx context.Context, a *app) (*component, error) {
	log := a.log.With("component", "auditsink")
	cfg := a.cfg.Audit
	store, kind, err := openAuditStore(ctx, log, cfg.Config, a.db)
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

	keys, err := audittrail.LoadKeyring(cfg.KeySource(), true)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("loading the audit key: %w", err)
	}
	if keys.Generated {
		// The public half only: it is what verifiers and collectors need.
		log.Warn("audit trail runs on a key generated in audit.spool_dir; configure audit.key_file or MESHGUARD_AUDIT_KEY from a Secret, and keep this public key to verify checkpoints",
			"key_id", keys.Current.ID(), "public_key", keys.Current.VerifierKey())
	} else {
		log.Info("audit signing key loaded", "key_id", keys.Current.ID(), "public_key", keys.Current.VerifierKey())
	}
	privileges := checkWriterPrivileges(ctx, log, store)
	writer, err := newAuditWriter(log, a.reg, cfg.Config, store, keys, audittrail.WithTracerProvider(a.tracerProvider()))
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("starting the audit writer: %w", err)
	}
	fail := func(err error) (*component, error) {
		writer.Close(ctx)
		store.Close()
		return nil, err
	}
	ingest := cfg.Ingest
	// A client is one client to ext_authz and to the CSP report limits.
	ingest.CSPReports.ClientIPHeader = a.cfg.Identity.ClientIPHeader
	ingest.CSPReports.IPv6Prefix = a.cfg.Identity.IPv6Prefix
	srv, err := auditsink.New(log, a.reg, ingest, writer)
	if err != nil {
		return fail(err)
	}
	api, err := auditapi.NewAPI(log.With("api", "admin"), a.reg, cfg.API, store, writer)
	if err != nil {
		return fail(err)
	}
	// The console is the admin API's web front end: same token, same
	// recording; off (503) while the API is.
	console, err := api.NewConsole(store, auditapi.ConsoleOptions{Secure: a.cfg.TLS.HTTP.Enabled(), Keys: keys,
		WitnessDir: cfg.WitnessDirectory(), CSPReportURI: "/v1/csp-reports"})
	if err != nil {
		return fail(err)
	}
	csp := srv.CSPReportHandler()
	checkpoints := audittrail.CheckpointsHandler(log, cfg.WitnessDirectory(), keys)
	return &component{
		name: "auditsink",
		grpc: srv.Register,
		http: func(mux *http.ServeMux) {
			mux.Handle("POST /v1/csp-reports", csp)
			mux.Handle("GET /v1/audit/checkpoints", checkpoints)
			api.Register(mux)
			console.Register(mux)
		},
		checks: []readinessCheck{
			// Reported, never takes the replica out: a database outage is
			// ridden out in the spool.
			{name: "audit", required: false, check: func(context.Context) dependencyStatus {
				st := writer.Status()
				ds := dependencyStatus{Healthy: st.LastError == "", Error: st.LastError, Details: auditDetails{
					Store: kind, WriterStatus: st, KeyID: keys.Current.ID(), PublicKey: keys.Current.VerifierKey(),
					GeneratedKey: keys.Generated, ExtraPrivileges: privileges}}
				if keys.Generated {
					ds.Error = "the audit trail runs on a generated key (configure audit.key_file or MESHGUARD_AUDIT_KEY)"
				}
				if st.CheckpointError != "" {
					// Rows go on being written; what is not checkpointed
					// can be truncated unseen, so say so loudly.
					ds.Healthy, ds.Error = false, "audit checkpoints not published: "+st.CheckpointError
				}
				if !migrated.done() {
					ds.Healthy, ds.Error = false, "audit schema not migrated yet"
				}
				return ds
			}},
			// Required: a full spool blocks or drops records, so the replica
			// must leave the rotation until it drains.
			{name: "audit_spool", required: true, check: func(context.Context) dependencyStatus {
				if err := writer.Ready(); err != nil {
					return dependencyStatus{Healthy: false, Error: err.Error()}
				}
				return dependencyStatus{Healthy: true}
			}},
		},
		run: func(ctx context.Context) error {
			var wg sync.WaitGroup
			var retErr error
			wg.Add(1)
			go func() {
				defer wg.Done()
				if !migrated.done() && !retryMigrate(ctx, log, store) {
					return
				}
				migrated.set()
				if err := store.RunRetention(ctx, keys); err != nil && ctx.Err() == nil {
					retErr = fmt.Errorf("audit retention: %w", err)
				}
			}()
			err := writer.Run(ctx)
			wg.Wait()
			return errors.Join(err, retErr)
		},
		shutdown: func(ctx context.Context) error {
			err := writer.Close(ctx)
			store.Close()
			return err
		},
	}, nil
}

// auditDetails is the audit entry's details in /readyz.
type auditDetails struct {
	Store string `json:"store"`
	audittrail.WriterStatus
	KeyID        string `json:"key_id"`
	PublicKey    string `json:"public_key"`
	GeneratedKey bool   `json:"generated_key"` // the key serve generated in the spool dir, not a configured one
	// ExtraPrivileges are what serve's database role may do to audit_logs
	// beyond INSERT and SELECT (it should be none: use meshguard_audit_writer).
	ExtraPrivileges []string `json:"extra_privileges,omitempty"`
}

// checkWriterPrivileges warns when serve's PostgreSQL role could rewrite
// the trail, and returns what it may do beyond INSERT and SELECT.
func checkWriterPrivileges(ctx context.Context, log *slog.Logger, store auditStore) []string {
	pg, ok := store.(*audittrail.PGStore)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, migrateAtStartTimeout)
	defer cancel()
	extra, err := pg.Privileges(ctx)
	if err != nil {
		log.Warn("could not read the audit role's privileges", "err", err)
		return nil
	}
	if len(extra) > 0 {
		log.Warn("serve's database role can rewrite the audit trail; connect as a role granted meshguard_audit_writer only (see `meshguard migrate`)",
			"privileges", extra)
	}
	return extra
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
	delay := migrateRetryDelay
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
