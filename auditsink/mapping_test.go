package auditsink

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshguard/meshguard/audittrail"
)

// updateGolden rewrites testdata/ingest/*.json. Other test files of the
// package that want -update should use flag.Lookup("update").
var updateGolden = flag.Bool("update", false, "rewrite golden files under testdata/")

type goldenOutcome struct {
	Outcome string             `json:"outcome"`
	Rule    string             `json:"rule,omitempty"`
	Record  *audittrail.Record `json:"record,omitempty"`
}

var outcomeNames = map[outcome]string{outKept: "kept", outDropRule: "dropped by rule", outUnmatched: "unmatched", outIntermediate: "intermediate"}

func sockAddr(ip string) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: ip}}}
}

// TestMappingGolden maps representative entries with the default rules
// and compares each audittrail.Record with testdata/ingest/<name>.json.
func TestMappingGolden(t *testing.T) {
	POST, PUT, GET := corev3.RequestMethod_POST, corev3.RequestMethod_PUT, corev3.RequestMethod_GET
	uaex := &accesslogv3.ResponseFlags{UnauthorizedDetails: &accesslogv3.ResponseFlags_Unauthorized{
		Reason: accesslogv3.ResponseFlags_Unauthorized_EXTERNAL_SERVICE}}
	const browser = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
	for _, tc := range []struct {
		name string
		o    entryOpts
		edit func(*accesslogv3.HTTPAccessLogEntry)
	}{
		{name: "create_with_identity", o: entryOpts{method: POST, path: "/api/users", status: 201, reqID: "4f1c2a9e-0d1b-4c59-9d3e-8f4b7f0c1a22", ua: browser,
			headers: map[string]string{"origin": "https://dashboard.example.com", "x-tenant-id": "tenant1", "cookie": "sid=secret"},
			authz: map[string]any{"decision": "allow", "reason": "origin_allowed", "origin": "https://dashboard.example.com",
				"user": "u-1001", "role": "admin", "tenant": "tenant1", "client": "user:u-1001"}},
			edit: func(e *accesslogv3.HTTPAccessLogEntry) {
				e.Response.ResponseHeaders = map[string]string{"content-type": "application/json", "set-cookie": "sid=x"}
				e.Request.ForwardedFor = "198.51.100.1, 203.0.113.7"
				e.CommonProperties.DownstreamDirectRemoteAddress = sockAddr("10.0.0.5")
			}},
		{name: "update_query_secrets", o: entryOpts{method: PUT,
			path: "/api/users/42?token=abc&x=1&API_KEY=zz&Pass%77ord=p&code=c&name=ok&access-token=t&sort_key=&flag", status: 200, reqID: "r-2"},
			edit: func(e *accesslogv3.HTTPAccessLogEntry) { e.Request.OriginalPath = "/v1/users/42?client_secret=s" }},
		{name: "login_failure", o: entryOpts{method: POST, path: "/api/auth/login", status: 401, reqID: "r-3", ua: "curl/8.5.0"}},
		{name: "cors_violation_enforce", o: entryOpts{method: POST, path: "/api/orders", status: 403, flags: uaex, reqID: "r-4",
			authz: map[string]any{"decision": "deny", "reason": "origin_not_allowed", "origin": "https://evil.example", "client": "ip:203.0.113.7"}},
			edit: func(e *accesslogv3.HTTPAccessLogEntry) { e.Response.ResponseCodeDetails = "ext_authz_denied" }},
		{name: "rate_limited_ipv6_zone", o: entryOpts{method: POST, path: "/api/ai/complete", status: 429, ip: "fe80::1%eth0", reqID: "r-5",
			flags: &accesslogv3.ResponseFlags{RateLimited: true}}},
		{name: "no_response", o: entryOpts{method: POST, path: "/api/orders", reqID: "r-6",
			flags: &accesslogv3.ResponseFlags{DownstreamConnectionTermination: true, UpstreamRequestTimeout: true}}},
		{name: "clock_skew", o: entryOpts{method: POST, path: "/api/orders", status: 201, reqID: "r-7", start: time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)}},
		{name: "hostile_strings", o: entryOpts{method: POST, path: "/api/notes/\x00x?password=\"><script>", status: 201, ip: "not-an-ip",
			reqID: "r-8\x00\n", ua: "bad\xffutf8 \u2028 \"quoted\" \\ \x01\x00", authz: map[string]any{"user": "u\x00ser", "tenant": "t\nx"}}},
		{name: "ipv4_mapped", o: entryOpts{method: corev3.RequestMethod_DELETE, path: "/api/orders/9", status: 204, ip: "::ffff:10.1.2.3", reqID: "r-9"}},
		{name: "pipe_address", o: entryOpts{method: corev3.RequestMethod_PATCH, path: "/api/orders/9", status: 200, reqID: "r-10"},
			edit: func(e *accesslogv3.HTTPAccessLogEntry) {
				e.CommonProperties.DownstreamRemoteAddress = &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: "/run/envoy.sock"}}}
				e.CommonProperties.Duration = nil
				e.CommonProperties.TimeToLastDownstreamTxByte = nil
			}},
		{name: "approve_templated_action", o: entryOpts{method: POST, path: "/api/invoices/INV-7/approve", status: 200, reqID: "r-11"}},
		{name: "long_fields_truncated", o: entryOpts{method: POST, path: "/api/" + strings.Repeat("p", 3000), status: 201,
			ua: strings.Repeat("u", 1000), reqID: strings.Repeat("i", 200)}},
		{name: "plain_get_dropped", o: entryOpts{method: GET, path: "/api/orders", status: 200}},
		{name: "start_entry_skipped", o: entryOpts{method: POST, path: "/api/orders", logType: accesslogv3.AccessLogType_DownstreamStart}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := testMapper(t, nil)
			m.respHeaders = []string{"content-type"}
			e := entry(tc.o)
			if tc.edit != nil {
				tc.edit(e)
			}
			id := newStreamIdentity(identifier("envoy-front-0", "meshguard_als"))
			var rec audittrail.Record
			r, out := m.mapHTTP(&id, e, &rec)
			got := goldenOutcome{Outcome: outcomeNames[out]}
			if r != nil {
				got.Rule = r.name
			}
			if out == outKept {
				checkStorable(t, &rec)
				got.Record = &rec
			}
			var buf bytes.Buffer
			enc := json.NewEncoder(&buf)
			enc.SetEscapeHTML(false)
			enc.SetIndent("", "  ")
			if err := enc.Encode(got); err != nil {
				t.Fatal(err)
			}
			b := buf.Bytes()
			path := filepath.Join("testdata", "ingest", tc.name+".json")
			if *updateGolden {
				if err := os.WriteFile(path, b, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create)", err)
			}
			if !bytes.Equal(want, b) {
				t.Errorf("%s differs from the mapping; got:\n%s", path, b)
			}
		})
	}
}

// checkStorable asserts what PostgreSQL needs of a row: text without NUL,
// valid UTF-8, jsonb-acceptable metadata, an inet or empty address.
func checkStorable(t *testing.T, r *audittrail.Record) {
	t.Helper()
	for name, s := range map[string]string{"action": r.Action, "severity": r.Severity, "entity_type": r.EntityType,
		"entity_id": r.EntityID, "user_id": r.UserID, "user_agent": r.UserAgent, "method": r.Method, "path": r.Path,
		"request_id": r.RequestID, "origin": r.Origin, "tenant": r.Tenant, "ip": r.IPAddress} {
		if strings.IndexByte(s, 0) >= 0 || !utf8.ValidString(s) {
			t.Errorf("%s = %q is not storable text", name, s)
		}
	}
	if !json.Valid(r.Metadata) || bytes.Contains(r.Metadata, []byte(`\u0000`)) || !utf8.Valid(r.Metadata) {
		t.Errorf("metadata %q is not storable jsonb", r.Metadata)
	}
	if r.CreatedAt.IsZero() || r.CreatedAt.Location() != time.UTC {
		t.Errorf("created_at %v not set in UTC", r.CreatedAt)
	}
}

func TestRedactQuery(t *testing.T) {
	for in, want := range map[string]string{
		"/a":                           "/a",
		"/a?":                          "/a?",
		"/a?x=1&y=2":                   "/a?x=1&y=2",
		"/a?token=t":                   "/a?token=REDACTED",
		"/a?x=1&Token=t&y=2":           "/a?x=1&Token=REDACTED&y=2",
		"/a?refresh_token=t&id_token=": "/a?refresh_token=REDACTED&id_token=REDACTED",
		"/a?api%5Fkey=k":               "/a?api%5Fkey=REDACTED",
		"/a?x-api-key=k&apikey=2":      "/a?x-api-key=REDACTED&apikey=REDACTED",
		"/a?password":                  "/a?password",
		"/a?&&code=1&":                 "/a?&&code=REDACTED&",
		"/cb?code=abc&state=xyz":       "/cb?code=REDACTED&state=xyz",
		"/a?X-Amz-Signature=s&b=1":     "/a?X-Amz-Signature=REDACTED&b=1",
		"/a?secret=a=b":                "/a?secret=REDACTED",
	} {
		if got := redactQuery(in); got != want {
			t.Errorf("redactQuery(%q) = %q, want %q", in, got, want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { redactQuery("/api/users?page=2&sort=name") }); n != 0 {
		t.Errorf("redactQuery without secrets allocates %v times", n)
	}
}

// FuzzRedactQuery: a secret parameter's value never survives, and the
// parameters keep their order and names.
func FuzzRedactQuery(f *testing.F) {
	f.Add("/a?token=abc&x=1", "s3cr3t")
	f.Add("/a?x=1&password=", "hunter2")
	f.Fuzz(func(t *testing.T, path, secret string) {
		if strings.ContainsAny(secret, "&#=") || len(secret) < 4 || strings.Contains(path, secret) || strings.Contains(redactedValue, secret) {
			return
		}
		p := path + "&api_key=" + secret
		if !strings.Contains(path, "?") {
			p = path + "?api_key=" + secret
		}
		got := redactQuery(p)
		if strings.Contains(got, secret) {
			t.Fatalf("redactQuery(%q) = %q keeps the secret", p, got)
		}
		if strings.Count(got, "&") != strings.Count(p, "&") {
			t.Fatalf("redactQuery(%q) = %q changed the parameters", p, got)
		}
	})
}

// FuzzAppendJSONString: any string becomes valid JSON that jsonb accepts
// and decodes back to the cleaned string.
func FuzzAppendJSONString(f *testing.F) {
	for _, s := range []string{"", "plain", "q\"b\\s", "\x00\x01\n\t", "bad\xff", "\u2028\u2029", "é", "\xdd\xd2", "\xff\x00\xe2\x82"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b := appendJSONString(nil, s)
		if !json.Valid(b) || bytes.Contains(b, []byte(`\u0000`)) {
			t.Fatalf("%q → %s: not jsonb-storable", s, b)
		}
		var back string
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if want := clean(s); back != want {
			t.Fatalf("%q → %s → %q, want %q", s, b, back, want)
		}
	})
}

func TestTruncate(t *testing.T) {
	for _, tc := range []struct {
		s    string
		max  int
		want string
	}{
		{"abc", 5, "abc"}, {"abcdef", 3, "abc"}, {"ééé", 3, "é"}, {"ééé", 4, "éé"}, {"é", 1, ""},
	} {
		if got := truncate(tc.s, tc.max); got != tc.want {
			t.Errorf("truncate(%q, %d) = %q, want %q", tc.s, tc.max, got, tc.want)
		}
	}
}

func TestEventTimeSkew(t *testing.T) {
	m := testMapper(t, nil)
	for _, tc := range []struct {
		name    string
		start   *timestamppb.Timestamp
		want    time.Time
		claimed bool
	}{
		{"recent", timestamppb.New(testNow.Add(-time.Hour)), testNow.Add(-time.Hour), false},
		{"missing", nil, testNow, false},
		{"far past", timestamppb.New(testNow.Add(-48 * time.Hour)), testNow, true},
		{"future", timestamppb.New(testNow.Add(time.Hour)), testNow, true},
		{"invalid", &timestamppb.Timestamp{Seconds: 1 << 62}, testNow, true},
	} {
		got, claimed := m.eventTime(&accesslogv3.AccessLogCommon{StartTime: tc.start})
		if !got.Equal(tc.want) || (claimed != nil) != tc.claimed {
			t.Errorf("%s: got %v claimed %v, want %v claimed %v", tc.name, got, claimed, tc.want, tc.claimed)
		}
	}
}

// TestBoundedPathNeverLeaks: whatever the cut point, a secret value near
// the end of a long path does not survive bounding.
func TestBoundedPathNeverLeaks(t *testing.T) {
	for pad := maxPathLen - 40; pad <= maxPathLen+5; pad++ {
		p := "/api/x?a=" + strings.Repeat("x", pad) + "&token=Zsecretvalue"
		got := boundedPath(p)
		if strings.Contains(got, "Zs") || len(got) > maxPathLen {
			t.Fatalf("pad %d: %q (%d bytes)", pad, got[len(got)-30:], len(got))
		}
	}
}
