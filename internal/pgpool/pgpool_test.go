package pgpool

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/meshguard/meshguard/internal/metrictest"
	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/servertest"
)

// pg is one server shared by the tests that do not stop it.
var pg *pgtest.Server

func TestMain(m *testing.M) {
	var stop func()
	pg, stop = pgtest.StartMain()
	code := m.Run()
	stop()
	os.Exit(code)
}

func needPG(t *testing.T) {
	t.Helper()
	if pg == nil {
		t.Skip("postgres not installed")
	}
}

// syncBuffer is a log destination safe for the pool's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func uniqueName(prefix string) string {
	var b [4]byte
	rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// testConfig is a config for url with fast start-up and a unique
// application_name.
func testConfig(url string) Config {
	cfg := DefaultConfig()
	cfg.URL = secret.URL(url)
	cfg.ApplicationName = uniqueName("mgtest_")
	cfg.ConnectTimeout = 10 * time.Second // generous: the test machine is shared
	cfg.Startup = StartupConfig{Attempts: 3, Backoff: 20 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
	cfg.Pool.MinConns = 0
	return cfg
}

func open(t *testing.T, cfg Config, logs *syncBuffer) (*Pool, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	var h slog.Handler = slog.DiscardHandler
	if logs != nil {
		h = slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})
	}
	p, err := Open(t.Context(), slog.New(h), reg, cfg, false)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(p.Close)
	return p, reg
}

// TestPoolLimitsUnderLoad: 24 workers share a 3-connection pool. The server
// never sees more than 3 meshguard connections (pg_stat_activity by
// application_name), acquires that had to wait are counted, and the
// Prometheus figures are the pool's own.
func TestPoolLimitsUnderLoad(t *testing.T) {
	needPG(t)
	cfg := testConfig(pg.NewDatabase(t))
	cfg.Pool.MaxConns = 3
	p, reg := open(t, cfg, nil)
	ctx := t.Context()

	mon, err := pgx.Connect(ctx, pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close(context.Background())
	var maxSeen atomic.Int32
	stopMon := make(chan struct{})
	monDone := make(chan error, 1)
	go func() {
		for {
			var n int32
			if err := mon.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, cfg.ApplicationName).Scan(&n); err != nil {
				monDone <- err
				return
			}
			if n > maxSeen.Load() {
				maxSeen.Store(n)
			}
			select {
			case <-stopMon:
				monDone <- nil
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()

	const workers, each = 24, 5
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for range workers {
		wg.Go(func() {
			for range each {
				if _, err := p.Pool().Exec(ctx, `SELECT pg_sleep(0.01)`); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(stopMon)
	if err := <-monDone; err != nil {
		t.Fatal(err)
	}
	close(errs)
	for err := range errs {
		t.Errorf("query: %v", err)
	}

	if got := maxSeen.Load(); got < 1 || got > 3 {
		t.Errorf("server saw %d meshguard connections at once, want 1..3", got)
	}
	s := p.Stats()
	if s.MaxConns != 3 || s.TotalConns > 3 {
		t.Errorf("stats max=%d total=%d, want max 3", s.MaxConns, s.TotalConns)
	}
	if s.AcquireCount < workers*each {
		t.Errorf("acquire count %d < %d queries", s.AcquireCount, workers*each)
	}
	if s.EmptyAcquireCount == 0 || s.EmptyAcquireWait <= 0 {
		t.Errorf("no waits counted under 8x oversubscription: %+v", s)
	}
	for name, want := range map[string]float64{
		"meshguard_db_pool_max_conns":            3,
		"meshguard_db_pool_acquires_total":       float64(s.AcquireCount),
		"meshguard_db_pool_empty_acquires_total": float64(s.EmptyAcquireCount),
		"meshguard_db_pool_acquired_conns":       0,
	} {
		if got := gauge(t, reg, name, nil); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if n := histogramCount(t, reg, "meshguard_db_query_duration_seconds", map[string]string{"statement": "select"}); n != workers*each {
		t.Errorf("select histogram count = %d, want %d", n, workers*each)
	}
}

// TestAcquireTimeout: with every connection held, an acquire whose context
// has no deadline gives up after database.pool.acquire_timeout and is
// counted as canceled.
func TestAcquireTimeout(t *testing.T) {
	needPG(t)
	cfg := testConfig(pg.URL())
	cfg.Pool.MaxConns = 1
	cfg.Pool.AcquireTimeout = 100 * time.Millisecond
	p, _ := open(t, cfg, nil)
	<-p.done // the start-up ping would compete for the one connection
	held, err := p.Pool().Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Release()
	start := time.Now()
	_, err = p.Pool().Exec(context.Background(), "SELECT 1")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Exec with the pool exhausted: err = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("acquire waited %v", d)
	}
	if s := p.Stats(); s.CanceledAcquireCount != 1 {
		t.Errorf("canceled acquires = %d, want 1", s.CanceledAcquireCount)
	}
}

// TestOpenWhileDown: Open returns at once with nothing listening, the
// start-up attempts are bounded and logged, Health reports the failure.
func TestOpenWhileDown(t *testing.T) {
	needPG(t)
	t.Parallel()
	srv := pgtest.Start(t)
	url := srv.URL()
	srv.Stop()
	cfg := testConfig(url)
	var logs syncBuffer
	start := time.Now()
	p, _ := open(t, cfg, &logs)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Open took %v with the database down", d)
	}
	h := p.Health(t.Context())
	if h.Err == nil || !strings.Contains(h.Err.Error(), "pinging database") {
		t.Fatalf("Health with the database down: %+v", h)
	}
	servertest.WaitUntil(t, 15*time.Second, "the start-up loop to give up", func() bool { return strings.Contains(logs.String(), "database unreachable after start-up attempts") })
	if n := strings.Count(logs.String(), `"database unreachable; retrying"`); n != cfg.Startup.Attempts-1 {
		t.Errorf("%d retry lines, want %d:\n%s", n, cfg.Startup.Attempts-1, logs.String())
	}

	srv.Restart(t)
	servertest.WaitUntil(t, 15*time.Second, "the pool to reach the database", func() bool { return p.Health(t.Context()).Err == nil })
}

// TestOpenDoesNotWaitForAHungServer: a server that accepts TCP and never
// answers (a stopped host, a black-holed route) neither delays Open nor
// hangs Health past its context, and Close still returns.
func TestOpenDoesNotWaitForAHungServer(t *testing.T) {
	needPG(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	cfg := testConfig(fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", l.Addr()))
	cfg.ConnectTimeout = 3 * time.Second
	cfg.Pool.MinConns = 2
	start := time.Now()
	p, err := Open(t.Context(), slog.New(slog.DiscardHandler), prometheus.NewRegistry(), cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Open took %v against a server that never answers", d)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	h := p.Health(ctx)
	cancel()
	if h.Err == nil || h.Latency > 2*time.Second {
		t.Errorf("Health against a hung server = %+v", h)
	}
	start = time.Now()
	p.Close()
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Close took %v", d)
	}
}

// TestHealthKillAndRestart: a crashed server makes Health fail with the
// cause; once it is back, Health recovers without a new pool.
func TestHealthKillAndRestart(t *testing.T) {
	needPG(t)
	t.Parallel()
	srv := pgtest.Start(t)
	cfg := testConfig(srv.URL())
	cfg.Pool.MinConns = 2
	p, _ := open(t, cfg, nil)
	if h := p.Health(t.Context()); h.Err != nil || h.Latency <= 0 {
		t.Fatalf("Health = %+v", h)
	}
	srv.Kill()
	h := p.Health(t.Context())
	if h.Err == nil {
		t.Fatal("Health is fine with the server killed")
	}
	srv.Restart(t)
	servertest.WaitUntil(t, 15*time.Second, "the pool to reach the database", func() bool { return p.Health(t.Context()).Err == nil })
	if _, err := p.Pool().Exec(t.Context(), "SELECT 1"); err != nil {
		t.Errorf("query after restart: %v", err)
	}
}

// TestHealthSaturated: a pool whose connections are all busy is healthy
// while statements keep succeeding, unhealthy when none has lately.
func TestHealthSaturated(t *testing.T) {
	needPG(t)
	cfg := testConfig(pg.URL())
	cfg.Pool.MaxConns = 1
	p, _ := open(t, cfg, nil)
	<-p.done
	if _, err := p.Pool().Exec(t.Context(), "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	held, err := p.Pool().Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Release()
	health := func() Health {
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		return p.Health(ctx)
	}
	if h := health(); h.Err != nil || !h.Saturated {
		t.Errorf("busy pool after a recent success: %+v", h)
	}
	p.tracer.lastOK.Store(time.Now().Add(-time.Minute).UnixNano())
	h := health()
	if h.Err == nil || !strings.Contains(h.Err.Error(), "all 1 connections in use") {
		t.Errorf("busy pool with no recent success: %+v", h)
	}
}

// preparedStatements runs a mixed workload (queries with arguments, a
// transaction, COPY) on p, then reports how many server-side prepared
// statements each pool connection holds.
func preparedStatements(t *testing.T, p *Pool) int {
	t.Helper()
	ctx := t.Context()
	table := uniqueName("copy_")
	if _, err := p.Pool().Exec(ctx, "CREATE TABLE "+table+" (id int, note text)"); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		var n int
		if err := p.Pool().QueryRow(ctx, "SELECT $1::int + 1", i).Scan(&n); err != nil || n != i+1 {
			t.Fatalf("query: %d, %v", n, err)
		}
		if _, err := p.Pool().Exec(ctx, "INSERT INTO "+table+" VALUES ($1, $2)", i, "x"); err != nil {
			t.Fatal(err)
		}
	}
	err := pgx.BeginFunc(ctx, p.Pool(), func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "UPDATE "+table+" SET note = $1 WHERE id = $2", "y", 1)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	n, err := p.Pool().CopyFrom(ctx, pgx.Identifier{table}, []string{"id", "note"},
		pgx.CopyFromRows([][]any{{10, "a"}, {11, "b"}, {12, "c"}}))
	if err != nil || n != 3 {
		t.Fatalf("COPY: %d, %v", n, err)
	}
	var total int
	if err := p.Pool().QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&total); err != nil || total != 8 {
		t.Fatalf("rows: %d, %v", total, err)
	}
	prepared := 0
	for _, c := range p.Pool().AcquireAllIdle(ctx) {
		var k int
		rows, err := c.Conn().Query(ctx, "SELECT count(*) FROM pg_prepared_statements", pgx.QueryExecModeSimpleProtocol)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			if err := rows.Scan(&k); err != nil {
				t.Fatal(err)
			}
		}
		rows.Close()
		prepared += k
		c.Release()
	}
	return prepared
}

// TestPgBouncerModeNoPreparedStatements: the same workload leaves server-side
// prepared statements in normal mode and none in PgBouncer mode.
func TestPgBouncerModeNoPreparedStatements(t *testing.T) {
	needPG(t)
	url := pg.NewDatabase(t)
	for _, tc := range []struct {
		pgbouncer bool
		wantNone  bool
	}{{false, false}, {true, true}} {
		t.Run(fmt.Sprintf("pgbouncer=%v", tc.pgbouncer), func(t *testing.T) {
			cfg := testConfig(url)
			cfg.PgBouncer = tc.pgbouncer
			cfg.Pool.MaxConns = 2
			p, _ := open(t, cfg, nil)
			n := preparedStatements(t, p)
			if tc.wantNone && n != 0 {
				t.Errorf("%d server-side prepared statements in PgBouncer mode", n)
			}
			if !tc.wantNone && n == 0 {
				t.Error("no prepared statements in normal mode: the check cannot tell the modes apart")
			}
			if tc.pgbouncer {
				var st string
				if err := p.Pool().QueryRow(t.Context(), "SHOW statement_timeout").Scan(&st); err != nil || st != "0" {
					t.Errorf("statement_timeout = %q, %v; PgBouncer mode must not set session state", st, err)
				}
			}
		})
	}
}

// TestConnectDirect: the direct connection hears NOTIFY; PgBouncer mode
// without a direct URL refuses rather than LISTEN through the bouncer.
func TestConnectDirect(t *testing.T) {
	needPG(t)
	cfg := testConfig(pg.URL())
	cfg.PgBouncer = true
	p, _ := open(t, cfg, nil)
	if _, err := p.ConnectDirect(t.Context()); !errors.Is(err, ErrNoDirectURL) {
		t.Errorf("PgBouncer mode without direct_url: err = %v, want ErrNoDirectURL", err)
	}

	cfg.DirectURL = secret.URL(pg.URL())
	p, _ = open(t, cfg, nil)
	c, err := p.ConnectDirect(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	channel := uniqueName("chan_")
	if _, err := c.Exec(t.Context(), "LISTEN "+channel); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Pool().Exec(t.Context(), "SELECT pg_notify($1, $2)", channel, "hello"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	n, err := c.WaitForNotification(ctx)
	if err != nil || n.Payload != "hello" {
		t.Fatalf("notification = %+v, %v", n, err)
	}
	var app string
	if err := c.QueryRow(t.Context(), "SHOW application_name").Scan(&app); err != nil || app != cfg.ApplicationName {
		t.Errorf("direct application_name = %q, %v; want %q", app, err, cfg.ApplicationName)
	}
}

// TestStatementTimeout: the server cancels a statement longer than
// database.pool.statement_timeout, and the error is counted by its SQLSTATE.
func TestStatementTimeout(t *testing.T) {
	needPG(t)
	cfg := testConfig(pg.URL())
	cfg.Pool.StatementTimeout = 50 * time.Millisecond
	p, reg := open(t, cfg, nil)
	_, err := p.Pool().Exec(t.Context(), "SELECT pg_sleep(2)")
	if err == nil || !strings.Contains(err.Error(), "57014") {
		t.Fatalf("err = %v, want query_canceled (57014)", err)
	}
	if got := gauge(t, reg, "meshguard_db_query_errors_total", map[string]string{"statement": "select", "code": "57014"}); got != 1 {
		t.Errorf("errors_total{select,57014} = %v, want 1", got)
	}
}

// TestSlowQueryLog: a slow statement is logged with its label and duration,
// never its SQL text or arguments; a failed one logs its SQLSTATE only.
func TestSlowQueryLog(t *testing.T) {
	needPG(t)
	cfg := testConfig(pg.URL())
	cfg.SlowQueryThreshold = 20 * time.Millisecond
	var logs syncBuffer
	p, reg := open(t, cfg, &logs)
	const arg = "argument-value-7f3a"
	if _, err := p.Pool().Exec(t.Context(), "SELECT pg_sleep(0.05), $1::text", arg); err != nil {
		t.Fatal(err)
	}
	// The server's message quotes the value: "invalid input syntax for type integer: ...".
	_, err := p.Pool().Exec(WithStatementLabel(t.Context(), "Tenant Lookup"),
		"SELECT ($1::text || clock_timestamp()::text)::int FROM pg_sleep(0.05)", arg)
	if err == nil {
		t.Fatal("cast of a non-number succeeded")
	}
	out := logs.String()
	if n := strings.Count(out, `"msg":"slow query"`); n != 2 {
		t.Errorf("%d slow query lines, want 2:\n%s", n, out)
	}
	for _, w := range []string{`"statement":"select"`, `"statement":"tenant lookup"`, `"error_code":"22P02"`, `"duration":`} {
		if !strings.Contains(out, w) {
			t.Errorf("log lacks %s:\n%s", w, out)
		}
	}
	for _, leak := range []string{arg, "pg_sleep"} {
		if strings.Contains(out, leak) {
			t.Errorf("log leaks %q:\n%s", leak, out)
		}
	}
	if got := gauge(t, reg, "meshguard_db_slow_queries_total", map[string]string{"statement": "select"}); got != 1 {
		t.Errorf("slow_queries_total{select} = %v, want 1", got)
	}
	if got := gauge(t, reg, "meshguard_db_query_errors_total", map[string]string{"statement": "tenant lookup", "code": "22P02"}); got != 1 {
		t.Errorf("errors_total{tenant lookup,22P02} = %v, want 1", got)
	}
}

// TestStatementLabelCap: dynamically named statements stop adding label
// values after maxStatementLabels.
func TestStatementLabelCap(t *testing.T) {
	needPG(t)
	p, reg := open(t, testConfig(pg.URL()), nil)
	for i := range maxStatementLabels + 10 {
		ctx := WithStatementLabel(t.Context(), fmt.Sprintf("label_%d", i))
		if _, err := p.Pool().Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := testutil.GatherAndCount(reg, "meshguard_db_query_duration_seconds"); err != nil || n != maxStatementLabels+1 {
		t.Errorf("%d label values, want %d plus other", n, maxStatementLabels)
	}
	if n := histogramCount(t, reg, "meshguard_db_query_duration_seconds", map[string]string{"statement": "other"}); n != 10 {
		t.Errorf("other count = %d, want 10", n)
	}
}

// TestPasswordRedaction: with a password-protected role and a wrong password,
// neither the logs, nor Health, nor ConnectDirect's error shows it; the right
// password connects.
func TestPasswordRedaction(t *testing.T) {
	needPG(t)
	t.Parallel()
	srv := pgtest.Start(t)
	role, pw := uniqueName("mg_role_"), "S3cr3t-"+uniqueName("")
	requirePassword(t, srv, role, pw)
	base := fmt.Sprintf("postgres://%s:%%s@127.0.0.1:%d/postgres?sslmode=disable", role, srv.Port())
	wrong := "Wr0ng-" + uniqueName("")

	cfg := testConfig(fmt.Sprintf(base, wrong))
	cfg.Startup.Attempts = 2
	var logs syncBuffer
	p, _ := open(t, cfg, &logs)
	servertest.WaitUntil(t, 15*time.Second, "the start-up loop to give up", func() bool { return strings.Contains(logs.String(), "after start-up attempts") })
	h := p.Health(t.Context())
	if h.Err == nil || !strings.Contains(h.Err.Error(), "password authentication failed") {
		t.Fatalf("Health with a wrong password: %+v", h)
	}
	_, derr := p.ConnectDirect(t.Context())
	if derr == nil {
		t.Fatal("direct connection with a wrong password succeeded")
	}
	for what, text := range map[string]string{"logs": logs.String(), "health": h.Err.Error(), "direct": derr.Error(),
		"config": fmt.Sprintf("%v %+v %#v", cfg, cfg, cfg)} {
		if strings.Contains(text, wrong) {
			t.Errorf("%s leaks the password:\n%s", what, text)
		}
	}

	cfg = testConfig(fmt.Sprintf(base, pw))
	p, _ = open(t, cfg, nil)
	if h := p.Health(t.Context()); h.Err != nil {
		t.Errorf("right password: %v", h.Err)
	}
}

// requirePassword creates a login role with a password and makes the server
// check passwords for it (pgtest trusts everyone else).
func requirePassword(t *testing.T, srv *pgtest.Server, role, pw string) {
	t.Helper()
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var hba string
	if err := conn.QueryRow(ctx, "SHOW hba_file").Scan(&hba); err != nil {
		t.Fatal(err)
	}
	old, err := os.ReadFile(hba)
	if err != nil {
		t.Fatal(err)
	}
	line := fmt.Sprintf("host all %s 127.0.0.1/32 scram-sha-256\n", role)
	if err := os.WriteFile(hba, append([]byte(line), old...), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{
		fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", role, pw),
		"SELECT pg_reload_conf()",
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	servertest.WaitUntil(t, 15*time.Second, "the login to be refused", func() bool {
		c, err := pgx.Connect(ctx, fmt.Sprintf("postgres://%s:nope@127.0.0.1:%d/postgres?sslmode=disable", role, srv.Port()))
		if err == nil {
			c.Close(ctx)
			return false
		}
		return strings.Contains(err.Error(), "password authentication failed")
	})
}

// TestMetricsRegistration: a second pool on the same registry is refused,
// and Close unregisters so a new pool can take its place.
func TestMetricsRegistration(t *testing.T) {
	needPG(t)
	cfg := testConfig(pg.URL())
	reg := prometheus.NewRegistry()
	p, err := Open(t.Context(), slog.New(slog.DiscardHandler), reg, cfg, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(t.Context(), slog.New(slog.DiscardHandler), reg, cfg, false); err == nil {
		t.Error("second pool on one registry accepted")
	}
	p.Close()
	p.Close() // idempotent
	p, err = Open(t.Context(), slog.New(slog.DiscardHandler), reg, cfg, false)
	if err != nil {
		t.Fatalf("reopen after Close: %v", err)
	}
	p.Close()
}

// gauge returns the value of a gauge or counter with exactly these labels
// (0 when absent).
func gauge(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	v, _ := metrictest.Value(t, reg, name, labels)
	return v
}

// histogramCount returns the observations of a histogram series (0 when absent).
func histogramCount(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) uint64 {
	t.Helper()
	n, _ := metrictest.SampleCount(t, reg, name, labels)
	return n
}

// TestCloseLeavesNoGoroutines: Close stops the start-up loop (even one still
// retrying an absent server) and pgxpool's background work.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	needPG(t)
	before := runtime.NumGoroutine()
	for _, url := range []string{pg.URL(), "postgres://postgres@127.0.0.1:1/none?sslmode=disable"} {
		cfg := testConfig(url)
		cfg.Pool.MinConns = 2
		cfg.Startup = StartupConfig{Attempts: 1000, Backoff: time.Hour, MaxBackoff: time.Hour}
		p, err := Open(t.Context(), slog.New(slog.DiscardHandler), prometheus.NewRegistry(), cfg, false)
		if err != nil {
			t.Fatal(err)
		}
		p.Pool().Exec(t.Context(), "SELECT 1")
		start := time.Now()
		p.Close()
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("Close took %v", d)
		}
	}
	servertest.WaitUntil(t, 15*time.Second, "Close's goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}
