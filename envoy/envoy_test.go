package envoy

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	grpcalsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	dnsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dns/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	headermutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	jwtauthnv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/jwt_authn/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ratelimit/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/meshguard/meshguard/extauthz"
	"github.com/meshguard/meshguard/ratelimitsvc"
)

// presetRules returns the preset values that have a rule in ratelimitsvc's
// default "api" domain: (preset=<name>, client) limited by that preset.
func presetRules(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, d := range ratelimitsvc.DefaultConfig().Domains {
		if d.Domain != "api" {
			continue
		}
		for _, p := range d.Descriptors {
			if p.Key == "preset" && len(p.Descriptors) == 1 && p.Descriptors[0].Key == "client" && p.Descriptors[0].RateLimit != nil {
				out = append(out, p.Value)
			}
		}
	}
	if len(out) == 0 {
		t.Fatal(`ratelimitsvc's default config has no "api" domain with preset rules`)
	}
	return out
}

// TestBootstrapsParse decodes every YAML bootstrap in this directory strictly,
// resolves every typed extension and validates every message.
func TestBootstrapsParse(t *testing.T) {
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no bootstrap files found: %v", err)
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ParseBootstrap(data); err != nil {
				t.Fatal(err)
			}
		})
	}
	if !bytes.Equal(mustRead(t, "envoy.yaml"), FrontProxy) {
		t.Error("FrontProxy is not envoy.yaml")
	}
}

// TestNoDeprecatedFields: nothing in the bootstraps uses a field or enum
// value the Envoy API marks deprecated (Envoy warns, and a later release
// removes them).
func TestNoDeprecatedFields(t *testing.T) {
	for _, b := range bootstraps {
		t.Run(b.name, func(t *testing.T) {
			bs, err := ParseBootstrap(b.data)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range Deprecated(bs) {
				t.Errorf("deprecated: %s", f)
			}
		})
	}
	// The walker finds a deprecated field two Anys deep and a deprecated
	// enum value.
	bad := bytes.Replace(FrontProxy, []byte("append_action: OVERWRITE_IF_EXISTS_OR_ADD"), []byte("append: false"), 1)
	bad = bytes.Replace(bad, []byte("transport_api_version: V3"), []byte("transport_api_version: V2"), 1)
	bs, err := ParseBootstrap(bad)
	if err != nil {
		t.Fatal(err)
	}
	d := Deprecated(bs)
	for _, want := range []string{".append", "transport_api_version=V2"} {
		if !slices.ContainsFunc(d, func(s string) bool { return strings.HasSuffix(s, want) }) {
			t.Errorf("Deprecated missed *%s: %v", want, d)
		}
	}
}

// TestParseBootstrapRejects shows that the checker fails on each class of
// mistake Envoy would refuse at load, so a passing TestBootstrapsParse means
// something.
func TestParseBootstrapRejects(t *testing.T) {
	tests := []struct {
		name, old, new, wantErr string
	}{
		{"unknown field in a typed extension", "failure_mode_allow: false", "failure_mode_allowed: false", `unknown field "failure_mode_allowed"`},
		{"unknown extension type", "v3.HttpGrpcAccessLogConfig", "v3.HttpGrpcAccessLogConfigX", "unable to resolve"},
		{"rule inside an Any", "log_name: meshguard_audit", `log_name: ""`, "CommonGrpcAccessLogConfig.LogName"},
		{"rule two Anys deep", "stage: 0", "stage: 11", "RateLimit.Stage"},
		{"rule in a typed_per_filter_config map", "\n                    check_settings:\n                      context_extensions: {csp: \"off\"}", "", "ExtAuthzPerRoute.Override"},
		{"rule outside any Any", "port_value: 8081", "port_value: 80810", "SocketAddress.PortValue"},
		{"header value with a newline", "value: nosniff}", `value: "no\nsniff"}`, "HeaderValue.Value"},
		{"bad enum name", "append_action: OVERWRITE_IF_EXISTS_OR_ADD", "append_action: OVERWRITE", "invalid value for enum"},
		{"not YAML", "node:", "node: [", "converting YAML to JSON"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !bytes.Contains(FrontProxy, []byte(tc.old)) {
				t.Fatalf("envoy.yaml has no %q to replace", tc.old)
			}
			_, err := ParseBootstrap(bytes.Replace(FrontProxy, []byte(tc.old), []byte(tc.new), 1))
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("ParseBootstrap error = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

// frontProxy is the decoded front-proxy config with the parts the wiring
// tests look at unpacked.
type frontProxy struct {
	b        *bootstrapv3.Bootstrap
	hcm      *hcmv3.HttpConnectionManager
	filters  []string
	mutation *headermutationv3.HeaderMutation
	jwt      *jwtauthnv3.JwtAuthentication
	authz    *extauthzv3.ExtAuthz
	rl       *ratelimitv3.RateLimit
	als      *grpcalsv3.HttpGrpcAccessLogConfig
	vhost    *routev3.VirtualHost
	clusters map[string]*clusterv3.Cluster
}

// bootstraps are the configurations every wiring test runs on.
var bootstraps = []struct {
	name string
	data []byte
}{{"envoy.yaml", FrontProxy}, {"sidecar.yaml", Sidecar}}

// forEach runs f on each bootstrap in bootstraps as a subtest.
func forEach(t *testing.T, f func(t *testing.T, fp *frontProxy)) {
	for _, b := range bootstraps {
		t.Run(b.name, func(t *testing.T) { f(t, load(t, b.data)) })
	}
}

func load(t *testing.T, data []byte) *frontProxy {
	t.Helper()
	b, err := ParseBootstrap(data)
	if err != nil {
		t.Fatal(err)
	}
	fp := &frontProxy{b: b, clusters: map[string]*clusterv3.Cluster{}}
	for _, c := range b.GetStaticResources().GetClusters() {
		fp.clusters[c.GetName()] = c
	}
	l := listener(t, b, "ingress_http")
	if n := len(l.GetFilterChains()); n != 1 {
		t.Fatalf("ingress_http has %d filter chains, want 1", n)
	}
	fp.hcm = unpack[*hcmv3.HttpConnectionManager](t, l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig())
	for _, f := range fp.hcm.GetHttpFilters() {
		fp.filters = append(fp.filters, f.GetName())
		switch f.GetName() {
		case "envoy.filters.http.header_mutation":
			fp.mutation = unpack[*headermutationv3.HeaderMutation](t, f.GetTypedConfig())
		case "envoy.filters.http.jwt_authn":
			fp.jwt = unpack[*jwtauthnv3.JwtAuthentication](t, f.GetTypedConfig())
		case "envoy.filters.http.ext_authz":
			fp.authz = unpack[*extauthzv3.ExtAuthz](t, f.GetTypedConfig())
		case "envoy.filters.http.ratelimit":
			fp.rl = unpack[*ratelimitv3.RateLimit](t, f.GetTypedConfig())
		}
	}
	for _, al := range fp.hcm.GetAccessLog() {
		if al.GetName() == "envoy.access_loggers.http_grpc" {
			fp.als = unpack[*grpcalsv3.HttpGrpcAccessLogConfig](t, al.GetTypedConfig())
		}
	}
	if vh := fp.hcm.GetRouteConfig().GetVirtualHosts(); len(vh) == 1 {
		fp.vhost = vh[0]
	} else {
		t.Fatalf("ingress_http has %d virtual hosts, want 1", len(vh))
	}
	return fp
}

func listener(t *testing.T, b *bootstrapv3.Bootstrap, name string) *listenerv3.Listener {
	t.Helper()
	for _, l := range b.GetStaticResources().GetListeners() {
		if l.GetName() == name {
			return l
		}
	}
	t.Fatalf("no listener %q", name)
	return nil
}

func unpack[M proto.Message](t *testing.T, a *anypb.Any) M {
	t.Helper()
	m, err := a.UnmarshalNew()
	if err != nil {
		t.Fatalf("unpacking %s: %v", a.GetTypeUrl(), err)
	}
	typed, ok := m.(M)
	if !ok {
		t.Fatalf("%s is a %T", a.GetTypeUrl(), m)
	}
	return typed
}

func TestConnectionManager(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		h := fp.hcm
		if !h.GetUseRemoteAddress().GetValue() {
			t.Error("use_remote_address must be true: the client address comes from the connection, not from client headers")
		}
		if got := h.GetXffNumTrustedHops(); got != 1 {
			t.Errorf("xff_num_trusted_hops = %d, want 1 (one TLS-terminating load balancer)", got)
		}
		if !h.GetNormalizePath().GetValue() || !h.GetMergeSlashes() {
			t.Error("normalize_path and merge_slashes must be on so route presets cannot be dodged")
		}
		if got := h.GetPathWithEscapedSlashesAction(); got != hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT {
			t.Errorf("path_with_escaped_slashes_action = %v", got)
		}
		if got := h.GetCommonHttpProtocolOptions().GetHeadersWithUnderscoresAction(); got != corev3.HttpProtocolOptions_REJECT_REQUEST {
			t.Errorf("headers_with_underscores_action = %v, want REJECT_REQUEST", got)
		}
		if h.GetRequestHeadersTimeout().AsDuration() <= 0 || h.GetStreamIdleTimeout().AsDuration() <= 0 {
			t.Error("request_headers_timeout and stream_idle_timeout must be set")
		}
		if kb := h.GetMaxRequestHeadersKb().GetValue(); kb == 0 || kb > 96 {
			t.Errorf("max_request_headers_kb = %d, want 1..96", kb)
		}
		if h.GetPreserveExternalRequestId() {
			t.Error("preserve_external_request_id lets clients choose the audit request id")
		}
		want := []string{
			"envoy.filters.http.header_mutation",
			"envoy.filters.http.jwt_authn",
			"envoy.filters.http.ext_authz",
			"envoy.filters.http.ratelimit",
			"envoy.filters.http.router",
		}
		if diff := cmp.Diff(want, fp.filters); diff != "" {
			t.Errorf("HTTP filter order (-want +got):\n%s", diff)
		}
	})
}

// TestSpoofableHeadersStripped: the headers meshguard sets for the upstream
// and for the rate limit descriptor are removed before any filter reads them.
func TestSpoofableHeadersStripped(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		var removed []string
		for _, m := range fp.mutation.GetMutations().GetRequestMutations() {
			if r := m.GetRemove(); r != "" {
				removed = append(removed, r)
			}
		}
		for _, h := range []string{"x-meshguard-client", "x-meshguard-user", "x-meshguard-role", "x-csp-nonce"} {
			if !slices.Contains(removed, h) {
				t.Errorf("header_mutation does not remove %s", h)
			}
		}
		// The trusted client address (XFF-aware) for meshguard's ip:<addr>
		// key, always overwritten, and sent to ext_authz.
		var ip *corev3.HeaderValueOption
		for _, m := range fp.mutation.GetMutations().GetRequestMutations() {
			if a := m.GetAppend(); strings.EqualFold(a.GetHeader().GetKey(), "x-meshguard-client-ip") {
				ip = a
			}
		}
		if ip.GetHeader().GetValue() != "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%" || ip.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
			t.Errorf("x-meshguard-client-ip mutation = %v, want %%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%% with overwrite", ip)
		}
		if !anyMatch(fp.authz.GetAllowedHeaders().GetPatterns(), "x-meshguard-client-ip") {
			t.Error("ext_authz does not send x-meshguard-client-ip")
		}
	})
}

func TestJWTMetadataMatchesExtauthz(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		id := extauthz.DefaultIdentityConfig().JWTMetadata
		if id.Namespace != "envoy.filters.http.jwt_authn" {
			t.Fatalf("extauthz reads JWT metadata from %q", id.Namespace)
		}
		if len(fp.jwt.GetProviders()) == 0 {
			t.Fatal("jwt_authn has no provider")
		}
		for name, p := range fp.jwt.GetProviders() {
			if p.GetPayloadInMetadata() != id.Key {
				t.Errorf("provider %s: payload_in_metadata = %q, extauthz reads key %q", name, p.GetPayloadInMetadata(), id.Key)
			}
			if c := p.GetRemoteJwks().GetHttpUri().GetCluster(); c != "" && fp.clusters[c] == nil {
				t.Errorf("provider %s: JWKS cluster %q does not exist", name, c)
			}
		}
		if !slices.Contains(fp.authz.GetMetadataContextNamespaces(), id.Namespace) {
			t.Errorf("ext_authz metadata_context_namespaces = %v, missing %s", fp.authz.GetMetadataContextNamespaces(), id.Namespace)
		}
	})
}

func TestExtAuthz(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		a := fp.authz
		// The gRPC listener (:8081): the rate limit listener serves
		// ShouldRateLimit alone and would answer Check with UNIMPLEMENTED.
		if got := a.GetGrpcService().GetEnvoyGrpc().GetClusterName(); got != "meshguard" {
			t.Errorf("ext_authz cluster = %q, want meshguard", got)
		} else if port := clusterPort(fp.clusters[got]); port != 8081 {
			t.Errorf("ext_authz cluster %s reaches port %d, want 8081 (listen.grpc)", got, port)
		}
		if d := a.GetGrpcService().GetTimeout().AsDuration(); d <= 0 || d > 1e9 {
			t.Errorf("ext_authz timeout = %v, want (0, 1s]", d)
		}
		if a.GetFailureModeAllow() {
			t.Error("failure_mode_allow must be false: CORS and CSP fail closed")
		}
		if a.GetIncludePeerCertificate() {
			t.Error("include_peer_certificate sends every client certificate to meshguard for nothing")
		}
		if a.GetTransportApiVersion() != corev3.ApiVersion_V3 {
			t.Errorf("transport_api_version = %v", a.GetTransportApiVersion())
		}
		if rp := a.GetGrpcService().GetRetryPolicy(); rp.GetNumRetries().GetValue() == 0 || !strings.Contains(rp.GetRetryOn(), "connect-failure") {
			t.Errorf("ext_authz retry_policy = %v: a Check should move to another meshguard when a connection fails", rp)
		}
		if !a.GetValidateMutations() {
			t.Error("validate_mutations should be on")
		}
		allowed := a.GetAllowedHeaders().GetPatterns()
		for _, h := range []string{"origin", "access-control-request-method", "access-control-request-headers", "x-tenant-id", "sec-fetch-site"} {
			if !anyMatch(allowed, h) {
				t.Errorf("ext_authz allowed_headers does not send %s", h)
			}
		}
		for _, h := range []string{"authorization", "cookie", "proxy-authorization", "x-meshguard-client"} {
			if anyMatch(allowed, h) {
				t.Errorf("ext_authz allowed_headers sends %s to meshguard", h)
			}
		}
		tenant := extauthz.DefaultCORSConfig().TenantHeader
		if tenant != "" && !anyMatch(allowed, strings.ToLower(tenant)) {
			t.Errorf("extauthz's tenant header %q is not sent", tenant)
		}
	})
}

// anyMatch evaluates the exact/prefix string matchers the config uses.
func anyMatch(ms []*matcherv3.StringMatcher, s string) bool {
	for _, m := range ms {
		switch {
		case m.GetExact() != "" && m.GetExact() == s,
			m.GetPrefix() != "" && strings.HasPrefix(s, m.GetPrefix()):
			return true
		}
	}
	return false
}

func TestRateLimitFilter(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		r := fp.rl
		if r.GetDomain() != "api" {
			t.Errorf("domain = %q, want api (the domain of meshguard's presets)", r.GetDomain())
		}
		// meshguard's rate limit listener (listen.ratelimit, :8082), which
		// keeps rate limit calls apart from ext_authz and access-log traffic.
		if got := r.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName(); got != "meshguard_ratelimit" {
			t.Errorf("rate limit service cluster = %q, want meshguard_ratelimit (meshguard's rate limit listener)", got)
		} else if port := clusterPort(fp.clusters[got]); port != 8082 {
			t.Errorf("rate limit service cluster %s reaches port %d, want 8082 (listen.ratelimit)", got, port)
		}
		if r.GetRateLimitService().GetTransportApiVersion() != corev3.ApiVersion_V3 {
			t.Error("rate limit service must use the v3 API")
		}
		// A retry after meshguard saw the request would count the hit twice.
		if rp := r.GetRateLimitService().GetGrpcService().GetRetryPolicy(); rp != nil {
			for _, on := range strings.Split(rp.GetRetryOn(), ",") {
				if on != "connect-failure" && on != "refused-stream" {
					t.Errorf("rate limit retry_on %q may retry a request meshguard already counted", on)
				}
			}
		}
		if r.GetFailureModeDeny() {
			t.Error("failure_mode_deny must be false: meshguard follows ratelimit.failure_mode itself")
		}
		if r.GetEnableXRatelimitHeaders() != ratelimitv3.RateLimit_DRAFT_VERSION_03 {
			t.Errorf("enable_x_ratelimit_headers = %v", r.GetEnableXRatelimitHeaders())
		}
		if !r.GetRateLimitedAsResourceExhausted() {
			t.Error("rate_limited_as_resource_exhausted should be on so gRPC clients see RESOURCE_EXHAUSTED")
		}
		if d := r.GetTimeout().AsDuration(); d <= 0 || d > 5e8 {
			t.Errorf("timeout = %v, want (0, 500ms]", d)
		}
	})
}

// route finds the route Envoy would pick for method and path: the first whose
// path or prefix matches (the config uses no other matchers).
func route(t *testing.T, vh *routev3.VirtualHost, path string) *routev3.Route {
	t.Helper()
	for _, r := range vh.GetRoutes() {
		m := r.GetMatch()
		if len(m.GetHeaders()) > 0 || len(m.GetQueryParameters()) > 0 {
			t.Fatalf("route %s uses matchers this test cannot evaluate", r.GetName())
		}
		switch p := m.GetPathSpecifier().(type) {
		case *routev3.RouteMatch_Path:
			if p.Path == path {
				return r
			}
		case *routev3.RouteMatch_Prefix:
			if strings.HasPrefix(path, p.Prefix) {
				return r
			}
		default:
			t.Fatalf("route %s: unexpected path matcher %T", r.GetName(), p)
		}
	}
	return nil
}

// descriptor reads a rate_limits entry as (preset, client header) if it has
// exactly the shape meshguard's preset domain expects.
func descriptor(rl *routev3.RateLimit) (preset, clientHeader string, ok bool) {
	a := rl.GetActions()
	if len(a) != 2 {
		return "", "", false
	}
	g, h := a[0].GetGenericKey(), a[1].GetRequestHeaders()
	if g == nil || h == nil || g.GetDescriptorKey() != "preset" || h.GetDescriptorKey() != "client" || h.GetSkipIfAbsent() {
		return "", "", false
	}
	return g.GetDescriptorValue(), h.GetHeaderName(), true
}

func TestRoutesAndPresets(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		tests := []struct {
			path, cluster, preset string
		}{
			{"/api/auth/login", "app", "auth"},
			{"/api/auth/register", "app", "auth"},
			{"/api/upload", "app", "upload"},
			{"/api/uploads/avatar", "app", "upload"},
			{"/api/ai/chat", "app", "ai"},
			{"/api/users/42", "app", "standard"},
			{"/api/admin/users", "app", "standard"},
			{"/", "app", "relaxed"},
			{"/assets/app.js", "app", "relaxed"},
			{extauthz.DefaultCSPConfig().ReportURI, "meshguard_http", "relaxed"},
			{"/v1/audit/logs", "", ""}, // never exposed at the edge
		}
		for _, tc := range tests {
			t.Run(tc.path, func(t *testing.T) {
				r := route(t, fp.vhost, tc.path)
				if r == nil {
					t.Fatal("no route")
				}
				if tc.cluster == "" {
					if r.GetDirectResponse().GetStatus() != 404 {
						t.Errorf("route %s forwards %s", r.GetName(), tc.path)
					}
					return
				}
				if got := r.GetRoute().GetCluster(); got != tc.cluster {
					t.Errorf("route %s goes to %q, want %q", r.GetName(), got, tc.cluster)
				}
				rls := r.GetRoute().GetRateLimits()
				if len(rls) != 1 {
					t.Fatalf("route %s has %d rate_limits, want 1", r.GetName(), len(rls))
				}
				preset, hdr, ok := descriptor(rls[0])
				if !ok {
					t.Fatalf("route %s: rate limit actions are not [generic_key preset, request_headers client]: %v", r.GetName(), rls[0])
				}
				if preset != tc.preset || hdr != "x-meshguard-client" {
					t.Errorf("route %s: descriptor (preset=%s, client from %s), want (preset=%s, client from x-meshguard-client)", r.GetName(), preset, hdr, tc.preset)
				}
			})
		}
		// Every route that forwards carries a preset that meshguard's "api"
		// domain has a rule for, and the client key.
		presets := presetRules(t)
		for _, r := range fp.vhost.GetRoutes() {
			if r.GetRoute() == nil {
				continue
			}
			for _, rl := range r.GetRoute().GetRateLimits() {
				preset, hdr, ok := descriptor(rl)
				if !ok || !slices.Contains(presets, preset) || hdr != "x-meshguard-client" {
					t.Errorf("route %s: rate limit %v is not a known preset keyed by x-meshguard-client", r.GetName(), rl)
				}
			}
			if len(r.GetRoute().GetRateLimits()) == 0 {
				t.Errorf("route %s forwards without a rate limit", r.GetName())
			}
		}
	})
}

// TestSecurityHeaders: every response gets the OWASP set, each overwriting an
// upstream copy, and exactly the routes that serve no HTML get a stricter CSP.
func TestSecurityHeaders(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		rc := fp.hcm.GetRouteConfig()
		if !rc.GetMostSpecificHeaderMutationsWins() {
			t.Error("most_specific_header_mutations_wins must be true so a route's CSP replaces the virtual host's")
		}
		for _, h := range []string{"server", "x-powered-by"} {
			if !slices.Contains(rc.GetResponseHeadersToRemove(), h) {
				t.Errorf("response header %s is not removed", h)
			}
		}
		got := map[string]string{}
		for _, o := range fp.vhost.GetResponseHeadersToAdd() {
			if o.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
				t.Errorf("%s: append_action = %v, want OVERWRITE_IF_EXISTS_OR_ADD (the default appends next to an upstream copy)", o.GetHeader().GetKey(), o.GetAppendAction())
			}
			got[strings.ToLower(o.GetHeader().GetKey())] = o.GetHeader().GetValue()
		}
		want := map[string]func(string) bool{
			"strict-transport-security":  func(v string) bool { return strings.Contains(v, "max-age=63072000") },
			"x-content-type-options":     func(v string) bool { return v == "nosniff" },
			"referrer-policy":            func(v string) bool { return v != "" && v != "unsafe-url" },
			"permissions-policy":         func(v string) bool { return strings.Contains(v, "camera=()") },
			"x-frame-options":            func(v string) bool { return v == "DENY" },
			"cross-origin-opener-policy": func(v string) bool { return v == "same-origin" },
			"content-security-policy": func(v string) bool {
				return strings.Contains(v, "frame-ancestors 'none'") && strings.Contains(v, "object-src 'none'") &&
					strings.Contains(v, "report-uri "+extauthz.DefaultCSPConfig().ReportURI) && !strings.Contains(v, "unsafe-")
			},
		}
		for name, ok := range want {
			if v, present := got[name]; !present || !ok(v) {
				t.Errorf("virtual host %s = %q", name, v)
			}
		}
		for _, r := range fp.vhost.GetRoutes() {
			for _, o := range r.GetResponseHeadersToAdd() {
				if o.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
					t.Errorf("route %s %s: append_action = %v", r.GetName(), o.GetHeader().GetKey(), o.GetAppendAction())
				}
			}
		}
		// API routes answer JSON: a CSP that allows nothing.
		for _, p := range []string{"/api/users", "/api/auth/login", "/api/ai/chat", "/api/upload"} {
			r := route(t, fp.vhost, p)
			if csp := headerValue(r.GetResponseHeadersToAdd(), "content-security-policy"); !strings.HasPrefix(csp, "default-src 'none'") {
				t.Errorf("route %s CSP = %q, want default-src 'none'", r.GetName(), csp)
			}
		}
	})
}

// TestRoutePolicy: context_extensions use only the keys and values extauthz
// understands (an unknown value is a 500 there, an unknown key is ignored,
// so a misspelled key would silently do nothing), API routes turn the nonce
// off, and the admin API requires the admin role.
func TestRoutePolicy(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		values := map[string][]string{"cors": {"enforce", "report", "skip"}, "csp": {"nonce", "off"}}
		policy := map[string]map[string]string{}
		for _, r := range fp.vhost.GetRoutes() {
			a := r.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]
			if a == nil {
				continue
			}
			pr := unpack[*extauthzv3.ExtAuthzPerRoute](t, a)
			if pr.GetDisabled() {
				t.Errorf("route %s disables ext_authz: its requests would skip CORS and keep a client-chosen x-meshguard-client", r.GetName())
			}
			ext := pr.GetCheckSettings().GetContextExtensions()
			for k, v := range ext {
				switch allowed, known := values[k]; {
				case known && !slices.Contains(allowed, v):
					t.Errorf("route %s: context_extensions %s=%q, extauthz accepts %v", r.GetName(), k, v, allowed)
				case !known && k != "require_role" && k != "tenant":
					t.Errorf("route %s: context_extensions key %q is not one extauthz reads", r.GetName(), k)
				}
			}
			policy[r.GetName()] = ext
		}
		for _, p := range []string{"/api/users", "/api/auth/login", "/api/ai/chat", "/api/upload", "/api/admin/x", "/v1/csp-reports"} {
			if r := route(t, fp.vhost, p); policy[r.GetName()]["csp"] != "off" {
				t.Errorf("route %s (%s) does not turn the CSP nonce off", r.GetName(), p)
			}
		}
		if r := route(t, fp.vhost, "/index.html"); policy[r.GetName()]["csp"] == "off" {
			t.Errorf("route %s serves pages but turns the nonce off", r.GetName())
		}
		if r := route(t, fp.vhost, "/api/admin/users"); policy[r.GetName()]["require_role"] != "admin" {
			t.Errorf("route %s does not require the admin role", r.GetName())
		}
	})
}

func headerValue(opts []*corev3.HeaderValueOption, name string) string {
	for _, o := range opts {
		if strings.EqualFold(o.GetHeader().GetKey(), name) {
			return o.GetHeader().GetValue()
		}
	}
	return ""
}

func TestAccessLog(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		if fp.als == nil {
			t.Fatal("no envoy.access_loggers.http_grpc access log")
		}
		c := fp.als.GetCommonConfig()
		if c.GetLogName() != "meshguard_audit" {
			t.Errorf("log_name = %q, want meshguard_audit", c.GetLogName())
		}
		// The gRPC listener (:8081): ALS is a streaming API, which the rate
		// limit listener does not serve.
		if got := c.GetGrpcService().GetEnvoyGrpc().GetClusterName(); got != "meshguard" {
			t.Errorf("access log cluster = %q, want meshguard", got)
		} else if port := clusterPort(fp.clusters[got]); port != 8081 {
			t.Errorf("access log cluster %s reaches port %d, want 8081 (listen.grpc)", got, port)
		}
		if c.GetTransportApiVersion() != corev3.ApiVersion_V3 {
			t.Error("access log must use the v3 API")
		}
		if n := c.GetBufferSizeBytes().GetValue(); n < 16384 {
			t.Errorf("buffer_size_bytes = %d: below Envoy's default, entries drop sooner during a meshguard restart", n)
		}
		if c.GetGrpcStreamRetryPolicy().GetNumRetries().GetValue() == 0 {
			t.Error("grpc_stream_retry_policy should retry stream setup")
		}
		for _, h := range []string{"origin", "user-agent", "x-request-id", "x-tenant-id"} {
			if !slices.Contains(fp.als.GetAdditionalRequestHeadersToLog(), h) {
				t.Errorf("additional_request_headers_to_log misses %s", h)
			}
		}
	})
}

func TestClusters(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		// meshguard's two gRPC listeners: listen.grpc (ext_authz, ALS) and
		// listen.ratelimit (ShouldRateLimit and grpc.health.v1 only). The
		// health check names a service the listener answers SERVING for:
		// "" (the whole server) or, on the rate limit listener, the rate
		// limit service itself.
		rlsName := rlsv3.RateLimitService_ServiceDesc.ServiceName
		for _, want := range []struct {
			name   string
			port   uint32
			health []string
		}{
			{"meshguard", 8081, []string{""}},
			{"meshguard_ratelimit", 8082, []string{"", rlsName}},
		} {
			mg := fp.clusters[want.name]
			if mg == nil {
				t.Errorf("no %s cluster", want.name)
				continue
			}
			if !explicitHTTP2(t, mg) {
				t.Errorf("%s cluster must speak HTTP/2 (gRPC)", want.name)
			}
			if port := clusterPort(mg); port != want.port {
				t.Errorf("%s port = %d, want %d", want.name, port, want.port)
			}
			if len(mg.GetHealthChecks()) == 0 || mg.GetHealthChecks()[0].GetGrpcHealthCheck() == nil {
				t.Errorf("%s cluster needs a gRPC health check (grpc.health.v1)", want.name)
			} else if svc := mg.GetHealthChecks()[0].GetGrpcHealthCheck().GetServiceName(); !slices.Contains(want.health, svc) {
				t.Errorf("%s health check asks for service %q, want one of %q", want.name, svc, want.health)
			}
			if !mg.GetCommonLbConfig().GetIgnoreNewHostsUntilFirstHc() {
				t.Errorf("%s cluster must not send calls to a new pod before its first health check", want.name)
			}
			if len(mg.GetCircuitBreakers().GetThresholds()) == 0 || mg.GetOutlierDetection() == nil {
				t.Errorf("%s cluster needs circuit breakers and outlier detection", want.name)
			}
			switch addr := clusterAddress(mg); {
			case addr == "127.0.0.1":
				if mg.GetType() != clusterv3.Cluster_STATIC {
					t.Errorf("%s on loopback: cluster type = %v, want STATIC", want.name, mg.GetType())
				}
			case mg.GetClusterType().GetName() != "envoy.cluster.dns":
				t.Errorf("%s cluster type = %v, want the envoy.cluster.dns factory (the name Envoy registers)", want.name, mg.GetClusterType())
			default:
				d := unpack[*dnsv3.DnsCluster](t, mg.GetClusterType().GetTypedConfig())
				if d.GetAllAddressesInSingleEndpoint() || d.GetDnsRefreshRate().AsDuration() > 10e9 {
					t.Errorf("%s DNS cluster %v: want one host per address (strict DNS) refreshed at least every 10s", want.name, d)
				}
			}
		}
		// The rate limit cluster is the meshguard cluster on the other port,
		// same host, protocol options, timeouts, balancing, health checking,
		// outlier detection and circuit breakers.
		if mg, rl := fp.clusters["meshguard"], fp.clusters["meshguard_ratelimit"]; mg != nil && rl != nil {
			n := proto.Clone(rl).(*clusterv3.Cluster)
			n.Name = mg.GetName()
			if la := n.GetLoadAssignment(); la != nil {
				la.ClusterName = mg.GetLoadAssignment().GetClusterName()
			}
			if sa := clusterSocket(n); sa != nil {
				sa.PortSpecifier = &corev3.SocketAddress_PortValue{PortValue: clusterPort(mg)}
			}
			if hc := n.GetHealthChecks(); len(hc) > 0 && hc[0].GetGrpcHealthCheck() != nil && len(mg.GetHealthChecks()) > 0 && mg.GetHealthChecks()[0].GetGrpcHealthCheck() != nil {
				hc[0].GetGrpcHealthCheck().ServiceName = mg.GetHealthChecks()[0].GetGrpcHealthCheck().GetServiceName()
			}
			if diff := cmp.Diff(mg, n, protocmp.Transform()); diff != "" {
				t.Errorf("meshguard_ratelimit differs from meshguard beyond name, port and health check service (-meshguard +meshguard_ratelimit):\n%s", diff)
			}
		}
		h := fp.clusters["meshguard_http"]
		if h == nil || clusterPort(h) != 8080 {
			t.Error("meshguard_http must reach meshguard's HTTP listener on 8080")
		}
		// /healthz, not /readyz: /readyz is 503 while PostgreSQL or Redis is
		// down, and meshguard still takes CSP reports then (they spool).
		if h != nil && (len(h.GetHealthChecks()) == 0 || h.GetHealthChecks()[0].GetHttpHealthCheck().GetPath() != "/healthz") {
			t.Error("meshguard_http should be health checked on /healthz")
		}

		// Every cluster a route, a gRPC service or the JWKS fetch names exists.
		var refs []string
		for _, l := range fp.b.GetStaticResources().GetListeners() {
			hcm := unpack[*hcmv3.HttpConnectionManager](t, l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig())
			for _, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
				for _, r := range vh.GetRoutes() {
					if c := r.GetRoute().GetCluster(); c != "" {
						refs = append(refs, c)
					}
				}
			}
		}
		refs = append(refs,
			fp.authz.GetGrpcService().GetEnvoyGrpc().GetClusterName(),
			fp.rl.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName(),
			fp.als.GetCommonConfig().GetGrpcService().GetEnvoyGrpc().GetClusterName(),
		)
		for _, r := range refs {
			if fp.clusters[r] == nil {
				t.Errorf("cluster %q is referenced but not defined", r)
			}
		}
	})
}

// TestSidecarMatchesFrontProxy: sidecar.yaml is envoy.yaml with only the
// topology changed (node name, listener port, loopback STATIC clusters), so
// a policy change made in one file and not the other fails here.
func TestSidecarMatchesFrontProxy(t *testing.T) {
	front, side := load(t, FrontProxy).b, load(t, Sidecar).b
	side.Node = proto.Clone(front.GetNode()).(*corev3.Node)
	for _, l := range side.GetStaticResources().GetListeners() {
		if l.GetName() == "ingress_http" {
			if got := l.GetAddress().GetSocketAddress().GetPortValue(); got != 8000 {
				t.Errorf("sidecar listens on %d, want 8000", got)
			}
			l.GetAddress().GetSocketAddress().PortSpecifier = &corev3.SocketAddress_PortValue{PortValue: 10000}
		}
	}
	frontClusters := map[string]*clusterv3.Cluster{}
	for _, c := range front.GetStaticResources().GetClusters() {
		frontClusters[c.GetName()] = c
	}
	for i, c := range side.GetStaticResources().GetClusters() {
		switch c.GetName() {
		case "meshguard", "meshguard_ratelimit", "meshguard_http", "app":
		default:
			continue
		}
		sa := c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
		if c.GetType() != clusterv3.Cluster_STATIC || sa.GetAddress() != "127.0.0.1" {
			t.Errorf("sidecar cluster %s: %v %s, want STATIC on 127.0.0.1", c.GetName(), c.GetType(), sa.GetAddress())
		}
		f := frontClusters[c.GetName()]
		fa := f.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
		if sa.GetPortValue() != fa.GetPortValue() {
			t.Errorf("sidecar cluster %s port %d, front proxy %d", c.GetName(), sa.GetPortValue(), fa.GetPortValue())
		}
		// Take the front proxy's DNS settings; everything else must already match.
		n := proto.Clone(c).(*clusterv3.Cluster)
		n.ClusterDiscoveryType = f.GetClusterDiscoveryType()
		n.DnsLookupFamily = f.GetDnsLookupFamily()
		n.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().Address = fa.GetAddress()
		side.GetStaticResources().GetClusters()[i] = n
	}
	if diff := cmp.Diff(front, side, protocmp.Transform()); diff != "" {
		t.Errorf("sidecar.yaml differs from envoy.yaml beyond topology (-front +sidecar):\n%s", diff)
	}
}

// clusterSocket is the socket address of c's first endpoint (every cluster
// here has one); nil for a nil cluster or one without endpoints.
func clusterSocket(c *clusterv3.Cluster) *corev3.SocketAddress {
	eps := c.GetLoadAssignment().GetEndpoints()
	if len(eps) == 0 || len(eps[0].GetLbEndpoints()) == 0 {
		return nil
	}
	return eps[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
}

func clusterAddress(c *clusterv3.Cluster) string { return clusterSocket(c).GetAddress() }

func clusterPort(c *clusterv3.Cluster) uint32 { return clusterSocket(c).GetPortValue() }

func explicitHTTP2(t *testing.T, c *clusterv3.Cluster) bool {
	t.Helper()
	a := c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
	if a == nil {
		return false
	}
	o := unpack[*upstreamhttpv3.HttpProtocolOptions](t, a)
	return o.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil
}

// TestAdminNotExposed: Envoy's admin API (which can stop Envoy) listens on
// loopback; only /ready and /stats/prometheus are proxied to the pod address.
func TestAdminNotExposed(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		if a := fp.b.GetAdmin().GetAddress().GetSocketAddress().GetAddress(); a != "127.0.0.1" {
			t.Errorf("admin listens on %q", a)
		}
		hcm := unpack[*hcmv3.HttpConnectionManager](t, listener(t, fp.b, "envoy_admin").GetFilterChains()[0].GetFilters()[0].GetTypedConfig())
		vh := hcm.GetRouteConfig().GetVirtualHosts()[0]
		for path, wantForward := range map[string]bool{"/ready": true, "/stats/prometheus": true, "/quitquitquit": false, "/config_dump": false, "/": false} {
			r := route(t, vh, path)
			if forwards := r != nil && r.GetRoute() != nil; forwards != wantForward {
				t.Errorf("%s forwarded to admin = %v, want %v", path, forwards, wantForward)
			}
		}
	})
}

func mustRead(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
