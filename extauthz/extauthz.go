// Package extauthz serves Envoy's external authorization API
// (envoy.service.auth.v3.Authorization/Check) for web applications behind
// Envoy: CORS origin policy (Fetch rules, Vary: Origin, 403 for disallowed
// origins), preflight answers (never forwarded upstream), a per-request CSP
// nonce, the caller's identity, the keys the rate limit service counts by
// (x-meshguard-client: user:<id> or ip:<address>; x-meshguard-ip: the
// address key, IPv6 by prefix; x-meshguard-account: a keyed hash of a login
// body's account name), the 401 for a bearer token jwt_authn let through as
// failed (with CORS headers the browser can read), per tenant origin lists
// kept current from PostgreSQL, and per-route policy from
// context_extensions. Every answer carries dynamic metadata (decision,
// reason, origin, tenant, user, role, client, account, preflight) for the
// access log.
//
// Responses whose CORS headers depend on Origin carry Vary: Origin, those to
// requests without an Origin too, so a shared cache never serves a response
// made for one origin to another. Header options always name their append
// action: Envoy's default (append) would otherwise add a second CSP or
// Access-Control-Allow-Origin next to the upstream's.
//
// Per-route policy keys in context_extensions (unknown keys are ignored, an
// unknown value is a 500 so a typo never silently weakens a route):
//
//	cors:         enforce | report | skip   (default: cors.mode)
//	csp:          nonce | off               (default: csp.nonce)
//	require_role: role[,role…]              (any of; 401 without identity, 403 without the role)
//	tenant:       tenant id                 (overrides the header and host)
//	account:      body field                (a login: POST/PUT/PATCH bodies must name the account once;
//	                                         400/413/415 otherwise; needs the route's with_request_body)
//
// Metrics:
//
//	meshguard_extauthz_decisions_total{decision,reason}
//	meshguard_extauthz_check_duration_seconds
//	meshguard_extauthz_csp_nonces_total
//	meshguard_extauthz_identity_total{source}
//	meshguard_extauthz_identity_invalid_total
//	meshguard_extauthz_tenant_reloads_total{result}
//	meshguard_extauthz_tenant_origins
//	meshguard_extauthz_tenant_origins_invalid
//	meshguard_extauthz_tenant_last_reload_timestamp_seconds
package extauthz

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/prometheus/client_golang/prometheus"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// Bounds on what one CheckRequest can make Check do.
const (
	maxHeaders      = 512  // Envoy's own default limit is 100
	maxACRHLen      = 4096 // Access-Control-Request-Headers
	maxACRHNames    = 64
	maxRequireRoles = 16
)

// Denied-response bodies.
const (
	bodyOriginNotAllowed  = `{"error":"CORS policy: Origin not allowed"}`
	bodyMethodNotAllowed  = `{"error":"CORS policy: Method not allowed"}`
	bodyHeadersNotAllowed = `{"error":"CORS policy: Request header not allowed"}`
	bodyAuthRequired      = `{"error":"Authentication required"}`
	bodyRoleRequired      = `{"error":"Forbidden"}`
	bodyBadRoutePolicy    = `{"error":"Internal server error"}`
	bodyTooLarge          = `{"error":"Request header fields too large"}`
	bodyTokenInvalid      = `{"error":"Invalid or expired token"}`
	bodyAccountInvalid    = `{"error":"Bad request: the body must name the account exactly once"}`
	bodyBodyTooLarge      = `{"error":"Request body too large"}`
	bodyUnsupportedType   = `{"error":"Unsupported media type: send application/json or application/x-www-form-urlencoded"}`
)

// Server answers Check. It is safe for concurrent use.
type Server struct {
	authv3.UnimplementedAuthorizationServer
	log     *slog.Logger
	m       *metrics
	p       *compiled
	tenants *TenantStore // nil: config tenants only
	// accountKey keys the hash of login account names (see account.go).
	accountKey []byte

	// Header options that never change, shared by every response (protobuf
	// marshalling only reads them).
	hAllowCreds, hExpose, hVary, hACAOStar, hReporting           *corev3.HeaderValueOption
	hPreflightVary, hAllowMethods, hAllowHeaders, hMaxAge, hJSON *corev3.HeaderValueOption
	hVaryDenied, hChallenge, hChallengeInvalid, hExposeAuth      *corev3.HeaderValueOption

	lastWarn atomic.Int64 // unix nanos of the last sampled warning
}

// warnSampled logs at most one warning a minute from the request path, so
// a misconfigured route cannot flood the log.
func (s *Server) warnSampled(msg string, args ...any) {
	now, last := time.Now().UnixNano(), s.lastWarn.Load()
	if now-last < int64(time.Minute) || !s.lastWarn.CompareAndSwap(last, now) {
		return
	}
	s.log.Warn(msg, args...)
}

// New returns a Server for cfg. tenants may be nil (no database): then only
// the tenants of cfg.CORS.Tenants apply.
//
// The account key comes from cfg.Identity.AccountKey, else the file
// cfg.Identity.AccountKeyFile (read once, here), else crypto/rand.
func New(log *slog.Logger, reg prometheus.Registerer, cfg Config, tenants *TenantStore) (*Server, error) {
	p, err := compile(cfg)
	if err != nil {
		return nil, err
	}
	key, err := loadAccountKey(cfg.Identity)
	if err != nil {
		return nil, err
	}
	s := &Server{log: log, m: newMetrics(reg), p: p, tenants: tenants, accountKey: key}
	s.hAllowCreds = overwrite("Access-Control-Allow-Credentials", "true")
	if p.exposeHeaders != "" {
		s.hExpose = overwrite("Access-Control-Expose-Headers", p.exposeHeaders)
	}
	// Vary is appended, not overwritten: the upstream may vary on other
	// headers too, and repeated Vary lines combine.
	s.hVary = headerOption("Vary", "Origin", corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD)
	s.hVaryDenied = overwrite("Vary", "Origin")
	s.hACAOStar = overwrite("Access-Control-Allow-Origin", "*")
	s.hPreflightVary = overwrite("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
	if p.allowMethods != "" {
		s.hAllowMethods = overwrite("Access-Control-Allow-Methods", p.allowMethods)
	}
	if p.allowHeaders != "" {
		s.hAllowHeaders = overwrite("Access-Control-Allow-Headers", p.allowHeaders)
	}
	if p.maxAge != "" {
		s.hMaxAge = overwrite("Access-Control-Max-Age", p.maxAge)
	}
	s.hJSON = overwrite("Content-Type", "application/json")
	s.hChallenge = overwrite("WWW-Authenticate", "Bearer") // a 401 must carry a challenge (RFC 9110)
	s.hChallengeInvalid = overwrite("WWW-Authenticate", `Bearer error="invalid_token"`)
	// A cross-origin script reads WWW-Authenticate only when it is exposed.
	expose := "WWW-Authenticate"
	if p.exposeHeaders != "" {
		expose = p.exposeHeaders + ", " + expose
	}
	s.hExposeAuth = overwrite("Access-Control-Expose-Headers", expose)
	if p.csp != nil && p.csp.report != "" {
		s.hReporting = overwrite("Reporting-Endpoints", p.csp.report)
	}
	return s, nil
}

// Register registers the Authorization service on r.
func (s *Server) Register(r grpc.ServiceRegistrar) { authv3.RegisterAuthorizationServer(r, s) }

func headerOption(k, v string, a corev3.HeaderValueOption_HeaderAppendAction) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, Value: v}, AppendAction: a}
}

func overwrite(k, v string) *corev3.HeaderValueOption {
	return headerOption(k, v, corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD)
}

// Shared statuses; read-only.
var (
	statusOK     = &rpcstatus.Status{Code: int32(codes.OK)}
	statusDenied = &rpcstatus.Status{Code: int32(codes.PermissionDenied)}
	statusUnauth = &rpcstatus.Status{Code: int32(codes.Unauthenticated)}
	statusBad    = &rpcstatus.Status{Code: int32(codes.InvalidArgument)}
	statusPolicy = &rpcstatus.Status{Code: int32(codes.FailedPrecondition)}
	// A preflight answer is a denied response with a 2xx status: Envoy then
	// sends it as a local reply and never forwards the OPTIONS upstream.
	statusPreflight = &rpcstatus.Status{Code: int32(codes.PermissionDenied), Message: "CORS preflight answered by meshguard"}

	http204 = &typev3.HttpStatus{Code: typev3.StatusCode_NoContent}
	http400 = &typev3.HttpStatus{Code: typev3.StatusCode_BadRequest}
	http413 = &typev3.HttpStatus{Code: typev3.StatusCode_PayloadTooLarge}
	http415 = &typev3.HttpStatus{Code: typev3.StatusCode_UnsupportedMediaType}
	http401 = &typev3.HttpStatus{Code: typev3.StatusCode_Unauthorized}
	http403 = &typev3.HttpStatus{Code: typev3.StatusCode_Forbidden}
	http431 = &typev3.HttpStatus{Code: typev3.StatusCode_RequestHeaderFieldsTooLarge}
	http500 = &typev3.HttpStatus{Code: typev3.StatusCode_InternalServerError}
)

// request holds what Check reads from one CheckRequest. Strings alias the
// request's memory where they can.
type request struct {
	method, scheme, host string
	origin               string
	nOrigin              int
	acrm                 string
	nACRM                int
	acrh                 [4]string // Access-Control-Request-Headers lines
	nACRH                int
	tenantHdr            string
	nTenant              int
	userHdr, roleHdr     string
	nUser, nRole         int
	clientIP             string
	nClientIP            int
	contentType          string
	nContentType         int
	tooMany              bool
}

// read fills r from h, handling both forms Envoy sends: the headers map
// (duplicates joined with ",") and header_map (encode_raw_headers: one
// entry per line, raw bytes).
func (s *Server) read(h *authv3.AttributeContext_HttpRequest, r *request) {
	r.method, r.scheme, r.host = h.GetMethod(), h.GetScheme(), h.GetHost()
	if hm := h.GetHeaderMap(); hm != nil && len(hm.GetHeaders()) > 0 {
		hs := hm.GetHeaders()
		if len(hs) > maxHeaders {
			r.tooMany = true
			return
		}
		for _, hv := range hs {
			k := hv.GetKey()
			switch {
			case len(k) == 0:
			case eqFold(k, "origin"):
				if r.nOrigin == 0 {
					r.origin = headerValue(hv)
				} else if r.nOrigin < 4 {
					// Join as the headers form does; it never parses.
					r.origin += "," + headerValue(hv)
				}
				r.nOrigin++
			case eqFold(k, "access-control-request-method"):
				r.acrm = headerValue(hv)
				r.nACRM++
			case eqFold(k, "access-control-request-headers"):
				if r.nACRH < len(r.acrh) {
					r.acrh[r.nACRH] = headerValue(hv)
				}
				r.nACRH++
			case s.p.tenantHeader != "" && eqFold(k, s.p.tenantHeader):
				r.tenantHdr = headerValue(hv)
				r.nTenant++
			case s.p.userHeader != "" && eqFold(k, s.p.userHeader):
				r.userHdr = headerValue(hv)
				r.nUser++
			case s.p.roleHeader != "" && eqFold(k, s.p.roleHeader):
				r.roleHdr = headerValue(hv)
				r.nRole++
			case s.p.ipHeader != "" && eqFold(k, s.p.ipHeader):
				r.clientIP = headerValue(hv)
				r.nClientIP++
			case eqFold(k, "content-type"):
				r.contentType = headerValue(hv)
				r.nContentType++
			}
		}
		if r.method == "" {
			r.method = findHeader(hs, ":method")
		}
		return
	}
	m := h.GetHeaders()
	if len(m) > maxHeaders {
		r.tooMany = true
		return
	}
	one := func(k string, dst *string, n *int) {
		if v, ok := m[k]; ok {
			*dst, *n = v, 1
		}
	}
	one("origin", &r.origin, &r.nOrigin)
	one("access-control-request-method", &r.acrm, &r.nACRM)
	one("access-control-request-headers", &r.acrh[0], &r.nACRH)
	if s.p.tenantHeader != "" {
		one(s.p.tenantHeader, &r.tenantHdr, &r.nTenant)
	}
	if s.p.userHeader != "" {
		one(s.p.userHeader, &r.userHdr, &r.nUser)
	}
	if s.p.roleHeader != "" {
		one(s.p.roleHeader, &r.roleHdr, &r.nRole)
	}
	if s.p.ipHeader != "" {
		one(s.p.ipHeader, &r.clientIP, &r.nClientIP)
	}
	one("content-type", &r.contentType, &r.nContentType)
	if r.method == "" {
		r.method = m[":method"]
	}
	if r.scheme == "" {
		r.scheme = m[":scheme"]
	}
	if r.host == "" {
		r.host = m[":authority"]
	}
}

func eqFold(a, b string) bool { return len(a) == len(b) && (a == b || strings.EqualFold(a, b)) }

func headerValue(hv *corev3.HeaderValue) string {
	if len(hv.GetRawValue()) > 0 {
		return string(hv.GetRawValue())
	}
	return hv.GetValue()
}

func findHeader(hs []*corev3.HeaderValue, k string) string {
	for _, hv := range hs {
		if hv.GetKey() == k {
			return headerValue(hv)
		}
	}
	return ""
}

// route is the per-route policy from context_extensions.
type route struct {
	corsSkip    bool
	report      bool
	nonce       bool
	requireRole string
	tenant      string
	account     string // body field naming the login account; "" none
	bad         string // the offending key when a value is unknown
}

func (s *Server) route(ext map[string]string) route {
	rt := route{report: s.p.report, nonce: s.p.csp != nil}
	if len(ext) == 0 {
		return rt
	}
	switch v := ext["cors"]; v {
	case "":
	case "enforce":
		rt.report = false
	case "report":
		rt.report = true
	case "skip":
		rt.corsSkip = true
	default:
		rt.bad = "cors"
	}
	switch v := ext["csp"]; v {
	case "":
	case "off":
		rt.nonce = false
	case "nonce":
		if s.p.csp == nil {
			rt.bad = "csp" // no template to put a nonce in
		}
	default:
		rt.bad = "csp"
	}
	rt.requireRole = ext["require_role"]
	if t, ok := ext["tenant"]; ok {
		if !validTenant(t) {
			rt.bad = "tenant"
		}
		rt.tenant = t
	}
	if a, ok := ext["account"]; ok {
		if !validAccountField(a) {
			rt.bad = "account"
		}
		rt.account = a
	}
	return rt
}

// eval is one decision in the making.
type eval struct {
	decision decision
	reason   reason
	status   *typev3.HttpStatus
	body     string
	grpc     *rpcstatus.Status

	origin    origin
	originRaw string // for metadata when the origin did not parse
	cors      bool   // add ACAO (and friends) for origin
	anyOrigin bool   // ACAO: *
	vary      bool   // add Vary: Origin
	preflight bool
	tenant    string
	user      string
	role      string
	client    string // user:<id>, else ip
	ip        string // ip:<address or IPv6 prefix>
	account   string // account:<key>; "" none
	nonce     bool
	idSource  int
	// tokenInvalid: a bearer token was presented and failed (jwt_authn's
	// failed_status_in_metadata).
	tokenInvalid bool
}

// Check decides one request. A deny is an answer; the error is non-nil only
// for a CheckRequest that is not an HTTP request at all.
func (s *Server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	start := time.Now()
	attrs := req.GetAttributes()
	h := attrs.GetRequest().GetHttp()
	if h == nil {
		return nil, status.Error(codes.InvalidArgument, "check request: attributes.request.http is missing (extauthz serves the HTTP filter only)")
	}
	var e eval
	s.evaluate(attrs, h, &e)
	resp := s.respond(&e)
	s.m.decisions[e.decision][e.reason].Inc()
	s.m.identity[e.idSource].Inc()
	s.m.duration.Observe(time.Since(start).Seconds())
	return resp, nil
}

func (s *Server) deny(e *eval, r reason, st *typev3.HttpStatus, body string, g *rpcstatus.Status) {
	e.decision, e.reason, e.status, e.body, e.grpc = decisionDeny, r, st, body, g
}

func (s *Server) evaluate(attrs *authv3.AttributeContext, h *authv3.AttributeContext_HttpRequest, e *eval) {
	var r request
	s.read(h, &r)
	s.identify(attrs, &r, e)
	if r.tooMany {
		s.deny(e, reasonRequestTooLarge, http431, bodyTooLarge, statusBad)
		return
	}
	rt := s.route(attrs.GetContextExtensions())
	if rt.bad != "" {
		s.warnSampled("unknown per-route policy value in context_extensions; answering 500 (logged at most once a minute)",
			"key", rt.bad, "value", attrs.GetContextExtensions()[rt.bad])
		s.deny(e, reasonBadRoutePolicy, http500, bodyBadRoutePolicy, statusPolicy)
		return
	}
	e.nonce = rt.nonce
	s.tenant(&r, &rt, e)

	// CORS (Fetch): a request with an Origin that is not its own origin.
	e.decision, e.reason = decisionAllow, reasonNotCORS
	switch {
	case rt.corsSkip:
		e.reason = reasonCORSSkipped
	case r.nOrigin == 0:
		e.vary = !s.p.origins.any
	default:
		if !s.cors(&r, &rt, e) {
			return
		}
	}

	// After CORS, so the browser may read the 401 (ACAO for an allowed
	// origin) and the dashboard can refresh its token.
	if e.tokenInvalid {
		s.deny(e, reasonTokenInvalid, http401, bodyTokenInvalid, statusUnauth)
		return
	}
	if rt.requireRole != "" {
		switch {
		case e.user == "":
			s.deny(e, reasonAuthRequired, http401, bodyAuthRequired, statusUnauth)
			return
		case !hasRole(rt.requireRole, e.role):
			s.deny(e, reasonRoleRequired, http403, bodyRoleRequired, statusDenied)
			return
		}
	}
	if rt.account != "" && accountMethod(r.method) {
		key, why := s.account(rt.account, &r, h.GetRawBody(), h.GetBody())
		switch why {
		case reasonNone:
			e.account = key
		case reasonBodyTooLarge:
			s.deny(e, why, http413, bodyBodyTooLarge, statusBad)
		case reasonBodyUnsupported:
			s.deny(e, why, http415, bodyUnsupportedType, statusBad)
		default:
			s.deny(e, why, http400, bodyAccountInvalid, statusBad)
		}
	}
}

// cors evaluates a request that carries Origin. It reports false when the
// decision is final (denied or preflight answered).
func (s *Server) cors(r *request, rt *route, e *eval) bool {
	e.vary = true
	preflight := r.method == "OPTIONS" && r.nACRM > 0 && r.acrm != ""
	o, err := parseOrigin(r.origin)
	if err != nil || r.nOrigin > 1 {
		e.originRaw = r.origin
		if preflight || !rt.report {
			e.preflight = preflight
			s.deny(e, reasonOriginInvalid, http403, bodyOriginNotAllowed, statusDenied)
			return false
		}
		e.reason = reasonOriginInvalid
		return true
	}
	e.origin = o
	if sameOrigin(o, r.scheme, r.host) {
		e.reason = reasonSameOrigin
		return true
	}
	allowed := s.allowed(o, e.tenant)
	if preflight {
		e.preflight = true
		switch {
		case !allowed:
			s.deny(e, reasonOriginNotAllowed, http403, bodyOriginNotAllowed, statusDenied)
		case r.nACRM > 1 || !s.methodAllowed(r.acrm):
			s.deny(e, reasonMethodNotAllowed, http403, bodyMethodNotAllowed, statusDenied)
		case !s.headersAllowed(r):
			s.deny(e, reasonHeadersNotAllowed, http403, bodyHeadersNotAllowed, statusDenied)
		default:
			e.decision, e.reason, e.status, e.grpc = decisionPreflight, reasonPreflightOK, http204, statusPreflight
			e.cors = true
			e.anyOrigin = s.p.origins.any && !s.p.allowCredentials
		}
		return false
	}
	if !allowed {
		if !rt.report {
			s.deny(e, reasonOriginNotAllowed, http403, bodyOriginNotAllowed, statusDenied)
			return false
		}
		e.reason = reasonOriginNotAllowed // report mode: forwarded, no ACAO
		return true
	}
	e.reason = reasonOriginAllowed
	e.cors = true
	e.anyOrigin = s.p.origins.any && !s.p.allowCredentials
	e.vary = !e.anyOrigin
	return true
}

// allowed reports whether o may call: the global list, then the tenant's
// list from config, then the tenant's rows from the database.
func (s *Server) allowed(o origin, tenant string) bool {
	if s.p.origins.allows(o) {
		return true
	}
	if tenant == "" {
		return false
	}
	if set := s.p.tenants[tenant]; set != nil && set.allows(o) {
		return true
	}
	return s.tenants != nil && s.tenants.lookup(tenant).allows(o)
}

// tenant picks the tenant: the route's, else the tenant header, else the
// host without its port. A host counts only when some list knows it.
func (s *Server) tenant(r *request, rt *route, e *eval) {
	switch {
	case rt.tenant != "":
		e.tenant = rt.tenant
	case r.nTenant == 1 && validTenant(r.tenantHdr):
		e.tenant = r.tenantHdr
	case r.nTenant == 0 && r.host != "":
		host := r.host
		if i := strings.LastIndexByte(host, ':'); i >= 0 && !strings.HasSuffix(host, "]") {
			host = host[:i]
		}
		if !validTenant(host) {
			return
		}
		if hasUpper(host) {
			host = strings.ToLower(host) // host names are case-insensitive
		}
		if _, ok := s.p.tenants[host]; ok || (s.tenants != nil && s.tenants.lookup(host) != nil) {
			e.tenant = host
		}
	}
}

func (s *Server) methodAllowed(m string) bool {
	if !tokenish(m) {
		return false
	}
	m = normalizeMethod(m)
	switch m {
	case "GET", "HEAD", "POST": // CORS-safelisted: browsers never preflight for them
		return true
	}
	for _, a := range s.p.methods {
		if a == m {
			return true
		}
	}
	return false
}

func (s *Server) headersAllowed(r *request) bool {
	if r.nACRH > len(r.acrh) {
		return false
	}
	names := 0
	for _, line := range r.acrh[:r.nACRH] {
		if len(line) > maxACRHLen {
			return false
		}
		for line != "" {
			var name string
			if i := strings.IndexByte(line, ','); i >= 0 {
				name, line = line[:i], line[i+1:]
			} else {
				name, line = line, ""
			}
			name = strings.Trim(name, " \t")
			if name == "" {
				continue
			}
			if names++; names > maxACRHNames {
				return false
			}
			ok := false
			for _, a := range s.p.headers {
				if eqFold(name, a) {
					ok = true
					break
				}
			}
			if !ok {
				return false
			}
		}
	}
	return true
}

func hasUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 'A' && s[i] <= 'Z' {
			return true
		}
	}
	return false
}

func tokenish(s string) bool {
	if s == "" || len(s) > 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c > '~' || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// okArena holds one allowed answer in a single allocation.
type okArena struct {
	resp   authv3.CheckResponse
	oneof  authv3.CheckResponse_OkResponse
	ok     authv3.OkHttpResponse
	reqPtr [6]*corev3.HeaderValueOption
	reqOpt [6]corev3.HeaderValueOption
	reqVal [6]corev3.HeaderValue
	rspPtr [7]*corev3.HeaderValueOption
	rspOpt [2]corev3.HeaderValueOption
	rspVal [2]corev3.HeaderValue
	remove [4]string
}

// deniedArena holds one denied answer (including preflight answers).
type deniedArena struct {
	resp   authv3.CheckResponse
	oneof  authv3.CheckResponse_DeniedResponse
	denied authv3.DeniedHttpResponse
	ptr    [8]*corev3.HeaderValueOption
	opt    [1]corev3.HeaderValueOption
	val    [1]corev3.HeaderValue
}

// dynamicMetadataField is CheckResponse.dynamic_metadata's field number.
const dynamicMetadataField protowire.Number = 4

// setMetadata attaches the decision's dynamic metadata (a
// google.protobuf.Struct of strings and one bool) to resp, already in wire
// form: protobuf-go encodes a Struct's map by reflection, which took three
// times as long as all the rest of an answer and 18 allocations (measured);
// this takes one. Envoy, and any client, decode it as dynamic_metadata; only
// an in-process caller of Check sees it as an unknown field instead.
func setMetadata(resp *authv3.CheckResponse, e *eval) {
	var kv [9][2]string
	n := 0
	add := func(k, v string) {
		if v != "" {
			kv[n] = [2]string{k, v}
			n++
		}
	}
	add("decision", decisionNames[e.decision])
	add("reason", reasonNames[e.reason])
	if e.origin.s != "" {
		add("origin", e.origin.s)
	} else if e.originRaw != "" {
		raw := e.originRaw
		if len(raw) > 256 {
			raw = raw[:256]
		}
		add("origin", strings.ToValidUTF8(raw, "\uFFFD"))
	}
	add("tenant", e.tenant)
	add("user", e.user)
	add("role", e.role)
	add("client", e.client)
	add("account", e.account)

	// Struct{fields: map<string, Value>}: one length-delimited entry per
	// field, entry{1: key, 2: Value{3: string_value | 4: bool_value}}.
	entrySize := func(k string, valueSize int) int {
		return protowire.SizeTag(1) + protowire.SizeBytes(len(k)) + protowire.SizeTag(2) + protowire.SizeBytes(valueSize)
	}
	strValueSize := func(v string) int { return protowire.SizeTag(3) + protowire.SizeBytes(len(v)) }
	boolValueSize := protowire.SizeTag(4) + protowire.SizeVarint(1)
	structSize := 0
	for _, p := range kv[:n] {
		structSize += protowire.SizeTag(1) + protowire.SizeBytes(entrySize(p[0], strValueSize(p[1])))
	}
	if e.preflight {
		structSize += protowire.SizeTag(1) + protowire.SizeBytes(entrySize("preflight", boolValueSize))
	}
	b := make([]byte, 0, protowire.SizeTag(dynamicMetadataField)+protowire.SizeBytes(structSize))
	b = protowire.AppendTag(b, dynamicMetadataField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(structSize))
	entry := func(k string, valueSize int) {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(entrySize(k, valueSize)))
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, k)
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(valueSize))
	}
	for _, p := range kv[:n] {
		entry(p[0], strValueSize(p[1]))
		b = protowire.AppendTag(b, 3, protowire.BytesType)
		b = protowire.AppendString(b, p[1])
	}
	if e.preflight {
		entry("preflight", boolValueSize)
		b = protowire.AppendTag(b, 4, protowire.VarintType)
		b = protowire.AppendVarint(b, 1)
	}
	resp.ProtoReflect().SetUnknown(b)
}

// respond turns the decision into Envoy's CheckResponse.
func (s *Server) respond(e *eval) *authv3.CheckResponse {
	if e.decision != decisionAllow {
		return s.respondDenied(e)
	}
	a := &okArena{}
	a.resp.Status = statusOK
	a.resp.HttpResponse = &a.oneof
	a.oneof.OkResponse = &a.ok
	setMetadata(&a.resp, e)

	// Upstream request headers: meshguard's own, always overwritten; any
	// client copy of one meshguard does not set is removed.
	req := a.reqPtr[:0]
	remove := a.remove[:0]
	n := 0
	set := func(k, v string) {
		a.reqVal[n] = corev3.HeaderValue{Key: k, Value: v}
		a.reqOpt[n].Header = &a.reqVal[n]
		a.reqOpt[n].AppendAction = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
		req = append(req, &a.reqOpt[n])
		n++
	}
	set(headerClient, e.client)
	set(headerIP, e.ip)
	if e.account != "" {
		set(headerAccount, e.account)
	} else {
		remove = append(remove, headerAccount)
	}
	if e.user != "" {
		set(headerUser, e.user)
	} else {
		remove = append(remove, headerUser)
	}
	if e.role != "" {
		set(headerRole, e.role)
	} else {
		remove = append(remove, headerRole)
	}

	rsp := a.rspPtr[:0]
	if e.cors {
		rsp = s.appendAllowOrigin(rsp, &a.rspVal[0], &a.rspOpt[0], e)
		if s.hExpose != nil {
			rsp = append(rsp, s.hExpose)
		}
	}
	if e.vary {
		rsp = append(rsp, s.hVary)
	}
	if e.nonce {
		value, nonce := s.p.csp.build()
		s.m.nonces.Inc()
		set(headerNonce, nonce)
		a.rspVal[1] = corev3.HeaderValue{Key: s.p.csp.header, Value: value}
		a.rspOpt[1].Header = &a.rspVal[1]
		a.rspOpt[1].AppendAction = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
		rsp = append(rsp, &a.rspOpt[1])
		if s.hReporting != nil {
			rsp = append(rsp, s.hReporting)
		}
	} else {
		remove = append(remove, headerNonce)
	}
	a.ok.Headers = req
	a.ok.HeadersToRemove = remove
	if len(rsp) > 0 {
		a.ok.ResponseHeadersToAdd = rsp
	}
	return &a.resp
}

// appendAllowOrigin appends Access-Control-Allow-Origin (the request's
// origin, built in the caller's arena val/opt, or the shared "*" option) and,
// for an echoed origin, Access-Control-Allow-Credentials when configured.
func (s *Server) appendAllowOrigin(h []*corev3.HeaderValueOption, val *corev3.HeaderValue, opt *corev3.HeaderValueOption, e *eval) []*corev3.HeaderValueOption {
	if e.anyOrigin {
		return append(h, s.hACAOStar)
	}
	*val = corev3.HeaderValue{Key: "Access-Control-Allow-Origin", Value: e.origin.s}
	opt.Header = val
	opt.AppendAction = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
	h = append(h, opt)
	if s.p.allowCredentials {
		h = append(h, s.hAllowCreds)
	}
	return h
}

func (s *Server) respondDenied(e *eval) *authv3.CheckResponse {
	a := &deniedArena{}
	a.resp.Status = e.grpc
	a.resp.HttpResponse = &a.oneof
	a.oneof.DeniedResponse = &a.denied
	setMetadata(&a.resp, e)
	a.denied.Status = e.status
	a.denied.Body = e.body
	h := a.ptr[:0]
	if e.cors {
		// Preflight answer, or an allowed origin denied for another reason
		// (a role): the browser may read the answer.
		h = s.appendAllowOrigin(h, &a.val[0], &a.opt[0], e)
	}
	switch {
	case e.decision == decisionPreflight:
		for _, o := range [...]*corev3.HeaderValueOption{s.hAllowMethods, s.hAllowHeaders, s.hMaxAge} {
			if o != nil {
				h = append(h, o)
			}
		}
		h = append(h, s.hPreflightVary)
	case e.preflight:
		h = append(h, s.hPreflightVary)
	case e.cors && e.status == http401:
		h = append(h, s.hExposeAuth, s.hVaryDenied)
	case e.cors && s.hExpose != nil:
		h = append(h, s.hExpose, s.hVaryDenied)
	case e.vary:
		h = append(h, s.hVaryDenied)
	}
	if e.body != "" {
		h = append(h, s.hJSON)
	}
	switch {
	case e.status == http401 && e.tokenInvalid:
		h = append(h, s.hChallengeInvalid)
	case e.status == http401:
		h = append(h, s.hChallenge)
	}
	a.denied.Headers = h
	return &a.resp
}

// build returns a fresh policy value and the nonce inside it (a substring,
// so both share one allocation). The nonce is 128 bits from crypto/rand,
// standard base64.
func (t *cspTemplate) build() (value, nonce string) {
	const rawLen, encLen = 16, 24
	n := len(t.parts) - 1
	total := t.fixed + n*encLen
	buf := make([]byte, total+rawLen)
	raw := buf[total:]
	rand.Read(raw) // never fails (Go 1.24+); crashes the process on a broken kernel RNG
	off := copy(buf, t.parts[0])
	nonceAt := off
	base64.StdEncoding.Encode(buf[off:off+encLen], raw)
	enc := buf[off : off+encLen]
	off += encLen
	for i := 1; i <= n; i++ {
		off += copy(buf[off:], t.parts[i])
		if i < n {
			off += copy(buf[off:], enc)
		}
	}
	value = unsafe.String(&buf[0], total)
	return value, value[nonceAt : nonceAt+encLen]
}
