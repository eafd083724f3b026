package extauthz

import (
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshguard/meshguard/internal/clientaddr"
	"github.com/meshguard/meshguard/internal/secret"
)

// CORSConfig is the `cors:` section: which origins may call the service
// cross-origin, and what preflight answers say.
type CORSConfig struct {
	// Mode is enforce (403 for disallowed origins) or report (forward the
	// request without CORS headers and record the violation).
	Mode string `yaml:"mode"`
	// PublicOrigin is the application's own origin (PUBLIC_URL); always allowed.
	PublicOrigin string `yaml:"public_origin"`
	// AllowedOrigins are exact origins, "https://*.example.com" subdomain
	// patterns, "null", or "*" (only without credentials).
	AllowedOrigins []string `yaml:"allowed_origins"`
	// AllowedMethods answer Access-Control-Request-Method; GET, HEAD and POST
	// are always allowed, as browsers never preflight them.
	AllowedMethods []string `yaml:"allowed_methods"`
	// AllowedHeaders answer Access-Control-Request-Headers (case-insensitive).
	AllowedHeaders []string `yaml:"allowed_headers"`
	// ExposedHeaders go into Access-Control-Expose-Headers; empty: none.
	ExposedHeaders []string `yaml:"exposed_headers"`
	// AllowCredentials sends Access-Control-Allow-Credentials: true.
	AllowCredentials bool `yaml:"allow_credentials"`
	// MaxAge is Access-Control-Max-Age, whole seconds, at most 24h; 0 leaves
	// the header out (browsers then cache a preflight for 5s).
	MaxAge time.Duration `yaml:"max_age"`
	// TenantHeader names the request header carrying the tenant id; when the
	// header is absent, the request's host (without port) is the tenant.
	TenantHeader string `yaml:"tenant_header"`
	// Tenants maps a tenant id to origins allowed for it, in addition to the
	// rows of TenantsTable.
	Tenants map[string][]string `yaml:"tenants"`
	// TenantsTable is the PostgreSQL table of live tenant origins
	// ("table" or "schema.table"); used only when a database is configured.
	TenantsTable string `yaml:"tenants_table"`
	// TenantsReload is how often the whole table is re-read, on top of the
	// LISTEN/NOTIFY updates.
	TenantsReload time.Duration `yaml:"tenants_reload"`
}

// IdentityConfig is the `identity:` section: who the caller is, and the
// keys the rate limit service counts them by.
type IdentityConfig struct {
	JWTMetadata JWTMetadataConfig `yaml:"jwt_metadata"`
	// TrustedUserHeader names a request header that carries the user id,
	// set by a filter the operator controls (never by clients); empty: none.
	// It is believed whenever a request carries no verified JWT, so Envoy
	// must remove client copies before that filter runs (envoy/envoy.yaml's
	// header_mutation removes x-auth-user and x-auth-role); Warnings says so.
	TrustedUserHeader string `yaml:"trusted_user_header"`
	// TrustedRoleHeader is the same for the role; empty: none.
	TrustedRoleHeader string `yaml:"trusted_role_header"`
	// ClientIPHeader names the request header carrying the client address
	// Envoy derived (%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%, after its
	// original IP detection), set with overwrite, as envoy/envoy.yaml does.
	// Anonymous callers are keyed ip:<that address>; without it (or when it
	// is not an IP address) the connection peer Envoy reports is used, which
	// behind a load balancer is the balancer for every client. Empty: always
	// the connection peer (Warnings says what that costs).
	ClientIPHeader string `yaml:"client_ip_header"`
	// IPv6Prefix is the prefix length anonymous IPv6 clients are keyed by:
	// one subscriber usually holds a whole /64, so per-address keys would
	// give one client 2^64 quotas. 128: per address.
	IPv6Prefix int `yaml:"ipv6_prefix"`
	// AccountKeyFile holds the secret that login account names are hashed
	// with (HMAC-SHA256) before they become rate limit keys, so no account
	// name reaches Redis, a header or a log. Every replica needs the same
	// key for per-account limits to be shared. Empty: MESHGUARD_ACCOUNT_KEY
	// (AccountKey), else a random key per process.
	AccountKeyFile string `yaml:"account_key_file"`
	// AccountKey comes from MESHGUARD_ACCOUNT_KEY, never from the file.
	AccountKey secret.String `yaml:"-"`
}

// JWTMetadataConfig says where Envoy's jwt_authn filter leaves the payload
// (its payload_in_metadata) and the verification failure (its
// failed_status_in_metadata). An empty Namespace disables JWT identity.
type JWTMetadataConfig struct {
	Namespace string `yaml:"namespace"`
	Key       string `yaml:"key"`
	UserClaim string `yaml:"user_claim"`
	RoleClaim string `yaml:"role_claim"`
	// FailureKey is where jwt_authn, running with allow_missing_or_failed,
	// records why a token failed ({code, message}); meshguard then answers
	// the 401 itself, with CORS headers the browser can read. Empty: failures
	// are not read (jwt_authn must then reject invalid tokens itself).
	FailureKey string `yaml:"failure_key"`
}

// CSPConfig is the `csp:` section.
type CSPConfig struct {
	// Nonce issues a per-request nonce: request header x-csp-nonce and a
	// Content-Security-Policy response header built from Directives. When
	// false, extauthz sends no CSP (the Envoy route config carries it).
	Nonce bool `yaml:"nonce"`
	// NonceDirectives are the directives that get 'nonce-…'; each must be in
	// Directives.
	NonceDirectives []string `yaml:"nonce_directives"`
	// Directives maps a directive name to its source list. Empty means
	// DefaultDirectives; a configured map replaces the defaults whole.
	Directives map[string][]string `yaml:"directives"`
	// ReportURI adds report-uri; empty: none.
	ReportURI string `yaml:"report_uri"`
	// ReportTo adds report-to <group> and a Reporting-Endpoints header
	// defining the group as ReportToURL; empty: none.
	ReportTo string `yaml:"report_to"`
	// ReportToURL is the group's endpoint; empty means ReportURI.
	ReportToURL string `yaml:"report_to_url"`
	// ReportOnly sends Content-Security-Policy-Report-Only instead.
	ReportOnly bool `yaml:"report_only"`
}

// Config gathers the sections extauthz serves.
type Config struct {
	Development bool
	CORS        CORSConfig
	Identity    IdentityConfig
	CSP         CSPConfig
}

// DefaultCORSConfig returns the defaults for the cors section.
func DefaultCORSConfig() CORSConfig {
	return CORSConfig{
		Mode:             "enforce",
		AllowedMethods:   []string{"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"},
		AllowedHeaders:   []string{"Content-Type", "Authorization", "X-Requested-With", "X-CSRF-Token", "X-Session-ID"},
		ExposedHeaders:   []string{"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"},
		AllowCredentials: true,
		MaxAge:           24 * time.Hour,
		TenantHeader:     "x-tenant-id",
		TenantsTable:     "tenant_origins",
		TenantsReload:    time.Minute,
	}
}

// DefaultIdentityConfig returns the defaults for the identity section.
func DefaultIdentityConfig() IdentityConfig {
	return IdentityConfig{
		JWTMetadata: JWTMetadataConfig{
			Namespace: "envoy.filters.http.jwt_authn", Key: "jwt_payload", UserClaim: "sub", RoleClaim: "role",
			FailureKey: "jwt_failure",
		},
		// What envoy/envoy.yaml's header_mutation overwrites. No identity
		// header is trusted by default.
		ClientIPHeader: ShippedClientIPHeader,
		IPv6Prefix:     64,
	}
}

// DefaultCSPConfig returns the defaults for the csp section.
func DefaultCSPConfig() CSPConfig {
	return CSPConfig{
		Nonce:           true,
		NonceDirectives: []string{"script-src"},
		ReportURI:       "/v1/csp-reports",
	}
}

// DefaultDirectives is the policy used when csp.directives is empty: a
// strict nonce-based CSP (script-src with 'strict-dynamic', no plugins, no
// <base> hijack, no framing). A configured map replaces it whole.
func DefaultDirectives() map[string][]string {
	return map[string][]string{
		"default-src":     {"'self'"},
		"script-src":      {"'self'", "'strict-dynamic'"},
		"object-src":      {"'none'"},
		"base-uri":        {"'self'"},
		"frame-ancestors": {"'none'"},
	}
}

// developmentOrigins are added to the allowed origins in development.
var developmentOrigins = []string{
	"http://localhost:3000", "http://localhost:3001", "http://127.0.0.1:3000", "http://127.0.0.1:3001",
}

// Headers meshguard itself sets on the upstream request. Client copies are
// always overwritten or removed.
const (
	headerClient  = "x-meshguard-client"
	headerIP      = "x-meshguard-ip"
	headerAccount = "x-meshguard-account"
	headerUser    = "x-meshguard-user"
	headerRole    = "x-meshguard-role"
	headerNonce   = "x-csp-nonce"
)

// ShippedClientIPHeader is the header envoy/envoy.yaml's header_mutation
// sets to the address Envoy derived for the client, with overwrite.
const ShippedClientIPHeader = clientaddr.ShippedHeader

// UpstreamHeaders are the request headers meshguard sets (or removes) on
// every request it allows; Envoy must strip client copies of them before
// any filter reads them, as envoy/envoy.yaml's header_mutation does.
var UpstreamHeaders = []string{headerClient, headerIP, headerAccount, headerUser, headerRole, headerNonce}

// Bounds on identity values taken from metadata or trusted headers.
const (
	maxUserLen    = 256
	maxRoleLen    = 64
	maxRoles      = 16
	maxTenantLen  = 253
	minIPv6Prefix = clientaddr.MinIPv6Prefix
	minAccountKey = 16
)

// Validate reports every invalid field at once, each naming its YAML path.
func (c Config) Validate() error {
	_, err := compile(c)
	return err
}

var (
	tokenRE     = regexp.MustCompile("^[!#$%&'*+.^_`|~0-9A-Za-z-]+$") // RFC 9110 token
	directiveRE = regexp.MustCompile(`^[a-z][a-z0-9-]*$`)
	identRE     = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)
)

// compiled is the validated, precomputed form of Config that Check uses.
type compiled struct {
	report           bool
	origins          originSet
	tenants          map[string]*originSet
	allowCredentials bool
	methods          []string // as configured, exact match
	headers          []string // lower-case
	allowMethods     string   // Access-Control-Allow-Methods value
	allowHeaders     string
	exposeHeaders    string
	maxAge           string // "" when 0
	tenantHeader     string // lower-case; "" none

	jwtNS, jwtKey, userClaim, roleClaim string
	jwtFailureKey                       string
	userHeader, roleHeader, ipHeader    string
	ipv6Prefix                          int

	csp *cspTemplate // nil: no nonce, no CSP from extauthz
}

// compile validates c and precomputes everything Check needs.
func compile(c Config) (*compiled, error) {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	p := &compiled{tenants: make(map[string]*originSet)}

	cors := c.CORS
	switch cors.Mode {
	case "enforce":
	case "report":
		p.report = true
	default:
		bad("cors.mode: must be enforce or report, got %q", cors.Mode)
	}
	p.allowCredentials = cors.AllowCredentials
	allowNull := !cors.AllowCredentials
	if cors.PublicOrigin != "" {
		if o, err := parseOrigin(cors.PublicOrigin); err != nil || o.null {
			if err == nil {
				err = errors.New("must be the application's own origin, not null")
			}
			bad("cors.public_origin: %q %v", cors.PublicOrigin, err)
		} else {
			_ = p.origins.add(o.s, false, false)
		}
	}
	for i, e := range cors.AllowedOrigins {
		if e == "*" && cors.AllowCredentials {
			bad("cors.allowed_origins[%d]: %q cannot be used while cors.allow_credentials is true (it would hand every site the user's credentials); list the origins", i, e)
			continue
		}
		if err := p.origins.add(e, allowNull, true); err != nil {
			bad("cors.allowed_origins[%d]: %q %v", i, e, err)
		}
	}
	if c.Development {
		for _, e := range developmentOrigins {
			_ = p.origins.add(e, false, false)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(cors.Tenants)) {
		if !validTenant(name) {
			bad("cors.tenants: tenant id %q must be 1-%d visible ASCII characters", name, maxTenantLen)
			continue
		}
		set := &originSet{}
		for i, e := range cors.Tenants[name] {
			if err := set.add(e, allowNull, false); err != nil {
				bad("cors.tenants.%s[%d]: %q %v", name, i, e, err)
			}
		}
		p.tenants[name] = set
	}
	for i, m := range cors.AllowedMethods {
		if m == "*" {
			bad("cors.allowed_methods[%d]: %q is not supported; list the methods", i, m)
		} else if !tokenRE.MatchString(m) {
			bad("cors.allowed_methods[%d]: %q is not an HTTP method token", i, m)
		} else {
			p.methods = append(p.methods, normalizeMethod(m))
		}
	}
	for i, h := range cors.AllowedHeaders {
		if h == "*" {
			bad("cors.allowed_headers[%d]: %q is not supported; list the header names", i, h)
		} else if !tokenRE.MatchString(h) {
			bad("cors.allowed_headers[%d]: %q is not a header name", i, h)
		} else {
			p.headers = append(p.headers, strings.ToLower(h))
		}
	}
	for i, h := range cors.ExposedHeaders {
		if !tokenRE.MatchString(h) {
			bad("cors.exposed_headers[%d]: %q is not a header name", i, h)
		}
	}
	p.allowMethods = strings.Join(p.methods, ", ")
	p.allowHeaders = strings.Join(cors.AllowedHeaders, ", ")
	p.exposeHeaders = strings.Join(cors.ExposedHeaders, ", ")
	switch {
	case cors.MaxAge < 0 || cors.MaxAge > 24*time.Hour:
		bad("cors.max_age: must be between 0 and 24h, got %s", cors.MaxAge)
	case cors.MaxAge%time.Second != 0:
		bad("cors.max_age: must be whole seconds, got %s", cors.MaxAge)
	case cors.MaxAge > 0:
		p.maxAge = strconv.FormatInt(int64(cors.MaxAge/time.Second), 10)
	}
	if h := cors.TenantHeader; h != "" {
		if !tokenRE.MatchString(h) {
			bad("cors.tenant_header: %q is not a header name", h)
		}
		p.tenantHeader = strings.ToLower(h)
	}
	if _, err := tableIdent(cors.TenantsTable); err != nil {
		bad("cors.tenants_table: %q %v", cors.TenantsTable, err)
	}
	if cors.TenantsReload < time.Second {
		bad("cors.tenants_reload: must be at least 1s, got %s", cors.TenantsReload)
	}

	id := c.Identity
	if j := id.JWTMetadata; j.Namespace != "" {
		if j.Key == "" {
			bad("identity.jwt_metadata.key: must be set when identity.jwt_metadata.namespace is %q", j.Namespace)
		}
		if j.UserClaim == "" {
			bad("identity.jwt_metadata.user_claim: must be set when identity.jwt_metadata.namespace is %q", j.Namespace)
		}
		if j.FailureKey != "" && j.FailureKey == j.Key {
			bad("identity.jwt_metadata.failure_key: %q is also identity.jwt_metadata.key", j.FailureKey)
		}
		p.jwtNS, p.jwtKey, p.userClaim, p.roleClaim, p.jwtFailureKey = j.Namespace, j.Key, j.UserClaim, j.RoleClaim, j.FailureKey
	}
	if id.IPv6Prefix < minIPv6Prefix || id.IPv6Prefix > 128 {
		bad("identity.ipv6_prefix: must be between %d and 128, got %d", minIPv6Prefix, id.IPv6Prefix)
	}
	p.ipv6Prefix = id.IPv6Prefix
	if k := id.AccountKey.Reveal(); k != "" && len(k) < minAccountKey {
		bad("MESHGUARD_ACCOUNT_KEY: must be at least %d bytes (use 32 random bytes)", minAccountKey)
	}
	if f := id.AccountKeyFile; f != "" && strings.ContainsAny(f, "\x00\n\r") {
		bad("identity.account_key_file: not a file path, got %q", f)
	}
	for _, h := range []struct{ path, v string }{
		{"identity.trusted_user_header", id.TrustedUserHeader},
		{"identity.trusted_role_header", id.TrustedRoleHeader},
		{"identity.client_ip_header", id.ClientIPHeader},
	} {
		if h.v == "" {
			continue
		}
		l := strings.ToLower(h.v)
		switch {
		case !tokenRE.MatchString(h.v):
			bad("%s: %q is not a header name", h.path, h.v)
		case slices.Contains(UpstreamHeaders, l):
			bad("%s: %q is a header meshguard sets itself", h.path, h.v)
		case l == p.tenantHeader:
			bad("%s: %q is also cors.tenant_header", h.path, h.v)
		}
	}
	p.userHeader = strings.ToLower(id.TrustedUserHeader)
	p.roleHeader = strings.ToLower(id.TrustedRoleHeader)
	p.ipHeader = strings.ToLower(id.ClientIPHeader)
	if p.ipHeader != "" && (p.ipHeader == p.userHeader || p.ipHeader == p.roleHeader) {
		bad("identity.client_ip_header: %q is also a trusted user or role header", id.ClientIPHeader)
	}

	csp, err := compileCSP(c.CSP)
	if err != nil {
		errs = append(errs, err)
	}
	p.csp = csp
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return p, nil
}

// validTenant reports whether t is a usable tenant id: 1-253 visible ASCII
// bytes.
func validTenant(t string) bool {
	if len(t) == 0 || len(t) > maxTenantLen {
		return false
	}
	for i := 0; i < len(t); i++ {
		if t[i] <= ' ' || t[i] > '~' {
			return false
		}
	}
	return true
}

// tableIdent splits "table" or "schema.table" into validated identifiers.
func tableIdent(s string) ([]string, error) {
	parts := strings.Split(s, ".")
	if len(parts) > 2 {
		return nil, errors.New(`must be "table" or "schema.table"`)
	}
	for _, p := range parts {
		if !identRE.MatchString(p) {
			return nil, errors.New("must be lower-case SQL identifiers (a-z, 0-9, _), at most 63 bytes each")
		}
	}
	return parts, nil
}

// normalizeMethod upper-cases the methods Fetch normalises (DELETE, GET,
// HEAD, OPTIONS, POST, PUT) and leaves others as they are: Fetch compares
// methods byte for byte, so "patch" and "PATCH" differ.
func normalizeMethod(m string) string {
	for _, s := range [...]string{"DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"} {
		if strings.EqualFold(m, s) {
			return s
		}
	}
	return m
}

// cspTemplate is a Content-Security-Policy value split around its nonces:
// value = parts[0] + nonce + parts[1] + … + parts[n].
type cspTemplate struct {
	header string // Content-Security-Policy or …-Report-Only
	parts  []string
	fixed  int    // total length of parts
	report string // Reporting-Endpoints value; "" none
}

func compileCSP(c CSPConfig) (*cspTemplate, error) {
	if len(c.Directives) == 0 {
		c.Directives = DefaultDirectives()
	}
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	names := slices.Sorted(maps.Keys(c.Directives))
	for _, n := range names {
		if !directiveRE.MatchString(n) {
			bad("csp.directives: directive name %q must be lower-case letters, digits and '-'", n)
		}
		if n == "report-uri" || n == "report-to" {
			bad("csp.directives.%s: set csp.report_uri / csp.report_to instead", n)
		}
		for i, v := range c.Directives[n] {
			if v == "" || strings.ContainsAny(v, ";,") || !visibleASCII(v) {
				bad("csp.directives.%s[%d]: %q must be a non-empty source expression without spaces, ';' or ','", n, i, v)
			}
			if strings.HasPrefix(v, "'nonce-") {
				bad("csp.directives.%s[%d]: %q: nonces are issued per request; list the directive in csp.nonce_directives", n, i, v)
			}
		}
	}
	nonceIn := map[string]bool{}
	for i, n := range c.NonceDirectives {
		if _, ok := c.Directives[n]; !ok {
			bad("csp.nonce_directives[%d]: directive %q is not in csp.directives", i, n)
		}
		nonceIn[n] = true
	}
	if c.Nonce && len(c.NonceDirectives) == 0 {
		bad("csp.nonce_directives: must name at least one directive when csp.nonce is true")
	}
	if c.ReportURI != "" && (!visibleASCII(c.ReportURI) || strings.ContainsAny(c.ReportURI, ";,")) {
		bad("csp.report_uri: %q must be a URL without spaces, ';' or ','", c.ReportURI)
	}
	if c.ReportTo != "" && !tokenRE.MatchString(c.ReportTo) {
		bad("csp.report_to: %q is not a reporting group name (a token)", c.ReportTo)
	}
	reportURL := c.ReportToURL
	if reportURL == "" {
		reportURL = c.ReportURI
	}
	if c.ReportTo != "" && reportURL == "" {
		bad("csp.report_to_url: must be set (or csp.report_uri) when csp.report_to is %q", c.ReportTo)
	}
	if c.ReportToURL != "" && (!visibleASCII(c.ReportToURL) || strings.ContainsAny(c.ReportToURL, "\"\\")) {
		bad("csp.report_to_url: %q must be a URL without spaces, quotes or backslashes", c.ReportToURL)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if !c.Nonce {
		return nil, nil
	}
	t := &cspTemplate{header: "Content-Security-Policy"}
	if c.ReportOnly {
		t.header = "Content-Security-Policy-Report-Only"
	}
	var b strings.Builder
	sep := func() {
		if b.Len() > 0 {
			b.WriteString("; ")
		}
	}
	for _, n := range names {
		sep()
		b.WriteString(n)
		for _, v := range c.Directives[n] {
			b.WriteByte(' ')
			b.WriteString(v)
		}
		if nonceIn[n] {
			b.WriteString(" 'nonce-")
			t.parts = append(t.parts, b.String())
			b.Reset()
			b.WriteByte('\'')
		}
	}
	if c.ReportURI != "" {
		sep()
		b.WriteString("report-uri ")
		b.WriteString(c.ReportURI)
	}
	if c.ReportTo != "" {
		sep()
		b.WriteString("report-to ")
		b.WriteString(c.ReportTo)
		t.report = c.ReportTo + `="` + reportURL + `"`
	}
	t.parts = append(t.parts, b.String())
	for _, p := range t.parts {
		t.fixed += len(p)
	}
	return t, nil
}

func visibleASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

// Warnings lists what a valid configuration relies on Envoy for, or gives
// up, one sentence each: check-config prints them and serve logs them at
// start. They name the key and what Envoy must do.
func (c Config) Warnings() []string {
	var w []string
	id := c.Identity
	for _, h := range []struct{ path, v string }{
		{"identity.trusted_user_header", id.TrustedUserHeader},
		{"identity.trusted_role_header", id.TrustedRoleHeader},
	} {
		if h.v == "" {
			continue
		}
		l := strings.ToLower(h.v)
		w = append(w, fmt.Sprintf("%s is %q: meshguard believes it on every request without a verified JWT, "+
			"so Envoy must remove client copies before the filter that sets it runs (header_mutation `remove: %s`, "+
			"as envoy/envoy.yaml does for x-auth-user and x-auth-role) and send it to ext_authz (allowed_headers); "+
			"otherwise any client can claim any identity", h.path, h.v, l))
	}
	switch ip := strings.ToLower(id.ClientIPHeader); {
	case ip == "" && !c.Development:
		w = append(w, "identity.client_ip_header is empty: anonymous clients are keyed by the connection peer, "+
			"which behind a load balancer is the balancer, so one client spends every anonymous client's quota; "+
			"set it to "+ShippedClientIPHeader+", which envoy/envoy.yaml overwrites with the address Envoy derived")
	case ip != "" && ip != ShippedClientIPHeader:
		w = append(w, fmt.Sprintf("identity.client_ip_header is %q: Envoy must overwrite it on every request "+
			"(header_mutation, %%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%%, OVERWRITE_IF_EXISTS_OR_ADD) "+
			"and send it to ext_authz, or clients pick their own rate limit key", id.ClientIPHeader))
	}
	if j := id.JWTMetadata; j.Namespace != "" && j.FailureKey == "" {
		w = append(w, "identity.jwt_metadata.failure_key is empty: if Envoy's jwt_authn lets failed tokens through "+
			"(allow_missing_or_failed, as envoy/envoy.yaml does), requests with invalid tokens are treated as anonymous "+
			"instead of answered 401")
	}
	if !id.AccountKey.IsSet() && id.AccountKeyFile == "" && !c.Development {
		w = append(w, "no account key (MESHGUARD_ACCOUNT_KEY or identity.account_key_file): login account names are "+
			"hashed with a random key of this process, so each replica counts its own per-account attempts; "+
			"give every replica the same key")
	}
	return w
}
