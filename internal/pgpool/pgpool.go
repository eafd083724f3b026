// Package pgpool is the PostgreSQL connection pool that the audit sink and the
// tenant-origin watcher share: configuration (with URL parameters winning
// over defaults), start-up that never blocks on the database, a direct
// connection for LISTEN, PgBouncer transaction-mode support, health for
// /readyz and real pool statistics.
//
// Metrics (all read at scrape time from pgxpool or fed by a pgx tracer):
//
//	meshguard_db_pool_total_conns, _idle_conns, _acquired_conns,
//	_constructing_conns, _max_conns                        gauges
//	meshguard_db_pool_acquires_total, _acquire_duration_seconds_total,
//	_empty_acquires_total, _empty_acquire_wait_seconds_total,
//	_canceled_acquires_total, _new_conns_total,
//	_max_lifetime_destroys_total, _max_idle_destroys_total  counters
//	meshguard_db_query_duration_seconds{statement}          histogram
//	meshguard_db_query_errors_total{statement,code}         counter
//	meshguard_db_slow_queries_total{statement}              counter
//
// The statement label is the statement's leading keyword and target table
// ("insert audit_logs", "select", "copy audit_logs") or a name set with
// WithStatementLabel; never its parameters. After 64 distinct labels, further
// statements count as "other".
//
// PgBouncer (Config.PgBouncer): in transaction mode each transaction may run
// on a different server connection, so the pool uses unnamed statements
// (pgx.QueryExecModeExec: parse, bind and execute in one round trip, no
// pg_prepared_statements entries), keeps no statement cache and sets no
// session state; statement_timeout is not sent (PgBouncer rejects it as a
// startup parameter, and a SET would leak to other clients): set it on the
// role, or use SET LOCAL inside a transaction. LISTEN needs a session, so the
// tenant watcher uses ConnectDirect, which dials Config.DirectURL.
package pgpool

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/internal/secret"
)

// ErrNoDirectURL is returned by ConnectDirect in PgBouncer mode when no
// direct_url is configured: a LISTEN through PgBouncer's transaction mode
// would never hear its notifications.
var ErrNoDirectURL = errors.New("database.direct_url is not set, and database.url points at PgBouncer (database.pgbouncer: true), which cannot carry LISTEN")

// Pool is the shared pool. Its methods are safe for concurrent use.
type Pool struct {
	log      *slog.Logger
	reg      prometheus.Registerer
	pool     *pgxpool.Pool
	direct   *pgx.ConnConfig // nil: no direct connection (PgBouncer without direct_url)
	tracer   *tracer
	secrets  []string // passwords to scrub from error text
	timeout  time.Duration
	collects []prometheus.Collector

	stop      context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// Open builds the pool from cfg and returns without waiting for the
// database: connections are opened in the background (Startup.Attempts tries
// with backoff, then on demand), so the process serves while the database is
// down and Health reports why. It fails only for a configuration error or a
// metric registration conflict. development relaxes the sslmode default.
func Open(ctx context.Context, log *slog.Logger, reg prometheus.Registerer, cfg Config, development bool) (*Pool, error) {
	if !cfg.Enabled() {
		return nil, errors.New("opening database pool: database.url is not set")
	}
	pc, direct, err := buildConfig(log, cfg, development)
	if err != nil {
		return nil, err
	}
	m, collects, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("registering database metrics: %w", err)
	}
	tr := &tracer{
		log:            log,
		m:              m,
		slow:           cfg.SlowQueryThreshold,
		acquireTimeout: cfg.Pool.AcquireTimeout,
		now:            time.Now,
	}
	pc.ConnConfig.Tracer = tr
	if direct != nil {
		direct.Tracer = tr
	}
	p := &Pool{
		log:      log,
		reg:      reg,
		direct:   direct,
		tracer:   tr,
		secrets:  secretsOf(cfg),
		timeout:  cfg.ConnectTimeout,
		collects: collects,
		done:     make(chan struct{}),
	}
	pool, err := pgxpool.NewWithConfig(context.WithoutCancel(ctx), pc)
	if err != nil {
		p.unregister()
		return nil, fmt.Errorf("creating database pool: %s", p.redact(err))
	}
	p.pool = pool
	pcol := newPoolCollector(pool)
	if err := reg.Register(pcol); err != nil {
		pool.Close()
		p.unregister()
		return nil, fmt.Errorf("registering database pool metrics: %w", err)
	}
	p.collects = append(p.collects, pcol)

	bg, stop := context.WithCancel(context.WithoutCancel(ctx))
	p.stop = stop
	go p.connect(bg, cfg.Startup, cfg.URL.String())
	return p, nil
}

// Pool returns the underlying pgxpool for queries, transactions and COPY.
// Statements on it are traced (metrics, slow-query log) and acquires are
// bounded by database.pool.acquire_timeout.
func (p *Pool) Pool() *pgxpool.Pool { return p.pool }

// ConnectDirect opens a standalone connection for LISTEN/NOTIFY, to
// database.direct_url when set, else to database.url (but see
// ErrNoDirectURL). The caller closes it.
func (p *Pool) ConnectDirect(ctx context.Context) (*pgx.Conn, error) {
	if p.direct == nil {
		return nil, ErrNoDirectURL
	}
	c, err := pgx.ConnectConfig(ctx, p.direct.Copy())
	if err != nil {
		return nil, p.redactErr("opening direct database connection", err)
	}
	return c, nil
}

// Health is the outcome of one health check.
type Health struct {
	// Latency is how long the check took.
	Latency time.Duration
	// Err is nil when the database answered; its text never holds a password.
	Err error
	// Saturated: every connection was in use so the check could not get one,
	// but a statement succeeded within the last few seconds, so the database
	// is up and merely busy. Err is nil then.
	Saturated bool
}

// saturatedGrace is how recent a successful statement must be for a
// saturated pool to count as healthy.
const saturatedGrace = 5 * time.Second

// Health pings the database through the pool, bounded by ctx and the connect
// timeout.
func (p *Pool) Health(ctx context.Context) Health {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	err := p.pool.Ping(ctx)
	h := Health{Latency: time.Since(start)}
	if err == nil {
		return h
	}
	if s := p.pool.Stat(); ctx.Err() != nil && s.AcquiredConns() >= s.MaxConns() {
		if last := p.tracer.lastOK.Load(); last != 0 && time.Since(time.Unix(0, last)) < saturatedGrace {
			h.Saturated = true
			return h
		}
		h.Err = p.redactErr("pinging database", fmt.Errorf("all %d connections in use and no statement succeeded in the last %s: %w", s.MaxConns(), saturatedGrace, err))
		return h
	}
	h.Err = p.redactErr("pinging database", err)
	return h
}

// Stats are pgxpool's live figures.
type Stats struct {
	TotalConns              int32         `json:"total_conns"`
	IdleConns               int32         `json:"idle_conns"`
	AcquiredConns           int32         `json:"acquired_conns"`
	ConstructingConns       int32         `json:"constructing_conns"`
	MaxConns                int32         `json:"max_conns"`
	AcquireCount            int64         `json:"acquire_count"`
	AcquireDuration         time.Duration `json:"-"`
	EmptyAcquireCount       int64         `json:"empty_acquire_count"`
	EmptyAcquireWait        time.Duration `json:"-"`
	CanceledAcquireCount    int64         `json:"canceled_acquire_count"`
	NewConnsCount           int64         `json:"new_conns_count"`
	MaxLifetimeDestroyCount int64         `json:"max_lifetime_destroy_count"`
	MaxIdleDestroyCount     int64         `json:"max_idle_destroy_count"`
}

// MarshalJSON writes the durations as milliseconds
// (acquire_duration_ms, empty_acquire_wait_ms).
func (s Stats) MarshalJSON() ([]byte, error) {
	type plain Stats
	return json.Marshal(struct {
		plain
		AcquireDurationMS  float64 `json:"acquire_duration_ms"`
		EmptyAcquireWaitMS float64 `json:"empty_acquire_wait_ms"`
	}{plain(s), ms(s.AcquireDuration), ms(s.EmptyAcquireWait)})
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Stats returns the pool's current figures.
func (p *Pool) Stats() Stats {
	s := p.pool.Stat()
	return Stats{
		TotalConns:              s.TotalConns(),
		IdleConns:               s.IdleConns(),
		AcquiredConns:           s.AcquiredConns(),
		ConstructingConns:       s.ConstructingConns(),
		MaxConns:                s.MaxConns(),
		AcquireCount:            s.AcquireCount(),
		AcquireDuration:         s.AcquireDuration(),
		EmptyAcquireCount:       s.EmptyAcquireCount(),
		EmptyAcquireWait:        s.EmptyAcquireWaitTime(),
		CanceledAcquireCount:    s.CanceledAcquireCount(),
		NewConnsCount:           s.NewConnsCount(),
		MaxLifetimeDestroyCount: s.MaxLifetimeDestroyCount(),
		MaxIdleDestroyCount:     s.MaxIdleDestroyCount(),
	}
}

// Close stops the start-up attempts, waits for acquired connections to be
// released, closes the pool and unregisters its metrics. Safe to call twice.
func (p *Pool) Close() {
	p.closeOnce.Do(func() {
		p.stop()
		<-p.done
		p.pool.Close()
		p.unregister()
	})
}

func (p *Pool) unregister() {
	for _, c := range p.collects {
		p.reg.Unregister(c)
	}
}

// connect pings the database until it answers or attempts run out, logging
// each failure with its backoff and the outcome.
func (p *Pool) connect(ctx context.Context, sc StartupConfig, where string) {
	defer close(p.done)
	for attempt := 1; attempt <= sc.Attempts; attempt++ {
		actx, cancel := context.WithTimeout(ctx, p.timeout)
		var tlsOn bool
		var version string
		err := p.pool.AcquireFunc(actx, func(c *pgxpool.Conn) error {
			_, tlsOn = c.Conn().PgConn().Conn().(*tls.Conn)
			version = c.Conn().PgConn().ParameterStatus("server_version")
			return c.Ping(actx)
		})
		cancel()
		if err == nil {
			p.log.Info("database connected", "url", where, "attempt", attempt, "tls", tlsOn, "server_version", version)
			return
		}
		if ctx.Err() != nil {
			return
		}
		if attempt == sc.Attempts {
			p.log.Error("database unreachable after start-up attempts; serving without it, the pool connects on demand",
				"url", where, "attempts", attempt, "err", p.redact(err))
			return
		}
		wait := backoff(sc, attempt, rand.Float64())
		p.log.Warn("database unreachable; retrying", "url", where, "attempt", attempt, "retry_in", wait, "err", p.redact(err))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// backoff is the wait after failed attempt n (1-based): Backoff doubled per
// further failure, capped at MaxBackoff, then scaled into [50%, 100%] by r in [0,1).
func backoff(sc StartupConfig, n int, r float64) time.Duration {
	d := sc.Backoff
	for i := 1; i < n && d < sc.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, sc.MaxBackoff)
	return d/2 + time.Duration(r*float64(d/2))
}

// redact returns err's text with every configured password removed.
func (p *Pool) redact(err error) string {
	s := err.Error()
	for _, pw := range p.secrets {
		s = scrub(s, pw)
	}
	return s
}

// redactErr wraps err with step, keeping errors.Is/As working but with a
// message that holds no password.
func (p *Pool) redactErr(step string, err error) error {
	return &redactedError{msg: step + ": " + p.redact(err), err: err}
}

type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

func secretsOf(cfg Config) []string {
	var out []string
	for _, u := range []string{cfg.URL.Reveal(), cfg.DirectURL.Reveal()} {
		if parsed, err := url.Parse(u); err == nil {
			if pw := password(parsed); pw != "" {
				out = append(out, pw)
			}
		}
	}
	if pw := os.Getenv("PGPASSWORD"); pw != "" {
		out = append(out, pw)
	}
	return out
}

// buildConfig turns cfg into the pool's pgx config and the direct
// connection's config (nil in PgBouncer mode without direct_url). Parameters
// present in the URL win over cfg; each such override is logged.
func buildConfig(log *slog.Logger, cfg Config, development bool) (*pgxpool.Config, *pgx.ConnConfig, error) {
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	pc, q, err := parse(log, "database.url", cfg.URL.Reveal(), cfg, development)
	if err != nil {
		return nil, nil, err
	}
	overridden := func(key, field string, cfgValue any) bool {
		v, ok := q[key]
		if ok {
			log.Info("database URL parameter overrides config", "parameter", key, "url_value", v[0], "config_key", field, "config_value", cfgValue)
		}
		return ok
	}
	pl := cfg.Pool
	if !overridden("pool_min_conns", "database.pool.min_conns", pl.MinConns) {
		pc.MinConns = pl.MinConns
	}
	if !overridden("pool_max_conns", "database.pool.max_conns", pl.MaxConns) {
		pc.MaxConns = pl.MaxConns
	}
	if !overridden("pool_max_conn_lifetime", "database.pool.max_conn_lifetime", pl.MaxConnLifetime) {
		pc.MaxConnLifetime = pl.MaxConnLifetime
	}
	if !overridden("pool_max_conn_lifetime_jitter", "database.pool.max_conn_lifetime_jitter", pl.MaxConnLifetimeJitter) {
		pc.MaxConnLifetimeJitter = pl.MaxConnLifetimeJitter
	}
	if !overridden("pool_max_conn_idle_time", "database.pool.idle_timeout", pl.IdleTimeout) {
		pc.MaxConnIdleTime = pl.IdleTimeout
	}
	if !overridden("pool_health_check_period", "database.pool.health_check_period", pl.HealthCheckPeriod) {
		pc.HealthCheckPeriod = pl.HealthCheckPeriod
	}
	if _, ok := q["pool_ping_timeout"]; !ok {
		pc.PingTimeout = cfg.ConnectTimeout
	}
	if pc.MinConns > pc.MaxConns {
		return nil, nil, fmt.Errorf("database.url: pool_min_conns %d exceeds pool_max_conns %d (after URL parameters)", pc.MinConns, pc.MaxConns)
	}
	if pc.MaxConnLifetime <= 0 || pc.HealthCheckPeriod <= 0 || pc.MaxConnIdleTime <= 0 {
		return nil, nil, errors.New("database.url: pool_max_conn_lifetime, pool_max_conn_idle_time and pool_health_check_period must be positive")
	}
	if pl.StatementTimeout > 0 && !cfg.PgBouncer &&
		!overridden("statement_timeout", "database.pool.statement_timeout", pl.StatementTimeout) {
		pc.ConnConfig.RuntimeParams["statement_timeout"] = strconv.FormatInt(pl.StatementTimeout.Milliseconds(), 10)
	}
	if cfg.PgBouncer {
		if _, ok := q["default_query_exec_mode"]; !ok {
			pc.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
		}
		pc.ConnConfig.StatementCacheCapacity = 0
		pc.ConnConfig.DescriptionCacheCapacity = 0
	}

	var direct *pgx.ConnConfig
	switch {
	case cfg.DirectURL.IsSet():
		dc, _, err := parse(log, "database.direct_url", cfg.DirectURL.Reveal(), cfg, development)
		if err != nil {
			return nil, nil, err
		}
		direct = dc.ConnConfig
	case !cfg.PgBouncer:
		direct = pc.ConnConfig.Copy()
	default:
		log.Warn("database.pgbouncer is true and database.direct_url is not set: LISTEN-based watchers cannot run")
	}
	return pc, direct, nil
}

// parse applies the defaults that must go into the connection string
// (sslmode) and the connection-level ones (application_name,
// connect_timeout), and reports the URL's own query parameters.
func parse(log *slog.Logger, field, raw string, cfg Config, development bool) (*pgxpool.Config, url.Values, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: not a URL: %q", field, secret.RedactURL(raw))
	}
	q := u.Query()
	sslmode := q.Get("sslmode")
	if sslmode == "" {
		sslmode = os.Getenv("PGSSLMODE")
	}
	if sslmode == "" && !development {
		sslmode = "require"
		q.Set("sslmode", sslmode)
		u2 := *u
		u2.RawQuery = q.Encode()
		raw = u2.String()
		q.Del("sslmode") // a default, not the URL's own
	}
	pc, err := pgxpool.ParseConfig(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %q: %s", field, secret.RedactURL(raw), scrub(err.Error(), password(u)))
	}
	if !development && !isUnixSocket(pc.ConnConfig.Host) {
		switch sslmode {
		case "", "disable", "allow", "prefer":
			log.Warn("database connection does not require TLS in production; set sslmode=require or verify-full",
				"config_key", field, "sslmode", cmpOr(sslmode, "prefer"))
		}
	}
	if cfg.ApplicationName != "" {
		if _, ok := q["application_name"]; !ok && os.Getenv("PGAPPNAME") == "" {
			pc.ConnConfig.RuntimeParams["application_name"] = cfg.ApplicationName
		}
	}
	if _, ok := q["connect_timeout"]; !ok && os.Getenv("PGCONNECT_TIMEOUT") == "" {
		pc.ConnConfig.ConnectTimeout = cfg.ConnectTimeout
	}
	return pc, q, nil
}

func isUnixSocket(host string) bool { return strings.HasPrefix(host, "/") }

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
