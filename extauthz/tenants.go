package extauthz

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// maxTenantRows bounds one reload; rows past it are ignored (and logged).
const maxTenantRows = 100_000

// dbStepTimeout bounds each database step (schema, reload, LISTEN), so a
// database that hangs instead of failing cannot stall the watcher.
const dbStepTimeout = 30 * time.Second

// TenantStore keeps the per-tenant origin lists of a PostgreSQL table in
// memory: it creates the table (and a NOTIFY trigger) if missing, LISTENs on
// a dedicated connection and reloads on every change, reloads the whole table
// periodically as well, and keeps serving the last good copy while the
// database is unreachable. Lookups are lock-free and safe for concurrent use.
type TenantStore struct {
	log     *slog.Logger
	pool    *pgxpool.Pool
	connect func(context.Context) (*pgx.Conn, error)
	table   string // sanitized, possibly schema-qualified
	channel string // sanitized NOTIFY channel
	chanRaw string
	lockKey int64
	reload  time.Duration
	// allowNull: "null" rows are accepted only without credentials.
	allowNull bool
	// backoff bounds reconnect waits; tests shorten it.
	minBackoff, maxBackoff time.Duration

	cur atomic.Pointer[tenantSnapshot]

	mu        sync.Mutex
	lastErr   error
	lastOK    time.Time
	listening bool
	schemaOK  bool

	mReloads   [2]prometheus.Counter // ok, error
	mOrigins   prometheus.Gauge
	mInvalid   prometheus.Gauge
	mLastWrite prometheus.Gauge
}

type tenantSnapshot struct {
	byTenant map[string]*originSet
	rows     int
	invalid  int
}

// NewTenantStore returns a store for cfg.TenantsTable. pool runs queries;
// connect opens the dedicated LISTEN connection (it must bypass PgBouncer
// transaction pooling); nil means no listener, only periodic reloads. Nothing touches the database until Load or Run.
func NewTenantStore(log *slog.Logger, reg prometheus.Registerer, cfg CORSConfig, pool *pgxpool.Pool, connect func(context.Context) (*pgx.Conn, error)) (*TenantStore, error) {
	parts, err := tableIdent(cfg.TenantsTable)
	if err != nil {
		return nil, fmt.Errorf("cors.tenants_table: %q %w", cfg.TenantsTable, err)
	}
	if cfg.TenantsReload <= 0 {
		return nil, fmt.Errorf("cors.tenants_reload: must be positive, got %s", cfg.TenantsReload)
	}
	chanRaw := "meshguard_" + strings.Join(parts, "_")
	if len(chanRaw) > 63 {
		chanRaw = chanRaw[:63]
	}
	h := fnv.New64a()
	h.Write([]byte("meshguard extauthz schema " + cfg.TenantsTable))
	t := &TenantStore{
		log: log, pool: pool, connect: connect,
		table:      pgx.Identifier(parts).Sanitize(),
		channel:    pgx.Identifier{chanRaw}.Sanitize(),
		chanRaw:    chanRaw,
		lockKey:    int64(h.Sum64()),
		reload:     cfg.TenantsReload,
		allowNull:  !cfg.AllowCredentials,
		minBackoff: 250 * time.Millisecond,
		maxBackoff: 30 * time.Second,
	}
	t.cur.Store(&tenantSnapshot{})
	rv := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshguard_extauthz_tenant_reloads_total",
		Help: "Reloads of the tenant origin table by result (ok, error).",
	}, []string{"result"})
	t.mReloads[0], t.mReloads[1] = rv.WithLabelValues("ok"), rv.WithLabelValues("error")
	t.mOrigins = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshguard_extauthz_tenant_origins",
		Help: "Tenant origin rows currently loaded from the database.",
	})
	t.mInvalid = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshguard_extauthz_tenant_origins_invalid",
		Help: "Tenant origin rows ignored at the last reload because they do not parse.",
	})
	t.mLastWrite = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshguard_extauthz_tenant_last_reload_timestamp_seconds",
		Help: "Unix time of the last successful tenant origin reload.",
	})
	if err := reg.Register(rv); err != nil {
		return nil, fmt.Errorf("registering tenant metrics: %w", err)
	}
	for _, c := range []prometheus.Collector{t.mOrigins, t.mInvalid, t.mLastWrite} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering tenant metrics: %w", err)
		}
	}
	return t, nil
}

// lookup returns the database origins of tenant, nil when none. Safe on a
// nil store.
func (t *TenantStore) lookup(tenant string) *originSet {
	if t == nil {
		return nil
	}
	return t.cur.Load().byTenant[tenant]
}

// EnsureSchema creates the table, the notify function and the trigger if
// missing. It is idempotent and safe when several replicas start at once.
func (t *TenantStore) EnsureSchema(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, dbStepTimeout)
	defer cancel()
	tx, err := t.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("creating tenant origin table: begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	stmts := []string{
		`SELECT pg_advisory_xact_lock($1)`,
		`CREATE TABLE IF NOT EXISTS ` + t.table + ` (
			tenant     text NOT NULL CHECK (length(tenant) BETWEEN 1 AND 253),
			origin     text NOT NULL CHECK (length(origin) BETWEEN 1 AND 512),
			created_at timestamptz NOT NULL DEFAULT now(),
			PRIMARY KEY (tenant, origin))`,
		`CREATE OR REPLACE FUNCTION meshguard_notify_tenant_origins() RETURNS trigger
			LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$`,
		`DROP TRIGGER IF EXISTS meshguard_notify ON ` + t.table,
		`CREATE TRIGGER meshguard_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON ` + t.table +
			` FOR EACH STATEMENT EXECUTE FUNCTION meshguard_notify_tenant_origins('` + t.chanRaw + `')`,
	}
	for i, q := range stmts {
		var args []any
		if i == 0 {
			args = []any{t.lockKey}
		}
		if _, err := tx.Exec(ctx, q, args...); err != nil {
			return fmt.Errorf("creating tenant origin table %s: %w", t.table, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("creating tenant origin table: commit: %w", err)
	}
	t.mu.Lock()
	t.schemaOK = true
	t.mu.Unlock()
	return nil
}

// Load re-reads the whole table and swaps it in. On error the previous copy
// stays in use.
func (t *TenantStore) Load(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, dbStepTimeout)
	defer cancel()
	err := t.load(ctx)
	t.mu.Lock()
	t.lastErr = err
	if err == nil {
		t.lastOK = time.Now()
		// The table is usable: if creating it failed (a role without
		// CREATE, a table made by a migration), trying again will not help.
		t.schemaOK = true
	}
	t.mu.Unlock()
	if err != nil {
		t.mReloads[1].Inc()
		return err
	}
	t.mReloads[0].Inc()
	return nil
}

func (t *TenantStore) load(ctx context.Context) error {
	rows, err := t.pool.Query(ctx, `SELECT tenant, origin FROM `+t.table+` ORDER BY tenant, origin LIMIT $1`, maxTenantRows+1)
	if err != nil {
		return fmt.Errorf("loading tenant origins: %w", err)
	}
	defer rows.Close()
	snap := &tenantSnapshot{byTenant: make(map[string]*originSet)}
	var firstBad string
	var tenant, org string
	for rows.Next() {
		if err := rows.Scan(&tenant, &org); err != nil {
			return fmt.Errorf("loading tenant origins: scanning: %w", err)
		}
		if snap.rows++; snap.rows > maxTenantRows {
			t.log.Warn("tenant origin table has more rows than meshguard loads; the rest are ignored", "limit", maxTenantRows)
			snap.rows--
			break
		}
		set := snap.byTenant[tenant]
		if set == nil {
			set = &originSet{}
		}
		if !validTenant(tenant) {
			err = errors.New("tenant id must be 1-253 visible ASCII characters")
		} else {
			err = set.add(org, t.allowNull, false)
		}
		if err != nil {
			snap.invalid++
			if firstBad == "" {
				firstBad = fmt.Sprintf("tenant %q origin %q: %v", tenant, org, err)
			}
			continue
		}
		snap.byTenant[tenant] = set
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("loading tenant origins: %w", err)
	}
	if snap.invalid > 0 {
		t.log.Warn("ignoring invalid tenant origin rows", "table", t.table, "count", snap.invalid, "first", firstBad)
	}
	t.cur.Store(snap)
	t.mOrigins.Set(float64(snap.rows - snap.invalid))
	t.mInvalid.Set(float64(snap.invalid))
	t.mLastWrite.Set(float64(time.Now().Unix()))
	return nil
}

// Run keeps the copy current until ctx is done: it LISTENs for changes and
// reloads on each (coalescing bursts), reloads every TenantsReload anyway,
// and reconnects with backoff after any failure. It returns nil when ctx is
// done.
func (t *TenantStore) Run(ctx context.Context) error {
	if t.connect == nil {
		return t.poll(ctx)
	}
	backoff := t.minBackoff
	for ctx.Err() == nil {
		err := t.listen(ctx, func() { backoff = t.minBackoff })
		if ctx.Err() != nil {
			break
		}
		t.log.Warn("tenant origin watcher lost the database; serving the last good copy", "err", err, "retry_in", backoff)
		// While the listener is down, the periodic reload still runs.
		if err := t.Load(ctx); err == nil {
			t.log.Info("tenant origins reloaded without a listener")
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, t.maxBackoff, max(t.reload, t.minBackoff))
	}
	return nil
}

// poll is Run without a listener: a reload every TenantsReload, sooner
// after a failure.
func (t *TenantStore) poll(ctx context.Context) error {
	backoff := t.minBackoff
	for ctx.Err() == nil {
		wait := t.reload
		if err := t.ensureSchemaOnce(ctx); err != nil {
			t.log.Warn("could not create the tenant origin table; trying to use it as it is", "err", err)
		}
		err := t.Load(ctx)
		if err != nil && ctx.Err() == nil {
			t.log.Warn("tenant origin reload failed; serving the last good copy", "err", err, "retry_in", backoff)
			wait = backoff
			backoff = min(2*backoff, t.maxBackoff, max(t.reload, t.minBackoff))
		} else {
			backoff = t.minBackoff
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	return nil
}

func (t *TenantStore) ensureSchemaOnce(ctx context.Context) error {
	t.mu.Lock()
	ok := t.schemaOK
	t.mu.Unlock()
	if ok {
		return nil
	}
	return t.EnsureSchema(ctx)
}

// listen runs one LISTEN session; connected is called once it is live.
func (t *TenantStore) listen(ctx context.Context, connected func()) error {
	if err := t.ensureSchemaOnce(ctx); err != nil {
		// Perhaps the role may not create tables and a migration made it:
		// go on, Load tells whether the table is there.
		t.log.Warn("could not create the tenant origin table; trying to use it as it is", "err", err)
	}
	conn, err := t.connect(ctx)
	if err != nil {
		return fmt.Errorf("connecting the tenant origin listener: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		conn.Close(cctx)
		t.mu.Lock()
		t.listening = false
		t.mu.Unlock()
	}()
	lctx, cancel := context.WithTimeout(ctx, dbStepTimeout)
	_, err = conn.Exec(lctx, "LISTEN "+t.channel)
	cancel()
	if err != nil {
		return fmt.Errorf("listening on %s: %w", t.chanRaw, err)
	}
	// Load after LISTEN, so no change between the two is missed.
	if err := t.Load(ctx); err != nil {
		return err
	}
	t.mu.Lock()
	t.listening = true
	t.mu.Unlock()
	connected()
	for {
		wctx, cancel := context.WithTimeout(ctx, t.reload)
		_, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err == nil:
			// Coalesce a burst of statements into one reload.
			for {
				dctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
				_, err := conn.WaitForNotification(dctx)
				cancel()
				if err != nil {
					break
				}
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if conn.IsClosed() {
				return errors.New("tenant origin listener connection closed")
			}
		case pgconnTimeout(err):
			// periodic reload
		default:
			return fmt.Errorf("waiting for tenant origin changes: %w", err)
		}
		if err := t.Load(ctx); err != nil {
			return err
		}
	}
}

func pgconnTimeout(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err)
}

// TenantStatus is the store's state for /readyz.
type TenantStatus struct {
	Listening  bool      `json:"listening"`
	LastReload time.Time `json:"last_reload,omitzero"`
	LastError  string    `json:"last_error,omitempty"`
	Tenants    int       `json:"tenants"`
	Origins    int       `json:"origins"`
	Invalid    int       `json:"invalid_rows"`
}

// Status reports the store's state. Healthy means the last reload worked.
func (t *TenantStore) Status() (healthy bool, st TenantStatus) {
	snap := t.cur.Load()
	t.mu.Lock()
	defer t.mu.Unlock()
	st = TenantStatus{Listening: t.listening, LastReload: t.lastOK, Tenants: len(snap.byTenant),
		Origins: snap.rows - snap.invalid, Invalid: snap.invalid}
	if t.lastErr != nil {
		st.LastError = t.lastErr.Error()
	}
	return t.lastErr == nil && !t.lastOK.IsZero(), st
}
