package pgpool

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/meshguard/meshguard/internal/secret"
)

// Config is the `database:` section. The database is configured when URL is
// set; with no URL meshguard uses its embedded store instead.
//
// Parameters already present in URL win over the values here: a URL that
// says pool_max_conns=20, application_name=x, sslmode=verify-full,
// connect_timeout=3 or statement_timeout=5000 keeps them (Open logs each
// override). The keys are pgx's: pool_min_conns, pool_max_conns,
// pool_max_conn_lifetime, pool_max_conn_lifetime_jitter,
// pool_max_conn_idle_time, pool_health_check_period.
type Config struct {
	// URL is the PostgreSQL connection URL (postgres:// or postgresql://).
	// Empty: no database. Without sslmode in the URL (or PGSSLMODE in the
	// environment), sslmode=require is added outside development.
	URL secret.URL `yaml:"url"`
	// DirectURL is a connection that bypasses PgBouncer, used for
	// LISTEN/NOTIFY (the tenant-origin watcher): PgBouncer's transaction mode
	// hands each transaction to any server connection, so a LISTEN through it
	// never hears its notifications. Empty: URL is used, except in PgBouncer
	// mode, where ConnectDirect then fails with ErrNoDirectURL.
	DirectURL secret.URL `yaml:"direct_url"`
	// Pool tunes the connection pool.
	Pool PoolConfig `yaml:"pool"`
	// PgBouncer says URL points at PgBouncer in transaction mode: queries run
	// with QueryExecModeExec (unnamed statements, one round trip, no
	// server-side prepared statements, no statement cache), and no session
	// state is set, statement_timeout included (set it on the role instead:
	// ALTER ROLE meshguard SET statement_timeout = '60s'). false: direct
	// connections with pgx's statement cache.
	PgBouncer bool `yaml:"pgbouncer"`
	// ApplicationName is sent as application_name, so the server's
	// pg_stat_activity shows which connections are meshguard's. Empty: none sent.
	ApplicationName string `yaml:"application_name"`
	// ConnectTimeout bounds one connection attempt (TCP, TLS, auth). Must be
	// positive.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// SlowQueryThreshold: a statement that runs at least this long is logged
	// at warn level with its duration and statement label (never its
	// parameters). Zero: no slow-query log.
	SlowQueryThreshold time.Duration `yaml:"slow_query_threshold"`
	// Startup bounds the background connection attempts made at start.
	Startup StartupConfig `yaml:"startup"`
}

// PoolConfig tunes pgxpool.
type PoolConfig struct {
	// MinConns is the number of connections kept open even when idle.
	MinConns int32 `yaml:"min_conns"`
	// MaxConns is the most connections the pool opens; further acquires wait.
	MaxConns int32 `yaml:"max_conns"`
	// AcquireTimeout bounds how long an acquire waits for a free connection
	// when the caller's context has no earlier deadline. Must be positive.
	AcquireTimeout time.Duration `yaml:"acquire_timeout"`
	// IdleTimeout closes a connection idle this long (above MinConns). Must be
	// positive.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// StatementTimeout is sent as the statement_timeout run-time parameter, so
	// the server cancels any statement that runs longer. Zero: no limit. Not
	// sent in PgBouncer mode (see Config.PgBouncer).
	StatementTimeout time.Duration `yaml:"statement_timeout"`
	// MaxConnLifetime closes a connection this old (after its jitter), so
	// connections move to new servers after a failover. Must be positive.
	MaxConnLifetime time.Duration `yaml:"max_conn_lifetime"`
	// MaxConnLifetimeJitter adds a random 0..jitter to each connection's
	// lifetime, so they do not all reconnect at once. Zero: no jitter.
	MaxConnLifetimeJitter time.Duration `yaml:"max_conn_lifetime_jitter"`
	// HealthCheckPeriod is how often idle connections are checked, expired
	// ones closed and MinConns restored. Must be positive.
	HealthCheckPeriod time.Duration `yaml:"health_check_period"`
}

// StartupConfig bounds the connection attempts Open makes in the background
// (Open itself never waits for the database). After the last attempt the
// pool still connects on demand; readiness reports the error meanwhile.
type StartupConfig struct {
	// Attempts is how many times to try. Zero: do not try at start; the
	// first query connects.
	Attempts int `yaml:"attempts"`
	// Backoff is the wait after the first failed attempt; it doubles after
	// each further failure, with jitter, up to MaxBackoff. Must be positive.
	Backoff time.Duration `yaml:"backoff"`
	// MaxBackoff caps the wait between attempts. Must be at least Backoff.
	MaxBackoff time.Duration `yaml:"max_backoff"`
}

// DefaultConfig returns the defaults for the database section.
func DefaultConfig() Config {
	return Config{
		Pool: PoolConfig{
			MinConns:              2,
			MaxConns:              10,
			AcquireTimeout:        60 * time.Second,
			IdleTimeout:           60 * time.Second,
			StatementTimeout:      60 * time.Second,
			MaxConnLifetime:       time.Hour,
			MaxConnLifetimeJitter: 5 * time.Minute,
			HealthCheckPeriod:     30 * time.Second,
		},
		ApplicationName:    "meshguard",
		ConnectTimeout:     5 * time.Second,
		SlowQueryThreshold: 500 * time.Millisecond,
		Startup: StartupConfig{
			Attempts:   10,
			Backoff:    250 * time.Millisecond,
			MaxBackoff: 10 * time.Second,
		},
	}
}

// Enabled reports whether a database is configured.
func (c Config) Enabled() bool { return c.URL.IsSet() }

// Validate reports every invalid field, naming it by its YAML path and
// quoting the value (URLs with their password redacted).
func (c Config) Validate() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	positive := func(name string, d time.Duration) {
		if d <= 0 {
			add("database.%s: must be positive, got %q", name, d)
		}
	}
	nonNegative := func(name string, d time.Duration) {
		if d < 0 {
			add("database.%s: must not be negative, got %q", name, d)
		}
	}

	if err := validateURL("database.url", c.URL, c.PgBouncer); err != nil {
		errs = append(errs, err)
	}
	if c.DirectURL.IsSet() {
		if !c.URL.IsSet() {
			add("database.direct_url: set without database.url")
		}
		if err := validateURL("database.direct_url", c.DirectURL, false); err != nil {
			errs = append(errs, err)
		}
	}

	p := c.Pool
	if p.MinConns < 0 {
		add("database.pool.min_conns: must be >= 0, got %d", p.MinConns)
	}
	if p.MaxConns < 1 {
		add("database.pool.max_conns: must be >= 1, got %d", p.MaxConns)
	}
	if p.MinConns > p.MaxConns {
		add("database.pool.min_conns: must not exceed max_conns %d, got %d", p.MaxConns, p.MinConns)
	}
	positive("pool.acquire_timeout", p.AcquireTimeout)
	positive("pool.idle_timeout", p.IdleTimeout)
	nonNegative("pool.statement_timeout", p.StatementTimeout)
	if p.StatementTimeout > 0 && p.StatementTimeout < time.Millisecond {
		add("database.pool.statement_timeout: must be 0 or at least 1ms, got %q", p.StatementTimeout)
	}
	positive("pool.max_conn_lifetime", p.MaxConnLifetime)
	nonNegative("pool.max_conn_lifetime_jitter", p.MaxConnLifetimeJitter)
	positive("pool.health_check_period", p.HealthCheckPeriod)

	if n := c.ApplicationName; len(n) > 63 {
		add("database.application_name: must be at most 63 bytes, got %q", n)
	} else if strings.IndexFunc(n, func(r rune) bool { return r < 0x20 || r > 0x7e }) >= 0 {
		add("database.application_name: must be printable ASCII, got %q", n)
	}
	positive("connect_timeout", c.ConnectTimeout)
	nonNegative("slow_query_threshold", c.SlowQueryThreshold)

	s := c.Startup
	if s.Attempts < 0 {
		add("database.startup.attempts: must be >= 0, got %d", s.Attempts)
	}
	positive("startup.backoff", s.Backoff)
	if s.MaxBackoff < s.Backoff {
		add("database.startup.max_backoff: must be at least startup.backoff %q, got %q", s.Backoff, s.MaxBackoff)
	}
	return errors.Join(errs...)
}

// validateURL checks that u is a postgres URL pgx can parse. Its error quotes
// the URL with the password redacted and scrubs the password from pgx's text.
func validateURL(name string, u secret.URL, pgbouncer bool) error {
	if !u.IsSet() {
		return nil
	}
	raw := u.Reveal()
	parsed, err := url.Parse(raw)
	if err != nil || (parsed.Scheme != "postgres" && parsed.Scheme != "postgresql") {
		return fmt.Errorf("%s: must be a postgres:// or postgresql:// URL, got %q", name, u.String())
	}
	if _, err := pgxpool.ParseConfig(raw); err != nil {
		return fmt.Errorf("%s: %q: %s", name, u.String(), scrub(err.Error(), password(parsed)))
	}
	if pgbouncer {
		if m := parsed.Query().Get("default_query_exec_mode"); m == "cache_statement" {
			return fmt.Errorf("%s: default_query_exec_mode=%s uses server-side prepared statements, which PgBouncer's transaction mode cannot carry (database.pgbouncer is true), in %q", name, m, u.String())
		}
	}
	return nil
}

// password returns the password a URL carries, in its user info or its query.
func password(u *url.URL) string {
	if u == nil {
		return ""
	}
	if u.User != nil {
		if pw, ok := u.User.Password(); ok {
			return pw
		}
	}
	return u.Query().Get("password")
}

// scrub replaces every occurrence of pw (and its URL-escaped form) in s.
func scrub(s, pw string) string {
	if pw == "" {
		return s
	}
	s = strings.ReplaceAll(s, pw, "[REDACTED]")
	if esc := url.QueryEscape(pw); esc != pw {
		s = strings.ReplaceAll(s, esc, "[REDACTED]")
	}
	if esc := url.PathEscape(pw); esc != pw {
		s = strings.ReplaceAll(s, esc, "[REDACTED]")
	}
	return s
}
