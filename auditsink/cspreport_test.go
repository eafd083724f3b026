package auditsink

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/meshguard/meshguard/audittrail"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// startCSP serves the handler the way serve mounts it.
func startCSP(t *testing.T, sink recordSink) (*Server, *fakeClock, string) {
	t.Helper()
	return startCSPConfig(t, DefaultCSPReportsConfig(), sink)
}

func startCSPConfig(t *testing.T, csp CSPReportsConfig, sink recordSink) (*Server, *fakeClock, string) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.CSPReports = csp
	s, _ := newTestServer(t, cfg, sink)
	clk := &fakeClock{t: testNow}
	s.now = clk.now
	mux := http.NewServeMux()
	mux.Handle("POST /v1/csp-reports", s.CSPReportHandler())
	ts := httptest.NewServer(mux)
	t.Cleanup(ts.Close)
	return s, clk, ts.URL + "/v1/csp-reports"
}

const legacyBody = `{"csp-report":{"document-uri":"https://app.example.com/settings?token=abc#frag","referrer":"https://user:pw@ref.example/?code=1",
"violated-directive":"script-src-elem","effective-directive":"script-src-elem","original-policy":"default-src 'self'; script-src 'self' 'nonce-abc'; report-uri /v1/csp-reports",
"disposition":"enforce","blocked-uri":"https://cdn.evil.example/x.js","line-number":12,"column-number":"7","source-file":"https://app.example.com/app.js","status-code":200,"script-sample":""}}`

const reportsBody = `[
{"type":"csp-violation","age":10,"url":"https://app.example.com/a","user_agent":"UA-from-report",
 "body":{"documentURL":"https://app.example.com/a","blockedURL":"inline","effectiveDirective":"style-src-attr","originalPolicy":"style-src 'self'","disposition":"report","sample":"color:red","statusCode":200,"lineNumber":3,"columnNumber":9}},
{"type":"deprecation","age":1,"url":"https://app.example.com/a","body":{"id":"x"}},
{"type":"csp-violation","age":0,"url":"https://app.example.com/b","body":{"documentURL":"https://app.example.com/b","blockedURL":"eval","effectiveDirective":"script-src","disposition":"enforce"}}
]`

func TestCSPReportHandler(t *testing.T) {
	for _, tc := range []struct {
		name, method, ctype, body string
		sinkErr                   error
		chunked                   bool // no Content-Length: the size is found while reading
		status                    int
		wantErr                   string
		wantRecs                  int
		outcome                   string
	}{
		{name: "legacy report", ctype: "application/csp-report", body: legacyBody, status: 204, wantRecs: 1, outcome: "stored"},
		{name: "legacy with charset", ctype: "application/csp-report; charset=utf-8", body: legacyBody, status: 204, wantRecs: 1, outcome: "stored"},
		{name: "reporting api", ctype: "application/reports+json", body: reportsBody, status: 204, wantRecs: 2, outcome: "stored"},
		{name: "reporting api without csp", ctype: "application/reports+json", body: `[{"type":"deprecation","body":{}}]`, status: 204, outcome: "ignored"},
		{name: "json", ctype: "application/json", body: legacyBody, status: 415, wantErr: "content type must be", outcome: "unsupported_media_type"},
		{name: "no content type", body: legacyBody, status: 415, wantErr: "content type must be", outcome: "unsupported_media_type"},
		{name: "malformed json", ctype: "application/csp-report", body: `{"csp-report":`, status: 400, wantErr: "decoding csp-report", outcome: "malformed"},
		{name: "wrong shape", ctype: "application/csp-report", body: `{"other":{}}`, status: 400, wantErr: `no \"csp-report\" object`, outcome: "malformed"},
		{name: "no directive", ctype: "application/csp-report", body: `{"csp-report":{"document-uri":"https://a"}}`, status: 400, wantErr: "no violated-directive", outcome: "malformed"},
		{name: "bad number", ctype: "application/csp-report", body: `{"csp-report":{"effective-directive":"img-src","line-number":"x"}}`, status: 400, wantErr: "not a number", outcome: "malformed"},
		{name: "NaN", ctype: "application/csp-report", body: `{"csp-report":{"effective-directive":"img-src","line-number":"NaN"}}`, status: 400, wantErr: "not a number", outcome: "malformed"},
		{name: "beyond int64", ctype: "application/reports+json", body: `[{"type":"csp-violation","age":1e19,"body":{"effectiveDirective":"img-src"}}]`, status: 400, wantErr: "not a number", outcome: "malformed"},
		{name: "infinity", ctype: "application/reports+json", body: `[{"type":"csp-violation","body":{"effectiveDirective":"img-src","lineNumber":"-Inf"}}]`, status: 400, wantErr: "not a number", outcome: "malformed"},
		{name: "empty list", ctype: "application/reports+json", body: `[]`, status: 400, wantErr: "no CSP violation", outcome: "malformed"},
		{name: "csp report without body", ctype: "application/reports+json", body: `[{"type":"csp-violation"}]`, status: 400, wantErr: "report 0 has no body", outcome: "malformed"},
		{name: "too many reports", ctype: "application/reports+json", body: "[" + strings.Repeat(`{"type":"x"},`, maxCSPReports) + `{"type":"x"}]`, status: 400, wantErr: "more than 100 reports", outcome: "malformed"},
		{name: "over 64 KiB", ctype: "application/csp-report", body: `{"csp-report":{"effective-directive":"img-src","script-sample":"` + strings.Repeat("a", 65<<10) + `"}}`, status: 413, wantErr: "over 64 KiB", outcome: "too_large"},
		{name: "over 64 KiB chunked", ctype: "application/csp-report", body: `{"csp-report":{"effective-directive":"img-src","script-sample":"` + strings.Repeat("a", 65<<10) + `"}}`, chunked: true, status: 413, wantErr: "over 64 KiB", outcome: "too_large"},
		{name: "exactly 64 KiB", ctype: "application/csp-report", body: padJSON(`{"csp-report":{"effective-directive":"img-src"}}`, maxCSPBody), status: 204, wantRecs: 1, outcome: "stored"},
		{name: "writer refuses", ctype: "application/csp-report", body: legacyBody, sinkErr: errors.New("spool full"), status: 503, wantErr: "audit trail unavailable", outcome: "sink_error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sink := &collectSink{err: tc.sinkErr}
			s, _, url := startCSP(t, sink)
			var body io.Reader = strings.NewReader(tc.body)
			if tc.chunked {
				body = struct{ io.Reader }{body}
			}
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, url, body)
			if tc.ctype != "" {
				req.Header.Set("Content-Type", tc.ctype)
			}
			req.Header.Set("User-Agent", "UA-header")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, got, tc.status)
			}
			if tc.wantErr != "" {
				var e struct{ Error string }
				if err := json.Unmarshal(got, &e); err != nil || !strings.Contains(e.Error, strings.ReplaceAll(tc.wantErr, `\"`, `"`)) {
					t.Errorf("body %s, want error containing %q", got, tc.wantErr)
				}
			}
			if got := len(sink.records()); got != tc.wantRecs {
				t.Errorf("%d records, want %d", got, tc.wantRecs)
			}
			if metricValue(s.m.csp.WithLabelValues(tc.outcome)) == 0 {
				t.Errorf("outcome %s not counted", tc.outcome)
			}
		})
	}
}

func padJSON(obj string, size int) string {
	return obj + strings.Repeat(" ", size-len(obj))
}

// TestCSPReportRecords checks the rows both formats produce: URLs lose
// fragments, credentials and query secrets; the page becomes path/origin.
func TestCSPReportRecords(t *testing.T) {
	sink := &collectSink{}
	_, _, url := startCSP(t, sink)
	post := func(ctype, body, clientIP string) {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, url, strings.NewReader(body))
		req.Header.Set("Content-Type", ctype)
		if clientIP != "" {
			req.Header.Set("X-Meshguard-Client-Ip", clientIP)
		}
		req.Header.Set("User-Agent", "UA-header")
		req.Header.Set("X-Request-Id", "req-1")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 204 {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	// The first as a direct caller (the peer), the second via Envoy: the
	// address it derived, unmapped, whole (the limits key the /64, the row
	// keeps the address).
	post("application/csp-report", legacyBody, "")
	post("application/reports+json", reportsBody, "::ffff:198.51.100.20")
	want := []audittrail.Record{
		{CreatedAt: testNow, Action: "CSP_VIOLATION", Severity: audittrail.SeverityMedium, EntityType: "csp_directive", EntityID: "script-src-elem",
			IPAddress: "127.0.0.1", UserAgent: "UA-header", Method: "POST", Path: "/settings?token=REDACTED", RequestID: "req-1",
			Origin: "https://app.example.com", Metadata: json.RawMessage(`{"document_uri":"https://app.example.com/settings?token=REDACTED",` +
				`"referrer":"https://ref.example/?code=REDACTED","blocked_uri":"https://cdn.evil.example/x.js","violated_directive":"script-src-elem",` +
				`"effective_directive":"script-src-elem","disposition":"enforce","source_file":"https://app.example.com/app.js",` +
				`"original_policy":"default-src 'self'; script-src 'self' 'nonce-abc'; report-uri /v1/csp-reports","line":12,"column":7,"status_code":200}`)},
		{CreatedAt: testNow, Action: "CSP_VIOLATION", Severity: audittrail.SeverityLow, EntityType: "csp_directive", EntityID: "style-src-attr",
			IPAddress: "198.51.100.20", UserAgent: "UA-from-report", Method: "POST", Path: "/a", RequestID: "req-1", Origin: "https://app.example.com",
			Metadata: json.RawMessage(`{"document_uri":"https://app.example.com/a","blocked_uri":"inline","effective_directive":"style-src-attr",` +
				`"disposition":"report","sample":"color:red","original_policy":"style-src 'self'","line":3,"column":9,"status_code":200,"age_ms":10}`)},
		{CreatedAt: testNow, Action: "CSP_VIOLATION", Severity: audittrail.SeverityMedium, EntityType: "csp_directive", EntityID: "script-src",
			IPAddress: "198.51.100.20", UserAgent: "UA-header", Method: "POST", Path: "/b", RequestID: "req-1", Origin: "https://app.example.com",
			Metadata: json.RawMessage(`{"document_uri":"https://app.example.com/b","blocked_uri":"eval","effective_directive":"script-src","disposition":"enforce"}`)},
	}
	if diff := cmp.Diff(want, sink.records(), cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("records (-want +got):\n%s", diff)
	}
}

func TestCSPReportMethod(t *testing.T) {
	s, _ := newTestServer(t, DefaultConfig(), &collectSink{})
	rec := httptest.NewRecorder()
	s.CSPReportHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/v1/csp-reports", nil))
	if rec.Code != 405 || rec.Header().Get("Allow") != "POST" {
		t.Fatalf("GET: %d Allow=%q", rec.Code, rec.Header().Get("Allow"))
	}
	if got := metricValue(s.m.csp.WithLabelValues("method_not_allowed")); got != 1 {
		t.Errorf("method_not_allowed = %v, want 1", got)
	}
}

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://u:p@h.example/p?token=1#x": "https://h.example/p?token=REDACTED",
		"inline":                            "inline",
		"https://h.example":                 "https://h.example",
		"https://h.example?a=1&secret=2":    "https://h.example?a=1&secret=REDACTED",
		"https://h.example/@foo":            "https://h.example/@foo",
	} {
		if got := redactURL(in); got != want {
			t.Errorf("redactURL(%q) = %q, want %q", in, got, want)
		}
	}
}

// FuzzParseCSPReports: no body panics the parser, and every accepted
// report becomes a bounded, storable row.
func FuzzParseCSPReports(f *testing.F) {
	f.Add(false, []byte(legacyBody))
	f.Add(true, []byte(reportsBody))
	f.Add(false, []byte(`{"csp-report":{"effective-directive":"\u0000","document-uri":"https://a:b@c/d?password=e#f","line-number":"1e400"}}`))
	f.Add(true, []byte(`[{"type":"csp-violation","body":{"effectiveDirective":"x","documentURL":"//x"}}]`))
	req := httptest.NewRequest(http.MethodPost, "/v1/csp-reports", nil)
	f.Fuzz(func(t *testing.T, reportsAPI bool, body []byte) {
		mt := cspMediaLegacy
		if reportsAPI {
			mt = cspMediaReporter
		}
		reps, _, err := parseCSPReports(mt, body)
		if err != nil {
			return
		}
		if len(reps) > maxCSPReports {
			t.Fatalf("%d reports", len(reps))
		}
		for i := range reps {
			if reps[i].directive() == "" {
				t.Fatal("accepted a report without directive")
			}
			rec := reps[i].record(testNow, req, "203.0.113.9")
			checkStorable(t, &rec)
			if len(rec.Path) > maxPathLen || len(rec.Origin) > maxShortLen || len(rec.EntityID) > maxCSPDirective || len(rec.Metadata) > 16<<10 {
				t.Fatalf("unbounded row: path %d origin %d entity %d metadata %d", len(rec.Path), len(rec.Origin), len(rec.EntityID), len(rec.Metadata))
			}
		}
	})
}

// TestCSPReportCountBoundedFirst: a Reporting API body of 64 KiB of tiny
// elements is refused at the 101st, without decoding (and allocating) the
// thousands behind it: what one refusal costs stays below what the body
// itself takes.
func TestCSPReportCountBoundedFirst(t *testing.T) {
	for _, el := range []string{`{}`, `null`, `{"type":"x","body":{}}`} {
		n := (maxCSPBody - 2) / (len(el) + 1)
		body := []byte("[" + strings.Repeat(el+",", n-1) + el + "]")
		if _, _, err := parseCSPReports(cspMediaReporter, body); err == nil || !strings.Contains(err.Error(), "more than 100 reports") {
			t.Fatalf("%d × %s: %v, want more than 100 reports", n, el, err)
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		const runs = 10
		for range runs {
			parseCSPReports(cspMediaReporter, body)
		}
		runtime.ReadMemStats(&after)
		if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > maxCSPBody {
			t.Errorf("%d × %s: %d bytes allocated per refusal, want under %d", n, el, per, maxCSPBody)
		}
	}
}
