package pgpool

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/meshguard/meshguard/internal/secret"
)

func TestValidate(t *testing.T) {
	const pw = "hunter2secret"
	tests := []struct {
		name  string
		edit  func(*Config)
		wants []string
	}{
		{"defaults without url", func(*Config) {}, nil},
		{"defaults with url", func(c *Config) { c.URL = "postgres://app:" + pw + "@db:5432/audit" }, nil},
		{"scheme", func(c *Config) { c.URL = "mysql://app:" + pw + "@db/audit" },
			[]string{`database.url: must be a postgres:// or postgresql:// URL, got "mysql://app:[REDACTED]@db/audit"`}},
		{"bad url parameter", func(c *Config) { c.URL = "postgres://app:" + pw + "@db/audit?pool_max_conns=lots" },
			[]string{`database.url: "postgres://app:[REDACTED]@db/audit?pool_max_conns=lots"`, "pool_max_conns"}},
		{"bad sslmode", func(c *Config) { c.URL = "postgres://app:" + pw + "@db/audit?sslmode=sometimes" },
			[]string{"database.url:", "sslmode"}},
		{"direct url", func(c *Config) {
			c.URL = "postgres://db/audit"
			c.DirectURL = "http://app:" + pw + "@db/audit"
		}, []string{`database.direct_url: must be a postgres:// or postgresql:// URL, got "http://app:[REDACTED]@db/audit"`}},
		{"direct url alone", func(c *Config) { c.DirectURL = "postgres://db/audit" },
			[]string{"database.direct_url: set without database.url"}},
		{"pgbouncer with statement cache", func(c *Config) {
			c.URL = "postgres://app:" + pw + "@bouncer/audit?default_query_exec_mode=cache_statement"
			c.PgBouncer = true
		}, []string{"database.url: default_query_exec_mode=cache_statement", "PgBouncer"}},
		{"conns", func(c *Config) { c.Pool.MinConns, c.Pool.MaxConns = -1, 0 },
			[]string{"database.pool.min_conns: must be >= 0, got -1", "database.pool.max_conns: must be >= 1, got 0"}},
		{"min over max", func(c *Config) { c.Pool.MinConns, c.Pool.MaxConns = 20, 5 },
			[]string{"database.pool.min_conns: must not exceed max_conns 5, got 20"}},
		{"durations", func(c *Config) {
			c.Pool.AcquireTimeout = 0
			c.Pool.IdleTimeout = -time.Second
			c.Pool.StatementTimeout = time.Microsecond
			c.Pool.MaxConnLifetime = 0
			c.Pool.MaxConnLifetimeJitter = -time.Minute
			c.Pool.HealthCheckPeriod = 0
			c.ConnectTimeout = 0
			c.SlowQueryThreshold = -1
		}, []string{
			`database.pool.acquire_timeout: must be positive, got "0s"`,
			`database.pool.idle_timeout: must be positive, got "-1s"`,
			`database.pool.statement_timeout: must be 0 or at least 1ms, got "1µs"`,
			`database.pool.max_conn_lifetime: must be positive, got "0s"`,
			`database.pool.max_conn_lifetime_jitter: must not be negative, got "-1m0s"`,
			`database.pool.health_check_period: must be positive, got "0s"`,
			`database.connect_timeout: must be positive, got "0s"`,
			`database.slow_query_threshold: must not be negative, got "-1ns"`,
		}},
		{"application name", func(c *Config) { c.ApplicationName = "mesh\nguard" },
			[]string{`database.application_name: must be printable ASCII, got "mesh\nguard"`}},
		{"application name length", func(c *Config) { c.ApplicationName = strings.Repeat("m", 64) },
			[]string{"database.application_name: must be at most 63 bytes"}},
		{"startup", func(c *Config) {
			c.Startup = StartupConfig{Attempts: -1, Backoff: time.Second, MaxBackoff: time.Millisecond}
		},
			[]string{"database.startup.attempts: must be >= 0, got -1",
				`database.startup.max_backoff: must be at least startup.backoff "1s", got "1ms"`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			tc.edit(&cfg)
			err := cfg.Validate()
			if len(tc.wants) == 0 {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.wants {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if strings.Contains(err.Error(), pw) {
				t.Errorf("error leaks the password: %v", err)
			}
		})
	}
}

func TestBuildConfig(t *testing.T) {
	t.Setenv("PGSSLMODE", "")
	t.Setenv("PGAPPNAME", "")
	t.Setenv("PGCONNECT_TIMEOUT", "")
	base := DefaultConfig()
	base.URL = "postgres://app:pw@db.example.com:5432/audit"

	t.Run("defaults applied", func(t *testing.T) {
		pc, direct, err := buildConfig(slog.New(slog.DiscardHandler), base, false)
		if err != nil {
			t.Fatal(err)
		}
		p := base.Pool
		checkEq(t, "MinConns", pc.MinConns, p.MinConns)
		checkEq(t, "MaxConns", pc.MaxConns, p.MaxConns)
		checkEq(t, "MaxConnLifetime", pc.MaxConnLifetime, p.MaxConnLifetime)
		checkEq(t, "MaxConnLifetimeJitter", pc.MaxConnLifetimeJitter, p.MaxConnLifetimeJitter)
		checkEq(t, "MaxConnIdleTime", pc.MaxConnIdleTime, p.IdleTimeout)
		checkEq(t, "HealthCheckPeriod", pc.HealthCheckPeriod, p.HealthCheckPeriod)
		checkEq(t, "ConnectTimeout", pc.ConnConfig.ConnectTimeout, base.ConnectTimeout)
		checkEq(t, "application_name", pc.ConnConfig.RuntimeParams["application_name"], "meshguard")
		checkEq(t, "statement_timeout", pc.ConnConfig.RuntimeParams["statement_timeout"], "60000")
		checkEq(t, "exec mode", pc.ConnConfig.DefaultQueryExecMode, pgx.QueryExecModeCacheStatement)
		// sslmode=require: TLS without certificate checks and no plain-text fallback.
		if pc.ConnConfig.TLSConfig == nil || len(pc.ConnConfig.Fallbacks) != 0 {
			t.Errorf("production default is not sslmode=require: tls=%v fallbacks=%d", pc.ConnConfig.TLSConfig != nil, len(pc.ConnConfig.Fallbacks))
		}
		if direct == nil || direct.Host != "db.example.com" {
			t.Errorf("direct config = %+v, want the URL's", direct)
		}
	})

	t.Run("url parameters win", func(t *testing.T) {
		cfg := base
		cfg.URL = "postgres://app:pw@db.example.com/audit?pool_max_conns=7&pool_min_conns=1&pool_max_conn_lifetime=10m" +
			"&pool_max_conn_idle_time=3m&pool_health_check_period=5s&pool_max_conn_lifetime_jitter=1s" +
			"&application_name=fromurl&connect_timeout=9&statement_timeout=1234&sslmode=disable"
		var logs bytes.Buffer
		pc, _, err := buildConfig(slog.New(slog.NewTextHandler(&logs, nil)), cfg, false)
		if err != nil {
			t.Fatal(err)
		}
		checkEq(t, "MaxConns", pc.MaxConns, int32(7))
		checkEq(t, "MinConns", pc.MinConns, int32(1))
		checkEq(t, "MaxConnLifetime", pc.MaxConnLifetime, 10*time.Minute)
		checkEq(t, "MaxConnIdleTime", pc.MaxConnIdleTime, 3*time.Minute)
		checkEq(t, "HealthCheckPeriod", pc.HealthCheckPeriod, 5*time.Second)
		checkEq(t, "MaxConnLifetimeJitter", pc.MaxConnLifetimeJitter, time.Second)
		checkEq(t, "application_name", pc.ConnConfig.RuntimeParams["application_name"], "fromurl")
		checkEq(t, "ConnectTimeout", pc.ConnConfig.ConnectTimeout, 9*time.Second)
		checkEq(t, "statement_timeout", pc.ConnConfig.RuntimeParams["statement_timeout"], "1234")
		if pc.ConnConfig.TLSConfig != nil {
			t.Error("sslmode=disable in the URL did not win")
		}
		for _, w := range []string{"parameter=pool_max_conns url_value=7 config_key=database.pool.max_conns config_value=10",
			"does not require TLS in production", "sslmode=disable"} {
			if !strings.Contains(logs.String(), w) {
				t.Errorf("log lacks %q:\n%s", w, logs.String())
			}
		}
	})

	t.Run("development keeps pgx's sslmode", func(t *testing.T) {
		var logs bytes.Buffer
		pc, _, err := buildConfig(slog.New(slog.NewTextHandler(&logs, nil)), base, true)
		if err != nil {
			t.Fatal(err)
		}
		if len(pc.ConnConfig.Fallbacks) == 0 { // prefer: TLS, then plain text
			t.Error("development added sslmode=require")
		}
		if strings.Contains(logs.String(), "TLS") {
			t.Errorf("development warned about TLS:\n%s", logs.String())
		}
	})

	t.Run("pgbouncer", func(t *testing.T) {
		cfg := base
		cfg.PgBouncer = true
		var logs bytes.Buffer
		pc, direct, err := buildConfig(slog.New(slog.NewTextHandler(&logs, nil)), cfg, false)
		if err != nil {
			t.Fatal(err)
		}
		checkEq(t, "exec mode", pc.ConnConfig.DefaultQueryExecMode, pgx.QueryExecModeExec)
		checkEq(t, "statement cache", pc.ConnConfig.StatementCacheCapacity, 0)
		checkEq(t, "description cache", pc.ConnConfig.DescriptionCacheCapacity, 0)
		if v, ok := pc.ConnConfig.RuntimeParams["statement_timeout"]; ok {
			t.Errorf("statement_timeout %q sent to PgBouncer", v)
		}
		if direct != nil {
			t.Error("PgBouncer mode without direct_url has a direct config")
		}
		if !strings.Contains(logs.String(), "direct_url is not set") {
			t.Errorf("no warning about LISTEN:\n%s", logs.String())
		}

		cfg.DirectURL = "postgres://app:pw@primary.example.com/audit"
		_, direct, err = buildConfig(slog.New(slog.DiscardHandler), cfg, false)
		if err != nil {
			t.Fatal(err)
		}
		if direct == nil || direct.Host != "primary.example.com" || direct.DefaultQueryExecMode != pgx.QueryExecModeCacheStatement {
			t.Errorf("direct config = %+v, want primary.example.com with the statement cache", direct)
		}
	})

	t.Run("url min over config max", func(t *testing.T) {
		cfg := base
		cfg.URL = "postgres://db/audit?pool_min_conns=50"
		_, _, err := buildConfig(slog.New(slog.DiscardHandler), cfg, false)
		if err == nil || !strings.Contains(err.Error(), "pool_min_conns 50 exceeds pool_max_conns 10") {
			t.Errorf("err = %v", err)
		}
	})
}

func checkEq[T comparable](t *testing.T, what string, got, want T) {
	t.Helper()
	if got != want {
		t.Errorf("%s = %v, want %v", what, got, want)
	}
}

func TestStatementLabel(t *testing.T) {
	tests := []struct{ sql, want string }{
		{"SELECT 1", "select"},
		{"  select * from audit_logs where id = $1", "select"},
		{"-- fetch\n/* hint */ WITH x AS (SELECT 1) SELECT * FROM x", "with"},
		{"INSERT INTO audit_logs (a) VALUES ('secret')", "insert audit_logs"},
		{`insert into "Audit_Logs_2026_11" values ($1)`, "insert audit_logs"},
		{"INSERT INTO public.audit_logs_2026_11 SELECT 1", "insert audit_logs"},
		{"UPDATE ONLY tenants SET origin = 'x'", "update tenants"},
		{"update tenant_origins set x = 1", "update tenant_origins"},
		{"DELETE FROM sessions WHERE token = 'abc'", "delete sessions"},
		{"COPY audit_logs (a, b) FROM STDIN", "copy audit_logs"},
		{"(SELECT 1) UNION (SELECT 2)", "select"},
		{"LISTEN tenant_origins", "listen"},
		{"frobnicate 'password'", "other"},
		{"", "empty"},
		{"-- only a comment", "empty"},
		{"INSERT 'x'", "insert"},
		{"DELETE 'x'", "delete"},
		{"INSERT INTO 'secret'", "insert"},
		{"INSERT INTO " + strings.Repeat("t", 300), "insert " + strings.Repeat("t", 48)},
	}
	for _, tc := range tests {
		t.Run(tc.sql, func(t *testing.T) {
			if got := statementLabel(tc.sql); got != tc.want {
				t.Errorf("statementLabel(%q) = %q, want %q", tc.sql, got, tc.want)
			}
		})
	}
}

func FuzzStatementLabel(f *testing.F) {
	for _, s := range []string{"SELECT 1", "insert into t values (1)", "/* x */ update only t set", "COPY \"A\".\"b_1\" FROM STDIN", "--\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, sql string) {
		got := statementLabel(sql)
		if len(got) > 60 || got == "" {
			t.Fatalf("label %q", got)
		}
		for _, c := range []byte(got) {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == ' ') {
				t.Fatalf("label %q has byte %q", got, c)
			}
		}
	})
}

func TestBackoff(t *testing.T) {
	sc := StartupConfig{Attempts: 10, Backoff: 100 * time.Millisecond, MaxBackoff: time.Second}
	tests := []struct {
		n        int
		r        float64
		want     time.Duration
		describe string
	}{
		{1, 0, 50 * time.Millisecond, "first wait, lowest jitter"},
		{1, 0.999999, 100 * time.Millisecond, "first wait, highest jitter"},
		{2, 0.5, 150 * time.Millisecond, "doubles"},
		{4, 0, 400 * time.Millisecond, "doubles again"},
		{5, 0.999999, time.Second, "capped"},
		{60, 0, 500 * time.Millisecond, "no overflow after many attempts"},
	}
	for _, tc := range tests {
		t.Run(tc.describe, func(t *testing.T) {
			got := backoff(sc, tc.n, tc.r)
			if d := got - tc.want; d < -time.Millisecond || d > time.Millisecond {
				t.Errorf("backoff(%d, %v) = %v, want %v", tc.n, tc.r, got, tc.want)
			}
		})
	}
}

func TestErrorCode(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{&pgconn.PgError{Code: "22P02", Message: "invalid input syntax: \"secret\""}, "22P02"},
		{errors.Join(errors.New("x"), context.Canceled), "canceled"},
		{errors.New("boom"), "other"},
	}
	for _, tc := range tests {
		if got := errorCode(tc.err); got != tc.want {
			t.Errorf("errorCode(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

func TestScrub(t *testing.T) {
	u := secret.URL("postgres://app:p%40ss%2Fw0rd@db/audit")
	cfg := DefaultConfig()
	cfg.URL = u
	p := &Pool{secrets: secretsOf(cfg)}
	err := p.redactErr("step", errors.New("saw p@ss/w0rd and p%40ss%2Fw0rd and p%40ss%2Fw0rd"))
	if strings.Contains(err.Error(), "w0rd") {
		t.Errorf("password survived: %v", err)
	}
	if !strings.HasPrefix(err.Error(), "step: saw [REDACTED]") {
		t.Errorf("err = %v", err)
	}
}
