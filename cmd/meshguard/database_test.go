package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/audittrail"
	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/servertest"
)

// readyzDoc is /readyz as a client sees it.
type readyzDoc struct {
	Status       string `json:"status"`
	Dependencies map[string]struct {
		Healthy   bool    `json:"healthy"`
		Required  bool    `json:"required"`
		LatencyMS float64 `json:"latency_ms"`
		Error     string  `json:"error"`
		Details   struct {
			Pool map[string]float64 `json:"pool"`
		} `json:"details"`
	} `json:"dependencies"`
}

func getReadyz(t *testing.T, h http.Handler) (int, readyzDoc, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	body := rec.Body.String()
	var doc readyzDoc
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatalf("/readyz body %q: %v", body, err)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q", ct)
	}
	return rec.Code, doc, body
}

func testDatabase(t *testing.T, url string) *database {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Database.URL = secret.URL(url)
	cfg.Database.Startup.Backoff = 20 * time.Millisecond
	cfg.Database.Startup.MaxBackoff = 100 * time.Millisecond
	a := &app{log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry(), cfg: cfg}
	db, err := openDatabase(t.Context(), a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.close)
	return db
}

// TestReadyzDatabase: /readyz is 200 with live pool figures while postgres
// runs, 503 with the cause once it is killed, and 200 again after it
// restarts, with no restart of meshguard.
func TestReadyzDatabase(t *testing.T) {
	srv := pgtest.Start(t)
	db := testDatabase(t, srv.URL())
	h := newReadyHandler([]readinessCheck{db.check()})

	code, doc, body := waitReady(t, h)
	dep, ok := doc.Dependencies["database"]
	if code != http.StatusOK || doc.Status != "ready" || !ok || !dep.Healthy || !dep.Required || dep.Error != "" {
		t.Fatalf("up: %d %s", code, body)
	}
	if dep.LatencyMS <= 0 {
		t.Errorf("latency_ms = %v", dep.LatencyMS)
	}
	for _, k := range []string{"total_conns", "idle_conns", "acquired_conns", "constructing_conns", "max_conns",
		"acquire_count", "empty_acquire_count", "empty_acquire_wait_ms", "canceled_acquire_count"} {
		if _, ok := dep.Details.Pool[k]; !ok {
			t.Errorf("details.pool lacks %s: %s", k, body)
		}
	}
	if got := dep.Details.Pool["max_conns"]; got != 10 {
		t.Errorf("max_conns = %v, want the configured 10", got)
	}
	if dep.Details.Pool["acquire_count"] < 1 {
		t.Errorf("acquire_count = %v after a ping", dep.Details.Pool["acquire_count"])
	}

	srv.Kill()
	code, doc, body = getReadyz(t, h)
	dep = doc.Dependencies["database"]
	if code != http.StatusServiceUnavailable || doc.Status != "not_ready" || dep.Healthy || dep.Error == "" {
		t.Fatalf("killed: %d %s", code, body)
	}
	if _, ok := dep.Details.Pool["max_conns"]; !ok {
		t.Errorf("pool figures missing while down: %s", body)
	}

	srv.Restart(t)
	waitReady(t, h)
}

// waitReady polls /readyz until it answers 200, for up to 15s (the first
// connection may take a while on a loaded machine).
func waitReady(t *testing.T, h http.Handler) (int, readyzDoc, string) {
	t.Helper()
	var code int
	var doc readyzDoc
	var body string
	servertest.WaitFor(t, 15*time.Second, func() error {
		if code, doc, body = getReadyz(t, h); code != http.StatusOK {
			return fmt.Errorf("not ready: %d %s", code, body)
		}
		return nil
	})
	return code, doc, body
}

// TestReadyzRedactsPasswords: neither the database check nor any other
// check's error can put a password into /readyz.
func TestReadyzRedactsPasswords(t *testing.T) {
	const pw = "hunter2-7c1e"
	srv := pgtest.Start(t)
	url := fmt.Sprintf("postgres://nobody:%s@127.0.0.1:%d/postgres?sslmode=disable", pw, srv.Port())
	srv.Stop()
	db := testDatabase(t, url)
	leaky := readinessCheck{name: "redis", required: false, check: func(context.Context) dependencyStatus {
		return dependencyStatus{Error: "dial redis://:" + pw + "@10.0.0.1:6379/0 failed; conninfo host=db password=" + pw + " user=x"}
	}}
	h := newReadyHandler([]readinessCheck{db.check(), leaky})
	code, doc, body := getReadyz(t, h)
	if code != http.StatusServiceUnavailable || doc.Dependencies["database"].Error == "" {
		t.Fatalf("%d %s", code, body)
	}
	if strings.Contains(body, pw) {
		t.Errorf("/readyz leaks the password: %s", body)
	}
	if e := doc.Dependencies["redis"].Error; !strings.Contains(e, "redis://:[REDACTED]@10.0.0.1:6379/0") || !strings.Contains(e, "password=[REDACTED] user=x") {
		t.Errorf("redis error = %q", e)
	}
}

func TestRedactError(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"connection refused", "connection refused"},
		{"postgres://app:s3cr%40t@db:5432/x: refused", "postgres://app:[REDACTED]@db:5432/x: refused"},
		{"rediss://user:p:w@h:1 down", "rediss://user:[REDACTED]@h:1 down"},
		{"host=db PASSWORD = 'a b' port=1", "host=db PASSWORD = [REDACTED] port=1"},
		{"https://example.com/path is fine", "https://example.com/path is fine"},
		{strings.Repeat("x", 600), strings.Repeat("x", 512) + "..."},
	}
	for _, tc := range tests {
		if got := redactError(tc.in); got != tc.want {
			t.Errorf("redactError(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestNoDatabaseConfigured(t *testing.T) {
	a := &app{log: slog.New(slog.NewTextHandler(io.Discard, nil)), reg: prometheus.NewRegistry(), cfg: DefaultConfig()}
	db, err := openDatabase(t.Context(), a)
	if db != nil || err != nil {
		t.Errorf("openDatabase without a URL = %v, %v; want nil, nil", db, err)
	}
}

// TestAuditPathThroughPgBouncer: with database.pgbouncer on, the audit
// store migrates (transaction-scoped advisory lock, SET LOCAL) and the
// writer's COPY batches land in PostgreSQL through a real PgBouncer in
// transaction mode, leaving no server-side prepared statement behind.
func TestAuditPathThroughPgBouncer(t *testing.T) {
	srv := pgtest.Start(t)
	bouncer := pgtest.StartPgBouncer(t, srv)
	direct := srv.NewDatabase(t)
	viaBouncer := bouncer.URL(t, direct)

	cfg := DefaultConfig()
	cfg.Database.URL = secret.URL(viaBouncer)
	cfg.Database.DirectURL = secret.URL(direct)
	cfg.Database.PgBouncer = true
	cfg.Audit.SpoolDir = t.TempDir()
	a := &app{log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry(), cfg: cfg}
	db, err := openDatabase(t.Context(), a)
	if err != nil {
		t.Fatal(err)
	}
	defer db.close()

	store, kind, err := openAuditStore(t.Context(), a.log, cfg.Audit.Config, db)
	if err != nil || kind != "postgres" {
		t.Fatalf("store %q: %v", kind, err)
	}
	defer store.Close()
	if err := store.Migrate(t.Context()); err != nil {
		t.Fatalf("migrating through PgBouncer: %v", err)
	}
	pgStore, ok := store.(*audittrail.PGStore)
	if !ok {
		t.Fatalf("store is %T", store)
	}
	keys, err := audittrail.LoadKeyring(cfg.Audit.KeySource(), true)
	if err != nil {
		t.Fatal(err)
	}
	w, err := audittrail.NewWriter(a.log, a.reg, cfg.Audit.Config, pgStore, keys)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(t.Context())
	runDone := make(chan error, 1)
	go func() { runDone <- w.Run(runCtx) }()
	const n = 250
	recs := make([]audittrail.Record, n)
	for i := range recs {
		recs[i] = audittrail.Record{CreatedAt: time.Now().UTC(), Action: "READ", Severity: audittrail.SeverityLow,
			Method: "GET", Path: fmt.Sprintf("/items/%d", i), Status: 200, Metadata: []byte(`{"k":"v"}`)}
	}
	if err := w.Enqueue(t.Context(), recs); err != nil {
		t.Fatal(err)
	}
	stop()
	<-runDone
	if err := w.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	if st := w.Status(); st.SpoolSegments != 0 || st.LastError != "" {
		t.Fatalf("records went to the spool, not PgBouncer: %+v", st)
	}
	var rows int
	if err := db.pool.Pool().QueryRow(t.Context(), "SELECT count(*) FROM audit_logs").Scan(&rows); err != nil || rows != n {
		t.Fatalf("audit_logs rows = %d, %v; want %d", rows, err, n)
	}
	var prepared int
	err = db.pool.Pool().QueryRow(t.Context(), "SELECT count(*) FROM pg_prepared_statements").Scan(&prepared)
	if err != nil || prepared != 0 {
		t.Errorf("server session behind PgBouncer holds %d prepared statements (%v)", prepared, err)
	}
}
