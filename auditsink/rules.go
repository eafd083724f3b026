package auditsink

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshguard/meshguard/audittrail"
)

// RuleConfig is one classification rule of audit.rules. A rule matches an
// access-log entry when every condition it sets holds; a condition left
// empty matches anything. Within one condition list any element may match.
// Rules are tried in order and the first match decides: the entry is
// dropped (Drop) or becomes one audit row with Action, Severity, EntityType
// and EntityID. An entry no rule matches is dropped and counted.
//
// Path is a template over the path without its query string: literal
// segments (compared ASCII case-insensitively), `*` (any one segment),
// `{name}` (one segment, captured) and, as the last segment only,
// `{name...}` (the rest of the path, possibly empty, captured). Empty
// segments in the request path (`//`) and a trailing slash are ignored.
// Action, EntityType and EntityID may reference captures as `{name}`; in
// Action the captured text is upper-cased and every character outside
// A-Z 0-9 becomes `_`, so `{entity_type}_APPROVE` on /api/invoices/7/approve
// gives INVOICES_APPROVE.
type RuleConfig struct {
	// Name labels the rule in metrics and in the row's metadata ("rule").
	// Empty: "rules[<index>]". Names are unique.
	Name string `yaml:"name"`
	// Kind is the entry type the rule applies to: http (empty means http)
	// or tcp. TCP rules may only use response_flags and metadata.
	Kind string `yaml:"kind"`
	// Methods are HTTP methods in upper case (GET, POST, ...). Empty: any.
	Methods []string `yaml:"methods"`
	// Path is a path template (see above). Empty: any path.
	Path string `yaml:"path"`
	// Status lists response codes: "401", classes "4xx", ranges "500-599",
	// or "none" for an entry without a response (downstream reset).
	// Empty: any status, including none.
	Status []string `yaml:"status"`
	// ResponseFlags are Envoy short flags (UAEX, RL, UH, ...); any one set
	// on the entry matches. Empty: no condition.
	ResponseFlags []string `yaml:"response_flags"`
	// Metadata conditions on the ext_authz dynamic metadata
	// (filter_metadata["envoy.filters.http.ext_authz"]): every key must be
	// present with one of the listed values; the value "*" accepts any
	// non-empty value. Empty: no condition.
	Metadata map[string][]string `yaml:"metadata"`
	// Drop discards matching entries. Exclusive with Action.
	Drop bool `yaml:"drop"`
	// Action is the audit action (upper case, A-Z 0-9 _ and {capture}).
	// Required unless Drop.
	Action string `yaml:"action"`
	// Severity is LOW, MEDIUM, HIGH or CRITICAL. Empty means LOW.
	Severity string `yaml:"severity"`
	// EntityType and EntityID are literals or capture references.
	EntityType string `yaml:"entity_type"`
	EntityID   string `yaml:"entity_id"`
}

// Bounds on rules and what they capture.
const (
	maxCaptures       = 8
	maxTemplateLen    = 1024
	maxActionLen      = 64
	maxEntityLen      = 128
	maxRuleNameLen    = 64
	maxMetadataKeyLen = 64
)

// DefaultRules returns the built-in classification, used when audit.rules
// is empty. Order matters (first match wins): noise is dropped first, then
// security events (which apply to any route and method), then the named
// routes, then the generic CREATE/UPDATE/DELETE by method. Plain reads are
// dropped, except GET of a single user, which is READ: user records are the
// sensitive entity of the seed application, and reading them is what an
// auditor asks about. Everything else (GET, HEAD, OPTIONS) is dropped.
//
// CORS_VIOLATION relies on meshguard's ext_authz metadata: reason
// origin_not_allowed, origin_invalid, method_not_allowed or
// headers_not_allowed, whether the request was refused (enforce mode, 403
// with UAEX) or forwarded (report mode). ext_authz's own 401/403 answers
// (authentication_required, role_required) are PERMISSION_DENIED.
func DefaultRules() []RuleConfig {
	writes := []string{"POST", "PUT", "PATCH", "DELETE"}
	corsReasons := []string{"origin_not_allowed", "origin_invalid", "method_not_allowed", "headers_not_allowed"}
	return []RuleConfig{
		{Name: "health_checks", Path: "/healthz", Drop: true},
		{Name: "health_checks_readyz", Path: "/readyz", Drop: true},
		{Name: "health_checks_livez", Path: "/livez", Drop: true},
		{Name: "health_checks_health", Path: "/health", Drop: true},
		{Name: "health_checks_api", Path: "/api/health", Drop: true},
		{Name: "metrics_scrapes", Path: "/metrics", Methods: []string{"GET"}, Drop: true},
		{Name: "static_assets", Path: "/static/{rest...}", Methods: []string{"GET", "HEAD"}, Drop: true},
		{Name: "static_assets_build", Path: "/assets/{rest...}", Methods: []string{"GET", "HEAD"}, Drop: true},
		{Name: "static_favicon", Path: "/favicon.ico", Methods: []string{"GET", "HEAD"}, Drop: true},
		{Name: "static_robots", Path: "/robots.txt", Methods: []string{"GET", "HEAD"}, Drop: true},

		{Name: "cors_violation", Metadata: map[string][]string{"reason": corsReasons},
			Action: "CORS_VIOLATION", Severity: audittrail.SeverityHigh},
		{Name: "rate_limited", Status: []string{"429"}, Action: "RATE_LIMIT_EXCEEDED", Severity: audittrail.SeverityMedium},
		{Name: "rate_limited_flag", ResponseFlags: []string{"RL"}, Action: "RATE_LIMIT_EXCEEDED", Severity: audittrail.SeverityMedium},

		{Name: "login_success", Methods: []string{"POST"}, Path: "/api/auth/login", Status: []string{"2xx", "3xx"},
			Action: "LOGIN_SUCCESS", Severity: audittrail.SeverityLow, EntityType: "session"},
		{Name: "login_failure", Methods: []string{"POST"}, Path: "/api/auth/login",
			Action: "LOGIN_FAILURE", Severity: audittrail.SeverityMedium, EntityType: "session"},
		{Name: "logout", Methods: []string{"POST"}, Path: "/api/auth/logout", Status: []string{"2xx", "3xx"},
			Action: "LOGOUT", Severity: audittrail.SeverityLow, EntityType: "session"},

		{Name: "permission_denied", Status: []string{"401", "403"}, Action: "PERMISSION_DENIED", Severity: audittrail.SeverityHigh},
		{Name: "permission_denied_authz", ResponseFlags: []string{"UAEX"}, Action: "PERMISSION_DENIED", Severity: audittrail.SeverityHigh},

		{Name: "password_change", Methods: []string{"POST", "PUT", "PATCH"}, Path: "/api/auth/password",
			Action: "PASSWORD_CHANGE", Severity: audittrail.SeverityHigh, EntityType: "user"},
		{Name: "password_change_user", Methods: []string{"POST", "PUT", "PATCH"}, Path: "/api/users/{id}/password",
			Action: "PASSWORD_CHANGE", Severity: audittrail.SeverityHigh, EntityType: "user", EntityID: "{id}"},
		{Name: "settings_change", Methods: writes, Path: "/api/settings/{rest...}",
			Action: "SETTINGS_CHANGE", Severity: audittrail.SeverityHigh, EntityType: "settings", EntityID: "{rest}"},
		{Name: "export", Methods: []string{"GET", "POST"}, Path: "/api/{entity_type}/export",
			Action: "EXPORT", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}"},
		{Name: "export_prefixed", Methods: []string{"GET", "POST"}, Path: "/api/export/{entity_type}",
			Action: "EXPORT", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}"},
		{Name: "import", Methods: []string{"POST", "PUT"}, Path: "/api/{entity_type}/import",
			Action: "IMPORT", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}"},
		{Name: "import_prefixed", Methods: []string{"POST", "PUT"}, Path: "/api/import/{entity_type}",
			Action: "IMPORT", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}"},
		{Name: "approve", Methods: []string{"POST", "PUT", "PATCH"}, Path: "/api/{entity_type}/{id}/approve",
			Action: "{entity_type}_APPROVE", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}", EntityID: "{id}"},
		{Name: "reject", Methods: []string{"POST", "PUT", "PATCH"}, Path: "/api/{entity_type}/{id}/reject",
			Action: "{entity_type}_REJECT", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}", EntityID: "{id}"},
		{Name: "bulk_create", Methods: []string{"POST"}, Path: "/api/{entity_type}/bulk",
			Action: "BULK_CREATE", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}"},
		{Name: "bulk_update", Methods: []string{"PUT", "PATCH"}, Path: "/api/{entity_type}/bulk",
			Action: "BULK_UPDATE", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}"},
		{Name: "bulk_delete", Methods: []string{"DELETE"}, Path: "/api/{entity_type}/bulk",
			Action: "BULK_DELETE", Severity: audittrail.SeverityHigh, EntityType: "{entity_type}"},

		{Name: "create", Methods: []string{"POST"}, Path: "/api/{entity_type}",
			Action: "CREATE", Severity: audittrail.SeverityLow, EntityType: "{entity_type}"},
		{Name: "create_nested", Methods: []string{"POST"}, Path: "/api/{entity_type}/{id}/{rest...}",
			Action: "CREATE", Severity: audittrail.SeverityLow, EntityType: "{entity_type}", EntityID: "{id}"},
		{Name: "update", Methods: []string{"PUT", "PATCH"}, Path: "/api/{entity_type}/{id}/{rest...}",
			Action: "UPDATE", Severity: audittrail.SeverityLow, EntityType: "{entity_type}", EntityID: "{id}"},
		{Name: "delete", Methods: []string{"DELETE"}, Path: "/api/{entity_type}/{id}/{rest...}",
			Action: "DELETE", Severity: audittrail.SeverityMedium, EntityType: "{entity_type}", EntityID: "{id}"},
		{Name: "read_user", Methods: []string{"GET"}, Path: "/api/users/{id}", Status: []string{"2xx"},
			Action: "READ", Severity: audittrail.SeverityLow, EntityType: "user", EntityID: "{id}"},
		{Name: "create_other", Methods: []string{"POST"}, Action: "CREATE", Severity: audittrail.SeverityLow},
		{Name: "update_other", Methods: []string{"PUT", "PATCH"}, Action: "UPDATE", Severity: audittrail.SeverityLow},
		{Name: "delete_other", Methods: []string{"DELETE"}, Action: "DELETE", Severity: audittrail.SeverityMedium},
		{Name: "reads", Drop: true},
	}
}

// validateRules checks audit.rules and the extra header lists. It compiles
// the rules the way New does, so a config that validates also starts.
func (c Config) validateRules() error {
	_, err := compileRules(c.Rules)
	return errors.Join(err, validateHeaderNames("audit.request_headers", c.RequestHeaders),
		validateHeaderNames("audit.response_headers", c.ResponseHeaders))
}

// sensitiveHeaders are never copied into the audit trail, even if listed.
var sensitiveHeaders = []string{"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token", "x-csrf-token"}

func validateHeaderNames(field string, names []string) error {
	var errs []error
	seen := map[string]bool{}
	for i, n := range names {
		l := strings.ToLower(n)
		switch {
		case n == "" || len(n) > 128 || !isToken(n):
			errs = append(errs, fmt.Errorf("%s[%d]: must be an HTTP header name, got %q", field, i, n))
		case slices.Contains(sensitiveHeaders, l):
			errs = append(errs, fmt.Errorf("%s[%d]: %q carries credentials and is never logged", field, i, n))
		case seen[l]:
			errs = append(errs, fmt.Errorf("%s[%d]: duplicate header %q", field, i, n))
		}
		seen[l] = true
	}
	if len(names) > 32 {
		errs = append(errs, fmt.Errorf("%s: at most 32 headers, got %d", field, len(names)))
	}
	return errors.Join(errs...)
}

func isToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0 {
			continue
		}
		return false
	}
	return true
}

// rule is a compiled RuleConfig.
type rule struct {
	name     string
	tcp      bool
	methods  uint32 // bit per corev3.RequestMethod; 0: any
	path     *pathTemplate
	status   []statusRange
	flags    uint64 // any of these response flag bits; 0: no condition
	meta     []metaCond
	drop     bool
	action   template
	severity string
	entType  template
	entID    template
	// actionLabel is the configured action, a bounded metric label.
	actionLabel string
	// matches and kept are set by New; nil in rule sets built for
	// validation only.
	matches, kept prometheus.Counter
}

type statusRange struct{ lo, hi uint32 } // inclusive; 0 is "no response"

type metaCond struct {
	key    string
	values []string // nil: any non-empty value
}

// ruleSet is the ordered, compiled rule list. It is immutable and safe for
// concurrent use.
type ruleSet struct {
	rules []*rule
	// byMethod[m] lists, in order, the HTTP rules that can match method m
	// (a corev3.RequestMethod), so a GET never looks at POST-only rules.
	byMethod [numMethods][]*rule
	tcp      []*rule
}

const numMethods = 10 // corev3.RequestMethod values, METHOD_UNSPECIFIED..PATCH

func (rs *ruleSet) index() {
	for _, r := range rs.rules {
		if r.tcp {
			rs.tcp = append(rs.tcp, r)
			continue
		}
		for m := range numMethods {
			if r.methods == 0 || r.methods&(1<<uint(m)) != 0 {
				rs.byMethod[m] = append(rs.byMethod[m], r)
			}
		}
	}
}

// compileRules compiles cfg (DefaultRules when empty), returning every
// problem found, each naming audit.rules[i].<field>.
func compileRules(cfg []RuleConfig) (*ruleSet, error) {
	if len(cfg) == 0 {
		cfg = DefaultRules()
	}
	var errs []error
	rs := &ruleSet{}
	names := map[string]int{}
	for i, rc := range cfg {
		r, rerrs := compileRule(i, rc)
		errs = append(errs, rerrs...)
		if prev, dup := names[r.name]; dup {
			errs = append(errs, fmt.Errorf("audit.rules[%d].name: duplicate of audit.rules[%d], got %q", i, prev, rc.Name))
		}
		names[r.name] = i
		rs.rules = append(rs.rules, r)
	}
	if len(cfg) > 1000 {
		errs = append(errs, fmt.Errorf("audit.rules: at most 1000 rules, got %d", len(cfg)))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	rs.index()
	return rs, nil
}

func compileRule(i int, rc RuleConfig) (*rule, []error) {
	var errs []error
	fail := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("audit.rules[%d].%s: "+format, append([]any{i, field}, args...)...))
	}
	r := &rule{name: rc.Name, drop: rc.Drop, severity: rc.Severity, actionLabel: rc.Action}
	if r.name == "" {
		r.name = fmt.Sprintf("rules[%d]", i)
	} else if len(r.name) > maxRuleNameLen || !isIdent(r.name, false) {
		fail("name", "must be 1-%d characters of a-z 0-9 _ - ., got %q", maxRuleNameLen, rc.Name)
	}
	switch rc.Kind {
	case "", "http":
	case "tcp":
		r.tcp = true
		if len(rc.Methods) > 0 {
			fail("methods", "not allowed on a tcp rule, got %q", rc.Methods)
		}
		if rc.Path != "" {
			fail("path", "not allowed on a tcp rule, got %q", rc.Path)
		}
		if len(rc.Status) > 0 {
			fail("status", "not allowed on a tcp rule, got %q", rc.Status)
		}
	default:
		fail("kind", "must be http or tcp, got %q", rc.Kind)
	}
	for j, m := range rc.Methods {
		v, ok := corev3.RequestMethod_value[m]
		if !ok || v == 0 {
			fail(fmt.Sprintf("methods[%d]", j), "must be an upper-case HTTP method (GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH), got %q", m)
			continue
		}
		r.methods |= 1 << uint(v)
	}
	var captures []string
	if rc.Path != "" && !r.tcp {
		t, err := parsePathTemplate(rc.Path)
		if err != nil {
			fail("path", "%v, got %q", err, rc.Path)
		} else {
			r.path = t
			captures = t.names
		}
	}
	for j, s := range rc.Status {
		sr, err := parseStatus(s)
		if err != nil {
			fail(fmt.Sprintf("status[%d]", j), "%v, got %q", err, s)
			continue
		}
		r.status = append(r.status, sr)
	}
	for j, f := range rc.ResponseFlags {
		bit, ok := responseFlagBit(f)
		if !ok {
			fail(fmt.Sprintf("response_flags[%d]", j), "must be an Envoy response flag (%s), got %q", strings.Join(responseFlagNames[:], ", "), f)
			continue
		}
		r.flags |= bit
	}
	keys := make([]string, 0, len(rc.Metadata))
	for k := range rc.Metadata {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		vals := rc.Metadata[k]
		if k == "" || len(k) > maxMetadataKeyLen {
			fail("metadata", "keys must be 1-%d characters, got %q", maxMetadataKeyLen, k)
			continue
		}
		if len(vals) == 0 {
			fail("metadata."+k, "must list at least one value (\"*\" for any), got %q", vals)
			continue
		}
		mc := metaCond{key: k}
		if !slices.Contains(vals, "*") {
			mc.values = slices.Clone(vals)
		}
		r.meta = append(r.meta, mc)
	}
	switch {
	case rc.Drop && (rc.Action != "" || rc.Severity != "" || rc.EntityType != "" || rc.EntityID != ""):
		fail("drop", "a drop rule takes no action, severity, entity_type or entity_id, got action %q", rc.Action)
	case !rc.Drop && rc.Action == "":
		fail("action", "required unless drop is true, got %q", rc.Action)
	case !rc.Drop:
		t, err := parseTemplate(rc.Action, captures, true)
		if err != nil {
			fail("action", "%v, got %q", err, rc.Action)
		}
		r.action = t
		if t, err = parseTemplate(rc.EntityType, captures, false); err != nil {
			fail("entity_type", "%v, got %q", err, rc.EntityType)
		}
		r.entType = t
		if t, err = parseTemplate(rc.EntityID, captures, false); err != nil {
			fail("entity_id", "%v, got %q", err, rc.EntityID)
		}
		r.entID = t
		switch rc.Severity {
		case "":
			r.severity = audittrail.SeverityLow
		case audittrail.SeverityLow, audittrail.SeverityMedium, audittrail.SeverityHigh, audittrail.SeverityCritical:
		default:
			fail("severity", "must be LOW, MEDIUM, HIGH or CRITICAL, got %q", rc.Severity)
		}
	}
	return r, errs
}

func isIdent(s string, upper bool) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= '0' && c <= '9', c == '_':
		case upper && c >= 'A' && c <= 'Z':
		case !upper && (c >= 'a' && c <= 'z' || c == '-' || c == '.'):
		default:
			return false
		}
	}
	return true
}

func parseStatus(s string) (statusRange, error) {
	if s == "none" {
		return statusRange{0, 0}, nil
	}
	if len(s) == 3 && (s[1] == 'x' || s[1] == 'X') && (s[2] == 'x' || s[2] == 'X') && s[0] >= '1' && s[0] <= '5' {
		c := uint32(s[0]-'0') * 100
		return statusRange{c, c + 99}, nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	a, err1 := strconv.ParseUint(lo, 10, 32)
	b, err2 := strconv.ParseUint(hi, 10, 32)
	if err1 != nil || err2 != nil || a < 100 || b > 599 || a > b {
		return statusRange{}, errors.New(`must be a code 100-599, a class like "4xx", a range like "500-599" or "none"`)
	}
	return statusRange{uint32(a), uint32(b)}, nil
}

// template is a literal string with optional {capture} references.
type template struct {
	parts []tmplPart // nil for a constant
	lit   string     // the constant when parts is nil
	upper bool       // captured text upper-cased and sanitised (actions)
}

type tmplPart struct {
	lit     string
	capture int // index into the path captures; -1 for lit
}

func parseTemplate(s string, captures []string, action bool) (template, error) {
	t := template{upper: action}
	if len(s) > maxTemplateLen {
		return t, fmt.Errorf("longer than %d characters", maxTemplateLen)
	}
	if !strings.ContainsAny(s, "{}") {
		if action && !isIdent(s, true) {
			return t, errors.New("must be upper case A-Z 0-9 _ with optional {capture} references")
		}
		if action && len(s) > maxActionLen {
			return t, fmt.Errorf("longer than %d characters", maxActionLen)
		}
		t.lit = s
		return t, nil
	}
	rest := s
	for rest != "" {
		open := strings.IndexByte(rest, '{')
		if open < 0 {
			open = len(rest)
		}
		if lit := rest[:open]; lit != "" {
			if strings.IndexByte(lit, '}') >= 0 {
				return t, errors.New("unbalanced }")
			}
			if action && !isIdent(lit, true) {
				return t, errors.New("must be upper case A-Z 0-9 _ with optional {capture} references")
			}
			t.parts = append(t.parts, tmplPart{lit: lit, capture: -1})
		}
		if open == len(rest) {
			break
		}
		end := strings.IndexByte(rest[open:], '}')
		if end < 0 {
			return t, errors.New("unbalanced {")
		}
		name := rest[open+1 : open+end]
		idx := slices.Index(captures, name)
		if idx < 0 {
			return t, fmt.Errorf("references {%s}, which the rule's path does not capture", name)
		}
		t.parts = append(t.parts, tmplPart{capture: idx})
		rest = rest[open+end+1:]
	}
	return t, nil
}

// expand renders t with caps, bounded to max bytes. Constant templates do
// not allocate.
func (t *template) expand(caps *[maxCaptures]string, max int) string {
	if t.parts == nil {
		return t.lit
	}
	if len(t.parts) == 1 && t.parts[0].capture >= 0 && !t.upper {
		return truncate(caps[t.parts[0].capture], max)
	}
	var b strings.Builder
	for _, p := range t.parts {
		s := p.lit
		if p.capture >= 0 {
			s = caps[p.capture]
		}
		for i := 0; i < len(s) && b.Len() < max; i++ {
			c := s[i]
			if t.upper {
				switch {
				case c >= 'a' && c <= 'z':
					c -= 'a' - 'A'
				case c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_':
				default:
					c = '_'
				}
			}
			b.WriteByte(c)
		}
	}
	return truncate(b.String(), max)
}

// classify returns the first rule matching v and fills caps, or nil.
func (rs *ruleSet) classify(v *entryView, caps *[maxCaptures]string) *rule {
	v.segs.split(v.path)
	list := rs.tcp
	if !v.tcp {
		m := int(v.method)
		if m < 0 || m >= numMethods {
			m = 0 // unknown enum value: only method-less rules apply
		}
		list = rs.byMethod[m]
	}
	for _, r := range list {
		if r.match(v, caps) {
			return r
		}
	}
	return nil
}

// match tests the cheap conditions first. Method and kind are already
// settled by the index.
func (r *rule) match(v *entryView, caps *[maxCaptures]string) bool {
	if r.flags != 0 && r.flags&v.flags == 0 {
		return false
	}
	if r.status != nil {
		ok := false
		for _, s := range r.status {
			if v.status >= s.lo && v.status <= s.hi {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if r.path != nil && !r.path.matchSplit(&v.segs, caps) {
		return false
	}
	for _, mc := range r.meta {
		got, ok := metaString(v.authz, mc.key)
		if !ok || got == "" {
			return false
		}
		if mc.values != nil && !slices.Contains(mc.values, got) {
			return false
		}
	}
	return true
}

// metaString returns a string or bool field of an ext_authz metadata struct.
func metaString(fields map[string]*structpb.Value, key string) (string, bool) {
	val, ok := fields[key]
	if !ok {
		return "", false
	}
	switch k := val.GetKind().(type) {
	case *structpb.Value_StringValue:
		return k.StringValue, true
	case *structpb.Value_BoolValue:
		if k.BoolValue {
			return "true", true
		}
		return "false", true
	}
	return "", false
}
