package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/audittrail"
	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// auditFixture is a config file over a SQLite trail in a temp dir.
type auditFixture struct {
	dir, config, db string
}

func newAuditFixture(t *testing.T, extra string) auditFixture {
	t.Helper()
	dir := t.TempDir()
	f := auditFixture{dir: dir, config: filepath.Join(dir, "meshguard.yaml"), db: filepath.Join(dir, "audit.db")}
	yaml := fmt.Sprintf("audit:\n  sqlite_path: %q\n  spool_dir: %q\n  witness_dir: %q\n%s", f.db, filepath.Join(dir, "spool"), filepath.Join(dir, "witness"), extra)
	if err := os.WriteFile(f.config, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func auditNoEnv(string) string { return "" }

// runCLI runs meshguard with args and returns stdout, stderr and the error.
func runCLI(t *testing.T, getenv func(string) string, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(t.Context(), append([]string{"meshguard"}, args...), getenv, &out, &errb)
	return out.String(), errb.String(), err
}

// seedTrail writes recs through the real writer into the store cfg names
// (SQLite, or PostgreSQL when databaseURL is set).
func seedTrail(t *testing.T, configPath string, getenv func(string) string, recs []audittrail.Record) {
	t.Helper()
	cfg, err := loadConfig(configPath, getenv)
	if err != nil {
		t.Fatal(err)
	}
	a := &app{log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry(), cfg: cfg}
	db, err := openDatabase(t.Context(), a)
	if err != nil {
		t.Fatal(err)
	}
	if db != nil {
		defer db.close()
	}
	store, _, err := openAuditStore(t.Context(), a.log, cfg.Audit.Config, db)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if err := store.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	cfg.Audit.ChainID = "seed"
	keys, err := audittrail.LoadKeyring(cfg.Audit.KeySource(), true)
	if err != nil {
		t.Fatal(err)
	}
	w, err := newAuditWriter(a.log, a.reg, cfg.Audit.Config, store, keys)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Enqueue(t.Context(), recs); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	if st := w.Status(); st.SpoolSegments != 0 {
		t.Fatalf("seed rows went to the spool: %+v", st)
	}
}

func sampleRecords(n int, start time.Time) []audittrail.Record {
	recs := make([]audittrail.Record, n)
	for i := range recs {
		recs[i] = audittrail.Record{
			CreatedAt: start.Add(time.Duration(i) * time.Minute), Action: []string{"CREATE", "LOGIN_FAILURE"}[i%2],
			Severity: audittrail.SeverityLow, UserID: fmt.Sprintf("u%d", i), Method: "POST",
			Path: "/api/items", Status: 201, RequestID: fmt.Sprintf("r%d", i),
			UserAgent: []string{"=cmd|' /C calc'!A0", "curl/8, \"quoted\"\nnext"}[i%2],
			Metadata:  json.RawMessage(`{"i":` + fmt.Sprint(i) + `}`),
		}
	}
	return recs
}

// exportRows reads the EXPORT rows the CLI recorded.
func cliExportRows(t *testing.T, configPath string, getenv func(string) string) []audittrail.Record {
	t.Helper()
	out, stderr, err := runCLI(t, getenv, "audit", "export", "--config", configPath, "--format", "jsonl")
	if err != nil {
		t.Fatalf("export: %v\n%s", err, stderr)
	}
	var got []audittrail.Record
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var r audittrail.Record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if r.Action == "EXPORT" && r.EntityType == "audit_log" {
			got = append(got, r)
		}
	}
	return got
}

func TestCLIAuditExport(t *testing.T) {
	f := newAuditFixture(t, "")
	start := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	seedTrail(t, f.config, auditNoEnv, sampleRecords(50, start))

	t.Run("csv to a file", func(t *testing.T) {
		out := filepath.Join(f.dir, "export.csv")
		stdout, stderr, err := runCLI(t, auditNoEnv, "audit", "export", "--config", f.config, "--format", "csv",
			"--from", start.Add(10*time.Minute).Format(time.RFC3339), "--to", start.Add(30*time.Minute).Format(time.RFC3339), "--out", out)
		if err != nil {
			t.Fatalf("%v\n%s", err, stderr)
		}
		if stdout != "" || !strings.Contains(stderr, "exported 20 rows to "+out) {
			t.Fatalf("stdout %q stderr %q", stdout, stderr)
		}
		data, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		rows, err := csv.NewReader(bytes.NewReader(data)).ReadAll()
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) != 21 || rows[0][0] != "id" {
			t.Fatalf("%d CSV rows (header %v), want 1+20", len(rows), rows[0])
		}
		for i, row := range rows[1:] {
			if want := fmt.Sprintf("r%d", 10+i); row[12] != want {
				t.Fatalf("row %d request_id %q, want %q", i, row[12], want)
			}
			if ua := row[8]; !strings.HasPrefix(ua, "'=") && !strings.HasPrefix(ua, "curl/8, \"quoted\"\n") {
				t.Fatalf("row %d user_agent %q not neutralised or not round-tripped", i, ua)
			}
		}
		if m, _ := filepath.Glob(filepath.Join(f.dir, ".export.csv.*")); len(m) != 0 {
			t.Fatalf("temporary files left: %v", m)
		}
	})

	t.Run("jsonl to stdout", func(t *testing.T) {
		stdout, stderr, err := runCLI(t, auditNoEnv, "audit", "export", "--config", f.config, "--format", "jsonl",
			"--to", start.Add(5*time.Minute).Format(time.RFC3339))
		if err != nil {
			t.Fatalf("%v\n%s", err, stderr)
		}
		lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
		if len(lines) != 5 {
			t.Fatalf("%d lines, want 5:\n%s", len(lines), stdout)
		}
		var r audittrail.Record
		if err := json.Unmarshal([]byte(lines[1]), &r); err != nil || r.RequestID != "r1" || r.UserAgent != "curl/8, \"quoted\"\nnext" || len(r.Hash) != 32 {
			t.Fatalf("line 2 = %+v, %v", r, err)
		}
	})

	t.Run("each export is recorded", func(t *testing.T) {
		rows := cliExportRows(t, f.config, auditNoEnv)
		// csv + jsonl above, and the export reading them (recorded before it read)
		if len(rows) != 3 {
			t.Fatalf("%d EXPORT rows, want 3: %+v", len(rows), rows)
		}
		if !strings.HasPrefix(rows[0].UserID, "cli:") || rows[0].Severity != audittrail.SeverityMedium {
			t.Fatalf("EXPORT row %+v", rows[0])
		}
		var meta map[string]any
		if err := json.Unmarshal(rows[0].Metadata, &meta); err != nil || meta["format"] != "csv" || meta["out"] != filepath.Join(f.dir, "export.csv") {
			t.Fatalf("EXPORT metadata %s: %v", rows[0].Metadata, err)
		}
	})
}

func TestCLIAuditBadArguments(t *testing.T) {
	f := newAuditFixture(t, "")
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"audit"}, "usage error"},
		{[]string{"audit", "explode"}, "usage error"},
		{[]string{"audit", "export", "--config", f.config, "--format", "xml"}, `--format must be csv or jsonl, got "xml"`},
		{[]string{"audit", "export", "--config", f.config, "--from", "yesterday"}, `must be an RFC 3339 time like 2026-01-02T15:04:05Z, got "yesterday"`},
		{[]string{"audit", "export", "--config", f.config, "--from", "2026-02-01T00:00:00Z", "--to", "2026-01-01T00:00:00Z"}, "--to (2026-01-01T00:00:00Z) must be after --from (2026-02-01T00:00:00Z)"},
		{[]string{"audit", "export", "--config", f.config, "extra"}, `unexpected argument "extra"`},
		{[]string{"audit", "verify", "--config", filepath.Join(f.dir, "missing.yaml")}, "reading config"},
		{[]string{"audit", "prune", "--config", f.config, "--force"}, "flag provided but not defined: -force"},
		{[]string{"migrate", "--config", f.config, "now"}, `unexpected argument "now"`},
		// No key configured and none generated in the spool dir (only serve generates one).
		{[]string{"audit", "verify", "--config", f.config}, "no key: configure audit.key_file or MESHGUARD_AUDIT_KEY"},
		{[]string{"audit", "prune", "--config", f.config}, "no signing key to sign retention checkpoints with"},
		{[]string{"audit", "export", "--config", f.config}, "recording the export: no signing key"},
		{[]string{"audit", "keygen"}, "--out FILE is required"},
		{[]string{"audit", "keygen", "--out", filepath.Join(f.dir, "extra.key"), "extra"}, `unexpected argument "extra"`},
	}
	for i, tc := range cases {
		t.Run(fmt.Sprintf("%d_%s", i, strings.Join(tc.args[:min(2, len(tc.args))], "_")), func(t *testing.T) {
			_, stderr, err := runCLI(t, auditNoEnv, tc.args...)
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) && !strings.Contains(stderr, tc.want) {
				t.Fatalf("error %q, stderr %q; want %q", err, stderr, tc.want)
			}
		})
	}
	for _, name := range []string{"export.csv", "extra.key"} {
		if _, err := os.Stat(filepath.Join(f.dir, name)); err == nil {
			t.Fatalf("a rejected command wrote %s", name)
		}
	}
}

func TestCLIAuditVerifyDetectsTampering(t *testing.T) {
	f := newAuditFixture(t, "")
	seedTrail(t, f.config, auditNoEnv, sampleRecords(30, time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)))

	stdout, stderr, err := runCLI(t, auditNoEnv, "audit", "verify", "--config", f.config)
	if err != nil || !strings.HasPrefix(stdout, "ok: 30 rows in 1 chains verified") {
		t.Fatalf("clean trail: %v\n%s%s", err, stdout, stderr)
	}

	db, err := sql.Open("sqlite", f.db)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(t.Context(), "UPDATE audit_logs SET path = '/innocent' WHERE request_id = 'r7'"); err != nil {
		t.Fatal(err)
	}
	stdout, _, err = runCLI(t, auditNoEnv, "audit", "verify", "--config", f.config)
	if err == nil || !strings.Contains(err.Error(), "failed verification") {
		t.Fatalf("tampered trail verified: %v\n%s", err, stdout)
	}
	// A chain is named by its configured id and the writer's start epoch.
	if !regexp.MustCompile(`^TAMPERED: chain "seed/\d+" seq 8 `).MatchString(stdout) {
		t.Fatalf("report %q does not name the first broken row (seq 8)", stdout)
	}

	stdout, _, err = runCLI(t, auditNoEnv, "audit", "verify", "--config", f.config, "--json")
	var rep audittrail.VerifyReport
	if err == nil || json.Unmarshal([]byte(stdout), &rep) != nil || rep.OK || rep.Break == nil || rep.Break.Seq != 8 {
		t.Fatalf("--json on a tampered trail: %v %+v\n%s", err, rep, stdout)
	}

	// Rows deleted from the end of the chain: the witness still holds its
	// signed checkpoint of 30 rows.
	if _, err := db.ExecContext(t.Context(), "DELETE FROM audit_logs WHERE seq >= 7"); err != nil {
		t.Fatal(err)
	}
	stdout, _, err = runCLI(t, auditNoEnv, "audit", "verify", "--config", f.config)
	if err == nil || !regexp.MustCompile(`^TAMPERED: chain "seed/\d+" seq 7: rows 7..30 are missing`).MatchString(stdout) {
		t.Fatalf("truncated trail: %v\n%s", err, stdout)
	}

	// A witness file someone rewrote fails verification, naming its chain.
	files, _ := filepath.Glob(filepath.Join(f.dir, "witness", "*.checkpoint"))
	if len(files) != 1 {
		t.Fatalf("witness files: %v", files)
	}
	if err := os.WriteFile(files[0], []byte("seed/1\n30\nAAAA\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, _, err = runCLI(t, auditNoEnv, "audit", "verify", "--config", f.config)
	if err == nil || !regexp.MustCompile(`^TAMPERED: chain "seed/\d+" seq 0: witness file .*: not a signed note`).MatchString(stdout) {
		t.Fatalf("corrupt witness: %v\n%s", err, stdout)
	}
}

func TestCLIAuditKeygen(t *testing.T) {
	out := filepath.Join(t.TempDir(), "audit.key")
	stdout, _, err := runCLI(t, auditNoEnv, "audit", "keygen", "--name", "prod-audit", "--out", out)
	if err != nil || !strings.HasPrefix(stdout, "prod-audit+") {
		t.Fatalf("keygen: %v %q", err, stdout)
	}
	st, err := os.Stat(out)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", st, err)
	}
	k, err := audittrail.ReadKeyFile(out)
	if err != nil || k.VerifierKey() != strings.TrimSpace(stdout) {
		t.Fatalf("key file does not hold the printed key's private half: %v", err)
	}
	if _, _, err := runCLI(t, auditNoEnv, "audit", "keygen", "--out", out); err == nil {
		t.Fatal("keygen overwrote an existing key file")
	}
}

func TestCLIAuditPrune(t *testing.T) {
	f := newAuditFixture(t, "  retention: 720h\n")
	now := time.Now().UTC()
	old := sampleRecords(10, now.AddDate(0, -6, 0))
	recent := sampleRecords(10, now.Add(-time.Hour))
	for i := range recent {
		recent[i].RequestID = "new-" + recent[i].RequestID
	}
	seedTrail(t, f.config, auditNoEnv, append(old, recent...))

	stdout, stderr, err := runCLI(t, auditNoEnv, "audit", "prune", "--config", f.config)
	if err != nil || !strings.HasPrefix(stdout, "pruned 1 partitions: audit_logs_p") {
		t.Fatalf("prune: %v\n%s%s", err, stdout, stderr)
	}
	stdout, _, err = runCLI(t, auditNoEnv, "audit", "export", "--config", f.config)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(stdout, `"request_id":"r`) || strings.Count(stdout, `"request_id":"new-`) != 10 {
		t.Fatalf("after prune the trail holds:\n%s", stdout)
	}
	// The pruned rows are vouched for by their checkpoint.
	if stdout, _, err := runCLI(t, auditNoEnv, "audit", "verify", "--config", f.config); err != nil {
		t.Fatalf("verify after prune: %v\n%s", err, stdout)
	}
	if stdout, _, err := runCLI(t, auditNoEnv, "audit", "prune", "--config", f.config); err != nil || !strings.HasPrefix(stdout, "nothing older than 720h0m0s") {
		t.Fatalf("second prune: %v %q", err, stdout)
	}
}

func TestCLIMigrateAndExportPostgres(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase(t)
	f := newAuditFixture(t, "")
	getenv := func(k string) string {
		if k == "DATABASE_URL" {
			return url
		}
		return ""
	}
	stdout, stderr, err := runCLI(t, getenv, "migrate", "--config", f.config)
	if err != nil || stdout != "audit schema up to date (postgres)\n" {
		t.Fatalf("migrate: %v %q\n%s", err, stdout, stderr)
	}
	// Idempotent.
	if _, _, err := runCLI(t, getenv, "migrate", "--config", f.config); err != nil {
		t.Fatalf("second migrate: %v", err)
	}
	seedTrail(t, f.config, getenv, sampleRecords(25, time.Now().UTC().Add(-time.Hour)))
	stdout, _, err = runCLI(t, getenv, "audit", "export", "--config", f.config, "--format", "csv")
	if err != nil {
		t.Fatal(err)
	}
	rows, err := csv.NewReader(strings.NewReader(stdout)).ReadAll()
	// header, 25 rows, and the EXPORT row of this very export (recorded first)
	if err != nil || len(rows) != 27 || rows[26][2] != "EXPORT" {
		t.Fatalf("%d CSV rows, want 27 ending with the EXPORT row: %v", len(rows), err)
	}
	if _, err := os.Stat(f.db); err == nil {
		t.Fatal("with DATABASE_URL set the CLI still created the SQLite file")
	}
	if stdout, _, err := runCLI(t, getenv, "audit", "verify", "--config", f.config); err != nil || !strings.HasPrefix(stdout, "ok: 26 rows in 2 chains") {
		t.Fatalf("verify on PostgreSQL: %v %q", err, stdout)
	}
}

// TestServeAuditAPIWiring builds the audit component as serve does, on the
// embedded store: the admin API refuses without the token and answers with
// it, and a CSP report reaches the trail through the real writer.
func TestServeAuditAPIWiring(t *testing.T) {
	const token = "wiring-test-token-0123456789"
	f := newAuditFixture(t, "  batch_interval: 20ms\n")
	cfg, err := loadConfig(f.config, func(k string) string {
		if k == "MESHGUARD_ADMIN_TOKEN" {
			return token
		}
		return ""
	})
	if err != nil {
		t.Fatal(err)
	}
	a := &app{log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry(), cfg: cfg}
	c, err := setupAuditsink(t.Context(), a)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(t.Context())
	runDone := make(chan error, 1)
	go func() { runDone <- c.run(ctx) }()
	t.Cleanup(func() {
		stop()
		<-runDone
		c.shutdown(context.Background())
	})
	if c.grpc == nil || c.http == nil || len(c.checks) != 2 {
		t.Fatalf("component %+v", c)
	}
	for _, ch := range c.checks {
		if st := ch.check(t.Context()); !st.Healthy {
			t.Fatalf("check %s unhealthy: %+v", ch.name, st)
		}
	}
	mux := http.NewServeMux()
	c.http(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	report := `{"csp-report":{"document-uri":"https://app.example.com/page","violated-directive":"script-src-elem","effective-directive":"script-src-elem","blocked-uri":"https://evil.example/x.js","original-policy":"script-src 'self'","disposition":"enforce","status-code":200}}`
	resp, err := srv.Client().Post(srv.URL+"/v1/csp-reports", "application/csp-report", strings.NewReader(report))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("CSP report: %d", resp.StatusCode)
	}

	get := func(auth string) (int, string) {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL+"/v1/audit/security-events?action=CSP_VIOLATION", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, _ := get(""); code != http.StatusUnauthorized {
		t.Fatalf("without a token: %d", code)
	}
	servertest.WaitFor(t, 10*time.Second, func() error {
		code, body := get("Bearer " + token)
		if code != http.StatusOK {
			t.Fatalf("with the token: %d %s", code, body)
		}
		if !strings.Contains(body, `"CSP_VIOLATION"`) {
			return fmt.Errorf("the CSP report never reached the trail: %s", body)
		}
		return nil
	})
}

// TestServeAuditStartsWithPostgresDown: serve's audit component starts
// while PostgreSQL is down (records go to the spool), reports "not migrated"
// in /readyz without taking the replica out, migrates by itself once the
// database is back, and the spooled records then land in PostgreSQL.
func TestServeAuditStartsWithPostgresDown(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase(t)
	srv.Stop()
	oldTimeout, oldDelay := migrateAtStartTimeout, migrateRetryDelay
	migrateAtStartTimeout, migrateRetryDelay = 300*time.Millisecond, 50*time.Millisecond
	t.Cleanup(func() { migrateAtStartTimeout, migrateRetryDelay = oldTimeout, oldDelay })

	f := newAuditFixture(t, "  batch_interval: 20ms\n  write_timeout: 300ms\n")
	cfg, err := loadConfig(f.config, func(k string) string {
		switch k {
		case "DATABASE_URL":
			return url
		case "MESHGUARD_ADMIN_TOKEN":
			return "outage-test-token-0123456789"
		}
		return ""
	})
	if err != nil {
		t.Fatal(err)
	}
	a := &app{log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry(), cfg: cfg}
	db, err := openDatabase(t.Context(), a)
	if err != nil {
		t.Fatal(err)
	}
	a.db = db
	t.Cleanup(db.close)
	c, err := setupAuditsink(t.Context(), a)
	if err != nil {
		t.Fatalf("setup with PostgreSQL down: %v", err)
	}
	ctx, stop := context.WithCancel(t.Context())
	runDone := make(chan error, 1)
	go func() { runDone <- c.run(ctx) }()
	t.Cleanup(func() {
		stop()
		<-runDone
		c.shutdown(context.Background())
	})
	check := func(name string) dependencyStatus {
		for _, ch := range c.checks {
			if ch.name == name {
				st := ch.check(t.Context())
				st.Required = ch.required
				return st
			}
		}
		t.Fatalf("no %s check", name)
		return dependencyStatus{}
	}
	if st := check("audit"); st.Healthy || st.Required || !strings.Contains(st.Error, "not migrated") {
		t.Fatalf("audit check while down: %+v", st)
	}
	if st := check("audit_spool"); !st.Healthy {
		t.Fatalf("spool check while down: %+v", st)
	}

	mux := http.NewServeMux()
	c.http(mux)
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)
	report := `{"csp-report":{"document-uri":"https://app.example.com/","violated-directive":"img-src","effective-directive":"img-src","blocked-uri":"https://x.example/p.gif","disposition":"enforce"}}`
	resp, err := hs.Client().Post(hs.URL+"/v1/csp-reports", "application/csp-report", strings.NewReader(report))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("CSP report while PostgreSQL is down: %d", resp.StatusCode)
	}

	srv.Restart(t)
	servertest.WaitFor(t, 20*time.Second, func() error {
		var n int
		err := db.pool.Pool().QueryRow(t.Context(), "SELECT count(*) FROM audit_logs WHERE action = 'CSP_VIOLATION'").Scan(&n)
		if err == nil && n == 1 && check("audit").Healthy {
			return nil
		}
		return fmt.Errorf("after PostgreSQL came back: rows=%d err=%v audit=%+v", n, err, check("audit"))
	})
}

// TestServeAuditGeneratedKey: with no key configured serve generates one in
// the spool dir (0600), logs its public half only, and /readyz says the
// trail runs on a generated key; a configured key is used as it is.
func TestServeAuditGeneratedKey(t *testing.T) {
	setup := func(t *testing.T, getenv func(string) string) (auditDetails, dependencyStatus, string, auditFixture) {
		f := newAuditFixture(t, "")
		cfg, err := loadConfig(f.config, getenv)
		if err != nil {
			t.Fatal(err)
		}
		var logs bytes.Buffer
		a := &app{log: slog.New(slog.NewTextHandler(&logs, nil)), reg: prometheus.NewRegistry(), cfg: cfg}
		c, err := setupAuditsink(t.Context(), a)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.shutdown(context.Background()) })
		for _, ch := range c.checks {
			if ch.name == "audit" {
				st := ch.check(t.Context())
				return st.Details.(auditDetails), st, logs.String(), f
			}
		}
		t.Fatal("no audit check")
		return auditDetails{}, dependencyStatus{}, "", f
	}

	d, st, logs, f := setup(t, auditNoEnv)
	keyFile := filepath.Join(f.dir, "spool", "audit-signing.key")
	fi, err := os.Stat(keyFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("generated key file: %v %v", fi, err)
	}
	skey, _ := os.ReadFile(keyFile)
	// The seed's base64 is the fifth '+' field (base64 itself may hold '+').
	secretPart := strings.SplitN(strings.TrimSpace(string(skey)), "+", 5)[4]
	if !d.GeneratedKey || !st.Healthy || !strings.Contains(st.Error, "generated key") || !strings.Contains(logs, d.PublicKey) {
		t.Fatalf("readyz details %+v / %+v; logs:\n%s", d, st, logs)
	}
	if strings.Contains(logs, secretPart) || strings.Contains(logs, "PRIVATE+KEY") {
		t.Fatal("the private key reached the log")
	}

	skey2, vkey2, err := audittrail.GenerateKey("configured")
	if err != nil {
		t.Fatal(err)
	}
	d, st, _, _ = setup(t, func(k string) string {
		if k == "MESHGUARD_AUDIT_KEY" {
			return skey2
		}
		return ""
	})
	if d.GeneratedKey || d.PublicKey != vkey2 || st.Error != "" {
		t.Fatalf("configured key: details %+v / %+v", d, st)
	}
}
