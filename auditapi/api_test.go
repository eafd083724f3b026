package auditapi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/internal/metrictest"
	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/servertest"

	"github.com/meshguard/meshguard/audittrail"
)

const apiTestToken = "s3cret-admin-token-0123456789"

var apiTestLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// apiStore is a store the API tests read and write.
type apiStore interface {
	recordReader
	audittrail.BatchStore
}

// testKeys signs the writers these tests start.
var testKeys = func() *audittrail.Keyring {
	skey, _, err := audittrail.GenerateKey("api-test")
	if err != nil {
		panic(err)
	}
	kr, err := audittrail.LoadKeyring(audittrail.KeySource{Key: skey}, false)
	if err != nil {
		panic(err)
	}
	return kr
}()

// apiOpenSQLite returns a migrated SQLite store in a temp dir.
func apiOpenSQLite(t testing.TB) *audittrail.SQLiteStore {
	t.Helper()
	s, err := audittrail.OpenSQLite(t.Context(), apiTestLog, filepath.Join(t.TempDir(), "audit.db"), audittrail.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	return s
}

// apiOpenPG returns a migrated PGStore on a fresh database of srv.
func apiOpenPG(t testing.TB, srv *pgtest.Server) *audittrail.PGStore {
	t.Helper()
	pool, err := pgxpool.New(t.Context(), srv.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	s, err := audittrail.OpenPostgres(t.Context(), apiTestLog, pool, audittrail.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	return s
}

// storeSink writes enqueued records into a real store through a real
// Writer and returns once they are committed, so what the API records can
// be read back at once.
type storeSink struct {
	mu   sync.Mutex
	w    *audittrail.Writer
	n    int64
	recs []audittrail.Record
	err  error // when set, Enqueue refuses
}

func newStoreSink(t testing.TB, s audittrail.BatchStore) *storeSink {
	t.Helper()
	cfg := audittrail.DefaultConfig()
	cfg.SpoolDir = filepath.Join(t.TempDir(), "spool")
	cfg.BatchInterval = 5 * time.Millisecond
	w, err := audittrail.NewWriter(apiTestLog, prometheus.NewRegistry(), cfg, s, testKeys)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		w.Close(context.Background())
		cancel()
		<-done
	})
	return &storeSink{w: w}
}

func (s *storeSink) Enqueue(ctx context.Context, recs []audittrail.Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	if err := s.w.Enqueue(ctx, recs); err != nil {
		return err
	}
	s.n += int64(len(recs))
	deadline := time.Now().Add(30 * time.Second)
	for st := s.w.Status(); st.Head.Seq < s.n || st.SpoolSegments > 0; st = s.w.Status() {
		if time.Now().After(deadline) {
			return fmt.Errorf("records not committed: %+v", st)
		}
		time.Sleep(time.Millisecond)
	}
	s.recs = append(s.recs, recs...)
	return nil
}

func (s *storeSink) recorded() []audittrail.Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.recs)
}

// apiSeed writes n records one second apart from start, with varied fields.
func apiSeed(t testing.TB, s audittrail.BatchStore, n int, start time.Time) []audittrail.Record {
	t.Helper()
	actions := []string{"LOGIN_FAILURE", "CREATE", "UPDATE", "PERMISSION_DENIED", "CSP_VIOLATION", "DELETE"}
	sev := []string{audittrail.SeverityLow, audittrail.SeverityMedium, audittrail.SeverityHigh, audittrail.SeverityCritical}
	recs := make([]audittrail.Record, n)
	for i := range recs {
		recs[i] = audittrail.Record{
			CreatedAt:  start.Add(time.Duration(i) * time.Second),
			Action:     actions[i%len(actions)],
			Severity:   sev[i%len(sev)],
			EntityType: []string{"invoice", "user"}[i%2],
			EntityID:   fmt.Sprint(i % 5),
			UserID:     fmt.Sprintf("u%d", i%3),
			IPAddress:  "192.0.2.7",
			UserAgent:  "test/1",
			Method:     "POST",
			Path:       "/api/invoices",
			Status:     []int{200, 403, 429}[i%3],
			RequestID:  fmt.Sprintf("req-%d", i),
			Tenant:     []string{"", "acme"}[i%2],
			Metadata:   json.RawMessage(fmt.Sprintf(`{"i":%d}`, i)),
		}
	}
	sink := newStoreSink(t, s)
	for off := 0; off < n; off += 500 {
		if err := sink.Enqueue(t.Context(), recs[off:min(off+500, n)]); err != nil {
			t.Fatal(err)
		}
	}
	return recs
}

// newTestAPI returns an API over store with cfg and its mux.
func newTestAPI(t testing.TB, cfg Config, store recordReader, sink recordSink) (*API, *http.ServeMux) {
	t.Helper()
	api, err := NewAPI(apiTestLog, prometheus.NewRegistry(), cfg, store, sink)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	api.Register(mux)
	return api, mux
}

func tokenConfig() Config {
	cfg := DefaultConfig()
	cfg.AdminToken = secret.String(apiTestToken)
	return cfg
}

func get(t testing.TB, h http.Handler, target string, hdr ...string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, target, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

var bearer = []string{"Authorization", "Bearer " + apiTestToken}

func TestAPIAuthz(t *testing.T) {
	store := apiOpenSQLite(t)
	apiSeed(t, store, 10, time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("file-token-abcdefghijklmnop\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	disabled := DefaultConfig()
	withToken := tokenConfig()
	withFile := DefaultConfig()
	withFile.AdminTokenFile = tokenFile

	cases := []struct {
		name      string
		cfg       Config
		hdr       []string
		want      int
		challenge string // expected WWW-Authenticate prefix; "" means none
		user      string // recorded user on success
	}{
		{"disabled, no credentials", disabled, nil, 503, "", ""},
		{"disabled, a token", disabled, bearer, 503, "", ""},
		{"disabled, a role header", disabled, []string{"x-meshguard-role", "auditor"}, 503, "", ""},
		{"no credentials", withToken, nil, 401, `Bearer realm="meshguard-audit"`, ""},
		{"wrong token", withToken, []string{"Authorization", "Bearer nope"}, 401, `Bearer realm="meshguard-audit", error="invalid_token"`, ""},
		{"token prefix", withToken, []string{"Authorization", "Bearer " + apiTestToken[:10]}, 401, `Bearer realm="meshguard-audit", error="invalid_token"`, ""},
		{"token with suffix", withToken, []string{"Authorization", "Bearer " + apiTestToken + "x"}, 401, `Bearer realm="meshguard-audit", error="invalid_token"`, ""},
		{"basic scheme", withToken, []string{"Authorization", "Basic " + apiTestToken}, 401, `Bearer realm="meshguard-audit", error="invalid_request"`, ""},
		{"empty bearer", withToken, []string{"Authorization", "Bearer "}, 401, `Bearer realm="meshguard-audit", error="invalid_request"`, ""},
		{"right token", withToken, bearer, 200, "", actorEnvToken},
		{"right token, lower-case scheme", withToken, []string{"Authorization", "bearer " + apiTestToken}, 200, "", actorEnvToken},
		{"file token", withFile, []string{"Authorization", "Bearer file-token-abcdefghijklmnop"}, 200, "", actorFileToken},
		{"env token when only a file is configured", withFile, bearer, 401, `Bearer realm="meshguard-audit", error="invalid_token"`, ""},
		// Headers a direct caller can forge admit nobody and name nobody.
		{"forged role header", withToken, []string{"x-meshguard-role", "admin", "x-meshguard-user", "alice"}, 401, `Bearer realm="meshguard-audit"`, ""},
		{"forged role header beside the app's JWT", withToken, []string{"Authorization", "Bearer eyJhbGciOi.jwt.sig", "x-meshguard-role", "admin"}, 401, `Bearer realm="meshguard-audit", error="invalid_token"`, ""},
		{"forged user header beside the token", withToken, append([]string{"x-meshguard-user", "alice", "x-meshguard-role", "admin"}, bearer...), 200, "", actorEnvToken},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sink := newStoreSink(t, store)
			_, mux := newTestAPI(t, tc.cfg, store, sink)
			for _, path := range []string{"/v1/audit/logs", "/v1/audit/export?format=jsonl&from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z"} {
				rec := get(t, mux, path, tc.hdr...)
				if rec.Code != tc.want {
					t.Fatalf("GET %s: status %d, want %d; body %s", path, rec.Code, tc.want, rec.Body)
				}
				if got := rec.Header().Get("WWW-Authenticate"); got != tc.challenge {
					t.Errorf("WWW-Authenticate = %q, want %q", got, tc.challenge)
				}
				if tc.want != 200 {
					var body struct{ Error string }
					if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Error == "" {
						t.Errorf("error body %q is not a JSON error", rec.Body)
					}
					if strings.Contains(rec.Body.String(), `"id"`) || strings.Contains(rec.Body.String(), "req-") {
						t.Errorf("refused request leaked rows: %s", rec.Body)
					}
				}
			}
			got := sink.recorded()
			switch tc.want {
			case 503: // disabled: nothing to authenticate against
				if len(got) != 0 {
					t.Fatalf("refused requests recorded %d rows", len(got))
				}
				return
			case 401: // each failed authentication is in the trail, without a user
				if len(got) != 2 || got[0].Action != "LOGIN_FAILURE" || got[0].UserID != "" || got[0].EntityType != "audit_api" {
					t.Fatalf("recorded %+v, want two LOGIN_FAILURE rows", got)
				}
				return
			}
			if len(got) != 2 || got[0].UserID != tc.user || got[1].UserID != tc.user {
				t.Fatalf("recorded %+v, want two rows by %q", got, tc.user)
			}
		})
	}
}

// TestAPIDisabledMessage checks the disabled API says how to enable it.
func TestAPIDisabledMessage(t *testing.T) {
	store := apiOpenSQLite(t)
	_, mux := newTestAPI(t, DefaultConfig(), store, newStoreSink(t, store))
	rec := get(t, mux, "/v1/audit/logs", bearer...)
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "MESHGUARD_ADMIN_TOKEN") {
		t.Fatalf("disabled API: %d %s", rec.Code, rec.Body)
	}
}

func TestAPITokenFileRotation(t *testing.T) {
	store := apiOpenSQLite(t)
	path := filepath.Join(t.TempDir(), "token")
	write := func(tok string, mod time.Time) {
		t.Helper()
		if err := os.WriteFile(path, []byte(tok), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(path, mod, mod); err != nil {
			t.Fatal(err)
		}
	}
	base := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	write("first-token-0123456789", base)
	cfg := DefaultConfig()
	cfg.AdminTokenFile = path
	api, mux := newTestAPI(t, cfg, store, newStoreSink(t, store))
	var mu sync.Mutex
	now := base
	api.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	try := func(tok string) int {
		return get(t, mux, "/v1/audit/logs", "Authorization", "Bearer "+tok).Code
	}

	if c := try("first-token-0123456789"); c != 200 {
		t.Fatalf("first token: %d", c)
	}
	write("second-token-0123456789", base.Add(time.Minute))
	advance(2 * tokenFileCheckInterval)
	if c := try("first-token-0123456789"); c != 401 {
		t.Fatalf("first token after rotation: %d, want 401", c)
	}
	if c := try("second-token-0123456789"); c != 200 {
		t.Fatalf("second token after rotation: %d, want 200", c)
	}
	// Emptied file: nobody gets in with a token (fail closed).
	write("", base.Add(2*time.Minute))
	advance(2 * tokenFileCheckInterval)
	if c := try("second-token-0123456789"); c != 401 {
		t.Fatalf("emptied file still admits the old token: %d", c)
	}
	// Removed file: still closed, and the API says 401, not 503.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	advance(2 * tokenFileCheckInterval)
	if c := try("second-token-0123456789"); c != 401 {
		t.Fatalf("removed file: %d, want 401", c)
	}
	write("third-token-0123456789", base.Add(3*time.Minute))
	advance(2 * tokenFileCheckInterval)
	if c := try("third-token-0123456789"); c != 200 {
		t.Fatalf("restored file: %d, want 200", c)
	}
}

func TestNewAPIRejectsUnreadableTokenFile(t *testing.T) {
	store := apiOpenSQLite(t)
	cfg := DefaultConfig()
	cfg.AdminTokenFile = filepath.Join(t.TempDir(), "missing")
	if _, err := NewAPI(apiTestLog, prometheus.NewRegistry(), cfg, store, newStoreSink(t, store)); err == nil ||
		!strings.Contains(err.Error(), "audit.admin_token_file") {
		t.Fatalf("NewAPI with a missing token file: %v", err)
	}
}

func TestValidateAdmin(t *testing.T) {
	cases := []struct {
		name string
		mod  func(*Config)
		want string // "" means valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"role", func(c *Config) { c.AdminRole = "audit:admin" }, "audit.admin_role: removed: any caller reaching the listener could forge the role header; use MESHGUARD_ADMIN_TOKEN or audit.admin_token_file"},
		{"token with space", func(c *Config) { c.AdminToken = "abc def" }, "MESHGUARD_ADMIN_TOKEN: must be visible ASCII without spaces"},
		{"token file with newline", func(c *Config) { c.AdminTokenFile = "a\nb" }, `audit.admin_token_file: not a file path, got "a\nb"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			tc.mod(&c)
			err := c.validateAdmin()
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Fatalf("validateAdmin() = %q, want %q", got, tc.want)
			}
			if strings.Contains(got, "def") {
				t.Fatalf("error quotes the token: %q", got)
			}
		})
	}
}

// listPage is a decoded list response.
type listPage struct {
	Items      []audittrail.Record `json:"items"`
	NextCursor string              `json:"next_cursor"`
}

// pageAll follows next_cursor from target until the end.
func pageAll(t *testing.T, h http.Handler, target string) []audittrail.Record {
	t.Helper()
	var all []audittrail.Record
	cursor := ""
	for pages := 0; ; pages++ {
		u := target
		if cursor != "" {
			u += "&cursor=" + url.QueryEscape(cursor)
		}
		rec := get(t, h, u, bearer...)
		if rec.Code != 200 {
			t.Fatalf("GET %s: %d %s", u, rec.Code, rec.Body)
		}
		var p listPage
		if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil {
			t.Fatal(err)
		}
		all = append(all, p.Items...)
		if p.NextCursor == "" {
			return all
		}
		cursor = p.NextCursor
		if pages > 1000 {
			t.Fatal("pagination does not end")
		}
	}
}

func TestAPIFiltersAndPagination(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) { testAPIFilters(t, apiOpenSQLite(t)) })
	t.Run("postgres", func(t *testing.T) { testAPIFilters(t, apiOpenPG(t, pgtest.Start(t))) })
}

func testAPIFilters(t *testing.T, store apiStore) {
	start := time.Date(2026, 5, 10, 12, 0, 0, 0, time.UTC)
	seeded := apiSeed(t, store, 400, start)
	// The API's own READ rows land in another store, so they do not change
	// what the filters return.
	sink := newStoreSink(t, apiOpenSQLite(t))
	_, mux := newTestAPI(t, tokenConfig(), store, sink)

	// want returns the request ids of seeded rows matching keep, newest first.
	want := func(keep func(r audittrail.Record) bool) []string {
		var ids []string
		for i := len(seeded) - 1; i >= 0; i-- {
			if keep(seeded[i]) {
				ids = append(ids, seeded[i].RequestID)
			}
		}
		return ids
	}
	at := func(i int) time.Time { return start.Add(time.Duration(i) * time.Second) }
	in := func(r audittrail.Record, from, to int) bool {
		return !r.CreatedAt.Before(at(from)) && r.CreatedAt.Before(at(to))
	}
	security := func(r audittrail.Record) bool { return slices.Contains(securityActions, r.Action) }
	cases := []struct {
		name   string
		target string
		keep   func(r audittrail.Record) bool
	}{
		{"all", "/v1/audit/logs?limit=37", func(audittrail.Record) bool { return true }},
		{"time range", "/v1/audit/logs?limit=13&from=" + at(50).Format(time.RFC3339) + "&to=" + at(120).Format(time.RFC3339),
			func(r audittrail.Record) bool { return in(r, 50, 120) }},
		{"actions repeated", "/v1/audit/logs?action=CREATE&action=DELETE&limit=20",
			func(r audittrail.Record) bool { return r.Action == "CREATE" || r.Action == "DELETE" }},
		{"actions comma", "/v1/audit/logs?action=CREATE,DELETE", func(r audittrail.Record) bool { return r.Action == "CREATE" || r.Action == "DELETE" }},
		{"severity", "/v1/audit/logs?severity=HIGH", func(r audittrail.Record) bool { return r.Severity == audittrail.SeverityHigh }},
		{"user", "/v1/audit/logs?user_id=u2&limit=1000", func(r audittrail.Record) bool { return r.UserID == "u2" }},
		{"entity filter", "/v1/audit/logs?entity_type=user&entity_id=3", func(r audittrail.Record) bool { return r.EntityType == "user" && r.EntityID == "3" }},
		{"status", "/v1/audit/logs?status=429&limit=7", func(r audittrail.Record) bool { return r.Status == 429 }},
		{"tenant", "/v1/audit/logs?tenant=acme", func(r audittrail.Record) bool { return r.Tenant == "acme" }},
		{"ip address", "/v1/audit/logs?ip_address=192.0.2.7&limit=50", func(r audittrail.Record) bool { return r.IPAddress == "192.0.2.7" }},
		// Ingest stores an IPv4-mapped client unmapped; the filter finds it
		// however it is spelled.
		{"ip address IPv4-mapped", "/v1/audit/logs?ip_address=::ffff:192.0.2.7&limit=50", func(r audittrail.Record) bool { return r.IPAddress == "192.0.2.7" }},
		{"combined", "/v1/audit/logs?tenant=acme&action=CREATE&status=403&from=" + at(10).Format(time.RFC3339) + "&limit=3",
			func(r audittrail.Record) bool {
				return r.Tenant == "acme" && r.Action == "CREATE" && r.Status == 403 && !r.CreatedAt.Before(at(10))
			}},
		{"entity trail", "/v1/audit/entities/invoice/2?limit=9", func(r audittrail.Record) bool { return r.EntityType == "invoice" && r.EntityID == "2" }},
		{"entity trail with action", "/v1/audit/entities/invoice/2?action=UPDATE",
			func(r audittrail.Record) bool {
				return r.EntityType == "invoice" && r.EntityID == "2" && r.Action == "UPDATE"
			}},
		{"user activity", "/v1/audit/users/u1/activity?limit=25", func(r audittrail.Record) bool { return r.UserID == "u1" }},
		{"user activity escaped id", "/v1/audit/users/u%31/activity?limit=25", func(r audittrail.Record) bool { return r.UserID == "u1" }},
		{"security events", "/v1/audit/security-events?limit=50", security},
		{"security events, one action", "/v1/audit/security-events?action=CSP_VIOLATION",
			func(r audittrail.Record) bool { return r.Action == "CSP_VIOLATION" }},
		{"no match", "/v1/audit/logs?user_id=nobody", func(audittrail.Record) bool { return false }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			target := tc.target
			if !strings.Contains(target, "?") {
				target += "?"
			}
			got := pageAll(t, mux, target)
			var ids []string
			for _, r := range got {
				ids = append(ids, r.RequestID)
			}
			w := want(tc.keep)
			if len(w) == 0 && tc.name != "no match" {
				t.Fatal("the case selects no seeded row; it would prove nothing")
			}
			if d := cmp.Diff(w, ids); d != "" {
				t.Fatalf("rows (-want +got):\n%s", d)
			}
		})
	}

	// Items carry the stored row, chain columns included.
	rec := get(t, mux, "/v1/audit/logs?limit=1", bearer...)
	var p listPage
	if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil {
		t.Fatal(err)
	}
	direct, _, err := store.List(t.Context(), audittrail.Filter{}, audittrail.Cursor{}, 1)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(direct, p.Items); d != "" {
		t.Fatalf("API item differs from the stored row (-store +api):\n%s", d)
	}
	if p.Items[0].ID == 0 || len(p.Items[0].Hash) != 32 || p.Items[0].Seq == 0 {
		t.Fatalf("item lacks id or chain columns: %+v", p.Items[0])
	}
	if rec.Header().Get("Content-Type") != "application/json" || rec.Header().Get("Cache-Control") != "no-store" {
		t.Fatalf("headers: %v", rec.Header())
	}
	// An empty result is [] with no cursor.
	rec = get(t, mux, "/v1/audit/logs?user_id=nobody", bearer...)
	if got := strings.TrimSpace(rec.Body.String()); got != `{"items":[]}` {
		t.Fatalf("empty page = %s", got)
	}
}

func TestAPIBadParameters(t *testing.T) {
	store := apiOpenSQLite(t)
	sink := newStoreSink(t, store)
	_, mux := newTestAPI(t, tokenConfig(), store, sink)
	long := strings.Repeat("x", 300)
	cases := []struct {
		target, param, msg string
	}{
		{"/v1/audit/logs?from=yesterday", "from", `must be an RFC 3339 time like 2026-01-02T15:04:05Z, got "yesterday"`},
		{"/v1/audit/logs?to=2026-13-01T00:00:00Z", "to", "must be an RFC 3339 time"},
		{"/v1/audit/logs?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z", "to", "must be after from"},
		{"/v1/audit/logs?from=2026-02-01T00:00:00Z&to=2026-02-01T00:00:00Z", "to", "must be after from"},
		{"/v1/audit/logs?action=create", "action", `must be an action of A-Z 0-9 _ (at most 64 characters), got "create"`},
		{"/v1/audit/logs?action=", "action", "must be an action"},
		{"/v1/audit/logs?action=A,,B", "action", "must be an action"},
		{"/v1/audit/logs?" + strings.Repeat("action=A&", 33), "action", "at most 32 values"},
		{"/v1/audit/logs?severity=low", "severity", `must be LOW, MEDIUM, HIGH or CRITICAL, got "low"`},
		{"/v1/audit/logs?status=99", "status", "must be an HTTP status code 100-599"},
		{"/v1/audit/logs?status=abc", "status", "must be an HTTP status code"},
		{"/v1/audit/logs?limit=0", "limit", "must be an integer from 1 to 1000"},
		{"/v1/audit/logs?limit=1001", "limit", "must be an integer from 1 to 1000"},
		{"/v1/audit/logs?limit=-1", "limit", "must be an integer"},
		{"/v1/audit/logs?limit=1&limit=2", "limit", "given 2 times; give it once"},
		{"/v1/audit/logs?cursor=garbage!", "cursor", "not a cursor this API returned"},
		{"/v1/audit/logs?cursor=" + encodeCursor(audittrail.Cursor{ID: 1})[:5], "cursor", "not a cursor this API returned"},
		{"/v1/audit/logs?user_id=" + long, "user_id", "longer than 256 bytes"},
		{"/v1/audit/logs?user_id=", "user_id", "must not be empty"},
		{"/v1/audit/logs?user_id=a%0Ab", "user_id", "without control characters"},
		{"/v1/audit/logs?tenant=%FF", "tenant", "valid UTF-8"},
		{"/v1/audit/logs?entity_type=" + long, "entity_type", "longer than 128 bytes"},
		{"/v1/audit/logs?actions=CREATE", "actions", "unknown parameter; allowed: from, to, action"},
		{"/v1/audit/logs?format=csv", "format", "unknown parameter"},
		{"/v1/audit/entities/invoice/1?entity_type=user", "entity_type", "unknown parameter"},
		{"/v1/audit/entities/" + long + "/1", "type", "longer than 128 bytes"},
		{"/v1/audit/users/u1/activity?user_id=u2", "user_id", "unknown parameter"},
		{"/v1/audit/security-events?action=CREATE", "action", "must be a security event (LOGIN_FAILURE, PERMISSION_DENIED"},
		{"/v1/audit/export?from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z", "format", "required: csv or jsonl"},
		{"/v1/audit/export?format=xml&from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z", "format", `must be csv or jsonl, got "xml"`},
		{"/v1/audit/export?format=csv&to=2026-02-01T00:00:00Z", "from", "required"},
		{"/v1/audit/export?format=csv&from=2026-02-01T00:00:00Z", "to", "required"},
		{"/v1/audit/export?format=csv&from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z&limit=5", "limit", "unknown parameter"},
		{"/v1/audit/logs?a=%zz", "", "malformed query string"},
	}
	for _, tc := range cases {
		t.Run(tc.target[:min(len(tc.target), 60)], func(t *testing.T) {
			rec := get(t, mux, tc.target, bearer...)
			if rec.Code != http.StatusBadRequest {
				t.Fatalf("status %d, want 400; body %s", rec.Code, rec.Body)
			}
			var body struct{ Error, Parameter string }
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatalf("body %q: %v", rec.Body, err)
			}
			if body.Parameter != tc.param || !strings.Contains(body.Error, tc.msg) {
				t.Fatalf("error %+v, want parameter %q and message containing %q", body, tc.param, tc.msg)
			}
			if tc.param != "" && !strings.HasPrefix(body.Error, tc.param+": ") {
				t.Fatalf("error %q does not start with the parameter name", body.Error)
			}
		})
	}
	if n := len(sink.recorded()); n != 0 {
		t.Fatalf("rejected requests recorded %d rows", n)
	}
	rec := get(t, mux, "/v1/audit/logs?"+strings.Repeat("x", apiMaxRawQuery+1), bearer...)
	if rec.Code != http.StatusRequestURITooLong {
		t.Fatalf("huge query: %d", rec.Code)
	}
}

func TestCursorRoundTrip(t *testing.T) {
	for _, c := range []audittrail.Cursor{
		{CreatedAt: time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC), ID: 42},
		{CreatedAt: time.Unix(0, 0).UTC(), ID: 0},
		{CreatedAt: time.Date(1999, 12, 31, 23, 59, 59, 999999000, time.UTC), ID: 1 << 62},
	} {
		got, err := decodeCursor(encodeCursor(c))
		if err != nil || !got.CreatedAt.Equal(c.CreatedAt) || got.ID != c.ID {
			t.Errorf("decodeCursor(encodeCursor(%v)) = %v, %v", c, got, err)
		}
	}
}

func FuzzDecodeCursor(f *testing.F) {
	f.Add(encodeCursor(audittrail.Cursor{CreatedAt: time.Unix(1700000000, 5), ID: 9}))
	f.Add("djEuMS4y")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := decodeCursor(s)
		if err != nil {
			return
		}
		if c.ID < 0 {
			t.Fatalf("negative id from %q", s)
		}
		// What decodes re-encodes to a cursor that decodes the same.
		c2, err := decodeCursor(encodeCursor(c))
		if err != nil || c2 != c {
			t.Fatalf("re-encoding %q: %v %v", s, c2, err)
		}
	})
}

func TestAPIRecordsEveryAccess(t *testing.T) {
	store := apiOpenSQLite(t)
	apiSeed(t, store, 30, time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC))
	sink := newStoreSink(t, store)
	cfg := tokenConfig()
	api, mux := newTestAPI(t, cfg, store, sink)
	fixed := time.Date(2026, 4, 2, 9, 0, 0, 0, time.UTC)
	api.now = func() time.Time { return fixed }

	req := httptest.NewRequest(http.MethodGet, "/v1/audit/entities/invoice/3?limit=2", nil)
	req.Header.Set("Authorization", "Bearer "+apiTestToken)
	req.Header.Set("x-meshguard-user", "alice") // forgeable: never recorded as the actor
	req.Header.Set("X-Request-Id", "rid-1")
	req.Header.Set("User-Agent", "auditor-cli/1")
	req.RemoteAddr = "198.51.100.4:5555"
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, req)
	if rec.Code != 200 {
		t.Fatalf("entity trail: %d %s", rec.Code, rec.Body)
	}
	if rec := get(t, mux, "/v1/audit/export?format=csv&from=2026-04-01T00:00:00Z&to=2026-04-02T00:00:00Z&action=CREATE", bearer...); rec.Code != 200 {
		t.Fatalf("export: %d %s", rec.Code, rec.Body)
	}

	// The access rows are in the trail itself, readable through the API.
	listed := pageAll(t, mux, "/v1/audit/logs?entity_type=audit_log")
	if len(listed) != 2 || listed[0].Action != "EXPORT" || listed[1].Action != "READ" {
		t.Fatalf("API lists %+v, want the export and the read", listed)
	}
	var got []audittrail.Record // and that listing was itself recorded
	if err := store.Scan(t.Context(), audittrail.Filter{EntityType: "audit_log"}, func(r *audittrail.Record) error { got = append(got, *r); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("%d access rows, want 3: %+v", len(got), got)
	}
	for i := range got {
		got[i].ID, got[i].ChainID, got[i].Seq, got[i].KeyID, got[i].PrevHash, got[i].Hash = 0, "", 0, "", nil, nil
	}
	sum := sha256.Sum256([]byte(apiTestToken))
	fp := "sha256:" + hex.EncodeToString(sum[:6])
	want := []audittrail.Record{
		{CreatedAt: fixed, Action: "READ", Severity: audittrail.SeverityLow, EntityType: "audit_log", UserID: actorEnvToken,
			IPAddress: "198.51.100.4", UserAgent: "auditor-cli/1", Method: "GET", Path: "/v1/audit/entities/invoice/3",
			Status: 200, RequestID: "rid-1",
			Metadata: json.RawMessage(`{"auth":"token","token":"` + fp + `","endpoint":"entity","filter":{"entity_id":"3","entity_type":"invoice"},"limit":2,"returned":2}`)},
		{CreatedAt: fixed, Action: "EXPORT", Severity: audittrail.SeverityMedium, EntityType: "audit_log", UserID: actorEnvToken,
			IPAddress: "192.0.2.1", Method: "GET", Path: "/v1/audit/export", Status: 200,
			Metadata: json.RawMessage(`{"auth":"token","token":"` + fp + `","endpoint":"export","filter":{"action":["CREATE"],"from":"2026-04-01T00:00:00Z","to":"2026-04-02T00:00:00Z"},"format":"csv"}`)},
		{CreatedAt: fixed, Action: "READ", Severity: audittrail.SeverityLow, EntityType: "audit_log", UserID: actorEnvToken,
			IPAddress: "192.0.2.1", Method: "GET", Path: "/v1/audit/logs", Status: 200,
			Metadata: json.RawMessage(`{"auth":"token","token":"` + fp + `","endpoint":"logs","filter":{"entity_type":"audit_log"},"limit":100,"returned":2}`)},
	}
	if d := cmp.Diff(want, got, cmp.Comparer(jsonEqual)); d != "" {
		t.Fatalf("access rows (-want +got):\n%s", d)
	}
}

func jsonEqual(a, b json.RawMessage) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return string(a) == string(b)
	}
	return cmp.Equal(x, y)
}

func TestAPIRefusesWhenTheAccessCannotBeRecorded(t *testing.T) {
	store := apiOpenSQLite(t)
	apiSeed(t, store, 5, time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC))
	sink := newStoreSink(t, store)
	sink.err = errors.New("spool full")
	_, mux := newTestAPI(t, tokenConfig(), store, sink)
	for _, target := range []string{"/v1/audit/logs", "/v1/audit/security-events",
		"/v1/audit/export?format=jsonl&from=2026-04-01T00:00:00Z&to=2026-04-02T00:00:00Z"} {
		rec := get(t, mux, target, bearer...)
		if rec.Code != http.StatusServiceUnavailable || strings.Contains(rec.Body.String(), "req-") {
			t.Fatalf("GET %s with a refusing sink: %d %s", target, rec.Code, rec.Body)
		}
		if !strings.Contains(rec.Body.String(), "could not be recorded") {
			t.Fatalf("GET %s: message %s", target, rec.Body)
		}
		if rec.Header().Get("Content-Disposition") != "" {
			t.Fatalf("GET %s: refused export still sent Content-Disposition", target)
		}
	}
}

func TestAPIStoreDown(t *testing.T) {
	srv := pgtest.Start(t)
	store := apiOpenPG(t, srv)
	sink := newStoreSink(t, apiOpenSQLite(t))
	_, mux := newTestAPI(t, tokenConfig(), store, sink)
	srv.Stop()
	for _, target := range []string{"/v1/audit/logs", "/v1/audit/export?format=csv&from=2026-04-01T00:00:00Z&to=2026-04-02T00:00:00Z"} {
		rec := get(t, mux, target, bearer...)
		if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "audit store unavailable") {
			t.Fatalf("GET %s with PostgreSQL down: %d %s", target, rec.Code, rec.Body)
		}
		if strings.Contains(rec.Body.String(), "127.0.0.1") || strings.Contains(rec.Body.String(), "connect") {
			t.Fatalf("internal error leaked: %s", rec.Body)
		}
		if rec.Header().Get("Content-Disposition") != "" {
			t.Fatalf("failed export sent Content-Disposition")
		}
	}
	// Back up: the same API answers again, no restart needed.
	srv.Restart(t)
	servertest.WaitFor(t, 15*time.Second, func() error {
		if rec := get(t, mux, "/v1/audit/logs", bearer...); rec.Code != 200 {
			return fmt.Errorf("after PostgreSQL restarted: %d %s", rec.Code, rec.Body)
		}
		return nil
	})
}

// FuzzParseQuery: whatever the query string, parsing answers (no panic),
// and what it accepts is within the API's bounds.
func FuzzParseQuery(f *testing.F) {
	f.Add("from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z&action=CREATE&action=DELETE&limit=10")
	f.Add("cursor=" + encodeCursor(audittrail.Cursor{CreatedAt: time.Unix(1, 0), ID: 3}) + "&status=404&severity=HIGH")
	f.Add("user_id=%00&tenant=%FF&entity_type=x")
	f.Add("format=csv&limit=0&limit=1")
	f.Fuzz(func(t *testing.T, raw string) {
		req := httptest.NewRequest(http.MethodGet, "/v1/audit/logs", nil)
		req.URL.RawQuery = raw
		q, err := parseQuery(req, append(slices.Clone(listParams), "format")...)
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) || ae.status < 400 || ae.status > 499 {
				t.Fatalf("parseQuery(%q) error %v is not a client error", raw, err)
			}
			return
		}
		f := q.filter
		switch {
		case q.limit < 1 || q.limit > apiMaxLimit:
			t.Fatalf("limit %d accepted", q.limit)
		case len(f.Actions) > apiMaxActions:
			t.Fatalf("%d actions accepted", len(f.Actions))
		case f.Status != 0 && (f.Status < 100 || f.Status > 599):
			t.Fatalf("status %d accepted", f.Status)
		case len(f.UserID) > apiMaxUserLen || len(f.EntityType) > apiMaxEntityLen || len(f.EntityID) > apiMaxEntityLen || len(f.Tenant) > apiMaxTenantLen:
			t.Fatalf("oversized text accepted: %+v", f)
		case !f.From.IsZero() && !f.To.IsZero() && !f.From.Before(f.To):
			t.Fatalf("empty range accepted: %v %v", f.From, f.To)
		case q.format != "" && q.format != FormatCSV && q.format != FormatJSONL:
			t.Fatalf("format %q accepted", q.format)
		}
		for _, s := range []string{f.UserID, f.EntityType, f.EntityID, f.Tenant} {
			if strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0xfffd }) {
				t.Fatalf("control character or invalid UTF-8 accepted: %q", s)
			}
		}
	})
}

func TestAPIMetrics(t *testing.T) {
	store := apiOpenSQLite(t)
	reg := prometheus.NewRegistry()
	api, err := NewAPI(apiTestLog, reg, tokenConfig(), store, newStoreSink(t, store))
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	api.Register(mux)
	get(t, mux, "/v1/audit/logs")
	get(t, mux, "/v1/audit/logs", "Authorization", "Bearer wrong")
	get(t, mux, "/v1/audit/logs", bearer...)
	get(t, mux, "/v1/audit/logs?limit=0", bearer...)
	get(t, mux, "/v1/audit/export?format=jsonl&"+exportRange, bearer...)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"meshguard_auditsink_api_requests_total", map[string]string{"endpoint": "logs", "code": "401"}, 2},
		{"meshguard_auditsink_api_requests_total", map[string]string{"endpoint": "logs", "code": "200"}, 1},
		{"meshguard_auditsink_api_requests_total", map[string]string{"endpoint": "logs", "code": "400"}, 1},
		{"meshguard_auditsink_api_requests_total", map[string]string{"endpoint": "export", "code": "200"}, 1},
		{"meshguard_auditsink_api_auth_failures_total", map[string]string{"reason": "missing"}, 1},
		{"meshguard_auditsink_api_auth_failures_total", map[string]string{"reason": "invalid_token"}, 1},
		{"meshguard_auditsink_api_unrecorded_total", nil, 0},
	} {
		if got := counterValue(t, reg, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	// A second API on the same registry is a configuration error, not a panic.
	if _, err := NewAPI(apiTestLog, reg, tokenConfig(), store, newStoreSink(t, store)); err == nil {
		t.Fatal("NewAPI registered its metrics twice")
	}
}

// counterValue returns the value of the counter series name{labels} in reg
// (-1 when absent).
func counterValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	if v, ok := metrictest.Value(t, reg, name, labels); ok {
		return v
	}
	return -1
}

// TestAPIAuthFailuresRecordedRateLimited: failed authentications are in
// the trail, but a flood of them costs it a bounded number of rows, and the
// first row after the flood counts those left out.
func TestAPIAuthFailuresRecordedRateLimited(t *testing.T) {
	store := apiOpenSQLite(t)
	sink := newStoreSink(t, store)
	api, mux := newTestAPI(t, tokenConfig(), store, sink)
	clock := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	api.now = func() time.Time { return clock }

	const flood = 5000
	for i := range flood {
		hdr := []string{"Authorization", fmt.Sprintf("Bearer guess-%d", i)}
		if rec := get(t, mux, "/v1/audit/logs", hdr...); rec.Code != 401 {
			t.Fatalf("guess %d: %d", i, rec.Code)
		}
	}
	got := sink.recorded()
	if len(got) != authFailBurst {
		t.Fatalf("a flood of %d bad tokens recorded %d rows, want the burst of %d", flood, len(got), authFailBurst)
	}
	for _, r := range got {
		if r.Action != "LOGIN_FAILURE" || r.Status != 401 || r.UserID != "" || strings.Contains(string(r.Metadata), "guess") {
			t.Fatalf("failure row %+v: want LOGIN_FAILURE without the presented token", r)
		}
	}
	// Ten seconds later: ten more may be recorded, and the first counts the
	// ones the limit left out.
	clock = clock.Add(10 * time.Second)
	for range 50 {
		get(t, mux, "/v1/audit/logs", "Authorization", "Bearer nope")
	}
	got = sink.recorded()
	if len(got) != authFailBurst+10 {
		t.Fatalf("after 10 s: %d rows, want %d", len(got), authFailBurst+10)
	}
	var meta struct {
		Reason     string `json:"reason"`
		NotRecords int64  `json:"failures_not_recorded_before"`
	}
	if err := json.Unmarshal(got[authFailBurst].Metadata, &meta); err != nil || meta.NotRecords != flood-authFailBurst || meta.Reason != "invalid_token" {
		t.Fatalf("first row after the flood: %s, want failures_not_recorded_before %d", got[authFailBurst].Metadata, flood-authFailBurst)
	}
}

// TestRemoteIP: the API's own rows name the peer as ingest names clients
// (no port, no zone, IPv4-mapped unmapped), so one filter finds both.
func TestRemoteIP(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.1:443":           "192.0.2.1",
		"[::ffff:192.0.2.1]:443":  "192.0.2.1",
		"[fe80::1%eth0]:8080":     "fe80::1",
		"[2001:db8::1]:1":         "2001:db8::1",
		"2001:db8::2":             "2001:db8::2",
		"@":                       "",
		"":                        "",
		"not-an-address:80":       "",
		strings.Repeat("1", 5000): "",
	} {
		if got := remoteIP(in); got != want {
			t.Errorf("remoteIP(%.40q) = %q, want %q", in, got, want)
		}
	}
}
