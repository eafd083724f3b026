package auditsink

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"go.yaml.in/yaml/v3"

	"github.com/meshguard/meshguard/audittrail"
)

// TestDefaultRules covers every default action and drop, in rule order.
func TestDefaultRules(t *testing.T) {
	m := testMapper(t, nil)
	uaex := &accesslogv3.ResponseFlags{UnauthorizedDetails: &accesslogv3.ResponseFlags_Unauthorized{
		Reason: accesslogv3.ResponseFlags_Unauthorized_EXTERNAL_SERVICE}}
	type want struct{ action, severity, entityType, entityID, rule string }
	const (
		GET    = corev3.RequestMethod_GET
		HEAD   = corev3.RequestMethod_HEAD
		POST   = corev3.RequestMethod_POST
		PUT    = corev3.RequestMethod_PUT
		PATCH  = corev3.RequestMethod_PATCH
		DELETE = corev3.RequestMethod_DELETE
		OPT    = corev3.RequestMethod_OPTIONS
	)
	drop := func(rule string) want { return want{rule: rule} }
	for _, tc := range []struct {
		name string
		e    entryOpts
		want want
	}{
		{"health check", entryOpts{method: GET, path: "/healthz", status: 200}, drop("health_checks")},
		{"health check even when failing", entryOpts{method: GET, path: "/readyz", status: 503}, drop("health_checks_readyz")},
		{"api health", entryOpts{method: GET, path: "/api/health/", status: 200}, drop("health_checks_api")},
		{"metrics scrape", entryOpts{method: GET, path: "/metrics", status: 200}, drop("metrics_scrapes")},
		{"static asset", entryOpts{method: GET, path: "/static/js/app.123.js", status: 200}, drop("static_assets")},
		{"static asset 404", entryOpts{method: HEAD, path: "/assets/x.css", status: 404}, drop("static_assets_build")},
		{"favicon", entryOpts{method: GET, path: "/favicon.ico", status: 200}, drop("static_favicon")},

		{"cors violation enforce", entryOpts{method: POST, path: "/api/users", status: 403, flags: uaex,
			authz: map[string]any{"decision": "deny", "reason": "origin_not_allowed", "origin": "https://evil.example"}},
			want{"CORS_VIOLATION", "HIGH", "", "", "cors_violation"}},
		{"cors violation report mode", entryOpts{method: GET, path: "/api/users", status: 200,
			authz: map[string]any{"decision": "allow", "reason": "origin_not_allowed"}},
			want{"CORS_VIOLATION", "HIGH", "", "", "cors_violation"}},
		{"cors preflight denied", entryOpts{method: OPT, path: "/api/users", status: 403, flags: uaex,
			authz: map[string]any{"decision": "deny", "reason": "method_not_allowed", "preflight": true}},
			want{"CORS_VIOLATION", "HIGH", "", "", "cors_violation"}},
		{"cors allowed is not a violation", entryOpts{method: GET, path: "/api/users", status: 200,
			authz: map[string]any{"decision": "allow", "reason": "origin_allowed"}}, drop("reads")},

		{"rate limited 429", entryOpts{method: POST, path: "/api/auth/login", status: 429},
			want{"RATE_LIMIT_EXCEEDED", "MEDIUM", "", "", "rate_limited"}},
		{"rate limited flag", entryOpts{method: GET, path: "/api/orders", status: 503, flags: &accesslogv3.ResponseFlags{RateLimited: true}},
			want{"RATE_LIMIT_EXCEEDED", "MEDIUM", "", "", "rate_limited_flag"}},

		{"login success", entryOpts{method: POST, path: "/api/auth/login", status: 200},
			want{"LOGIN_SUCCESS", "LOW", "session", "", "login_success"}},
		{"login failure 401", entryOpts{method: POST, path: "/api/auth/login", status: 401},
			want{"LOGIN_FAILURE", "MEDIUM", "session", "", "login_failure"}},
		{"login failure 400", entryOpts{method: POST, path: "/API/Auth/Login", status: 400},
			want{"LOGIN_FAILURE", "MEDIUM", "session", "", "login_failure"}},
		{"login reset by client", entryOpts{method: POST, path: "/api/auth/login"},
			want{"LOGIN_FAILURE", "MEDIUM", "session", "", "login_failure"}},
		{"logout", entryOpts{method: POST, path: "/api/auth/logout", status: 204},
			want{"LOGOUT", "LOW", "session", "", "logout"}},

		{"permission denied 403", entryOpts{method: DELETE, path: "/api/users/9", status: 403},
			want{"PERMISSION_DENIED", "HIGH", "", "", "permission_denied"}},
		{"permission denied 401 on a read", entryOpts{method: GET, path: "/api/reports", status: 401},
			want{"PERMISSION_DENIED", "HIGH", "", "", "permission_denied"}},
		{"permission denied by ext_authz", entryOpts{method: GET, path: "/api/admin", flags: uaex,
			authz: map[string]any{"decision": "deny", "reason": "role_required"}},
			want{"PERMISSION_DENIED", "HIGH", "", "", "permission_denied_authz"}},

		{"password change", entryOpts{method: POST, path: "/api/auth/password", status: 200},
			want{"PASSWORD_CHANGE", "HIGH", "user", "", "password_change"}},
		{"password change of a user", entryOpts{method: PUT, path: "/api/users/42/password", status: 204},
			want{"PASSWORD_CHANGE", "HIGH", "user", "42", "password_change_user"}},
		{"settings change", entryOpts{method: PATCH, path: "/api/settings/smtp", status: 200},
			want{"SETTINGS_CHANGE", "HIGH", "settings", "smtp", "settings_change"}},
		{"settings root", entryOpts{method: PUT, path: "/api/settings", status: 200},
			want{"SETTINGS_CHANGE", "HIGH", "settings", "", "settings_change"}},
		{"export", entryOpts{method: GET, path: "/api/invoices/export?format=csv", status: 200},
			want{"EXPORT", "MEDIUM", "invoices", "", "export"}},
		{"export prefixed", entryOpts{method: POST, path: "/api/export/users", status: 200},
			want{"EXPORT", "MEDIUM", "users", "", "export_prefixed"}},
		{"import", entryOpts{method: POST, path: "/api/products/import", status: 202},
			want{"IMPORT", "MEDIUM", "products", "", "import"}},
		{"import prefixed", entryOpts{method: PUT, path: "/api/import/products", status: 202},
			want{"IMPORT", "MEDIUM", "products", "", "import_prefixed"}},
		{"approve", entryOpts{method: POST, path: "/api/invoices/7/approve", status: 200},
			want{"INVOICES_APPROVE", "MEDIUM", "invoices", "7", "approve"}},
		{"reject", entryOpts{method: POST, path: "/api/leave-requests/3/reject", status: 200},
			want{"LEAVE_REQUESTS_REJECT", "MEDIUM", "leave-requests", "3", "reject"}},
		{"bulk create", entryOpts{method: POST, path: "/api/users/bulk", status: 201},
			want{"BULK_CREATE", "MEDIUM", "users", "", "bulk_create"}},
		{"bulk update", entryOpts{method: PATCH, path: "/api/users/bulk", status: 200},
			want{"BULK_UPDATE", "MEDIUM", "users", "", "bulk_update"}},
		{"bulk delete", entryOpts{method: DELETE, path: "/api/users/bulk", status: 200},
			want{"BULK_DELETE", "HIGH", "users", "", "bulk_delete"}},

		{"create", entryOpts{method: POST, path: "/api/users", status: 201},
			want{"CREATE", "LOW", "users", "", "create"}},
		{"create nested", entryOpts{method: POST, path: "/api/users/5/comments", status: 201},
			want{"CREATE", "LOW", "users", "5", "create_nested"}},
		{"update", entryOpts{method: PUT, path: "/api/users/5", status: 200},
			want{"UPDATE", "LOW", "users", "5", "update"}},
		{"update patch, trailing slash", entryOpts{method: PATCH, path: "/api/users/5/", status: 200},
			want{"UPDATE", "LOW", "users", "5", "update"}},
		{"failed update kept with its status", entryOpts{method: PATCH, path: "/api/users/5", status: 500},
			want{"UPDATE", "LOW", "users", "5", "update"}},
		{"delete", entryOpts{method: DELETE, path: "/api/orders/77", status: 204},
			want{"DELETE", "MEDIUM", "orders", "77", "delete"}},
		{"read of a user", entryOpts{method: GET, path: "/api/users/5", status: 200},
			want{"READ", "LOW", "user", "5", "read_user"}},
		{"create outside /api", entryOpts{method: POST, path: "/graphql", status: 200},
			want{"CREATE", "LOW", "", "", "create_other"}},
		{"update outside /api", entryOpts{method: PUT, path: "/upload/x", status: 200},
			want{"UPDATE", "LOW", "", "", "update_other"}},
		{"delete outside /api", entryOpts{method: DELETE, path: "/sessions/x", status: 200},
			want{"DELETE", "MEDIUM", "", "", "delete_other"}},
		{"plain GET dropped", entryOpts{method: GET, path: "/api/users", status: 200}, drop("reads")},
		{"HEAD dropped", entryOpts{method: HEAD, path: "/", status: 200}, drop("reads")},
		{"OPTIONS dropped", entryOpts{method: OPT, path: "/api/users", status: 204}, drop("reads")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rec audittrail.Record
			r, out := m.mapHTTP(&streamIdentity{}, entry(tc.e), &rec)
			if r == nil {
				t.Fatalf("no rule matched (outcome %d)", out)
			}
			var got want
			got.rule = r.name
			if out == outKept {
				got.action, got.severity, got.entityType, got.entityID = rec.Action, rec.Severity, rec.EntityType, rec.EntityID
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestDefaultRulesCoverSeedActions: every action of the seed's list has a
// default rule.
func TestDefaultRulesCoverSeedActions(t *testing.T) {
	var actions []string
	for _, r := range DefaultRules() {
		actions = append(actions, r.Action)
	}
	for _, a := range []string{"LOGIN_SUCCESS", "LOGIN_FAILURE", "LOGOUT", "PASSWORD_CHANGE", "PERMISSION_DENIED",
		"RATE_LIMIT_EXCEEDED", "CORS_VIOLATION", "CREATE", "UPDATE", "DELETE", "READ", "EXPORT", "IMPORT",
		"{entity_type}_APPROVE", "{entity_type}_REJECT", "SETTINGS_CHANGE", "BULK_CREATE", "BULK_UPDATE", "BULK_DELETE"} {
		if !slices.Contains(actions, a) {
			t.Errorf("no default rule for %s", a)
		}
	}
	if err := (Config{}).validateRules(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
}

func TestRuleConditions(t *testing.T) {
	rules := []RuleConfig{
		{Name: "svc", Metadata: map[string][]string{"tenant": {"acme", "globex"}, "role": {"*"}}, Action: "TENANT_ADMIN"},
		{Name: "errors", Status: []string{"500-504", "none"}, Action: "SERVER_ERROR", Severity: audittrail.SeverityCritical},
		{Name: "upstream", ResponseFlags: []string{"UH", "UF"}, Action: "UPSTREAM_DOWN"},
		{Name: "wild", Methods: []string{"GET"}, Path: "/files/*/{name}", Action: "FILE_READ", EntityID: "{name}"},
		{Name: "rest", Path: "/docs/{rest...}", Action: "DOC", EntityID: "{rest}"},
	}
	m := testMapper(t, rules)
	for _, tc := range []struct {
		name, action, entityID string
		e                      entryOpts
	}{
		{"metadata all keys", "TENANT_ADMIN", "", entryOpts{path: "/x", status: 200, authz: map[string]any{"tenant": "acme", "role": "admin"}}},
		{"metadata wrong value", "", "", entryOpts{path: "/x", status: 200, authz: map[string]any{"tenant": "other", "role": "admin"}}},
		{"metadata missing key", "", "", entryOpts{path: "/x", status: 200, authz: map[string]any{"tenant": "acme"}}},
		{"metadata non-string", "", "", entryOpts{path: "/x", status: 200, authz: map[string]any{"tenant": "acme", "role": 3.0}}},
		{"status range", "SERVER_ERROR", "", entryOpts{path: "/x", status: 502}},
		{"status outside range", "", "", entryOpts{path: "/x", status: 505}},
		{"status none", "SERVER_ERROR", "", entryOpts{path: "/x"}},
		{"flag any of", "UPSTREAM_DOWN", "", entryOpts{path: "/x", status: 200, flags: &accesslogv3.ResponseFlags{UpstreamConnectionFailure: true}}},
		{"flag not set", "", "", entryOpts{path: "/x", status: 200, flags: &accesslogv3.ResponseFlags{LocalReset: true}}},
		{"wildcard and capture", "FILE_READ", "a.txt", entryOpts{method: corev3.RequestMethod_GET, path: "/files/7/a.txt?x=1", status: 200}},
		{"method mismatch", "", "", entryOpts{method: corev3.RequestMethod_POST, path: "/files/7/a.txt", status: 200}},
		{"too many segments", "", "", entryOpts{method: corev3.RequestMethod_GET, path: "/files/7/a/b", status: 200}},
		{"rest capture", "DOC", "a/b/c", entryOpts{path: "//docs//a/b/c/", status: 200}},
		{"rest empty", "DOC", "", entryOpts{path: "/docs", status: 200}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rec audittrail.Record
			_, out := m.mapHTTP(&streamIdentity{}, entry(tc.e), &rec)
			if tc.action == "" {
				if out != outUnmatched {
					t.Fatalf("matched %s, want no match", rec.Action)
				}
				return
			}
			if out != outKept || rec.Action != tc.action || rec.EntityID != tc.entityID {
				t.Fatalf("got %s %q (outcome %d), want %s %q", rec.Action, rec.EntityID, out, tc.action, tc.entityID)
			}
		})
	}
}

// TestRuleValidation: every rejected rule set is a
// testdata/ingest/bad_*.yaml with the exact error lines expected.
func TestRuleValidation(t *testing.T) {
	for _, tc := range []struct {
		file string
		want []string
	}{
		{"bad_path.yaml", []string{
			`audit.rules[0].path: must start with /, got "api/users"`,
			`audit.rules[1].path: {rest...} must be the last segment, got "/a/{rest...}/b"`,
			`audit.rules[2].path: segment "v{n}" mixes literal text with a capture or *; a capture is a whole segment, got "/api/v{n}"`,
			`audit.rules[3].path: capture {id} appears twice, got "/{id}/{id}"`,
			`audit.rules[4].path: capture name "Id" must be a-z 0-9 _ starting with a letter, got "/{Id}"`,
			`audit.rules[5].path: must not contain a query or fragment, got "/a?b=1"`,
			`audit.rules[6].path: empty segment 2, got "/a//b"`,
		}},
		{"bad_conditions.yaml", []string{
			`audit.rules[0].methods[1]: must be an upper-case HTTP method (GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH), got "get"`,
			`audit.rules[0].status[0]: must be a code 100-599, a class like "4xx", a range like "500-599" or "none", got "600"`,
			`audit.rules[0].status[1]: must be a code 100-599, a class like "4xx", a range like "500-599" or "none", got "499-400"`,
			`audit.rules[0].response_flags[0]: must be an Envoy response flag (LH, UH, UT, LR, UR, UF, UC, UO, NR, DI, FI, RL, UAEX, RLSE, DC, URX, SI, IH, DPE, UMSDR, RFCF, NFCF, DT, UPE, NC, OM, DF, DR), got "XX"`,
			`audit.rules[0].metadata.user: must list at least one value ("*" for any), got []`,
			`audit.rules[1].kind: must be http or tcp, got "udp"`,
			`audit.rules[2].methods: not allowed on a tcp rule, got ["GET"]`,
			`audit.rules[2].path: not allowed on a tcp rule, got "/x"`,
		}},
		{"bad_actions.yaml", []string{
			`audit.rules[0].action: required unless drop is true, got ""`,
			`audit.rules[1].drop: a drop rule takes no action, severity, entity_type or entity_id, got action "CREATE"`,
			`audit.rules[2].action: must be upper case A-Z 0-9 _ with optional {capture} references, got "create"`,
			`audit.rules[3].action: references {kind}, which the rule's path does not capture, got "{kind}_APPROVE"`,
			`audit.rules[3].entity_id: references {id}, which the rule's path does not capture, got "{id}"`,
			`audit.rules[4].severity: must be LOW, MEDIUM, HIGH or CRITICAL, got "URGENT"`,
			`audit.rules[5].name: duplicate of audit.rules[4], got "same"`,
			`audit.rules[6].name: must be 1-64 characters of a-z 0-9 _ - ., got "Bad Name"`,
			`audit.rules[7].entity_type: unbalanced {, got "{entity"`,
		}},
		{"bad_headers.yaml", []string{
			`audit.request_headers[0]: "Authorization" carries credentials and is never logged`,
			`audit.request_headers[1]: must be an HTTP header name, got "x bad"`,
			`audit.request_headers[3]: duplicate header "X-Tenant-Id"`,
			`audit.response_headers[0]: "set-cookie" carries credentials and is never logged`,
		}},
	} {
		t.Run(tc.file, func(t *testing.T) {
			raw, err := os.ReadFile(filepath.Join("testdata", "ingest", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			var cfg Config
			dec := yaml.NewDecoder(strings.NewReader(string(raw)))
			dec.KnownFields(true)
			if err := dec.Decode(&cfg); err != nil {
				t.Fatalf("decoding: %v", err)
			}
			err = cfg.validateRules()
			if err == nil {
				t.Fatal("accepted")
			}
			got := strings.Split(err.Error(), "\n")
			if !slices.Equal(got, tc.want) {
				t.Errorf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestTemplateExpand(t *testing.T) {
	caps := [maxCaptures]string{"leave-requests", "ünïcode", strings.Repeat("x", 300)}
	names := []string{"a", "b", "c"}
	for _, tc := range []struct {
		tmpl   string
		action bool
		want   string
	}{
		{"{a}_APPROVE", true, "LEAVE_REQUESTS_APPROVE"},
		{"{b}", true, "__N__CODE"},
		{"X_{c}", true, "X_" + strings.Repeat("X", maxActionLen-2)},
		{"{c}", false, strings.Repeat("x", maxEntityLen)},
		{"pre-{b}", false, "pre-ünïcode"},
		{"CONST", true, "CONST"},
	} {
		tp, err := parseTemplate(tc.tmpl, names, tc.action)
		if err != nil {
			t.Fatalf("%s: %v", tc.tmpl, err)
		}
		max := maxEntityLen
		if tc.action {
			max = maxActionLen
		}
		if got := tp.expand(&caps, max); got != tc.want {
			t.Errorf("%s: got %q, want %q", tc.tmpl, got, tc.want)
		}
	}
}

func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// refMatch is a straightforward reference for pathTemplate.match.
func refMatch(tmpl, path string) (bool, map[string]string) {
	split := func(s string) []string {
		var out []string
		for _, p := range strings.Split(s, "/") {
			if p != "" {
				out = append(out, p)
			}
		}
		return out
	}
	ts, ps := split(tmpl), split(path)
	caps := map[string]string{}
	for i, t := range ts {
		if strings.HasSuffix(t, "...}") {
			// rest: the remainder of the path after i segments, as it appears.
			rest := path
			for range i {
				rest = strings.TrimLeft(rest, "/")
				rest = rest[strings.IndexByte(rest, '/')+1:]
			}
			if len(ps) <= i {
				rest = ""
			}
			caps[t[1:len(t)-4]] = strings.Trim(rest, "/")
			return true, caps
		}
		if i >= len(ps) {
			return false, nil
		}
		switch {
		case t == "*":
		case strings.HasPrefix(t, "{"):
			caps[t[1:len(t)-1]] = ps[i]
		case asciiLower(t) != asciiLower(ps[i]):
			return false, nil
		}
	}
	return len(ts) == len(ps), caps
}

func TestPathTemplateMatch(t *testing.T) {
	for _, tc := range []struct{ tmpl, path string }{
		{"/", "/"}, {"/", ""}, {"/", "/a"}, {"/a", "/a/"}, {"/a", "/A"}, {"/a/{x}", "/a"},
		{"/a/{x}", "/a/1"}, {"/a/{x}", "/a/1/2"}, {"/a/*/b", "/a/zz/b"}, {"/a/{r...}", "/a//b//c/"},
		{"/a/{r...}", "/a"}, {"/a/{r...}", "/b"}, {"/{a}/{b}", "//x//y"}, {"/kelvin", "/\u212aelvin"},
		{"/a/{r...}", "/a" + strings.Repeat("/s", 40)}, {"/a/*", "/a" + strings.Repeat("/s", 40)},
	} {
		pt, err := parsePathTemplate(tc.tmpl)
		if err != nil {
			t.Fatal(err)
		}
		var caps, caps2 [maxCaptures]string
		got := pt.match(tc.path, &caps)
		var sp splitPath
		sp.split(tc.path)
		if got2 := pt.matchSplit(&sp, &caps2); got2 != got || caps2 != caps {
			t.Errorf("%s on %q: split match %v %q, string match %v %q", tc.tmpl, tc.path, got2, caps2, got, caps)
		}
		want, wantCaps := refMatch(tc.tmpl, tc.path)
		if got != want {
			t.Errorf("%s on %q: match %v, want %v", tc.tmpl, tc.path, got, want)
			continue
		}
		for i, n := range pt.names {
			if got && caps[i] != wantCaps[n] {
				t.Errorf("%s on %q: {%s} = %q, want %q", tc.tmpl, tc.path, n, caps[i], wantCaps[n])
			}
		}
	}
}

// FuzzPathTemplate: any template either fails to compile or matches
// exactly like the reference, without panicking.
func FuzzPathTemplate(f *testing.F) {
	for _, s := range [][2]string{
		{"/api/{entity_type}/{id}/approve", "/api/invoices/7/approve"},
		{"/static/{rest...}", "/static/a/b.js"},
		{"/a/*/b", "//a/x/b/"},
		{"/", "/"},
		{"/{a}/{b...}", "/x"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, tmpl, path string) {
		pt, err := parsePathTemplate(tmpl)
		if err != nil {
			return
		}
		var caps, caps2 [maxCaptures]string
		got := pt.match(path, &caps)
		var sp splitPath
		sp.split(path)
		if got2 := pt.matchSplit(&sp, &caps2); got2 != got || caps2 != caps {
			t.Fatalf("%q on %q: split match %v %q, string match %v %q", tmpl, path, got2, caps2, got, caps)
		}
		want, wantCaps := refMatch(tmpl, path)
		if got != want {
			t.Fatalf("%q on %q: match %v, reference %v", tmpl, path, got, want)
		}
		if !got {
			return
		}
		for i, n := range pt.names {
			if caps[i] != wantCaps[n] {
				t.Fatalf("%q on %q: {%s} = %q, reference %q", tmpl, path, n, caps[i], wantCaps[n])
			}
			if !strings.Contains(path, caps[i]) {
				t.Fatalf("capture %q is not part of %q", caps[i], path)
			}
		}
	})
}

func testMapper(t testing.TB, rules []RuleConfig) *mapper {
	t.Helper()
	rs, err := compileRules(rules)
	if err != nil {
		t.Fatal(err)
	}
	return &mapper{rules: rs, now: func() time.Time { return testNow }, reqHeaders: []string{"x-tenant-id"}}
}

// TestDefaultRulesFile keeps testdata/ingest/default_rules.yaml, the
// operator's starting point for audit.rules, equal to DefaultRules()
// (-update rewrites it).
func TestDefaultRulesFile(t *testing.T) {
	path := filepath.Join("testdata", "ingest", "default_rules.yaml")
	if *updateGolden {
		if err := os.WriteFile(path, []byte(rulesYAML(DefaultRules())), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Rules []RuleConfig `yaml:"rules"`
	}
	dec := yaml.NewDecoder(strings.NewReader(string(raw)))
	dec.KnownFields(true)
	if err := dec.Decode(&doc); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(DefaultRules(), doc.Rules, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("%s differs from DefaultRules() (-want +got):\n%s", path, diff)
	}
	if _, err := compileRules(doc.Rules); err != nil {
		t.Fatal(err)
	}
}

// rulesYAML renders rules one flow mapping per line, empty fields left out.
func rulesYAML(rules []RuleConfig) string {
	var b strings.Builder
	b.WriteString("# audit.rules: the built-in classification (DefaultRules), first match wins.\n")
	b.WriteString("# Copy under audit: in the config file and edit; a non-empty list replaces the defaults.\n")
	b.WriteString("rules:\n")
	q := func(s string) string { return strconv.Quote(s) }
	list := func(ss []string) string {
		out := make([]string, len(ss))
		for i, s := range ss {
			out[i] = q(s)
		}
		return "[" + strings.Join(out, ", ") + "]"
	}
	for _, r := range rules {
		var f []string
		add := func(k, v string) {
			if v != "" {
				f = append(f, k+": "+v)
			}
		}
		add("name", r.Name)
		add("kind", r.Kind)
		if len(r.Methods) > 0 {
			add("methods", list(r.Methods))
		}
		if r.Path != "" {
			add("path", q(r.Path))
		}
		if len(r.Status) > 0 {
			add("status", list(r.Status))
		}
		if len(r.ResponseFlags) > 0 {
			add("response_flags", list(r.ResponseFlags))
		}
		keys := slices.Sorted(maps.Keys(r.Metadata))
		var md []string
		for _, k := range keys {
			md = append(md, k+": "+list(r.Metadata[k]))
		}
		if len(md) > 0 {
			add("metadata", "{"+strings.Join(md, ", ")+"}")
		}
		if r.Drop {
			add("drop", "true")
		}
		if r.Action != "" {
			add("action", q(r.Action))
		}
		add("severity", r.Severity)
		if r.EntityType != "" {
			add("entity_type", q(r.EntityType))
		}
		if r.EntityID != "" {
			add("entity_id", q(r.EntityID))
		}
		b.WriteString("  - {" + strings.Join(f, ", ") + "}\n")
	}
	return b.String()
}
