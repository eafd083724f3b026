package envoy

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	yamlv3 "go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

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
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/proxy_protocol/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	earlymutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	xffv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/original_ip_detection/xff/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/meshguard/meshguard/extauthz"
	"github.com/meshguard/meshguard/ratelimitsvc"
)

// domainRules returns the (preset, descriptor key) pairs that have a rule
// in ratelimitsvc's default "api" domain: (preset=<name>, <key>) limited by
// that preset.
func domainRules(t *testing.T) map[[2]string]bool {
	t.Helper()
	out := map[[2]string]bool{}
	for _, d := range ratelimitsvc.DefaultConfig().Domains {
		if d.Domain != "api" {
			continue
		}
		for _, p := range d.Descriptors {
			if p.Key != "preset" {
				continue
			}
			for _, c := range p.Descriptors {
				if c.RateLimit != nil && c.Value == "" && len(c.Descriptors) == 0 {
					out[[2]string{p.Value, c.Key}] = true
				}
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
		// Envoy refuses original IP detection extensions beside either.
		if h.GetUseRemoteAddress() != nil || h.GetXffNumTrustedHops() != 0 {
			t.Errorf("use_remote_address %v, xff_num_trusted_hops %d: Envoy refuses them beside original_ip_detection_extensions",
				h.GetUseRemoteAddress(), h.GetXffNumTrustedHops())
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

// TestRequestIDs: the connection manager removes a client's x-request-id
// (and x-client-trace-id, traceparent, tracestate: a client would choose
// whether it is traced) with an early header mutation, the only place
// before Envoy decides whether to generate an id: without
// use_remote_address no request is an edge request, and Envoy then keeps
// any id a request carries. The header_mutation filter runs after that
// decision, so removing the id there would leave the request with none.
// TestClientRequestIDDiscarded plays a request through it.
func TestRequestIDs(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		h := fp.hcm
		if g := h.GetGenerateRequestId(); g != nil && !g.GetValue() {
			t.Error("generate_request_id is off: requests without an id would be logged without one")
		}
		removed := map[string]bool{}
		for _, ext := range h.GetEarlyHeaderMutationExtensions() {
			if ext.GetName() != "envoy.http.early_header_mutation.header_mutation" {
				t.Errorf("early header mutation extension %q", ext.GetName())
				continue
			}
			for _, m := range unpack[*earlymutationv3.HeaderMutation](t, ext.GetTypedConfig()).GetMutations() {
				if k := m.GetRemove(); k != "" {
					removed[strings.ToLower(k)] = true
				}
				if k := strings.ToLower(m.GetAppend().GetHeader().GetKey()); k == "x-request-id" || k == "x-client-trace-id" {
					t.Errorf("an early header mutation sets %s", k)
				}
			}
		}
		for _, k := range []string{"x-request-id", "x-client-trace-id", "traceparent", "tracestate"} {
			if !removed[k] {
				t.Errorf("no early header mutation removes %s: Envoy keeps a client's own (no request is an edge request here, and the tracer follows a client's trace context)", k)
			}
		}
		for _, m := range fp.mutation.GetMutations().GetRequestMutations() {
			if strings.EqualFold(m.GetRemove(), "x-request-id") {
				t.Error("the header_mutation filter removes x-request-id after Envoy generated it")
			}
		}
		if !slices.Contains(fp.als.GetAdditionalRequestHeadersToLog(), "x-request-id") {
			t.Error("the access log does not record x-request-id")
		}
	})
}

// TestClientAddress: only the load balancer's ranges may supply
// X-Forwarded-For (the xff original IP detection extension with
// xff_trusted_cidrs); a peer anywhere else is the client, whatever it sends.
func TestClientAddress(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		x := xffConfig(t, fp)
		if x.GetXffNumTrustedHops() != 0 || len(x.GetXffTrustedCidrs().GetCidrs()) == 0 {
			t.Fatalf("xff extension %v: want xff_trusted_cidrs, not a hop count that trusts any peer", x)
		}
		if x.GetSkipXffAppend() == nil || x.GetSkipXffAppend().GetValue() {
			t.Error("skip_xff_append must be false: the app should see the load balancer in X-Forwarded-For (the extension's default skips it)")
		}
		// Internet addresses (documentation ranges and a few real ones)
		// are never trusted to supply X-Forwarded-For.
		for _, a := range []string{"203.0.113.7", "198.51.100.1", "192.0.2.1", "8.8.8.8", "1.1.1.1", "2001:db8::1", "2606:4700::1111"} {
			if trustedPeer(t, x, netip.MustParseAddr(a)) {
				t.Errorf("%s may supply X-Forwarded-For", a)
			}
		}
	})
}

// xffConfig is the connection manager's one original IP detection
// extension, the xff one.
func xffConfig(t *testing.T, fp *frontProxy) *xffv3.XffConfig {
	t.Helper()
	exts := fp.hcm.GetOriginalIpDetectionExtensions()
	if len(exts) != 1 || exts[0].GetName() != "envoy.http.original_ip_detection.xff" {
		t.Fatalf("original_ip_detection_extensions = %v, want the xff extension alone", exts)
	}
	return unpack[*xffv3.XffConfig](t, exts[0].GetTypedConfig())
}

// trustedPeer reports whether a is in the extension's xff_trusted_cidrs.
func trustedPeer(t *testing.T, x *xffv3.XffConfig, a netip.Addr) bool {
	t.Helper()
	for _, c := range x.GetXffTrustedCidrs().GetCidrs() {
		p, err := netip.ParsePrefix(fmt.Sprintf("%s/%d", c.GetAddressPrefix(), c.GetPrefixLen().GetValue()))
		if err != nil {
			t.Fatalf("xff_trusted_cidrs entry %v: %v", c, err)
		}
		if p.Contains(a.Unmap()) {
			return true
		}
	}
	return false
}

// trustedHeaders are the headers a meshguard configuration may tell it to
// believe, with what Envoy must do to each: the client address header is
// overwritten, identity headers removed. They come from meshguard's
// defaults, the Kubernetes config and the README's example for
// identity.trusted_user_header / trusted_role_header.
func trustedHeaders(t *testing.T) map[string]string {
	t.Helper()
	ids := []extauthz.IdentityConfig{extauthz.DefaultIdentityConfig()}
	readme := regexp.MustCompile(`(?m)^identity: \{trusted_user_header: .*\}$`).Find(mustRead(t, "../README.md"))
	if readme == nil {
		t.Fatal("README.md shows no identity: {trusted_user_header: …} example")
	}
	for _, doc := range [][]byte{readme, mustRead(t, "../k8s/base/meshguard.yaml")} {
		var f struct {
			Identity extauthz.IdentityConfig `yaml:"identity"`
		}
		f.Identity = extauthz.DefaultIdentityConfig()
		if err := yamlv3.Unmarshal(doc, &f); err != nil { // meshguard's decoder, yaml tags
			t.Fatal(err)
		}
		ids = append(ids, f.Identity)
	}
	out := map[string]string{}
	for _, id := range ids {
		for h, what := range map[string]string{id.ClientIPHeader: "overwrite", id.TrustedUserHeader: "remove", id.TrustedRoleHeader: "remove"} {
			if h != "" {
				out[strings.ToLower(h)] = what
			}
		}
	}
	return out
}

// TestTrustedHeadersStripped: every header meshguard sets is removed before
// any filter reads it, every header it may be told to believe is removed
// (identity) or overwritten with what Envoy derived (client address), and
// ext_authz receives the ones meshguard reads.
func TestTrustedHeadersStripped(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		removed := map[string]bool{}
		overwritten := map[string]string{}
		for _, m := range fp.mutation.GetMutations().GetRequestMutations() {
			if r := m.GetRemove(); r != "" {
				removed[strings.ToLower(r)] = true
			}
			if a := m.GetAppend(); a != nil && a.GetAppendAction() == corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
				overwritten[strings.ToLower(a.GetHeader().GetKey())] = a.GetHeader().GetValue()
			}
		}
		for _, h := range extauthz.UpstreamHeaders {
			if !removed[h] {
				t.Errorf("header_mutation does not remove %s, which meshguard sets", h)
			}
		}
		trusted := trustedHeaders(t)
		if len(trusted) < 3 {
			t.Fatalf("trusted headers %v: want at least the client address and the documented user and role headers", trusted)
		}
		for h, what := range trusted {
			switch {
			case what == "remove" && !removed[h]:
				t.Errorf("header_mutation does not remove %s: a client could claim an identity meshguard believes", h)
			case what == "overwrite" && overwritten[h] != "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%":
				t.Errorf("header_mutation sets %s to %q, want %%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%% with overwrite", h, overwritten[h])
			}
			if !anyMatch(fp.authz.GetAllowedHeaders().GetPatterns(), h) {
				t.Errorf("ext_authz does not send %s to meshguard", h)
			}
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
			// jwt_authn lets failed tokens through; meshguard answers their
			// 401 from what it records here.
			if p.GetFailedStatusInMetadata() == "" || p.GetFailedStatusInMetadata() != id.FailureKey {
				t.Errorf("provider %s: failed_status_in_metadata = %q, extauthz reads key %q", name, p.GetFailedStatusInMetadata(), id.FailureKey)
			}
			if c := p.GetRemoteJwks().GetHttpUri().GetCluster(); c != "" && fp.clusters[c] == nil {
				t.Errorf("provider %s: JWKS cluster %q does not exist", name, c)
			}
		}
		// jwt_authn writes the failure key from its only provider when a
		// requirement names none (allow_missing_or_failed).
		if n := len(fp.jwt.GetProviders()); n != 1 {
			t.Errorf("%d providers: with allow_missing_or_failed, jwt_authn records the failure of a token whose issuer it does not know only when there is one", n)
		}
		for _, r := range fp.jwt.GetRules() {
			if r.GetRequires().GetAllowMissingOrFailed() == nil {
				t.Errorf("jwt_authn rule %v: a failed token would get jwt_authn's 401, without CORS headers; want allow_missing_or_failed", r)
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

// route finds the route Envoy would pick for path (without its query): the
// first whose path matcher matches, as Envoy evaluates path, prefix,
// path_separated_prefix (the prefix, then the end or a '/') and safe_regex
// (RE2, the whole path), case-insensitively where case_sensitive is false.
func route(t *testing.T, vh *routev3.VirtualHost, path string) *routev3.Route {
	t.Helper()
	for _, r := range vh.GetRoutes() {
		m := r.GetMatch()
		if len(m.GetHeaders()) > 0 || len(m.GetQueryParameters()) > 0 {
			t.Fatalf("route %s uses matchers this test cannot evaluate", r.GetName())
		}
		p := path
		fold := func(s string) string { return s }
		if cs := m.GetCaseSensitive(); cs != nil && !cs.GetValue() {
			fold = strings.ToLower
		}
		switch ps := m.GetPathSpecifier().(type) {
		case *routev3.RouteMatch_Path:
			if fold(p) == fold(ps.Path) {
				return r
			}
		case *routev3.RouteMatch_Prefix:
			if strings.HasPrefix(fold(p), fold(ps.Prefix)) {
				return r
			}
		case *routev3.RouteMatch_PathSeparatedPrefix:
			if rest, ok := strings.CutPrefix(fold(p), fold(ps.PathSeparatedPrefix)); ok && (rest == "" || rest[0] == '/') {
				return r
			}
		case *routev3.RouteMatch_SafeRegex:
			// safe_regex ignores case_sensitive; flags go in the regex.
			re, err := regexp.Compile("^(?:" + ps.SafeRegex.GetRegex() + ")$")
			if err != nil {
				t.Fatalf("route %s: regex: %v", r.GetName(), err)
			}
			if re.MatchString(p) {
				return r
			}
		default:
			t.Fatalf("route %s: unexpected path matcher %T", r.GetName(), ps)
		}
	}
	return nil
}

// limit is one rate_limits entry of the shape meshguard's preset domain
// expects: (preset=<name>, key) where the key's value comes from a header
// meshguard sets ("client" from header) or from Envoy's masked address.
type limit struct {
	preset string
	key    string // descriptor key: client or masked_remote_address
	from   string // the header the value comes from; "" for masked_remote_address
}

// descriptor reads a rate_limits entry as a limit, if it has that shape.
func descriptor(rl *routev3.RateLimit) (limit, bool) {
	a := rl.GetActions()
	if len(a) != 2 || a[0].GetGenericKey() == nil || a[0].GetGenericKey().GetDescriptorKey() != "preset" {
		return limit{}, false
	}
	l := limit{preset: a[0].GetGenericKey().GetDescriptorValue()}
	switch {
	case a[1].GetRequestHeaders() != nil:
		h := a[1].GetRequestHeaders()
		if h.GetDescriptorKey() != "client" || h.GetSkipIfAbsent() {
			return limit{}, false
		}
		l.key, l.from = "client", h.GetHeaderName()
	case a[1].GetMaskedRemoteAddress() != nil:
		l.key = "masked_remote_address"
	default:
		return limit{}, false
	}
	return l, true
}

func TestRoutesAndPresets(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		client := func(preset string) []limit { return []limit{{preset, "client", "x-meshguard-client"}} }
		login := []limit{{"auth", "client", "x-meshguard-account"}, {"auth_ip", "client", "x-meshguard-ip"}}
		tests := []struct {
			path, route, cluster string
			limits               []limit
		}{
			{"/api/auth/login", "api_auth_login", "app", login},
			{"/api/auth/login/", "api_auth_login", "app", login},
			{"/API/Auth/Login", "api_auth_login", "app", login},
			{"/api/auth/login-sso", "api_auth", "app", client("auth_ip")},
			{"/api/auth/register", "api_auth", "app", client("auth_ip")},
			{"/api/upload", "api_upload", "app", client("upload")},
			{"/api/uploads/avatar", "api_upload", "app", client("upload")},
			{"/api/ai/chat", "api_ai", "app", client("ai")},
			{"/api/users/42", "api", "app", client("standard")},
			{"/api/users/42.js", "api", "app", client("standard")},
			{"/api/admin/users", "api_admin", "app", client("standard")},
			{"/API/Admin/users", "api_admin", "app", client("standard")},
			{"/", "app", "app", client("relaxed")},
			{"/orders/42", "app", "app", client("relaxed")},
			{"/assets/app.3f9a.js", "static", "app", []limit{{"static", "masked_remote_address", ""}}},
			{"/static/media/Logo.PNG", "static", "app", []limit{{"static", "masked_remote_address", ""}}},
			{"/fonts/inter.woff2", "static", "app", []limit{{"static", "masked_remote_address", ""}}},
			{"/js/", "app", "app", client("relaxed")},
			{"/report.json", "app", "app", client("relaxed")},
			{extauthz.DefaultCSPConfig().ReportURI, "csp_reports", "meshguard_http", client("csp_report")},
			{"/v1/audit/logs", "meshguard_internal", "", nil}, // never exposed at the edge
		}
		for _, tc := range tests {
			t.Run(tc.path, func(t *testing.T) {
				r := route(t, fp.vhost, tc.path)
				if r == nil {
					t.Fatal("no route")
				}
				if r.GetName() != tc.route {
					t.Errorf("route %s, want %s", r.GetName(), tc.route)
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
				var got []limit
				for _, rl := range r.GetRoute().GetRateLimits() {
					l, ok := descriptor(rl)
					if !ok {
						t.Fatalf("route %s: rate limit %v is not [generic_key preset, client header or masked_remote_address]", r.GetName(), rl)
					}
					got = append(got, l)
				}
				if diff := cmp.Diff(tc.limits, got, cmp.AllowUnexported(limit{})); diff != "" {
					t.Errorf("route %s rate limits (-want +got):\n%s", r.GetName(), diff)
				}
			})
		}
		// Every route that forwards has a rate limit that meshguard's "api"
		// domain has a rule for; a key from a header comes from one meshguard
		// sets (and header_mutation strips), and only on routes where
		// ext_authz runs to set it; Envoy's masked address uses meshguard's
		// IPv6 prefix.
		rules := domainRules(t)
		id := extauthz.DefaultIdentityConfig()
		for _, r := range fp.vhost.GetRoutes() {
			if r.GetRoute() == nil {
				continue
			}
			if len(r.GetRoute().GetRateLimits()) == 0 {
				t.Errorf("route %s forwards without a rate limit", r.GetName())
			}
			authzOff := false
			if a := r.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]; a != nil {
				authzOff = unpack[*extauthzv3.ExtAuthzPerRoute](t, a).GetDisabled()
			}
			for _, rl := range r.GetRoute().GetRateLimits() {
				l, ok := descriptor(rl)
				switch {
				case !ok || !rules[[2]string{l.preset, l.key}]:
					t.Errorf("route %s: rate limit %v has no rule in the default api domain", r.GetName(), rl)
				case l.from != "" && !slices.Contains(extauthz.UpstreamHeaders, l.from):
					t.Errorf("route %s: rate limit keyed by %s, which meshguard does not set", r.GetName(), l.from)
				case l.from != "" && authzOff:
					t.Errorf("route %s skips ext_authz but keys its limit by %s, which only ext_authz sets (Envoy sends no descriptor)", r.GetName(), l.from)
				case l.key == "masked_remote_address":
					m := rl.GetActions()[1].GetMaskedRemoteAddress()
					if m.GetV4PrefixMaskLen().GetValue() != 32 || int(m.GetV6PrefixMaskLen().GetValue()) != id.IPv6Prefix {
						t.Errorf("route %s: masked_remote_address %v, want /32 and /%d (identity.ipv6_prefix)", r.GetName(), m, id.IPv6Prefix)
					}
				}
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
// off, the admin API requires the admin role, a login route sends meshguard
// the body it reads the account from, and only static assets skip ext_authz.
func TestRoutePolicy(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		values := map[string][]string{"cors": {"enforce", "report", "skip"}, "csp": {"nonce", "off"}}
		field := regexp.MustCompile(`^[!#$%&'*+.^_` + "`" + `|~0-9A-Za-z-]{1,64}$`)
		policy := map[string]map[string]string{}
		for _, r := range fp.vhost.GetRoutes() {
			a := r.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]
			if a == nil {
				policy[r.GetName()] = map[string]string{} // meshguard's defaults
				continue
			}
			pr := unpack[*extauthzv3.ExtAuthzPerRoute](t, a)
			if pr.GetDisabled() {
				checkStaticRoute(t, fp, r)
				continue
			}
			ext := pr.GetCheckSettings().GetContextExtensions()
			for k, v := range ext {
				switch allowed, known := values[k]; {
				case known && !slices.Contains(allowed, v):
					t.Errorf("route %s: context_extensions %s=%q, extauthz accepts %v", r.GetName(), k, v, allowed)
				case k == "account" && !field.MatchString(v):
					t.Errorf("route %s: account field %q is not a field name extauthz accepts", r.GetName(), v)
				case !known && k != "require_role" && k != "tenant" && k != "account":
					t.Errorf("route %s: context_extensions key %q is not one extauthz reads", r.GetName(), k)
				}
			}
			// A login route: Envoy buffers the body for meshguard, whole
			// (a partial body could cut the account off), no larger than
			// meshguard reads, and the route limits per account.
			body := pr.GetCheckSettings().GetWithRequestBody()
			if _, login := ext["account"]; login != (body != nil) {
				t.Errorf("route %s: account %q but with_request_body %v: a login route needs both, other routes neither", r.GetName(), ext["account"], body)
			} else if login {
				if n := body.GetMaxRequestBytes(); n == 0 || n > extauthz.MaxAccountBodyBytes || body.GetAllowPartialMessage() {
					t.Errorf("route %s: with_request_body %v: want max_request_bytes 1..%d and no partial bodies", r.GetName(), body, extauthz.MaxAccountBodyBytes)
				}
				keyed := false
				for _, rl := range r.GetRoute().GetRateLimits() {
					l, _ := descriptor(rl)
					keyed = keyed || l.from == "x-meshguard-account"
				}
				if !keyed {
					t.Errorf("route %s reads the account but limits nothing by x-meshguard-account", r.GetName())
				}
			}
			policy[r.GetName()] = ext
		}
		for _, p := range []string{"/api/users", "/api/auth/login", "/api/auth/register", "/api/ai/chat", "/api/upload", "/api/admin/x", "/v1/csp-reports"} {
			if r := route(t, fp.vhost, p); policy[r.GetName()]["csp"] != "off" {
				t.Errorf("route %s (%s) does not turn the CSP nonce off", r.GetName(), p)
			}
		}
		for _, p := range []string{"/", "/index.html", "/orders/42"} {
			if r := route(t, fp.vhost, p); policy[r.GetName()] == nil || policy[r.GetName()]["csp"] == "off" {
				t.Errorf("route %s serves pages (%s) but skips ext_authz or turns the nonce off", r.GetName(), p)
			}
		}
		if r := route(t, fp.vhost, "/api/admin/users"); policy[r.GetName()]["require_role"] != "admin" {
			t.Errorf("route %s does not require the admin role", r.GetName())
		}
		if r := route(t, fp.vhost, "/api/auth/login"); policy[r.GetName()]["account"] == "" {
			t.Errorf("route %s does not name the login body's account field", r.GetName())
		}
	})
}

// checkStaticRoute: a route that skips ext_authz serves static assets only
// (browsers send no bearer token for them): it never matches a page or an
// API path, and it passes no token on, since none is verified there.
func checkStaticRoute(t *testing.T, fp *frontProxy, r *routev3.Route) {
	t.Helper()
	for _, p := range []string{"/", "/index.html", "/login", "/api/users", "/api/auth/login", "/v1/csp-reports", "/orders/42.html", "/app.json"} {
		if route(t, fp.vhost, p) == r {
			t.Errorf("route %s skips ext_authz but serves %s", r.GetName(), p)
		}
	}
	hm := r.GetTypedPerFilterConfig()["envoy.filters.http.header_mutation"]
	removes := false
	if hm != nil {
		for _, m := range unpack[*headermutationv3.HeaderMutationPerRoute](t, hm).GetMutations().GetRequestMutations() {
			removes = removes || strings.EqualFold(m.GetRemove(), "authorization")
		}
	}
	if !removes {
		t.Errorf("route %s skips ext_authz, which answers failed tokens, but passes Authorization on", r.GetName())
	}
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

// TestPROXYProtocolVariant applies the README's fragments for an L4 load
// balancer (the proxy_protocol listener filter, use_remote_address with no
// trusted X-Forwarded-For) to envoy.yaml and validates the result, so the
// documented variant is one Envoy loads.
func TestPROXYProtocolVariant(t *testing.T) {
	readme := mustRead(t, "README.md")
	fragment := func(name string, m proto.Message) {
		t.Helper()
		f := regexp.MustCompile("(?s)<!-- " + name + " -->\n```yaml\n(.*?)```").FindSubmatch(readme)
		if f == nil {
			t.Fatalf("README.md has no %s block", name)
		}
		js, err := yaml.YAMLToJSON(f[1])
		if err != nil {
			t.Fatal(err)
		}
		if err := protojson.Unmarshal(js, m); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	var lis listenerv3.Listener
	var hcm hcmv3.HttpConnectionManager
	fragment("proxy-protocol-listener", &lis)
	fragment("proxy-protocol-hcm", &hcm)

	fp := load(t, FrontProxy)
	l := listener(t, fp.b, "ingress_http")
	l.ListenerFilters = lis.GetListenerFilters()
	h := proto.Clone(fp.hcm).(*hcmv3.HttpConnectionManager)
	h.OriginalIpDetectionExtensions = nil
	proto.Merge(h, &hcm)
	a, err := anypb.New(h)
	if err != nil {
		t.Fatal(err)
	}
	l.GetFilterChains()[0].GetFilters()[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: a}
	if err := Validate(fp.b); err != nil {
		t.Fatal(err)
	}
	if len(l.GetListenerFilters()) != 1 || l.GetListenerFilters()[0].GetName() != "envoy.filters.listener.proxy_protocol" {
		t.Errorf("listener filters %v, want proxy_protocol", l.GetListenerFilters())
	}
	if !h.GetUseRemoteAddress().GetValue() || h.GetXffNumTrustedHops() != 0 || len(h.GetOriginalIpDetectionExtensions()) != 0 {
		t.Errorf("connection manager: use_remote_address %v, xff_num_trusted_hops %d, %d detection extensions; want the peer and no trusted X-Forwarded-For",
			h.GetUseRemoteAddress(), h.GetXffNumTrustedHops(), len(h.GetOriginalIpDetectionExtensions()))
	}
}
