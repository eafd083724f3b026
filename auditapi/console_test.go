package auditapi

import (
	"context"
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshguard/meshguard/audittrail"
)

// consoleEnv is a console over a real SQLite trail, behind a real HTTP
// server, and a browser-like client with a cookie jar that does not follow
// redirects (so tests see them).
type consoleEnv struct {
	t       *testing.T
	api     *API
	console *Console
	sink    *storeSink
	srv     *httptest.Server
	client  *http.Client
	seeded  []audittrail.Record
	start   time.Time
}

type consoleReaderWrap struct {
	consoleReader
	scan func(ctx context.Context, f audittrail.Filter, fn func(*audittrail.Record) error) error
}

func (w consoleReaderWrap) Scan(ctx context.Context, f audittrail.Filter, fn func(*audittrail.Record) error) error {
	if w.scan != nil {
		return w.scan(ctx, f, fn)
	}
	return w.consoleReader.Scan(ctx, f, fn)
}

func newConsoleEnv(t *testing.T, cfg Config, opts ConsoleOptions, wrap func(consoleReader) consoleReader) *consoleEnv {
	t.Helper()
	store := apiOpenSQLite(t)
	start := time.Now().UTC().Add(-3 * time.Hour).Truncate(time.Second)
	seeded := apiSeed(t, store, 300, start)
	sink := newStoreSink(t, store)
	var reader consoleReader = store
	if wrap != nil {
		reader = wrap(store)
	}
	api, mux := newTestAPI(t, cfg, reader, sink)
	if opts.Keys == nil {
		opts.Keys = testKeys
	}
	if opts.WitnessDir == "" {
		opts.WitnessDir = t.TempDir()
	}
	con, err := api.NewConsole(reader, opts)
	if err != nil {
		t.Fatal(err)
	}
	con.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	e := &consoleEnv{t: t, api: api, console: con, sink: sink, srv: srv, seeded: seeded, start: start}
	e.client = e.newClient()
	return e
}

func (e *consoleEnv) newClient() *http.Client {
	jar, _ := cookiejar.New(nil)
	return &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

type consoleResp struct {
	code int
	hdr  http.Header
	body string
	err  error // reading the body
}

func (e *consoleEnv) do(c *http.Client, method, path string, form url.Values) consoleResp {
	e.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(e.t.Context(), method, e.srv.URL+path, body)
	if err != nil {
		e.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := c.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, rerr := io.ReadAll(resp.Body)
	// Bodies are compared as text: html/template escapes + and quotes.
	return consoleResp{code: resp.StatusCode, hdr: resp.Header, body: html.UnescapeString(string(b)), err: rerr}
}

var csrfRE = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

func csrfOf(t *testing.T, body string) string {
	t.Helper()
	m := csrfRE.FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no CSRF token in the page:\n%s", body)
	}
	return m[1]
}

// signIn signs c in with token and returns the session's CSRF token.
func (e *consoleEnv) signIn(c *http.Client, token string) consoleResp {
	e.t.Helper()
	form := e.do(c, "GET", "/console/signin", nil)
	if form.code != http.StatusOK {
		e.t.Fatalf("sign-in page: %d", form.code)
	}
	return e.do(c, "POST", "/console/signin", url.Values{"csrf": {csrfOf(e.t, form.body)}, "token": {token}, "next": {"/console/events"}})
}

func (e *consoleEnv) signedIn() string {
	e.t.Helper()
	if r := e.signIn(e.client, apiTestToken); r.code != http.StatusSeeOther {
		e.t.Fatalf("sign-in: %d %s", r.code, r.body)
	}
	page := e.do(e.client, "GET", "/console/events", nil)
	if page.code != http.StatusOK {
		e.t.Fatalf("events after sign-in: %d %s", page.code, page.body)
	}
	return csrfOf(e.t, page.body)
}

// recordedBy returns the sink's records of endpoint.
func (e *consoleEnv) recordedBy(endpoint string) []audittrail.Record {
	var out []audittrail.Record
	for _, r := range e.sink.recorded() {
		var m struct{ Endpoint string }
		json.Unmarshal(r.Metadata, &m)
		if m.Endpoint == endpoint {
			out = append(out, r)
		}
	}
	return out
}

func checkConsoleHeaders(t *testing.T, what string, h http.Header) {
	t.Helper()
	csp := h.Get("Content-Security-Policy")
	if !regexp.MustCompile(`script-src 'nonce-[A-Za-z0-9_-]{20,}'`).MatchString(csp) || strings.Contains(csp, "unsafe-inline") ||
		!strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "frame-ancestors 'none'") {
		t.Errorf("%s: CSP %q", what, csp)
	}
	for k, want := range map[string]string{"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
		"Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin"} {
		if got := h.Get(k); got != want {
			t.Errorf("%s: %s = %q, want %q", what, k, got, want)
		}
	}
}

// TestConsoleSignInAndOut: the token opens a session (cookie HttpOnly,
// SameSite=Strict); page views are recorded by the token's actor; a wrong
// token is refused and recorded; sign-out ends the session on the server,
// so the old cookie no longer works.
func TestConsoleSignInAndOut(t *testing.T) {
	e := newConsoleEnv(t, tokenConfig(), ConsoleOptions{}, nil)

	r := e.do(e.client, "GET", "/console/events?severity=HIGH", nil)
	if r.code != http.StatusSeeOther || r.hdr.Get("Location") != "/console/signin?next="+url.QueryEscape("/console/events?severity=HIGH") {
		t.Fatalf("signed out GET: %d %q", r.code, r.hdr.Get("Location"))
	}
	bad := e.signIn(e.client, "not-the-token-at-all")
	if bad.code != http.StatusUnauthorized || !strings.Contains(bad.body, "not accepted") {
		t.Fatalf("wrong token: %d %s", bad.code, bad.body)
	}
	if fails := e.recordedBy("console_signin"); len(fails) != 1 || fails[0].Action != "LOGIN_FAILURE" || fails[0].Status != 401 {
		t.Fatalf("failed sign-in records: %+v", fails)
	}

	ok := e.signIn(e.client, apiTestToken)
	if ok.code != http.StatusSeeOther || ok.hdr.Get("Location") != "/console/events" {
		t.Fatalf("sign-in: %d %q", ok.code, ok.hdr.Get("Location"))
	}
	var sc string
	for _, c := range ok.hdr.Values("Set-Cookie") {
		if strings.HasPrefix(c, "meshguard_console=") {
			sc = c
		}
	}
	for _, want := range []string{"HttpOnly", "SameSite=Strict", "Path=/console/", "Max-Age=28800"} {
		if !strings.Contains(sc, want) {
			t.Errorf("session cookie %q lacks %s", sc, want)
		}
	}
	if strings.Contains(sc, "Secure") {
		t.Errorf("session cookie %q is Secure on a plain-HTTP listener", sc)
	}
	if rec := e.recordedBy("console_signin"); len(rec) != 2 || rec[1].Action != "LOGIN_SUCCESS" || rec[1].UserID != actorEnvToken {
		t.Fatalf("sign-in records: %+v", rec)
	}

	page := e.do(e.client, "GET", "/console/events", nil)
	if page.code != http.StatusOK || !strings.Contains(page.body, "<svg") || strings.Count(page.body, `<a href="/console/events/`) != consolePageSize {
		t.Fatalf("events page: %d, %d event links\n%s", page.code, strings.Count(page.body, `<a href="/console/events/`), page.body)
	}
	checkConsoleHeaders(t, "events page", page.hdr)
	nonce := regexp.MustCompile(`'nonce-([^']+)'`).FindStringSubmatch(page.hdr.Get("Content-Security-Policy"))[1]
	if !strings.Contains(page.body, `<script nonce="`+nonce+`" src="/console/static/console.js"`) {
		t.Errorf("the page's script does not carry the response's nonce %s", nonce)
	}
	if strings.Count(page.body, "<script") != 1 || strings.Contains(page.body, " style=") {
		t.Errorf("page has inline scripts or style attributes")
	}
	reads := e.recordedBy("console_events")
	if len(reads) != 1 || reads[0].Action != "READ" || reads[0].UserID != actorEnvToken || !strings.Contains(string(reads[0].Metadata), `"auth":"console"`) {
		t.Fatalf("page view records: %+v", reads)
	}
	csrf := csrfOf(t, page.body)

	// A second page view gets a different nonce.
	again := e.do(e.client, "GET", "/console/security", nil)
	if again.code != http.StatusOK || again.hdr.Get("Content-Security-Policy") == page.hdr.Get("Content-Security-Policy") {
		t.Fatalf("security page: %d, CSP reused: %v", again.code, again.hdr.Get("Content-Security-Policy") == page.hdr.Get("Content-Security-Policy"))
	}

	// Keep the cookie to replay it after sign-out.
	u, _ := url.Parse(e.srv.URL + "/console/")
	old := e.client.Jar.Cookies(u)
	if out := e.do(e.client, "POST", "/console/signout", url.Values{}); out.code != http.StatusForbidden {
		t.Fatalf("sign-out without CSRF token: %d", out.code)
	}
	out := e.do(e.client, "POST", "/console/signout", url.Values{"csrf": {csrf}})
	if out.code != http.StatusSeeOther || !strings.Contains(out.hdr.Get("Clear-Site-Data"), "cookies") {
		t.Fatalf("sign-out: %d %v", out.code, out.hdr)
	}
	if e.console.sessions.len() != 0 {
		t.Fatalf("%d sessions left after sign-out", e.console.sessions.len())
	}
	replay := e.newClient()
	replay.Jar.SetCookies(u, old)
	r = e.do(replay, "GET", "/console/events", nil)
	if r.code != http.StatusUnauthorized || !strings.Contains(r.body, "signed out") {
		t.Fatalf("old cookie after sign-out: %d %s", r.code, r.body)
	}
	if rec := e.recordedBy("console_events"); rec[len(rec)-1].Action != "LOGIN_FAILURE" {
		t.Fatalf("a replayed session cookie was not recorded as a failed authentication")
	}
}

// TestConsoleSessionExpiry: idle and maximum lifetime end a session with
// a page that says which; a rotated token ends the sessions it opened.
func TestConsoleSessionExpiry(t *testing.T) {
	e := newConsoleEnv(t, tokenConfig(), ConsoleOptions{}, nil)
	now := time.Now()
	e.api.now = func() time.Time { return now }
	e.signedIn()
	now = now.Add(sessionIdle - time.Second)
	if r := e.do(e.client, "GET", "/console/security", nil); r.code != http.StatusOK {
		t.Fatalf("within the idle timeout: %d", r.code)
	}
	now = now.Add(sessionIdle)
	r := e.do(e.client, "GET", "/console/security", nil)
	if r.code != http.StatusUnauthorized || !strings.Contains(r.body, "expired after 15m0s without activity") {
		t.Fatalf("after the idle timeout: %d %s", r.code, r.body)
	}
	e.signedIn()
	for i := 0; i < int(sessionLifetime/(sessionIdle/2))-1; i++ {
		now = now.Add(sessionIdle / 2)
		if r := e.do(e.client, "GET", "/console/security", nil); r.code != http.StatusOK {
			t.Fatalf("%d: %d", i, r.code)
		}
	}
	now = now.Add(sessionIdle / 2)
	r = e.do(e.client, "GET", "/console/security", nil)
	if r.code != http.StatusUnauthorized || !strings.Contains(r.body, "maximum lifetime of 8h0m0s") {
		t.Fatalf("after the lifetime: %d %s", r.code, r.body)
	}
}

// TestConsoleBadInput: every malformed request gets the console's page
// with the reason and a 4xx status, never a stack trace.
func TestConsoleBadInput(t *testing.T) {
	e := newConsoleEnv(t, tokenConfig(), ConsoleOptions{VerifyMaxRows: 100}, nil)
	csrf := e.signedIn()
	long := strings.Repeat("x", 300)
	cases := []struct {
		name, method, path string
		form               url.Values
		code               int
		reason             string
	}{
		{"bad severity", "GET", "/console/events?severity=SEVERE", nil, 400, "severity: must be LOW, MEDIUM, HIGH or CRITICAL"},
		{"bad status", "GET", "/console/events?status=abc", nil, 400, "status: must be an HTTP status code"},
		{"bad time", "GET", "/console/events?from=yesterday", nil, 400, "from: must be an RFC 3339 time"},
		{"bad ip", "GET", "/console/events?ip_address=10.0.0.300", nil, 400, "ip_address: must be an IPv4 or IPv6 address"},
		{"to before from", "GET", "/console/events?from=2026-01-02T00:00&to=2026-01-01T00:00", nil, 400, "to: must be after from"},
		{"user too long", "GET", "/console/events?user_id=" + long, nil, 400, "user_id: longer than 256 bytes"},
		{"control characters", "GET", "/console/events?entity_id=a%00b", nil, 400, "entity_id: must be valid UTF-8 text"},
		{"unknown parameter", "GET", "/console/events?sort=asc", nil, 400, "sort: unknown parameter"},
		{"forged cursor", "GET", "/console/events?cursor=Zm9v", nil, 400, "cursor: not a cursor this API returned"},
		{"query too long", "GET", "/console/events?user_id=" + strings.Repeat("y", 9000), nil, 414, "longer than 8192 bytes"},
		{"user page id too long", "GET", "/console/users/" + long, nil, 400, "user: longer than 256 bytes"},
		{"event id not a number", "GET", "/console/events/abc", nil, 400, "an event id is a positive integer"},
		{"no such event", "GET", "/console/events/99999999", nil, 404, "there is no event with id 99999999"},
		{"no such page", "GET", "/console/nowhere", nil, 404, "There is no console page"},
		{"static listing", "GET", "/console/static/", nil, 404, "There is no console page"},
		{"export without CSRF", "POST", "/console/export", url.Values{"format": {"csv"}}, 403, "CSRF token"},
		{"export wrong CSRF", "POST", "/console/export", url.Values{"format": {"csv"}, "csrf": {csrf + "x"}}, 403, "CSRF token"},
		{"export bad format", "POST", "/console/export", url.Values{"format": {"xlsx"}, "csrf": {csrf}}, 400, "format: must be csv or jsonl"},
		{"export no format", "POST", "/console/export", url.Values{"csrf": {csrf}}, 400, "format: choose csv or jsonl"},
		{"verify without CSRF", "POST", "/console/integrity/verify", url.Values{}, 403, "CSRF token"},
		{"verify range too large", "POST", "/console/integrity/verify", url.Values{"csrf": {csrf}}, 422, "more than 100 rows, too many to verify at once"},
		{"form too large", "POST", "/console/integrity/verify", url.Values{"csrf": {csrf}, "pad": {strings.Repeat("z", 20<<10)}}, 400, "larger than 16 KiB"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(e.client, tc.method, tc.path, tc.form)
			if r.code != tc.code || !strings.Contains(r.body, tc.reason) {
				t.Fatalf("%s %s: %d, want %d with %q\n%s", tc.method, tc.path, r.code, tc.code, tc.reason, r.body)
			}
			if !strings.HasPrefix(r.hdr.Get("Content-Type"), "text/html") || strings.Contains(r.body, "goroutine") {
				t.Fatalf("not the console's page: %v\n%s", r.hdr, r.body)
			}
			checkConsoleHeaders(t, tc.name, r.hdr)
		})
	}

	t.Run("forged cookie", func(t *testing.T) {
		c := e.newClient()
		u, _ := url.Parse(e.srv.URL + "/console/")
		c.Jar.SetCookies(u, []*http.Cookie{{Name: "meshguard_console", Value: randomToken(sessionIDBytes)}})
		r := e.do(c, "GET", "/console/events", nil)
		if r.code != http.StatusUnauthorized || !strings.Contains(r.body, "not one this server issued") {
			t.Fatalf("forged cookie: %d %s", r.code, r.body)
		}
		c.Jar.SetCookies(u, []*http.Cookie{{Name: "meshguard_console", Value: strings.Repeat("A", 5000)}})
		if r := e.do(c, "GET", "/console/events", nil); r.code != http.StatusUnauthorized {
			t.Fatalf("oversized cookie: %d", r.code)
		}
	})
	t.Run("sign-in without its CSRF cookie", func(t *testing.T) {
		c := e.newClient()
		r := e.do(c, "POST", "/console/signin", url.Values{"csrf": {"guess"}, "token": {apiTestToken}})
		if r.code != http.StatusForbidden || e.console.sessions.len() != 1 {
			t.Fatalf("login CSRF: %d, %d sessions", r.code, e.console.sessions.len())
		}
	})
	t.Run("cross-site form", func(t *testing.T) {
		req, _ := http.NewRequest("POST", e.srv.URL+"/console/integrity/verify", strings.NewReader(url.Values{"csrf": {csrf}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Origin", "https://evil.example")
		resp, err := e.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("cross-origin POST with a valid token: %d", resp.StatusCode)
		}
	})
}

// TestConsoleFiltersPagingDetail: filters narrow the list, keyset pages
// walk it without overlap, the permalink reproduces the query, and an
// event's page shows its stored fields and chain position.
func TestConsoleFiltersPagingDetail(t *testing.T) {
	e := newConsoleEnv(t, tokenConfig(), ConsoleOptions{}, nil)
	e.signedIn()
	linkRE := regexp.MustCompile(`<a href="/console/events/(\d+)">`)
	q := "/console/events?severity=HIGH&ip_address=192.0.2.7&from=" + e.start.Format("2006-01-02T15:04:05")
	seen := map[string]bool{}
	pages := 0
	for path := q; path != ""; pages++ {
		r := e.do(e.client, "GET", path, nil)
		if r.code != http.StatusOK {
			t.Fatalf("%s: %d %s", path, r.code, r.body)
		}
		for _, m := range linkRE.FindAllStringSubmatch(r.body, -1) {
			if seen[m[1]] {
				t.Fatalf("event %s on two pages", m[1])
			}
			seen[m[1]] = true
		}
		path = ""
		if m := regexp.MustCompile(`<a href="([^"]+)" rel="next">`).FindStringSubmatch(r.body); m != nil {
			path = m[1]
		}
	}
	// apiSeed: severities cycle over 4, so 300 rows hold 75 HIGH ones.
	if len(seen) != 75 || pages != 2 {
		t.Fatalf("%d HIGH events over %d pages, want 75 over 2", len(seen), pages)
	}
	r := e.do(e.client, "GET", q, nil)
	perm := regexp.MustCompile(`Permalink to this query: <a href="([^"]+)"`).FindStringSubmatch(r.body)
	if perm == nil {
		t.Fatal("no permalink")
	}
	p := e.do(e.client, "GET", perm[1], nil)
	if p.code != http.StatusOK || len(linkRE.FindAllString(p.body, -1)) != len(linkRE.FindAllString(r.body, -1)) {
		t.Fatalf("permalink %s: %d", perm[1], p.code)
	}

	// The detail page of the newest HIGH event.
	recs, _, err := e.console.reader.List(t.Context(), audittrail.Filter{Severity: "HIGH"}, audittrail.Cursor{}, 1)
	if err != nil || len(recs) != 1 {
		t.Fatal(err)
	}
	d := e.do(e.client, "GET", "/console/events/"+itoa(recs[0].ID), nil)
	for _, want := range []string{recs[0].RequestID, recs[0].ChainID, "<dd>" + itoa(recs[0].Seq) + "</dd>", hexOf(recs[0].Hash), hexOf(recs[0].PrevHash),
		"MAC verifies with key " + recs[0].KeyID} {
		if !strings.Contains(d.body, want) {
			t.Errorf("event page lacks %q", want)
		}
	}
	if reads := e.recordedBy("console_event"); len(reads) != 1 || !strings.Contains(string(reads[0].Metadata), `"id":`+itoa(recs[0].ID)) {
		t.Fatalf("detail view records: %+v", reads)
	}
}

// TestConsoleExport: the download is the filter's rows, recorded as an
// EXPORT; an error after the first row cuts the transfer, so the client
// never holds a complete-looking file.
func TestConsoleExport(t *testing.T) {
	failAfter := 0
	e := newConsoleEnv(t, tokenConfig(), ConsoleOptions{}, func(r consoleReader) consoleReader {
		return consoleReaderWrap{consoleReader: r, scan: func(ctx context.Context, f audittrail.Filter, fn func(*audittrail.Record) error) error {
			n := 0
			return r.Scan(ctx, f, func(rec *audittrail.Record) error {
				if n++; failAfter > 0 && n > failAfter {
					return errors.New("database connection lost")
				}
				return fn(rec)
			})
		}}
	})
	csrf := e.signedIn()
	form := url.Values{"csrf": {csrf}, "format": {"csv"}, "action": {"LOGIN_FAILURE"}, "from": {e.start.Format(time.RFC3339)}}
	r := e.do(e.client, "POST", "/console/export", form)
	if r.code != http.StatusOK || r.err != nil || !strings.Contains(r.hdr.Get("Content-Disposition"), "attachment") {
		t.Fatalf("export: %d %v %v", r.code, r.err, r.hdr)
	}
	rows, err := csv.NewReader(strings.NewReader(r.body)).ReadAll()
	if err != nil || len(rows) != 51 { // header + 300/6 LOGIN_FAILURE rows
		t.Fatalf("export: %d CSV rows, %v", len(rows), err)
	}
	if ex := e.recordedBy("console_export"); len(ex) != 1 || ex[0].Action != "EXPORT" || !strings.Contains(string(ex[0].Metadata), `"LOGIN_FAILURE"`) {
		t.Fatalf("export records: %+v", ex)
	}

	// Failing before the first byte leaves the client (64 KiB buffered)
	// can still be answered: an error page, not a file.
	failAfter = 10
	form.Set("format", "jsonl")
	r = e.do(e.client, "POST", "/console/export", form)
	if r.code != http.StatusServiceUnavailable || r.err != nil || !strings.Contains(r.body, "Audit store unavailable") ||
		r.hdr.Get("Content-Disposition") != "" {
		t.Fatalf("export failing before its first byte: %d %v %v", r.code, r.err, r.hdr)
	}
	// Failing mid-stream cuts the transfer.
	failAfter = 250
	form.Del("action")
	r = e.do(e.client, "POST", "/console/export", form)
	if r.code != http.StatusOK || r.err == nil {
		t.Fatalf("an export that failed after 250 rows arrived as a complete response (%d, %d bytes, %v)", r.code, len(r.body), r.err)
	}
	if n := strings.Count(r.body, "\n"); n == 0 || n > 250 {
		t.Fatalf("%d rows arrived of an export that failed after 250", n)
	}
}

// TestConsoleIntegrityAndVerify: the integrity page lists the signing key
// and checkpoints, and "verify now" on an intact trail says so.
func TestConsoleIntegrityAndVerify(t *testing.T) {
	e := newConsoleEnv(t, tokenConfig(), ConsoleOptions{}, nil)
	csrf := e.signedIn()
	p := e.do(e.client, "GET", "/console/integrity", nil)
	if p.code != http.StatusOK || !strings.Contains(p.body, testKeys.Current.ID()) {
		t.Fatalf("integrity page: %d %s", p.code, p.body)
	}
	v := e.do(e.client, "POST", "/console/integrity/verify", url.Values{"csrf": {csrf}})
	if v.code != http.StatusOK || !strings.Contains(v.body, "Intact:") {
		t.Fatalf("verify: %d %s", v.code, v.body)
	}
	if rec := e.recordedBy("console_verify"); len(rec) != 1 {
		t.Fatalf("verify records: %+v", rec)
	}
}

// TestConsoleOffWithoutToken: with the admin API disabled the console
// answers 503 on every page, sign-in included.
func TestConsoleOffWithoutToken(t *testing.T) {
	e := newConsoleEnv(t, DefaultConfig(), ConsoleOptions{}, nil)
	for _, path := range []string{"/console/", "/console/signin", "/console/events", "/console/static/console.css"} {
		if r := e.do(e.client, "GET", path, nil); r.code != http.StatusServiceUnavailable || !strings.Contains(r.body, "admin API is disabled") {
			t.Fatalf("GET %s with the API off: %d %s", path, r.code, r.body)
		}
	}
}

// TestConsoleSigninRateLimit: sign-in attempts from one address are
// throttled after a small burst, and so are their records.
func TestConsoleSigninRateLimit(t *testing.T) {
	e := newConsoleEnv(t, tokenConfig(), ConsoleOptions{}, nil)
	now := time.Now()
	e.api.now = func() time.Time { return now }
	codes := map[int]int{}
	for range signinPerIPBurst + 3 {
		codes[e.signIn(e.client, "wrong-token-wrong-token").code]++
	}
	if codes[http.StatusUnauthorized] != signinPerIPBurst || codes[http.StatusTooManyRequests] != 3 {
		t.Fatalf("attempts answered %v, want %d refused then 3 throttled", codes, signinPerIPBurst)
	}
	if n := len(e.recordedBy("console_signin")); n != signinPerIPBurst {
		t.Fatalf("%d failures recorded, want %d", n, signinPerIPBurst)
	}
	// Even the right token waits its turn.
	if r := e.signIn(e.client, apiTestToken); r.code != http.StatusTooManyRequests {
		t.Fatalf("right token while throttled: %d", r.code)
	}
	now = now.Add(signinPerIPEvery)
	if r := e.signIn(e.client, apiTestToken); r.code != http.StatusSeeOther {
		t.Fatalf("right token after the wait: %d", r.code)
	}
}

// TestSessionStoreBounded: the store never holds more than sessionMax
// sessions; expired ones go first, then the least recently used.
func TestSessionStoreBounded(t *testing.T) {
	s := newSessionStore()
	now := time.Now()
	var ids []string
	for i := range sessionMax + 10 {
		id, _ := s.create(principal{user: "u"}, [32]byte{}, now.Add(time.Duration(i)*time.Millisecond))
		ids = append(ids, id)
	}
	if s.len() != sessionMax {
		t.Fatalf("%d sessions, want %d", s.len(), sessionMax)
	}
	if _, st := s.lookup(ids[0], now.Add(time.Second)); st != sessionUnknown {
		t.Fatal("the least recently used session survived eviction")
	}
	if _, st := s.lookup(ids[len(ids)-1], now.Add(time.Second)); st != sessionOK {
		t.Fatal("the newest session was evicted")
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func hexOf(b []byte) string { return hex.EncodeToString(b) }

// TestConsoleSecureCookies: on a TLS listener the cookies are Secure and
// __Host- prefixed and responses carry HSTS; sign-in works end to end.
func TestConsoleSecureCookies(t *testing.T) {
	store := apiOpenSQLite(t)
	sink := newStoreSink(t, store)
	api, mux := newTestAPI(t, tokenConfig(), store, sink)
	con, err := api.NewConsole(store, ConsoleOptions{Secure: true, Keys: testKeys, WitnessDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	con.Register(mux)
	srv := httptest.NewTLSServer(mux)
	t.Cleanup(srv.Close)
	e := &consoleEnv{t: t, api: api, console: con, sink: sink, srv: srv}
	e.client = srv.Client()
	e.client.Jar, _ = cookiejar.New(nil)
	e.client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	r := e.signIn(e.client, apiTestToken)
	if r.code != http.StatusSeeOther {
		t.Fatalf("sign-in over TLS: %d %s", r.code, r.body)
	}
	var sc string
	for _, c := range r.hdr.Values("Set-Cookie") {
		if strings.HasPrefix(c, "__Host-meshguard_console=") {
			sc = c
		}
	}
	for _, want := range []string{"Secure", "HttpOnly", "SameSite=Strict", "Path=/"} {
		if !strings.Contains(sc, want) {
			t.Errorf("session cookie %q lacks %s", sc, want)
		}
	}
	page := e.do(e.client, "GET", "/console/events", nil)
	if page.code != http.StatusOK || !strings.HasPrefix(page.hdr.Get("Strict-Transport-Security"), "max-age=") {
		t.Fatalf("events over TLS: %d, HSTS %q", page.code, page.hdr.Get("Strict-Transport-Security"))
	}
}

// TestConsoleTokenRotationEndsSessions: a session opened with the file's
// token ends once the file holds another token.
func TestConsoleTokenRotationEndsSessions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(path, []byte(apiTestToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.AdminTokenFile = path
	e := newConsoleEnv(t, cfg, ConsoleOptions{}, nil)
	now := time.Now()
	e.api.now = func() time.Time { return now }
	e.signedIn()
	if err := os.WriteFile(path, []byte("a-brand-new-token-0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A different size: the authorizer sees the change at its next check.
	now = now.Add(2 * tokenFileCheckInterval)
	r := e.do(e.client, "GET", "/console/events", nil)
	if r.code != http.StatusUnauthorized || !strings.Contains(r.body, "no longer accepted (it was rotated)") {
		t.Fatalf("after rotation: %d %s", r.code, r.body)
	}
	if e.console.sessions.len() != 0 {
		t.Fatal("the rotated-away session is still stored")
	}
}

// TestSigninLimiterPerClient: the per-client budget is per IPv4 address
// and per IPv6 /64, so rotating addresses inside one /64 (or spelling an
// IPv4 peer IPv4-mapped) does not buy more attempts, while another client
// keeps its own.
func TestSigninLimiterPerClient(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name        string
		peer, other func(i int) string // the flooding client's i-th peer; a different client
	}{
		{"IPv6 /64", func(i int) string { return fmt.Sprintf("[2001:db8:1:2::%x]:4000", i+1) },
			func(int) string { return "[2001:db8:1:3::1]:4000" }},
		{"IPv4", func(i int) string {
			if i%2 == 0 {
				return "192.0.2.1:4000"
			}
			return "[::ffff:192.0.2.1]:4001"
		}, func(int) string { return "192.0.2.2:4000" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newSigninLimiter()
			allowed := 0
			for i := range signinPerIPBurst + 10 {
				if l.allow(tc.peer(i), now) {
					allowed++
				}
			}
			if allowed != signinPerIPBurst {
				t.Fatalf("one client changing addresses got %d attempts at once, want %d", allowed, signinPerIPBurst)
			}
			if !l.allow(tc.other(0), now) {
				t.Fatal("another client was refused")
			}
		})
	}
}

// TestConsoleUserCountsWindow: the user page's action counts say which
// window they cover: the filter's range (from its start, hour-aligned),
// the last 24 hours when it has none, the last 7 days of a longer one.
func TestConsoleUserCountsWindow(t *testing.T) {
	e := newConsoleEnv(t, tokenConfig(), ConsoleOptions{}, nil)
	e.signedIn()
	now := time.Now().UTC()
	e.api.now = func() time.Time { return now }
	end := now.Truncate(time.Hour).Add(time.Hour)
	datetime := func(t time.Time) string { return `datetime="` + t.Format(time.RFC3339Nano) + `"` }
	heading := regexp.MustCompile(`<h2 id="summary-title">(.*?)</h2>`)
	for _, tc := range []struct {
		name, query string
		from        time.Time
		clamped     bool
	}{
		{"no range", "", end.Add(-24 * time.Hour), false},
		{"from the seed's start", "?from=" + e.start.Format("2006-01-02T15:04:05"), e.start.Truncate(time.Hour), false},
		{"longer than 7 days", "?from=" + now.Add(-30*24*time.Hour).Format("2006-01-02T15:04:05"), end.Add(-consoleChartMaxRange), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.do(e.client, "GET", "/console/users/u1"+tc.query, nil)
			m := heading.FindStringSubmatch(r.body)
			if r.code != http.StatusOK || m == nil {
				t.Fatalf("user page: %d\n%s", r.code, r.body)
			}
			h := m[1]
			if !strings.Contains(h, datetime(tc.from)) || !strings.Contains(h, datetime(end)) || strings.Contains(h, "last 7 days") != tc.clamped {
				t.Fatalf("counts heading %q, want the window %s to %s (clamped %v)", h, tc.from, end, tc.clamped)
			}
			if !strings.Contains(r.body, "<th scope=\"row\">CREATE</th>") {
				t.Fatalf("no counts for u1's actions:\n%s", r.body)
			}
		})
	}
}
