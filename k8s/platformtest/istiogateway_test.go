package platformtest

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	networkingv1api "istio.io/api/networking/v1"
	networkingv1alpha3api "istio.io/api/networking/v1alpha3"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	headermutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	jwtauthnv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/jwt_authn/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ratelimit/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/meshguard/meshguard/envoy"
)

// Istio is not run here either. The EnvoyFilter is applied, with Istio's
// documented semantics for the operations it uses (INSERT_FIRST,
// INSERT_BEFORE a named filter, MERGE: proto merge, a filter's typed_config
// merged as the message it holds), to an ingress gateway's connection
// manager and routes shaped as Istio generates them: its CUSTOM ext_authz
// filter (envoy.filters.http.ext_authz, calling the provider's outbound
// cluster, every header sent, no metadata) before the router, and one
// route per VirtualService http route, named after it, in the
// VirtualService's order. A patch whose match selects nothing is an
// error here; Istio would skip it silently.

// istioRouteFor maps gateway.yaml's VirtualService routes to envoy.yaml's.
var istioRouteFor = map[string]string{
	"csp-reports": "csp_reports",
	"login":       "api_auth_login",
	"auth":        "api_auth",
	"api":         "api",
	"static":      "static",
	"pages":       "app",
}

// istioGateway is the gateway's configuration before the EnvoyFilter.
func istioGateway(t *testing.T, vs *networkingv1api.VirtualService, authz *extauthzv3.ExtAuthz) (*hcmv3.HttpConnectionManager, *routev3.RouteConfiguration) {
	t.Helper()
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix:       "outbound_0.0.0.0_8080",
		UseRemoteAddress: wrapperspb.Bool(true),
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			RouteConfigName: "http.8080",
			ConfigSource:    &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}, ResourceApiVersion: corev3.ApiVersion_V3},
		}},
		HttpFilters: []*hcmv3.HttpFilter{
			{Name: "envoy.filters.http.ext_authz", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, authz)}},
			{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &routerv3.Router{})}},
		},
	}
	vh := &routev3.VirtualHost{Name: vs.GetHosts()[0] + ":80", Domains: vs.GetHosts()}
	for _, h := range vs.GetHttp() {
		if len(h.GetMatch()) != 1 || len(h.GetRoute()) != 1 {
			t.Fatalf("VirtualService route %s: one match and one destination expected", h.GetName())
		}
		m, u := &routev3.RouteMatch{}, h.GetMatch()[0].GetUri()
		if h.GetMatch()[0].GetIgnoreUriCase() {
			m.CaseSensitive = wrapperspb.Bool(false)
		}
		switch {
		case u.GetExact() != "":
			m.PathSpecifier = &routev3.RouteMatch_Path{Path: u.GetExact()}
		case u.GetPrefix() != "":
			m.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: u.GetPrefix()}
		case u.GetRegex() != "":
			m.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: u.GetRegex()}}
		default:
			t.Fatalf("VirtualService route %s: match %v has no check here", h.GetName(), u)
		}
		d := h.GetRoute()[0].GetDestination()
		vh.Routes = append(vh.Routes, &routev3.Route{Name: h.GetName(), Match: m, Action: &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: fmt.Sprintf("outbound|%d||%s", d.GetPort().GetNumber(), d.GetHost())},
		}}})
	}
	return hcm, &routev3.RouteConfiguration{Name: "http.8080", VirtualHosts: []*routev3.VirtualHost{vh}}
}

// applyEnvoyFilter applies ef's patches to the gateway's connection manager
// and routes.
func applyEnvoyFilter(t *testing.T, ef *networkingv1alpha3api.EnvoyFilter, hcm *hcmv3.HttpConnectionManager, rc *routev3.RouteConfiguration) error {
	t.Helper()
	for i, p := range ef.GetConfigPatches() {
		at := fmt.Sprintf("configPatches[%d] (%v %v)", i, p.GetApplyTo(), p.GetPatch().GetOperation())
		if p.GetMatch().GetContext() != networkingv1alpha3api.EnvoyFilter_GATEWAY {
			return fmt.Errorf("%s: context %v, want GATEWAY", at, p.GetMatch().GetContext())
		}
		js, err := protojson.Marshal(p.GetPatch().GetValue())
		if err != nil {
			return err
		}
		op := p.GetPatch().GetOperation()
		sub := p.GetMatch().GetListener().GetFilterChain().GetFilter().GetSubFilter().GetName()
		switch p.GetApplyTo() {
		case networkingv1alpha3api.EnvoyFilter_NETWORK_FILTER:
			var f listenerv3.Filter
			if err := protojson.Unmarshal(js, &f); err != nil {
				return fmt.Errorf("%s: %w", at, err)
			}
			if op != networkingv1alpha3api.EnvoyFilter_Patch_MERGE || f.GetName() != "envoy.filters.network.http_connection_manager" {
				return fmt.Errorf("%s: only a MERGE into the connection manager has a check here", at)
			}
			var v hcmv3.HttpConnectionManager
			if err := f.GetTypedConfig().UnmarshalTo(&v); err != nil {
				return fmt.Errorf("%s: %w", at, err)
			}
			proto.Merge(hcm, &v)
		case networkingv1alpha3api.EnvoyFilter_HTTP_FILTER:
			var f hcmv3.HttpFilter
			if err := protojson.Unmarshal(js, &f); err != nil {
				return fmt.Errorf("%s: %w", at, err)
			}
			fs := hcm.GetHttpFilters()
			idx := slices.IndexFunc(fs, func(x *hcmv3.HttpFilter) bool { return x.GetName() == sub })
			switch op {
			case networkingv1alpha3api.EnvoyFilter_Patch_INSERT_FIRST:
				hcm.HttpFilters = slices.Insert(fs, 0, &f)
			case networkingv1alpha3api.EnvoyFilter_Patch_INSERT_BEFORE:
				if idx < 0 {
					return fmt.Errorf("%s: no filter %q", at, sub)
				}
				hcm.HttpFilters = slices.Insert(fs, idx, &f)
			case networkingv1alpha3api.EnvoyFilter_Patch_MERGE:
				if idx < 0 {
					return fmt.Errorf("%s: no filter %q", at, sub)
				}
				dst, err := fs[idx].GetTypedConfig().UnmarshalNew()
				if err != nil {
					return err
				}
				src, err := f.GetTypedConfig().UnmarshalNew()
				if err != nil {
					return fmt.Errorf("%s: %w", at, err)
				}
				if dst.ProtoReflect().Descriptor() != src.ProtoReflect().Descriptor() {
					return fmt.Errorf("%s: merges a %T into a %T", at, src, dst)
				}
				proto.Merge(dst, src)
				fs[idx].ConfigType = &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, dst)}
			default:
				return fmt.Errorf("%s: operation has no check here", at)
			}
		case networkingv1alpha3api.EnvoyFilter_VIRTUAL_HOST:
			var v routev3.VirtualHost
			if err := protojson.Unmarshal(js, &v); err != nil {
				return fmt.Errorf("%s: %w", at, err)
			}
			for _, vh := range rc.GetVirtualHosts() {
				proto.Merge(vh, &v)
			}
		case networkingv1alpha3api.EnvoyFilter_HTTP_ROUTE:
			var v routev3.Route
			if err := protojson.Unmarshal(js, &v); err != nil {
				return fmt.Errorf("%s: %w", at, err)
			}
			name := p.GetMatch().GetRouteConfiguration().GetVhost().GetRoute().GetName()
			n := 0
			for _, vh := range rc.GetVirtualHosts() {
				for _, r := range vh.GetRoutes() {
					if r.GetName() == name {
						proto.Merge(r, &v)
						n++
					}
				}
			}
			if n == 0 {
				return fmt.Errorf("%s: no route %q", at, name)
			}
		default:
			return fmt.Errorf("%s: applyTo has no check here", at)
		}
	}
	return nil
}

// TestIstioGateway: the EnvoyFilter applies to the gateway Istio generates
// for gateway.yaml and the CUSTOM provider, the result validates, and the
// gateway then does what envoy.yaml does: client-supplied identity
// headers and request ids removed before anything reads them, the client
// address header first, jwt_authn letting failed tokens through to
// meshguard before ext_authz, ext_authz sending only what meshguard reads
// with the jwt_authn metadata and retrying on another meshguard, the rate
// limit filter before the router, and each route's rate limits and
// meshguard policy as its envoy.yaml counterpart's.
func TestIstioGateway(t *testing.T) {
	files, _ := filepath.Glob("../istio/*.yaml")
	files = slices.DeleteFunc(files, func(f string) bool { return strings.HasSuffix(f, "meshconfig.yaml") })
	objs := istioObjects(t, files...)
	fp := loadFrontProxy(t)
	vs, ok := objs["VirtualService/app"].(*networkingv1api.VirtualService)
	if !ok {
		t.Fatal("no VirtualService app")
	}
	gw, ok := objs["Gateway/meshguard-edge"].(*networkingv1api.Gateway)
	if !ok || !slices.Contains(vs.GetGateways(), "meshguard-edge") || !slices.Equal(gw.GetServers()[0].GetHosts(), vs.GetHosts()) {
		t.Errorf("VirtualService app is not bound to Gateway meshguard-edge's hosts")
	}
	var names []string
	for _, h := range vs.GetHttp() {
		names = append(names, h.GetName())
	}
	if got, want := slices.Sorted(slices.Values(names)), sortedKeys(istioRouteFor); !slices.Equal(got, want) {
		t.Fatalf("VirtualService routes %v, want %v (one per envoy.yaml route kind)", names, want)
	}

	// The CUSTOM provider's filter, as Istio builds it from meshconfig.yaml.
	var g *meshv1alpha1.MeshConfig_ExtensionProvider_EnvoyExternalAuthorizationGrpcProvider
	for _, p := range meshConfig(t).GetExtensionProviders() {
		if p.GetName() == "meshguard-ext-authz" {
			g = p.GetEnvoyExtAuthzGrpc()
		}
	}
	cluster := fmt.Sprintf("outbound|%d||%s", g.GetPort(), g.GetService())
	authz := &extauthzv3.ExtAuthz{
		TransportApiVersion: corev3.ApiVersion_V3,
		Services: &extauthzv3.ExtAuthz_GrpcService{GrpcService: &corev3.GrpcService{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: cluster, Authority: strings.ReplaceAll(cluster, "|", "_.")}},
			Timeout:         durationpb.New(g.GetTimeout().AsDuration()),
		}},
	}
	hcm, rc := istioGateway(t, vs, authz)
	ef, ok := objs["EnvoyFilter/meshguard"].(*networkingv1alpha3api.EnvoyFilter)
	if !ok {
		t.Fatal("no EnvoyFilter meshguard")
	}
	if err := applyEnvoyFilter(t, ef, hcm, rc); err != nil {
		t.Fatal(err)
	}
	for what, m := range map[string]proto.Message{"connection manager": hcm, "routes": rc} {
		if err := envoy.Validate(m); err != nil {
			t.Errorf("%s: %v", what, err)
		}
	}

	// Client-supplied headers: everything envoy.yaml removes or overwrites,
	// removed before anything reads the request.
	removed := map[string]bool{}
	for _, ext := range hcm.GetEarlyHeaderMutationExtensions() {
		js, _ := protojson.Marshal(ext.GetTypedConfig())
		for _, h := range strings.Split(string(js), `"remove":"`)[1:] {
			removed[h[:strings.IndexByte(h, '"')]] = true
		}
	}
	for _, h := range strippedByFrontProxy(t, fp) {
		if !removed[h] {
			t.Errorf("the gateway's early header mutation does not remove %s", h)
		}
	}
	fs := hcm.GetHttpFilters()
	var fnames []string
	for _, f := range fs {
		fnames = append(fnames, f.GetName())
	}
	if want := []string{"meshguard.client_ip", "meshguard.jwt_authn", "envoy.filters.http.ext_authz", "envoy.filters.http.ratelimit", "envoy.filters.http.router"}; !slices.Equal(fnames, want) {
		t.Fatalf("HTTP filters %v, want %v", fnames, want)
	}
	var wantIP *corev3.HeaderValueOption
	for _, m := range fp.filters["envoy.filters.http.header_mutation"].(*headermutationv3.HeaderMutation).GetMutations().GetRequestMutations() {
		if m.GetAppend().GetHeader().GetKey() == "x-meshguard-client-ip" {
			wantIP = m.GetAppend()
		}
	}
	if got := unpackAny[*headermutationv3.HeaderMutation](t, fs[0].GetTypedConfig()).GetMutations().GetRequestMutations(); len(got) != 1 || !proto.Equal(got[0].GetAppend(), wantIP) {
		t.Errorf("client address mutation %v, want envoy.yaml's %v", got, wantIP)
	}

	// jwt_authn: envoy.yaml's, its JWKS fetched through idp.yaml's entry.
	jwt := unpackAny[*jwtauthnv3.JwtAuthentication](t, fs[1].GetTypedConfig())
	jwksCluster := jwt.GetProviders()["app"].GetRemoteJwks().GetHttpUri().GetCluster()
	want := proto.Clone(fp.filters["envoy.filters.http.jwt_authn"]).(*jwtauthnv3.JwtAuthentication)
	want.GetProviders()["app"].GetRemoteJwks().GetHttpUri().HttpUpstreamType = &corev3.HttpUri_Cluster{Cluster: jwksCluster}
	if diff := cmp.Diff(want, jwt, protocmp.Transform()); diff != "" {
		t.Errorf("jwt_authn differs from envoy.yaml's but for the JWKS cluster (-envoy.yaml +gateway):\n%s", diff)
	}
	se, _ := objs["ServiceEntry/idp"].(*networkingv1api.ServiceEntry)
	dr, _ := objs["DestinationRule/idp"].(*networkingv1api.DestinationRule)
	if se == nil || dr == nil {
		t.Fatal("no ServiceEntry and DestinationRule idp")
	}
	port := se.GetPorts()[0]
	if want := fmt.Sprintf("outbound|%d||%s", port.GetNumber(), se.GetHosts()[0]); jwksCluster != want || port.GetProtocol() != "HTTP" || port.GetTargetPort() != 443 {
		t.Errorf("JWKS cluster %q, ServiceEntry port %v: want %s, HTTP to target port 443", jwksCluster, port, want)
	}
	tls := dr.GetTrafficPolicy().GetPortLevelSettings()[0]
	if dr.GetHost() != se.GetHosts()[0] || tls.GetPort().GetNumber() != port.GetNumber() || tls.GetTls().GetMode() != networkingv1api.ClientTLSSettings_SIMPLE ||
		tls.GetTls().GetSni() != se.GetHosts()[0] || !slices.Contains(tls.GetTls().GetSubjectAltNames(), se.GetHosts()[0]) {
		t.Errorf("DestinationRule idp %v: want TLS (SIMPLE, SNI and SAN %s) on port %d", dr, se.GetHosts()[0], port.GetNumber())
	}

	// ext_authz: only what envoy.yaml sends, the jwt_authn metadata,
	// envoy.yaml's retries; still the provider's cluster and failure mode.
	wantAuthz := fp.filters["envoy.filters.http.ext_authz"].(*extauthzv3.ExtAuthz)
	a := unpackAny[*extauthzv3.ExtAuthz](t, fs[2].GetTypedConfig())
	if diff := cmp.Diff(wantAuthz.GetAllowedHeaders(), a.GetAllowedHeaders(), protocmp.Transform()); diff != "" {
		t.Errorf("ext_authz allowed_headers differ from envoy.yaml's (-envoy.yaml +gateway):\n%s", diff)
	}
	if !slices.Equal(a.GetMetadataContextNamespaces(), wantAuthz.GetMetadataContextNamespaces()) || !proto.Equal(a.GetGrpcService().GetRetryPolicy(), wantAuthz.GetGrpcService().GetRetryPolicy()) {
		t.Errorf("ext_authz metadata %v, retries %v: want envoy.yaml's %v, %v", a.GetMetadataContextNamespaces(), a.GetGrpcService().GetRetryPolicy(), wantAuthz.GetMetadataContextNamespaces(), wantAuthz.GetGrpcService().GetRetryPolicy())
	}
	if a.GetGrpcService().GetEnvoyGrpc().GetClusterName() != cluster {
		t.Errorf("the merge changed ext_authz's cluster to %q", a.GetGrpcService().GetEnvoyGrpc().GetClusterName())
	}
	rl := unpackAny[*ratelimitv3.RateLimit](t, fs[3].GetTypedConfig())
	wantRL := fp.filters["envoy.filters.http.ratelimit"].(*ratelimitv3.RateLimit)
	if c := rl.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName(); !strings.HasPrefix(c, "outbound|8082||meshguard.") {
		t.Errorf("rate limit service cluster %q: want Istio's outbound cluster for meshguard's rate limit listener (8082)", c)
	}
	rl.GetRateLimitService().GetGrpcService().TargetSpecifier = wantRL.GetRateLimitService().GetGrpcService().GetTargetSpecifier()
	if diff := cmp.Diff(wantRL, rl, protocmp.Transform()); diff != "" {
		t.Errorf("rate limit filter differs from envoy.yaml's but for the cluster (-envoy.yaml +gateway):\n%s", diff)
	}

	// Each route, as its envoy.yaml counterpart.
	vh := rc.GetVirtualHosts()[0]
	for _, r := range vh.GetRoutes() {
		want := fp.routes[istioRouteFor[r.GetName()]]
		got := r.GetRoute().GetRateLimits()
		if len(got) == 0 {
			got = vh.GetRateLimits()
		}
		if diff := cmp.Diff(want.GetRoute().GetRateLimits(), got, protocmp.Transform()); diff != "" {
			t.Errorf("route %s: rate limits differ from envoy.yaml's %s (-envoy.yaml +gateway):\n%s", r.GetName(), want.GetName(), diff)
		}
		if diff := cmp.Diff(want.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"], r.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"], protocmp.Transform()); diff != "" {
			t.Errorf("route %s: ext_authz per-route settings differ from envoy.yaml's %s:\n%s", r.GetName(), want.GetName(), diff)
		}
		if diff := cmp.Diff(want.GetTypedPerFilterConfig()["envoy.filters.http.header_mutation"], r.GetTypedPerFilterConfig()["meshguard.client_ip"], protocmp.Transform()); diff != "" {
			t.Errorf("route %s: header mutations differ from envoy.yaml's %s:\n%s", r.GetName(), want.GetName(), diff)
		}
	}

	// Routing: in the VirtualService's order, each path reaches the route
	// envoy.yaml gives it.
	for path, want := range map[string]string{
		"/v1/csp-reports":      "csp-reports",
		"/API/Auth/Login":      "login",
		"/api/auth/register":   "auth",
		"/API/admin/x.JS":      "api",
		"/api/users/1":         "api",
		"/assets/app.min.CSS":  "static",
		"/app.js":              "static",
		"/":                    "pages",
		"/dashboard":           "pages",
		"/v1/csp-reports/more": "pages",
	} {
		got := ""
		for _, r := range vh.GetRoutes() {
			m := r.GetMatch()
			if m.GetCaseSensitive() != nil && !m.GetCaseSensitive().GetValue() {
				if strings.HasPrefix(strings.ToLower(path), strings.ToLower(m.GetPrefix())) {
					got = r.GetName()
					break
				}
				continue
			}
			if matches(t, m, path) {
				got = r.GetName()
				break
			}
		}
		if got != want {
			t.Errorf("%s goes to %s, want %s", path, got, want)
		}
	}
}

// TestIstioGatewayRejects: a route patch naming a route the VirtualService
// does not have fails here (Istio would skip it, leaving the route
// without its limits).
func TestIstioGatewayRejects(t *testing.T) {
	objs := istioObjects(t, "../istio/gateway.yaml", "../istio/envoyfilter-meshguard.yaml")
	ef := proto.Clone(objs["EnvoyFilter/meshguard"]).(*networkingv1alpha3api.EnvoyFilter)
	for _, p := range ef.GetConfigPatches() {
		if r := p.GetMatch().GetRouteConfiguration().GetVhost().GetRoute(); r.GetName() == "login" {
			r.Name = "signin"
		}
	}
	hcm, rc := istioGateway(t, objs["VirtualService/app"].(*networkingv1api.VirtualService), &extauthzv3.ExtAuthz{})
	if err := applyEnvoyFilter(t, ef, hcm, rc); err == nil || !strings.Contains(err.Error(), `no route "signin"`) {
		t.Fatalf("patch for a route that does not exist: %v", err)
	}
}
