package extauthz

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
)

// outcome is a CheckResponse in a form a table can spell out. Header
// options read "Key: value (action)"; the random nonce reads NONCE.
type outcome struct {
	Code     codes.Code
	HTTP     int32 // denied response status; 0 when allowed
	Body     string
	Upstream []string
	Remove   []string
	Response []string // response_headers_to_add, or the denied response's headers
	Meta     map[string]any
}

func optionString(o *corev3.HeaderValueOption) string {
	act := map[corev3.HeaderValueOption_HeaderAppendAction]string{
		corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD:    "append",
		corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD: "overwrite",
		corev3.HeaderValueOption_ADD_IF_ABSENT:              "add-if-absent",
		corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:        "overwrite-if-exists",
	}[o.GetAppendAction()]
	//lint:ignore SA1019 the tests show meshguard never sets it
	if o.GetAppend() != nil {
		act += " +deprecated append"
	}
	return fmt.Sprintf("%s: %s (%s)", o.GetHeader().GetKey(), o.GetHeader().GetValue(), act)
}

// toOutcome flattens resp, checking the nonce's shape and that the CSP and
// x-csp-nonce carry the same one.
func toOutcome(t *testing.T, resp *authv3.CheckResponse) outcome {
	t.Helper()
	o := outcome{Code: codes.Code(resp.GetStatus().GetCode()), Meta: resp.GetDynamicMetadata().AsMap()}
	var opts []*corev3.HeaderValueOption
	if ok := resp.GetOkResponse(); ok != nil {
		for _, h := range ok.GetHeaders() {
			o.Upstream = append(o.Upstream, optionString(h))
		}
		o.Remove = ok.GetHeadersToRemove()
		opts = ok.GetResponseHeadersToAdd()
	} else if d := resp.GetDeniedResponse(); d != nil {
		o.HTTP = int32(d.GetStatus().GetCode())
		o.Body = d.GetBody()
		opts = d.GetHeaders()
	} else {
		t.Fatalf("response has neither ok_response nor denied_response: %v", resp)
	}
	for _, h := range opts {
		o.Response = append(o.Response, optionString(h))
	}
	nonce := ""
	for _, h := range resp.GetOkResponse().GetHeaders() {
		if h.GetHeader().GetKey() == "x-csp-nonce" {
			nonce = h.GetHeader().GetValue()
		}
	}
	if nonce != "" {
		raw, err := base64.StdEncoding.DecodeString(nonce)
		if err != nil || len(raw) < 16 {
			t.Errorf("nonce %q: want >= 128 bits of standard base64 (err %v, %d bytes)", nonce, err, len(raw))
		}
		seen := false
		for _, h := range opts {
			if strings.HasPrefix(h.GetHeader().GetKey(), "Content-Security-Policy") {
				seen = strings.Contains(h.GetHeader().GetValue(), "'nonce-"+nonce+"'")
			}
		}
		if !seen {
			t.Errorf("Content-Security-Policy does not carry the x-csp-nonce value %q", nonce)
		}
		repl := func(s []string) {
			for i := range s {
				s[i] = strings.ReplaceAll(s[i], nonce, "NONCE")
			}
		}
		repl(o.Upstream)
		repl(o.Response)
	}
	return o
}

const (
	cspDefault = "Content-Security-Policy: base-uri 'self'; default-src 'self'; frame-ancestors 'none'; object-src 'none'; script-src 'self' 'strict-dynamic' 'nonce-NONCE'; report-uri /v1/csp-reports (overwrite)"
	varyAppend = "Vary: Origin (append)"
	clientIP   = "x-meshguard-client: ip:203.0.113.7 (overwrite)"
	ipHdr      = "x-meshguard-ip: ip:203.0.113.7 (overwrite)"
	nonceHdr   = "x-csp-nonce: NONCE (overwrite)"
	jsonHdr    = "Content-Type: application/json (overwrite)"
	varyDenied = "Vary: Origin (overwrite)"
	varyPre    = "Vary: Origin, Access-Control-Request-Method, Access-Control-Request-Headers (overwrite)"
	exposeHdr  = "Access-Control-Expose-Headers: X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset (overwrite)"
	credsHdr   = "Access-Control-Allow-Credentials: true (overwrite)"
)

func acao(origin string) string { return "Access-Control-Allow-Origin: " + origin + " (overwrite)" }

// allowCORS is the answer for an allowed cross-origin request.
func allowCORS(origin string, meta map[string]any) outcome {
	return outcome{
		Upstream: []string{clientIP, ipHdr, nonceHdr},
		Remove:   []string{"x-meshguard-account", "x-meshguard-user", "x-meshguard-role"},
		Response: []string{acao(origin), credsHdr, exposeHdr, varyAppend, cspDefault},
		Meta:     meta,
	}
}

// allowPlain is the answer for an allowed request that gets no CORS headers.
func allowPlain(meta map[string]any, vary bool) outcome {
	o := outcome{
		Upstream: []string{clientIP, ipHdr, nonceHdr},
		Remove:   []string{"x-meshguard-account", "x-meshguard-user", "x-meshguard-role"},
		Response: []string{cspDefault},
		Meta:     meta,
	}
	if vary {
		o.Response = []string{varyAppend, cspDefault}
	}
	return o
}

func denyOrigin(meta map[string]any) outcome {
	return outcome{Code: codes.PermissionDenied, HTTP: 403, Body: `{"error":"CORS policy: Origin not allowed"}`,
		Response: []string{varyDenied, jsonHdr}, Meta: meta}
}

func denyPreflight(body string, meta map[string]any) outcome {
	return outcome{Code: codes.PermissionDenied, HTTP: 403, Body: body, Response: []string{varyPre, jsonHdr}, Meta: meta}
}

func meta(kv ...any) map[string]any {
	m := map[string]any{"client": "ip:203.0.113.7"}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	return m
}

func hdr(kv ...string) [][2]string {
	var out [][2]string
	for i := 0; i < len(kv); i += 2 {
		out = append(out, [2]string{kv[i], kv[i+1]})
	}
	return out
}

func TestCheckConformance(t *testing.T) {
	dev := testConfig()
	dev.Development = true
	report := testConfig()
	report.CORS.Mode = "report"
	nullCfg := testConfig()
	nullCfg.CORS.AllowCredentials = false
	nullCfg.CORS.AllowedOrigins = []string{"null"}
	starCfg := testConfig()
	starCfg.CORS.AllowCredentials = false
	starCfg.CORS.AllowedOrigins = []string{"*"}
	trusted := testConfig()
	trusted.Identity.TrustedUserHeader = "x-auth-user"
	trusted.Identity.TrustedRoleHeader = "x-auth-role"
	noCSP := testConfig()
	noCSP.CSP.Nonce = false
	reportTo := testConfig()
	reportTo.CSP.ReportTo = "csp-endpoint"
	reportTo.CSP.ReportToURL = "https://app.example.com/v1/csp-reports"

	preflight := func(origin, method, headers string) envoyReq {
		h := hdr("origin", origin, "access-control-request-method", method)
		if headers != "" {
			h = append(h, [2]string{"access-control-request-headers", headers})
		}
		return envoyReq{method: "OPTIONS", host: "api.example.net", headers: h}
	}
	preflightOK := func(origin string, m map[string]any) outcome {
		return outcome{Code: codes.PermissionDenied, HTTP: 204, Response: []string{
			acao(origin), credsHdr,
			"Access-Control-Allow-Methods: GET, POST, PUT, PATCH, DELETE, OPTIONS (overwrite)",
			"Access-Control-Allow-Headers: Content-Type, Authorization, X-Requested-With, X-CSRF-Token, X-Session-ID (overwrite)",
			"Access-Control-Max-Age: 86400 (overwrite)",
			varyPre,
		}, Meta: m}
	}
	get := func(origin string, extra ...string) envoyReq {
		h := hdr(extra...)
		if origin != "" {
			h = append(hdr("origin", origin), h...)
		}
		return envoyReq{host: "api.example.net", headers: h}
	}
	user := func(o outcome, client string, up ...string) outcome {
		o.Upstream = append([]string{"x-meshguard-client: " + client + " (overwrite)", ipHdr}, up...)
		o.Upstream = append(o.Upstream, nonceHdr)
		o.Remove = []string{"x-meshguard-account"}
		o.Meta["client"] = client
		return o
	}

	cases := []struct {
		name  string
		cfg   Config
		req   envoyReq
		forms []string // default: both
		want  outcome
	}{
		// Not a CORS request.
		{name: "no origin", req: get(""), want: allowPlain(meta("decision", "allow", "reason", "not_cors"), true)},
		{name: "same origin", req: envoyReq{host: "app.example.com", headers: hdr("origin", "https://app.example.com")},
			want: allowPlain(meta("decision", "allow", "reason", "same_origin", "origin", "https://app.example.com"), true)},
		{name: "same origin, authority with default port", req: envoyReq{host: "App.Example.com:443", headers: hdr("origin", "https://app.example.com")},
			want: allowPlain(meta("decision", "allow", "reason", "same_origin", "origin", "https://app.example.com"), true)},
		{name: "same host other scheme is cross-origin", req: envoyReq{scheme: "http", host: "app.example.com", headers: hdr("origin", "https://app.example.com")},
			want: allowCORS("https://app.example.com", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://app.example.com"))},

		// Actual requests.
		{name: "public origin", req: get("https://app.example.com"),
			want: allowCORS("https://app.example.com", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://app.example.com"))},
		{name: "listed origin", req: get("https://dashboard.example.com"),
			want: allowCORS("https://dashboard.example.com", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://dashboard.example.com"))},
		{name: "subdomain pattern", req: get("https://api.example.com"),
			want: allowCORS("https://api.example.com", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://api.example.com"))},
		{name: "deep subdomain pattern", req: get("https://a.b.example.com"),
			want: allowCORS("https://a.b.example.com", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://a.b.example.com"))},
		{name: "normalised: case and default port", req: get("HTTPS://Dashboard.EXAMPLE.com:443"),
			want: allowCORS("https://dashboard.example.com", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://dashboard.example.com"))},
		{name: "pattern does not match the apex", req: get("https://example.com"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://example.com"))},
		{name: "suffix trick without dot", req: get("https://evilexample.com"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://evilexample.com"))},
		{name: "suffix trick as prefix", req: get("https://example.com.evil.net"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://example.com.evil.net"))},
		{name: "pattern scheme must match", req: get("http://api.example.com"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "http://api.example.com"))},
		{name: "pattern port must match", req: get("https://api.example.com:8443"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://api.example.com:8443"))},
		{name: "trailing slash is not an origin", req: get("https://dashboard.example.com/"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_invalid", "origin", "https://dashboard.example.com/"))},
		{name: "null not listed", req: get("null"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "null"))},
		{name: "null listed", cfg: nullCfg, req: get("null"),
			want: outcome{Upstream: []string{clientIP, ipHdr, nonceHdr}, Remove: []string{"x-meshguard-account", "x-meshguard-user", "x-meshguard-role"},
				Response: []string{acao("null"), exposeHdr, varyAppend, cspDefault},
				Meta:     meta("decision", "allow", "reason", "origin_allowed", "origin", "null")}},
		{name: "star without credentials", cfg: starCfg, req: get("https://anything.test"),
			want: outcome{Upstream: []string{clientIP, ipHdr, nonceHdr}, Remove: []string{"x-meshguard-account", "x-meshguard-user", "x-meshguard-role"},
				Response: []string{acao("*"), exposeHdr, cspDefault},
				Meta:     meta("decision", "allow", "reason", "origin_allowed", "origin", "https://anything.test")}},
		{name: "duplicate Origin headers", req: get("https://dashboard.example.com", "origin", "https://evil.test"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_invalid", "origin", "https://dashboard.example.com,https://evil.test"))},
		{name: "report mode forwards without CORS headers", cfg: report, req: get("https://evil.test"),
			want: allowPlain(meta("decision", "allow", "reason", "origin_not_allowed", "origin", "https://evil.test"), true)},
		{name: "route forces enforce over report mode", cfg: report,
			req:  envoyReq{host: "api.example.net", headers: hdr("origin", "https://evil.test"), ext: map[string]string{"cors": "enforce"}},
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://evil.test"))},
		{name: "development adds localhost", cfg: dev, req: get("http://localhost:3000"),
			want: allowCORS("http://localhost:3000", meta("decision", "allow", "reason", "origin_allowed", "origin", "http://localhost:3000"))},
		{name: "development adds 127.0.0.1:3001", cfg: dev, req: get("http://127.0.0.1:3001"),
			want: allowCORS("http://127.0.0.1:3001", meta("decision", "allow", "reason", "origin_allowed", "origin", "http://127.0.0.1:3001"))},
		{name: "production has no localhost", req: get("http://localhost:3000"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "http://localhost:3000"))},

		// Preflight.
		{name: "preflight allowed", req: preflight("https://dashboard.example.com", "PUT", "content-type,x-csrf-token"),
			want: preflightOK("https://dashboard.example.com", meta("decision", "preflight", "reason", "preflight_ok", "origin", "https://dashboard.example.com", "preflight", true))},
		{name: "preflight safelisted method not listed", cfg: func() Config { c := testConfig(); c.CORS.AllowedMethods = []string{"PUT"}; return c }(),
			req: preflight("https://dashboard.example.com", "POST", ""),
			want: func() outcome {
				o := preflightOK("https://dashboard.example.com", meta("decision", "preflight", "reason", "preflight_ok", "origin", "https://dashboard.example.com", "preflight", true))
				o.Response[2] = "Access-Control-Allow-Methods: PUT (overwrite)"
				return o
			}()},
		{name: "preflight disallowed origin", req: preflight("https://evil.test", "PUT", ""),
			want: denyPreflight(`{"error":"CORS policy: Origin not allowed"}`, meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://evil.test", "preflight", true))},
		{name: "preflight disallowed origin in report mode", cfg: report, req: preflight("https://evil.test", "PUT", ""),
			want: denyPreflight(`{"error":"CORS policy: Origin not allowed"}`, meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://evil.test", "preflight", true))},
		{name: "preflight disallowed method", req: preflight("https://dashboard.example.com", "PROPFIND", ""),
			want: denyPreflight(`{"error":"CORS policy: Method not allowed"}`, meta("decision", "deny", "reason", "method_not_allowed", "origin", "https://dashboard.example.com", "preflight", true))},
		{name: "preflight method is case-sensitive beyond the six", req: preflight("https://dashboard.example.com", "patch", ""),
			want: denyPreflight(`{"error":"CORS policy: Method not allowed"}`, meta("decision", "deny", "reason", "method_not_allowed", "origin", "https://dashboard.example.com", "preflight", true))},
		{name: "preflight disallowed header", req: preflight("https://dashboard.example.com", "PUT", "content-type,x-evil"),
			want: denyPreflight(`{"error":"CORS policy: Request header not allowed"}`, meta("decision", "deny", "reason", "headers_not_allowed", "origin", "https://dashboard.example.com", "preflight", true))},
		{name: "preflight invalid origin", req: preflight("https://dashboard.example.com/x", "PUT", ""),
			want: denyPreflight(`{"error":"CORS policy: Origin not allowed"}`, meta("decision", "deny", "reason", "origin_invalid", "origin", "https://dashboard.example.com/x", "preflight", true))},
		{name: "OPTIONS without Access-Control-Request-Method is an actual request",
			req:  envoyReq{method: "OPTIONS", host: "api.example.net", headers: hdr("origin", "https://dashboard.example.com")},
			want: allowCORS("https://dashboard.example.com", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://dashboard.example.com"))},

		// Tenants from config.
		{name: "tenant origin via tenant header", req: get("https://tenant1.example.org", "x-tenant-id", "tenant1"),
			want: allowCORS("https://tenant1.example.org", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://tenant1.example.org", "tenant", "tenant1"))},
		{name: "tenant origin without tenant", req: get("https://tenant1.example.org"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://tenant1.example.org"))},
		{name: "tenant origin for another tenant", req: get("https://tenant1.example.org", "x-tenant-id", "tenant2"),
			want: denyOrigin(meta("decision", "deny", "reason", "origin_not_allowed", "origin", "https://tenant1.example.org", "tenant", "tenant2"))},
		{name: "tenant from the route", req: envoyReq{host: "api.example.net", headers: hdr("origin", "https://tenant1.example.org"), ext: map[string]string{"tenant": "tenant1"}},
			want: allowCORS("https://tenant1.example.org", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://tenant1.example.org", "tenant", "tenant1"))},
		{name: "tenant from the host", cfg: func() Config {
			c := testConfig()
			c.CORS.Tenants = map[string][]string{"shop.example.net": {"https://partner.example.org"}}
			return c
		}(), req: envoyReq{host: "Shop.Example.net:8443", headers: hdr("origin", "https://partner.example.org")},
			want: allowCORS("https://partner.example.org", meta("decision", "allow", "reason", "origin_allowed", "origin", "https://partner.example.org", "tenant", "shop.example.net"))},

		// Identity.
		{name: "jwt identity", req: envoyReq{host: "api.example.net", jwt: map[string]any{"sub": "u-42", "role": "admin"},
			headers: hdr("x-meshguard-client", "user:someone-else", "x-meshguard-user", "forged")},
			want: user(allowPlain(meta("decision", "allow", "reason", "not_cors", "user", "u-42", "role", "admin"), true), "user:u-42",
				"x-meshguard-user: u-42 (overwrite)", "x-meshguard-role: admin (overwrite)")},
		{name: "jwt numeric sub and role list", req: envoyReq{host: "api.example.net", jwt: map[string]any{"sub": 42, "role": []any{"editor", "admin"}}},
			want: user(allowPlain(meta("decision", "allow", "reason", "not_cors", "user", "42", "role", "editor,admin"), true), "user:42",
				"x-meshguard-user: 42 (overwrite)", "x-meshguard-role: editor,admin (overwrite)")},
		{name: "jwt sub with spaces is ignored", req: envoyReq{host: "api.example.net", jwt: map[string]any{"sub": "a b"}},
			want: allowPlain(meta("decision", "allow", "reason", "not_cors"), true)},
		{name: "client-supplied identity headers are not trusted", req: get("", "x-meshguard-client", "user:admin", "x-user-id", "admin"),
			want: allowPlain(meta("decision", "allow", "reason", "not_cors"), true)},
		{name: "trusted user header", cfg: trusted, req: get("", "x-auth-user", "svc-7", "x-auth-role", "reader"),
			want: user(allowPlain(meta("decision", "allow", "reason", "not_cors", "user", "svc-7", "role", "reader"), true), "user:svc-7",
				"x-meshguard-user: svc-7 (overwrite)", "x-meshguard-role: reader (overwrite)")},
		{name: "client address from Envoy's x-meshguard-client-ip", req: get("", "x-meshguard-client-ip", "198.51.100.9"),
			want: func() outcome {
				o := allowPlain(meta("decision", "allow", "reason", "not_cors", "client", "ip:198.51.100.9"), true)
				o.Upstream[0] = "x-meshguard-client: ip:198.51.100.9 (overwrite)"
				o.Upstream[1] = "x-meshguard-ip: ip:198.51.100.9 (overwrite)"
				return o
			}()},
		{name: "x-meshguard-client-ip that is not an address", req: get("", "x-meshguard-client-ip", "198.51.100.9, 10.0.0.1"),
			want: allowPlain(meta("decision", "allow", "reason", "not_cors"), true)},
		{name: "client ip header switched off", cfg: func() Config { c := testConfig(); c.Identity.ClientIPHeader = ""; return c }(),
			req: get("", "x-meshguard-client-ip", "198.51.100.9"), want: allowPlain(meta("decision", "allow", "reason", "not_cors"), true)},
		{name: "ipv6 downstream: keyed by its /64", req: envoyReq{host: "api.example.net", source: "2001:db8::7"},
			want: func() outcome {
				o := allowPlain(meta("decision", "allow", "reason", "not_cors", "client", "ip:2001:db8::/64"), true)
				o.Upstream[0] = "x-meshguard-client: ip:2001:db8::/64 (overwrite)"
				o.Upstream[1] = "x-meshguard-ip: ip:2001:db8::/64 (overwrite)"
				return o
			}()},

		// Per-route policy.
		{name: "route skips CORS", req: envoyReq{host: "api.example.net", headers: hdr("origin", "https://evil.test"), ext: map[string]string{"cors": "skip"}},
			want: allowPlain(meta("decision", "allow", "reason", "cors_skipped"), false)},
		{name: "route requires a role, anonymous", req: envoyReq{host: "api.example.net", ext: map[string]string{"require_role": "admin"}},
			want: outcome{Code: codes.Unauthenticated, HTTP: 401, Body: `{"error":"Authentication required"}`,
				Response: []string{varyDenied, jsonHdr, "WWW-Authenticate: Bearer (overwrite)"},
				Meta:     meta("decision", "deny", "reason", "authentication_required")}},
		{name: "route requires a role the user lacks", req: envoyReq{host: "api.example.net", ext: map[string]string{"require_role": "admin"},
			jwt: map[string]any{"sub": "u-1", "role": "reader"}, headers: hdr("origin", "https://dashboard.example.com")},
			want: outcome{Code: codes.PermissionDenied, HTTP: 403, Body: `{"error":"Forbidden"}`,
				Response: []string{acao("https://dashboard.example.com"), credsHdr, exposeHdr, varyDenied, jsonHdr},
				Meta:     meta("decision", "deny", "reason", "role_required", "origin", "https://dashboard.example.com", "user", "u-1", "role", "reader", "client", "user:u-1")}},
		{name: "route requires one of two roles", req: envoyReq{host: "api.example.net", ext: map[string]string{"require_role": "owner, admin"},
			jwt: map[string]any{"sub": "u-1", "role": []any{"reader", "admin"}}},
			want: user(allowPlain(meta("decision", "allow", "reason", "not_cors", "user", "u-1", "role", "reader,admin"), true), "user:u-1",
				"x-meshguard-user: u-1 (overwrite)", "x-meshguard-role: reader,admin (overwrite)")},
		{name: "route turns the nonce off", req: envoyReq{host: "api.example.net", ext: map[string]string{"csp": "off"}},
			want: outcome{Upstream: []string{clientIP, ipHdr}, Remove: []string{"x-meshguard-account", "x-meshguard-user", "x-meshguard-role", "x-csp-nonce"},
				Response: []string{varyAppend}, Meta: meta("decision", "allow", "reason", "not_cors")}},
		{name: "unknown route policy value", req: envoyReq{host: "api.example.net", ext: map[string]string{"cors": "sometimes"}},
			want: outcome{Code: codes.FailedPrecondition, HTTP: 500, Body: `{"error":"Internal server error"}`, Response: []string{jsonHdr},
				Meta: meta("decision", "deny", "reason", "bad_route_policy")}},
		{name: "other context_extensions keys are ignored", req: envoyReq{host: "api.example.net", ext: map[string]string{"virtual_host": "x"}},
			want: allowPlain(meta("decision", "allow", "reason", "not_cors"), true)},

		// CSP.
		{name: "no nonce configured: client nonce removed", cfg: noCSP, req: get("", "x-csp-nonce", "attacker"),
			want: outcome{Upstream: []string{clientIP, ipHdr}, Remove: []string{"x-meshguard-account", "x-meshguard-user", "x-meshguard-role", "x-csp-nonce"},
				Response: []string{varyAppend}, Meta: meta("decision", "allow", "reason", "not_cors")}},
		{name: "report-to group and Reporting-Endpoints", cfg: reportTo, req: get(""),
			want: func() outcome {
				o := allowPlain(meta("decision", "allow", "reason", "not_cors"), true)
				o.Response = []string{varyAppend,
					strings.TrimSuffix(cspDefault, " (overwrite)") + "; report-to csp-endpoint (overwrite)",
					`Reporting-Endpoints: csp-endpoint="https://app.example.com/v1/csp-reports" (overwrite)`}
				return o
			}()},
	}
	for _, tc := range cases {
		forms := tc.forms
		if forms == nil {
			forms = []string{formHeaders, formHeaderMap}
		}
		for _, form := range forms {
			t.Run(tc.name+"/"+form, func(t *testing.T) {
				cfg := tc.cfg
				if cfg.CORS.Mode == "" {
					cfg = testConfig()
				}
				srv, _ := newTestServer(t, cfg, nil)
				client := startGRPC(t, srv)
				resp, err := client.Check(t.Context(), tc.req.build(t, form))
				if err != nil {
					t.Fatalf("Check: %v", err)
				}
				if diff := cmp.Diff(tc.want, toOutcome(t, resp)); diff != "" {
					t.Errorf("Check answer (-want +got):\n%s", diff)
				}
			})
		}
	}
}

// TestPreflightProto pins one whole answer, message for message.
func TestPreflightProto(t *testing.T) {
	cfg := testConfig()
	cfg.CORS.AllowCredentials = false
	cfg.CORS.MaxAge = 0
	cfg.CORS.AllowedHeaders = []string{"Content-Type"}
	srv, _ := newTestServer(t, cfg, nil)
	client := startGRPC(t, srv)
	req := envoyReq{method: "OPTIONS", host: "api.example.net",
		headers: hdr("origin", "https://dashboard.example.com", "access-control-request-method", "DELETE", "access-control-request-headers", "Content-Type")}
	got, err := client.Check(t.Context(), req.build(t, formHeaders))
	if err != nil {
		t.Fatal(err)
	}
	ow := corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
	h := func(k, v string) *corev3.HeaderValueOption {
		return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, Value: v}, AppendAction: ow}
	}
	want := &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(codes.PermissionDenied), Message: "CORS preflight answered by meshguard"},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status: &typev3.HttpStatus{Code: typev3.StatusCode_NoContent},
			Headers: []*corev3.HeaderValueOption{
				h("Access-Control-Allow-Origin", "https://dashboard.example.com"),
				h("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS"),
				h("Access-Control-Allow-Headers", "Content-Type"),
				h("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
			},
		}},
		DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{
			"decision":  structpb.NewStringValue("preflight"),
			"reason":    structpb.NewStringValue("preflight_ok"),
			"origin":    structpb.NewStringValue("https://dashboard.example.com"),
			"client":    structpb.NewStringValue("ip:203.0.113.7"),
			"preflight": structpb.NewBoolValue(true),
		}},
	}
	if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
		t.Errorf("preflight answer (-want +got):\n%s", diff)
	}
}

// TestCheckMalformed covers requests that are not what Envoy sends.
func TestCheckMalformed(t *testing.T) {
	srv, _ := newTestServer(t, testConfig(), nil)
	client := startGRPC(t, srv)

	t.Run("no http attributes", func(t *testing.T) {
		_, err := client.Check(t.Context(), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{}})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "attributes.request.http") {
			t.Fatalf("Check: got %v, want InvalidArgument naming attributes.request.http", err)
		}
	})
	for _, form := range []string{formHeaders, formHeaderMap} {
		t.Run("too many headers/"+form, func(t *testing.T) {
			var h [][2]string
			for i := range maxHeaders + 1 {
				h = append(h, [2]string{fmt.Sprintf("x-h-%d", i), "v"})
			}
			resp, err := client.Check(t.Context(), envoyReq{host: "api.example.net", headers: h}.build(t, form))
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.GetDeniedResponse().GetStatus().GetCode(); got != 431 {
				t.Fatalf("status %d, want 431", got)
			}
		})
		t.Run("huge header list in preflight/"+form, func(t *testing.T) {
			names := strings.Repeat("content-type,", 100)
			req := envoyReq{method: "OPTIONS", host: "api.example.net",
				headers: hdr("origin", "https://dashboard.example.com", "access-control-request-method", "PUT", "access-control-request-headers", names)}
			resp, err := client.Check(t.Context(), req.build(t, form))
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.GetDeniedResponse().GetStatus().GetCode(); got != 403 {
				t.Fatalf("status %d, want 403", got)
			}
		})
	}
	t.Run("invalid utf-8 origin in header_map", func(t *testing.T) {
		req := envoyReq{host: "api.example.net", headers: hdr("origin", "https://\xff.example.com")}
		resp, err := client.Check(t.Context(), req.build(t, formHeaderMap))
		if err != nil {
			t.Fatalf("Check: %v (the answer must marshal even for invalid UTF-8 input)", err)
		}
		if got := resp.GetDeniedResponse().GetStatus().GetCode(); got != 403 {
			t.Fatalf("status %d, want 403", got)
		}
	})
}

// TestNonceUnique checks that every answer carries a different nonce.
func TestNonceUnique(t *testing.T) {
	srv, _ := newTestServer(t, testConfig(), nil)
	client := startGRPC(t, srv)
	seen := map[string]bool{}
	const n = 200
	for range n {
		resp, err := client.Check(t.Context(), envoyReq{host: "api.example.net"}.build(t, formHeaders))
		if err != nil {
			t.Fatal(err)
		}
		nonce := ""
		for _, h := range resp.GetOkResponse().GetHeaders() {
			if h.GetHeader().GetKey() == "x-csp-nonce" {
				nonce = h.GetHeader().GetValue()
			}
		}
		if nonce == "" || seen[nonce] {
			t.Fatalf("nonce %q empty or repeated", nonce)
		}
		seen[nonce] = true
	}
	if got := testutil.ToFloat64(srv.m.nonces); got != n {
		t.Errorf("meshguard_extauthz_csp_nonces_total = %v, want %d", got, n)
	}
}

// TestMetrics checks decisions are counted by decision and reason.
func TestMetrics(t *testing.T) {
	srv, reg := newTestServer(t, testConfig(), nil)
	client := startGRPC(t, srv)
	reqs := []envoyReq{
		{host: "api.example.net", headers: hdr("origin", "https://dashboard.example.com")},
		{host: "api.example.net", headers: hdr("origin", "https://dashboard.example.com")},
		{host: "api.example.net", headers: hdr("origin", "https://evil.test")},
		{method: "OPTIONS", host: "api.example.net", headers: hdr("origin", "https://dashboard.example.com", "access-control-request-method", "PUT")},
	}
	for _, r := range reqs {
		if _, err := client.Check(t.Context(), r.build(t, formHeaders)); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]float64{
		"allow/origin_allowed":    2,
		"deny/origin_not_allowed": 1,
		"preflight/preflight_ok":  1,
	}
	got := map[string]float64{}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "meshguard_extauthz_decisions_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if v := m.GetCounter().GetValue(); v > 0 {
				got[l["decision"]+"/"+l["reason"]] = v
			}
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("decisions_total (-want +got):\n%s", diff)
	}
	var h dto.Metric
	if err := srv.m.duration.Write(&h); err != nil || h.GetHistogram().GetSampleCount() != uint64(len(reqs)) {
		t.Errorf("check duration samples = %d (%v), want %d", h.GetHistogram().GetSampleCount(), err, len(reqs))
	}
}

// TestConcurrentChecks runs answers that share precomputed header options
// through concurrent marshalling (run with -race).
func TestConcurrentChecks(t *testing.T) {
	srv, _ := newTestServer(t, testConfig(), nil)
	client := startGRPC(t, srv)
	reqs := []*authv3.CheckRequest{
		envoyReq{host: "api.example.net", headers: hdr("origin", "https://dashboard.example.com")}.build(t, formHeaders),
		envoyReq{method: "OPTIONS", host: "api.example.net", headers: hdr("origin", "https://dashboard.example.com", "access-control-request-method", "PUT")}.build(t, formHeaderMap),
		envoyReq{host: "api.example.net", headers: hdr("origin", "https://evil.test")}.build(t, formHeaders),
	}
	errc := make(chan error, 8)
	for g := range 8 {
		go func() {
			for i := range 40 {
				if _, err := client.Check(t.Context(), reqs[(g+i)%len(reqs)]); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	for range 8 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
}

// TestBadRoutePolicyLogSampled: a misconfigured route answers 500 on every
// request but logs once, naming the key and value, through Register's
// service registration.
func TestBadRoutePolicyLogSampled(t *testing.T) {
	var buf bytes.Buffer
	srv, err := New(slog.New(slog.NewTextHandler(&buf, nil)), prometheus.NewRegistry(), testConfig(), nil)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	srv.Register(gs)
	client := authv3.NewAuthorizationClient(grpcservertest.Serve(t, gs))
	for range 3 {
		resp, err := client.Check(t.Context(), envoyReq{host: "api.example.net", ext: map[string]string{"require_role": "admin", "csp": "maybe"}}.build(t, formHeaders))
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.GetDeniedResponse().GetStatus().GetCode(); got != 500 {
			t.Fatalf("status %d, want 500", got)
		}
	}
	if n := strings.Count(buf.String(), "unknown per-route policy value"); n != 1 || !strings.Contains(buf.String(), "key=csp value=maybe") {
		t.Errorf("log has %d warnings, want 1 naming key=csp value=maybe:\n%s", n, buf.String())
	}
}
