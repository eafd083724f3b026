package platformtest

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	egv1alpha1 "github.com/envoyproxy/gateway/api/v1alpha1"
	jsonpatch "github.com/evanphx/json-patch/v5"
	"github.com/google/go-cmp/cmp"
	"github.com/ohler55/ojg/jp"
	"github.com/ohler55/ojg/oj"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
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
	"github.com/meshguard/meshguard/extauthz"
)

// Envoy Gateway is not run here. Its manifests are decoded strictly into
// its own Go types, and the EnvoyPatchPolicy is applied the way Envoy
// Gateway applies it (internal/xds/translator/jsonpatch.go: resources
// marshalled with protojson's proto names, JSONPath located with ojg, JSON
// Patch with EnsurePathExistsOnAdd, the result unmarshalled strictly) to a
// listener, route configuration and clusters built with Envoy Gateway's
// names and ordering, as read from its source: listener and route
// configuration <namespace>/<gateway>/<listener>; one ext_authz filter per
// SecurityPolicy, envoy.filters.http.ext_authz/securitypolicy/<ns>/<name>,
// disabled in the chain and enabled per route; routes
// httproute/<ns>/<name>/rule/<i>/match/<j>/..., sorted Exact, then regular
// expressions, then prefixes, each longest first. The result must validate
// and agree with envoy/envoy.yaml, route for route.

// egObjects decodes every object of the Envoy Gateway manifests strictly
// (unknown or misspelled fields fail) into Envoy Gateway's and the Gateway
// API's Go types.
func egObjects(t *testing.T) map[string]any {
	t.Helper()
	files, _ := filepath.Glob("../envoy-gateway/*.yaml")
	if len(files) == 0 {
		t.Fatal("no manifests in k8s/envoy-gateway")
	}
	out := map[string]any{}
	for _, f := range files {
		for _, doc := range splitDocs(t, f) {
			var head envelope
			if err := yaml.Unmarshal(doc, &head); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			var obj any
			switch head.APIVersion + " " + head.Kind {
			case "gateway.networking.k8s.io/v1 Gateway":
				obj = &gwv1.Gateway{}
			case "gateway.networking.k8s.io/v1 HTTPRoute":
				obj = &gwv1.HTTPRoute{}
			case "gateway.envoyproxy.io/v1alpha1 SecurityPolicy":
				obj = &egv1alpha1.SecurityPolicy{}
			case "gateway.envoyproxy.io/v1alpha1 ClientTrafficPolicy":
				obj = &egv1alpha1.ClientTrafficPolicy{}
			case "gateway.envoyproxy.io/v1alpha1 EnvoyPatchPolicy":
				obj = &egv1alpha1.EnvoyPatchPolicy{}
			case "gateway.envoyproxy.io/v1alpha1 EnvoyProxy":
				obj = &egv1alpha1.EnvoyProxy{}
			default:
				t.Fatalf("%s: %s %s has no check here; add it", f, head.APIVersion, head.Kind)
			}
			if err := unmarshalStrict(doc, obj); err != nil {
				t.Fatalf("%s: %s %s: %v", f, head.Kind, head.Metadata.Name, err)
			}
			out[head.Kind+"/"+head.Metadata.Name] = obj
		}
	}
	return out
}

// frontProxy is envoy/envoy.yaml, the reference for what the platform
// material must do.
type frontProxy struct {
	hcm      *hcmv3.HttpConnectionManager
	filters  map[string]proto.Message
	routes   map[string]*routev3.Route
	clusters map[string]*clusterv3.Cluster
}

func loadFrontProxy(t *testing.T) *frontProxy {
	t.Helper()
	b, err := envoy.ParseBootstrap(envoy.FrontProxy)
	if err != nil {
		t.Fatal(err)
	}
	fp := &frontProxy{filters: map[string]proto.Message{}, routes: map[string]*routev3.Route{}, clusters: map[string]*clusterv3.Cluster{}}
	fp.hcm = unpackAny[*hcmv3.HttpConnectionManager](t, b.GetStaticResources().GetListeners()[0].GetFilterChains()[0].GetFilters()[0].GetTypedConfig())
	for _, f := range fp.hcm.GetHttpFilters() {
		fp.filters[f.GetName()] = unpackAny[proto.Message](t, f.GetTypedConfig())
	}
	for _, r := range fp.hcm.GetRouteConfig().GetVirtualHosts()[0].GetRoutes() {
		fp.routes[r.GetName()] = r
	}
	for _, c := range b.GetStaticResources().GetClusters() {
		fp.clusters[c.GetName()] = c
	}
	return fp
}

func unpackAny[M proto.Message](t *testing.T, a *anypb.Any) M {
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

// meshguardReads are the request headers meshguard's ext_authz reads with
// its defaults and the README's trusted identity headers; every platform's
// ext_authz must send them.
var meshguardReads = []string{
	"origin", "access-control-request-method", "access-control-request-headers",
	"x-tenant-id", "content-type", "x-meshguard-client-ip", "x-auth-user", "x-auth-role",
}

// strippedByFrontProxy are the request headers envoy.yaml removes before
// any filter reads them (every header meshguard sets or may trust), plus
// the ones its early header mutation removes and the client address
// header it overwrites: a platform that cannot overwrite must remove them.
func strippedByFrontProxy(t *testing.T, fp *frontProxy) []string {
	t.Helper()
	var out []string
	for _, m := range fp.filters["envoy.filters.http.header_mutation"].(*headermutationv3.HeaderMutation).GetMutations().GetRequestMutations() {
		if k := m.GetRemove(); k != "" {
			out = append(out, k)
		}
		if k := m.GetAppend().GetHeader().GetKey(); k != "" {
			out = append(out, k)
		}
	}
	for _, ext := range fp.hcm.GetEarlyHeaderMutationExtensions() {
		js, err := protojson.Marshal(ext.GetTypedConfig())
		if err != nil {
			t.Fatal(err)
		}
		var v struct {
			Mutations []struct{ Remove string }
		}
		if err := json.Unmarshal(js, &v); err != nil {
			t.Fatal(err)
		}
		for _, m := range v.Mutations {
			if m.Remove != "" {
				out = append(out, m.Remove)
			}
		}
	}
	sort.Strings(out)
	return slices.Compact(out)
}

// egRouteFor maps each HTTPRoute of gateway.yaml to the envoy.yaml route
// whose policy it must have.
var egRouteFor = map[string]string{
	"app-csp-reports": "csp_reports",
	"app-login":       "api_auth_login",
	"app-auth":        "api_auth",
	"app-api":         "api",
	"app-static":      "static",
	"app-pages":       "app",
}

// TestEnvoyGateway: the manifests decode strictly, the policies target the
// Gateway or its routes, ext_authz and the access log reach meshguard's
// gRPC listener with only the headers meshguard reads, client addresses
// come from trusted ranges only, and everything meshguard sets or trusts,
// and a client's request id, is removed before anything reads it.
func TestEnvoyGateway(t *testing.T) {
	objs := egObjects(t)
	fp := loadFrontProxy(t)
	gw, ok := objs["Gateway/meshguard-edge"].(*gwv1.Gateway)
	if !ok {
		t.Fatal("no Gateway meshguard-edge")
	}
	routes := map[string]*gwv1.HTTPRoute{}
	for k, o := range objs {
		if r, ok := o.(*gwv1.HTTPRoute); ok {
			routes[r.Name] = r
			if len(r.Spec.ParentRefs) != 1 || string(r.Spec.ParentRefs[0].Name) != gw.Name {
				t.Errorf("%s is not attached to Gateway %s", k, gw.Name)
			}
		}
	}
	if got, want := sortedKeys(routes), sortedKeys(egRouteFor); !slices.Equal(got, want) {
		t.Fatalf("HTTPRoutes %v, want %v (one per envoy.yaml route kind)", got, want)
	}
	if be := routes["app-csp-reports"].Spec.Rules[0].BackendRefs[0]; be.Name != "meshguard" || be.Port == nil || *be.Port != 8080 {
		t.Errorf("CSP reports go to %s:%v, want meshguard's HTTP listener (8080)", be.Name, be.Port)
	}

	pol := policiesByRoute(t, objs, gw, routes)
	for name, sp := range pol {
		ea := sp.Spec.ExtAuth
		if name == "app-static" {
			if ea != nil {
				t.Errorf("static assets get ext_authz from SecurityPolicy %s", sp.Name)
			}
			continue
		}
		if ea == nil || ea.GRPC == nil || len(ea.GRPC.BackendRefs) != 1 || ea.GRPC.BackendRefs[0].Name != "meshguard" || ea.GRPC.BackendRefs[0].Port == nil || *ea.GRPC.BackendRefs[0].Port != 8081 {
			t.Errorf("route %s: SecurityPolicy %s extAuth %+v: want gRPC to meshguard:8081", name, sp.Name, ea)
			continue
		}
		if ea.FailOpen == nil || *ea.FailOpen || ea.StatusOnError == nil || *ea.StatusOnError != 503 {
			t.Errorf("route %s: SecurityPolicy %s must fail closed with 503", name, sp.Name)
		}
		for _, h := range ea.HeadersToExtAuth {
			if strings.EqualFold(h, "authorization") || strings.EqualFold(h, "cookie") {
				t.Errorf("SecurityPolicy %s sends %s to meshguard: credentials must not reach it", sp.Name, h)
			}
		}
		for _, h := range meshguardReads {
			if !slices.Contains(ea.HeadersToExtAuth, h) {
				t.Errorf("SecurityPolicy %s does not send %s, which meshguard reads", sp.Name, h)
			}
		}
		// The per-route meshguard policy and the login body, as envoy.yaml's.
		want := checkSettings(t, fp.routes[egRouteFor[name]])
		got := map[string]string{}
		for _, c := range ea.ContextExtensions {
			if c.Value == nil {
				t.Errorf("SecurityPolicy %s: context extension %s has no value", sp.Name, c.Name)
				continue
			}
			got[c.Name] = *c.Value
		}
		if diff := cmp.Diff(want.GetContextExtensions(), got, cmp.Comparer(func(a, b map[string]string) bool { return len(a) == 0 && len(b) == 0 || cmp.Equal(a, b) })); diff != "" {
			t.Errorf("route %s: context extensions differ from envoy.yaml's %s (-envoy.yaml +SecurityPolicy %s):\n%s", name, egRouteFor[name], sp.Name, diff)
		}
		if b := want.GetWithRequestBody(); b != nil {
			if ea.BodyToExtAuth == nil || ea.BodyToExtAuth.MaxRequestBytes != b.GetMaxRequestBytes() || b.GetMaxRequestBytes() != extauthz.MaxAccountBodyBytes {
				t.Errorf("route %s: bodyToExtAuth %+v, want %d bytes (extauthz.MaxAccountBodyBytes)", name, ea.BodyToExtAuth, extauthz.MaxAccountBodyBytes)
			}
		} else if ea.BodyToExtAuth != nil {
			t.Errorf("route %s: sends the body to meshguard, envoy.yaml does not", name)
		}
	}

	ctp := objs["ClientTrafficPolicy/meshguard-client-ip"].(*egv1alpha1.ClientTrafficPolicy)
	targetsGateway(t, "ClientTrafficPolicy", ctp.Spec.TargetRefs, gw)
	if x := ctp.Spec.ClientIPDetection; x == nil || x.XForwardedFor == nil || len(x.XForwardedFor.TrustedCIDRs) == 0 || x.XForwardedFor.NumTrustedHops != nil {
		t.Error("ClientTrafficPolicy must trust X-Forwarded-For from listed CIDRs only, not by hop count")
	}
	var early []string
	if h := ctp.Spec.Headers; h != nil && h.EarlyRequestHeaders != nil {
		if len(h.EarlyRequestHeaders.Set)+len(h.EarlyRequestHeaders.Add) > 0 {
			t.Error("early request headers set or add a header: they run before the client address is known")
		}
		early = h.EarlyRequestHeaders.Remove
	}
	for _, h := range strippedByFrontProxy(t, fp) {
		if !slices.Contains(early, h) {
			t.Errorf("ClientTrafficPolicy's early request headers do not remove %s (envoy.yaml removes or overwrites it before anything reads it)", h)
		}
	}

	ep := objs["EnvoyProxy/meshguard-edge"].(*egv1alpha1.EnvoyProxy)
	if pr := gw.Spec.Infrastructure; pr == nil || pr.ParametersRef == nil || pr.ParametersRef.Name != ep.Name {
		t.Errorf("Gateway does not use EnvoyProxy %s", ep.Name)
	}
	var als *egv1alpha1.ALSEnvoyProxyAccessLog
	for _, s := range ep.Spec.Telemetry.AccessLog.Settings {
		for _, sink := range s.Sinks {
			if sink.ALS != nil {
				als = sink.ALS
			}
		}
	}
	if als == nil || als.LogName == nil || *als.LogName != "meshguard_audit" || len(als.BackendRefs) != 1 || *als.BackendRefs[0].Port != 8081 {
		t.Errorf("EnvoyProxy access log: want ALS meshguard_audit to meshguard:8081, got %+v", als)
	}
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func targetsGateway(t *testing.T, kind string, refs []gwv1.LocalPolicyTargetReferenceWithSectionName, gw *gwv1.Gateway) {
	t.Helper()
	if len(refs) != 1 || string(refs[0].Kind) != "Gateway" || string(refs[0].Name) != gw.Name {
		t.Errorf("%s targets %+v, want Gateway %s", kind, refs, gw.Name)
	}
}

// policiesByRoute is the SecurityPolicy in force on each HTTPRoute: one
// targeting the route, else the Gateway's (Envoy Gateway merges nothing
// without mergeType).
func policiesByRoute(t *testing.T, objs map[string]any, gw *gwv1.Gateway, routes map[string]*gwv1.HTTPRoute) map[string]*egv1alpha1.SecurityPolicy {
	t.Helper()
	var gwPolicy *egv1alpha1.SecurityPolicy
	byRoute := map[string]*egv1alpha1.SecurityPolicy{}
	for _, o := range objs {
		sp, ok := o.(*egv1alpha1.SecurityPolicy)
		if !ok {
			continue
		}
		if sp.Spec.MergeType != nil {
			t.Errorf("SecurityPolicy %s merges (%s): this test reads policies as replacing each other", sp.Name, *sp.Spec.MergeType)
		}
		for _, ref := range sp.Spec.TargetRefs {
			switch ref.Kind {
			case "Gateway":
				if string(ref.Name) != gw.Name || gwPolicy != nil {
					t.Errorf("SecurityPolicy %s targets Gateway %s (one policy for Gateway %s expected)", sp.Name, ref.Name, gw.Name)
				}
				gwPolicy = sp
			case "HTTPRoute":
				if routes[string(ref.Name)] == nil {
					t.Errorf("SecurityPolicy %s targets HTTPRoute %s, which does not exist", sp.Name, ref.Name)
				}
				if byRoute[string(ref.Name)] != nil {
					t.Errorf("HTTPRoute %s has two SecurityPolicies", ref.Name)
				}
				byRoute[string(ref.Name)] = sp
			default:
				t.Errorf("SecurityPolicy %s targets a %s", sp.Name, ref.Kind)
			}
		}
	}
	if gwPolicy == nil || gwPolicy.Spec.ExtAuth == nil {
		t.Fatal("no SecurityPolicy with extAuth for the Gateway: routes without their own policy would skip meshguard")
	}
	for name := range routes {
		if byRoute[name] == nil {
			byRoute[name] = gwPolicy
		}
	}
	return byRoute
}

// checkSettings is the ext_authz check_settings of an envoy.yaml route.
func checkSettings(t *testing.T, r *routev3.Route) *extauthzv3.CheckSettings {
	t.Helper()
	if r == nil {
		t.Fatal("no such envoy.yaml route")
	}
	if a := r.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]; a != nil {
		return unpackAny[*extauthzv3.ExtAuthzPerRoute](t, a).GetCheckSettings()
	}
	return nil
}

// egRoute is an HTTPRoute of gateway.yaml as Envoy Gateway routes it.
type egRoute struct {
	name  string
	match *routev3.RouteMatch
	// kind orders routes: 0 Exact, 1 RegularExpression, 2 PathPrefix.
	kind, length int
}

// egRouteOrder is gateway.yaml's HTTPRoutes in the order Envoy Gateway's
// route table has them: Exact, RegularExpression, PathPrefix; within a
// kind, the longer path value first ("/" counts as zero).
func egRouteOrder(t *testing.T, routes map[string]*gwv1.HTTPRoute) []egRoute {
	t.Helper()
	var out []egRoute
	for _, name := range sortedKeys(routes) {
		r := routes[name]
		if len(r.Spec.Rules) != 1 || len(r.Spec.Rules[0].Matches) != 1 {
			t.Fatalf("HTTPRoute %s: one rule with one match expected", name)
		}
		pm := r.Spec.Rules[0].Matches[0].Path
		e := egRoute{name: name, length: len(*pm.Value)}
		switch *pm.Type {
		case gwv1.PathMatchExact:
			e.match = &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: *pm.Value}}
		case gwv1.PathMatchRegularExpression:
			e.kind = 1
			e.match = &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: *pm.Value}}}
		case gwv1.PathMatchPathPrefix:
			e.kind = 2
			if *pm.Value == "/" {
				e.length = 0
			}
			e.match = &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: strings.TrimSuffix(*pm.Value, "/")}}
			if *pm.Value == "/" {
				e.match = &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}
			}
		}
		out = append(out, e)
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].kind != out[j].kind {
			return out[i].kind < out[j].kind
		}
		return out[i].length > out[j].length
	})
	return out
}

// matches reports whether path selects m (Envoy: exact path, a regular
// expression matching the whole path, a prefix on segment boundaries).
func matches(t *testing.T, m *routev3.RouteMatch, path string) bool {
	t.Helper()
	switch {
	case m.GetPath() != "":
		return path == m.GetPath()
	case m.GetSafeRegex() != nil:
		return regexp.MustCompile(`^(?:` + m.GetSafeRegex().GetRegex() + `)$`).MatchString(path)
	case m.GetPathSeparatedPrefix() != "":
		p := m.GetPathSeparatedPrefix()
		return path == p || strings.HasPrefix(path, p+"/")
	default:
		return strings.HasPrefix(path, m.GetPrefix())
	}
}

// TestEnvoyGatewayRouting: in Envoy Gateway's order, each path reaches the
// route envoy.yaml gives it; no API path, whatever its case, is a static
// asset (which skips ext_authz).
func TestEnvoyGatewayRouting(t *testing.T) {
	objs := egObjects(t)
	routes := map[string]*gwv1.HTTPRoute{}
	for _, o := range objs {
		if r, ok := o.(*gwv1.HTTPRoute); ok {
			routes[r.Name] = r
		}
	}
	order := egRouteOrder(t, routes)
	for path, want := range map[string]string{
		"/v1/csp-reports":        "app-csp-reports",
		"/api/auth/login":        "app-login",
		"/API/Auth/Login":        "app-login",
		"/api/auth/login/mfa":    "app-login",
		"/api/auth/register":     "app-auth",
		"/Api/auth/login.js":     "app-auth",
		"/api/users/1":           "app-api",
		"/api/admin/export.js":   "app-api",
		"/API/admin/x.JS":        "app-api",
		"/api/x.png":             "app-api",
		"/app.js":                "app-static",
		"/assets/app.min.CSS":    "app-static",
		"/a/b.woff2":             "app-static",
		"/api.js":                "app-static",
		"/apix/logo.svg":         "app-static",
		"/static/api/logo.png":   "app-static",
		"/":                      "app-pages",
		"/dashboard":             "app-pages",
		"/v1/audit/logs":         "app-pages",
		"/v1/csp-reports/extra":  "app-pages",
		"/api":                   "app-pages",
		"/app.json":              "app-pages",
		"/assets/app.js.gz":      "app-pages",
		"/api/auth/loginsomuch":  "app-auth",
		"/api/authority/x":       "app-api",
		"/apiary/honey.jpeg":     "app-static",
		"/assets/Api/ok.GIF":     "app-static",
		"/api/auth/login/x.js":   "app-login",
		"/API/AUTH/login/a.css":  "app-login",
		"/Api/Admin/payload.map": "app-api",
	} {
		got := ""
		for _, r := range order {
			if matches(t, r.match, path) {
				got = r.name
				break
			}
		}
		if got != want {
			t.Errorf("%s goes to %s, want %s", path, got, want)
		}
	}
}

// egResources are the xDS resources Envoy Gateway would generate for the
// manifests, before the EnvoyPatchPolicy: the listener (its connection
// manager with one disabled ext_authz filter per SecurityPolicy and the
// router), the route configuration (routes in Envoy Gateway's order, each
// enabling its policy's ext_authz with its context extensions) and no
// clusters of ours.
func egResources(t *testing.T, objs map[string]any) (l *listenerv3.Listener, rc *routev3.RouteConfiguration) {
	t.Helper()
	gw := objs["Gateway/meshguard-edge"].(*gwv1.Gateway)
	routes := map[string]*gwv1.HTTPRoute{}
	for _, o := range objs {
		if r, ok := o.(*gwv1.HTTPRoute); ok {
			routes[r.Name] = r
		}
	}
	xdsName := fmt.Sprintf("%s/%s/%s", gw.Namespace, gw.Name, gw.Spec.Listeners[0].Name)
	pol := policiesByRoute(t, objs, gw, routes)
	filterName := func(sp *egv1alpha1.SecurityPolicy) string {
		return "envoy.filters.http.ext_authz/securitypolicy/" + sp.Namespace + "/" + sp.Name
	}
	var filters []*hcmv3.HttpFilter
	seen := map[string]bool{}
	for _, name := range sortedKeys(pol) {
		sp := pol[name]
		if sp.Spec.ExtAuth == nil || seen[sp.Name] {
			continue
		}
		seen[sp.Name] = true
		ea := sp.Spec.ExtAuth
		cfg := &extauthzv3.ExtAuthz{
			TransportApiVersion: corev3.ApiVersion_V3,
			Services: &extauthzv3.ExtAuthz_GrpcService{GrpcService: &corev3.GrpcService{
				TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: "securitypolicy/" + sp.Namespace + "/" + sp.Name + "/0"}},
				Timeout:         durationpb.New(250e6),
			}},
		}
		if ea.BodyToExtAuth != nil {
			cfg.WithRequestBody = &extauthzv3.BufferSettings{MaxRequestBytes: ea.BodyToExtAuth.MaxRequestBytes}
		}
		filters = append(filters, &hcmv3.HttpFilter{Name: filterName(sp), Disabled: true, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, cfg)}})
	}
	filters = append(filters, &hcmv3.HttpFilter{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &routerv3.Router{})}})
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: "http-80",
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			RouteConfigName: xdsName,
			ConfigSource:    &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}, ResourceApiVersion: corev3.ApiVersion_V3},
		}},
		HttpFilters: filters,
	}
	l = &listenerv3.Listener{
		Name:    xdsName,
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "0.0.0.0", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 10080}}}},
		DefaultFilterChain: &listenerv3.FilterChain{Filters: []*listenerv3.Filter{{
			Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, hcm)},
		}}},
	}
	vh := &routev3.VirtualHost{Name: xdsName + "/*", Domains: []string{"*"}}
	for _, r := range egRouteOrder(t, routes) {
		rt := &routev3.Route{
			Name:  "httproute/" + gw.Namespace + "/" + r.name + "/rule/0/match/0/*",
			Match: r.match,
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "httproute/" + gw.Namespace + "/" + r.name + "/rule/0"},
			}},
		}
		if sp := pol[r.name]; sp.Spec.ExtAuth != nil {
			ctx := map[string]string{}
			for _, c := range sp.Spec.ExtAuth.ContextExtensions {
				ctx[c.Name] = *c.Value
			}
			rt.TypedPerFilterConfig = map[string]*anypb.Any{filterName(sp): mustAny(t, &extauthzv3.ExtAuthzPerRoute{
				Override: &extauthzv3.ExtAuthzPerRoute_CheckSettings{CheckSettings: &extauthzv3.CheckSettings{ContextExtensions: ctx}},
			})}
		}
		vh.Routes = append(vh.Routes, rt)
	}
	return l, &routev3.RouteConfiguration{Name: xdsName, VirtualHosts: []*routev3.VirtualHost{vh}}
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// applyEnvoyPatchPolicy applies epp's patches as Envoy Gateway does: a
// whole new resource for "add" at the empty path, otherwise the named
// resource marshalled with proto names, each JSONPath located (every
// match, the path appended to each) and patched, then unmarshalled
// strictly. A JSONPath that matches nothing, or a named resource that does
// not exist, is an error, as Envoy Gateway reports it.
func applyEnvoyPatchPolicy(epp *egv1alpha1.EnvoyPatchPolicy, resources map[string]proto.Message) error {
	var errs []error
	for i, p := range epp.Spec.JSONPatches {
		at := fmt.Sprintf("jsonPatches[%d] (%s %s)", i, p.Type, p.Name)
		path := ""
		if p.Operation.Path != nil {
			path = *p.Operation.Path
		}
		var raw []byte
		if p.Operation.Value != nil {
			raw = p.Operation.Value.Raw
		}
		key := string(p.Type) + "/" + p.Name
		if p.Operation.Op == "add" && path == "" && p.Operation.JSONPath == nil {
			m, err := newResource(p.Type)
			if err == nil {
				err = protojson.Unmarshal(raw, m)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", at, err))
				continue
			}
			resources[key] = m
			continue
		}
		dest := resources[key]
		if dest == nil {
			errs = append(errs, fmt.Errorf("%s: no such resource", at))
			continue
		}
		doc, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(dest)
		if err != nil {
			return err
		}
		pointers := []string{path}
		if p.Operation.JSONPath != nil {
			if pointers, err = locate(doc, *p.Operation.JSONPath, path); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", at, err))
				continue
			}
		}
		for _, ptr := range pointers {
			op := map[string]any{"op": string(p.Operation.Op), "path": ptr}
			if raw != nil {
				op["value"] = json.RawMessage(raw)
			}
			js, err := json.Marshal([]any{op})
			if err != nil {
				return err
			}
			patch, err := jsonpatch.DecodePatch(js)
			if err != nil {
				return err
			}
			opts := jsonpatch.NewApplyOptions()
			opts.EnsurePathExistsOnAdd = true
			if doc, err = patch.ApplyWithOptions(doc, opts); err != nil {
				errs = append(errs, fmt.Errorf("%s: %s %s: %w", at, p.Operation.Op, ptr, err))
			}
		}
		m, _ := newResource(p.Type)
		if err := protojson.Unmarshal(doc, m); err != nil {
			errs = append(errs, fmt.Errorf("%s: the patched resource: %w", at, err))
			continue
		}
		resources[key] = m
	}
	return errors.Join(errs...)
}

func newResource(typ egv1alpha1.EnvoyResourceType) (proto.Message, error) {
	switch typ {
	case egv1alpha1.ListenerEnvoyResourceType:
		return &listenerv3.Listener{}, nil
	case egv1alpha1.RouteConfigurationEnvoyResourceType:
		return &routev3.RouteConfiguration{}, nil
	case egv1alpha1.ClusterEnvoyResourceType:
		return &clusterv3.Cluster{}, nil
	}
	return nil, fmt.Errorf("resource type %s has no check here", typ)
}

// locate is every JSON pointer the JSONPath selects in doc, path appended.
func locate(doc []byte, jsonPath, path string) ([]string, error) {
	obj, err := oj.Parse(doc)
	if err != nil {
		return nil, err
	}
	x, err := jp.ParseString(jsonPath)
	if err != nil {
		return nil, fmt.Errorf("JSONPath %q: %w", jsonPath, err)
	}
	var out []string
	for _, loc := range x.Locate(obj, 0) {
		var b strings.Builder
		for _, f := range loc {
			switch f := f.(type) {
			case jp.Root:
			case jp.Nth:
				fmt.Fprintf(&b, "/%d", int(f))
			case jp.Child:
				b.WriteString("/" + strings.NewReplacer("~", "~0", "/", "~1").Replace(string(f)))
			default:
				return nil, fmt.Errorf("JSONPath %q: location step %T has no JSON pointer", jsonPath, f)
			}
		}
		out = append(out, strings.TrimSuffix(b.String(), "/")+"/"+strings.TrimPrefix(path, "/"))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("JSONPath %q matches nothing", jsonPath)
	}
	for i := range out {
		out[i] = strings.TrimSuffix(out[i], "/")
	}
	return out, nil
}

// TestEnvoyGatewayPatches: the EnvoyPatchPolicy applies to the resources
// Envoy Gateway generates, the results are valid Envoy API messages, and
// the Gateway then does what envoy.yaml does: the client address header
// first, jwt_authn letting failed tokens through to meshguard (which reads
// its metadata) before every ext_authz filter, ext_authz retrying on
// another meshguard, the rate limit filter just before the router calling
// meshguard's rate limit listener, and each route's rate limits and
// ext_authz settings as its envoy.yaml counterpart's.
func TestEnvoyGatewayPatches(t *testing.T) {
	objs := egObjects(t)
	fp := loadFrontProxy(t)
	epp := objs["EnvoyPatchPolicy/meshguard"].(*egv1alpha1.EnvoyPatchPolicy)
	if gw := objs["Gateway/meshguard-edge"].(*gwv1.Gateway); epp.Spec.TargetRef.Kind != "Gateway" || string(epp.Spec.TargetRef.Name) != gw.Name {
		t.Errorf("EnvoyPatchPolicy targets %s %s", epp.Spec.TargetRef.Kind, epp.Spec.TargetRef.Name)
	}
	l, rc := egResources(t, objs)
	res := map[string]proto.Message{
		string(egv1alpha1.ListenerEnvoyResourceType) + "/" + l.GetName():            l,
		string(egv1alpha1.RouteConfigurationEnvoyResourceType) + "/" + rc.GetName(): rc,
	}
	if err := applyEnvoyPatchPolicy(epp, res); err != nil {
		t.Fatal(err)
	}
	for k, m := range res {
		if err := envoy.Validate(m); err != nil {
			t.Errorf("%s: %v", k, err)
		}
	}
	l = res[string(egv1alpha1.ListenerEnvoyResourceType)+"/"+l.GetName()].(*listenerv3.Listener)
	rc = res[string(egv1alpha1.RouteConfigurationEnvoyResourceType)+"/"+rc.GetName()].(*routev3.RouteConfiguration)
	cluster := func(name string) *clusterv3.Cluster {
		c, _ := res[string(egv1alpha1.ClusterEnvoyResourceType)+"/"+name].(*clusterv3.Cluster)
		return c
	}
	hcm := unpackAny[*hcmv3.HttpConnectionManager](t, l.GetDefaultFilterChain().GetFilters()[0].GetTypedConfig())
	var names []string
	for _, f := range hcm.GetHttpFilters() {
		names = append(names, f.GetName())
	}
	fs := hcm.GetHttpFilters()
	if len(fs) < 5 || fs[0].GetName() != "meshguard.client_ip" || fs[1].GetName() != "meshguard.jwt_authn" ||
		fs[len(fs)-2].GetName() != "envoy.filters.http.ratelimit" || fs[len(fs)-1].GetName() != "envoy.filters.http.router" {
		t.Fatalf("HTTP filters %v: want the client address, jwt_authn, Envoy Gateway's filters, the rate limit filter, the router", names)
	}

	// The client address header, as envoy.yaml writes it.
	var wantIP *corev3.HeaderValueOption
	for _, m := range fp.filters["envoy.filters.http.header_mutation"].(*headermutationv3.HeaderMutation).GetMutations().GetRequestMutations() {
		if m.GetAppend().GetHeader().GetKey() == "x-meshguard-client-ip" {
			wantIP = m.GetAppend()
		}
	}
	gotIP := unpackAny[*headermutationv3.HeaderMutation](t, fs[0].GetTypedConfig()).GetMutations().GetRequestMutations()
	if len(gotIP) != 1 || !proto.Equal(gotIP[0].GetAppend(), wantIP) {
		t.Errorf("client address mutation %v, want envoy.yaml's %v", gotIP, wantIP)
	}
	// jwt_authn: envoy.yaml's, whose JWKS cluster the patch adds too.
	jwt := unpackAny[*jwtauthnv3.JwtAuthentication](t, fs[1].GetTypedConfig())
	if diff := cmp.Diff(fp.filters["envoy.filters.http.jwt_authn"], jwt, protocmp.Transform()); diff != "" {
		t.Errorf("jwt_authn differs from envoy.yaml's (-envoy.yaml +patched):\n%s", diff)
	}
	if diff := cmp.Diff(fp.clusters["idp"], cluster("idp"), protocmp.Transform()); diff != "" {
		t.Errorf("JWKS cluster differs from envoy.yaml's (-envoy.yaml +patched):\n%s", diff)
	}
	// Every ext_authz filter: after jwt_authn, with its metadata and
	// envoy.yaml's retries.
	wantAuthz := fp.filters["envoy.filters.http.ext_authz"].(*extauthzv3.ExtAuthz)
	n := 0
	for _, f := range fs[2 : len(fs)-2] {
		if !strings.HasPrefix(f.GetName(), "envoy.filters.http.ext_authz/") {
			continue
		}
		n++
		a := unpackAny[*extauthzv3.ExtAuthz](t, f.GetTypedConfig())
		if !slices.Equal(a.GetMetadataContextNamespaces(), wantAuthz.GetMetadataContextNamespaces()) {
			t.Errorf("%s: metadata_context_namespaces %v, want %v", f.GetName(), a.GetMetadataContextNamespaces(), wantAuthz.GetMetadataContextNamespaces())
		}
		if !proto.Equal(a.GetGrpcService().GetRetryPolicy(), wantAuthz.GetGrpcService().GetRetryPolicy()) {
			t.Errorf("%s: retry_policy %v, want envoy.yaml's %v", f.GetName(), a.GetGrpcService().GetRetryPolicy(), wantAuthz.GetGrpcService().GetRetryPolicy())
		}
	}
	if n == 0 {
		t.Error("no ext_authz filter after the patches")
	}
	// The rate limit filter: envoy.yaml's domain, failure mode, headers and
	// retries, to a cluster the patch adds on meshguard's rate limit port.
	rl := unpackAny[*ratelimitv3.RateLimit](t, fs[len(fs)-2].GetTypedConfig())
	wantRL := fp.filters["envoy.filters.http.ratelimit"].(*ratelimitv3.RateLimit)
	if rl.GetDomain() != wantRL.GetDomain() || rl.GetFailureModeDeny() != wantRL.GetFailureModeDeny() ||
		rl.GetEnableXRatelimitHeaders() != wantRL.GetEnableXRatelimitHeaders() || !proto.Equal(rl.GetTimeout(), wantRL.GetTimeout()) ||
		!proto.Equal(rl.GetRateLimitService().GetGrpcService().GetRetryPolicy(), wantRL.GetRateLimitService().GetGrpcService().GetRetryPolicy()) {
		t.Errorf("rate limit filter %v differs from envoy.yaml's %v", rl, wantRL)
	}
	rlc := cluster(rl.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName())
	if rlc == nil {
		t.Fatalf("the rate limit filter calls cluster %q, which the patch does not add", rl.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName())
	}
	sa := rlc.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
	if !strings.HasPrefix(sa.GetAddress(), "meshguard.") || sa.GetPortValue() != 8082 || rlc.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] == nil {
		t.Errorf("rate limit cluster reaches %s:%d: want meshguard's rate limit listener (8082) over HTTP/2", sa.GetAddress(), sa.GetPortValue())
	}

	// Each route: the rate limits in force (its own, else the virtual
	// host's) and ext_authz (enabled with envoy.yaml's context extensions,
	// or off) as its envoy.yaml counterpart's.
	vh := rc.GetVirtualHosts()[0]
	for _, r := range vh.GetRoutes() {
		name := strings.Split(r.GetName(), "/")[2]
		want := fp.routes[egRouteFor[name]]
		got := r.GetRoute().GetRateLimits()
		if len(got) == 0 {
			got = vh.GetRateLimits()
		}
		if diff := cmp.Diff(want.GetRoute().GetRateLimits(), got, protocmp.Transform()); diff != "" {
			t.Errorf("route %s: rate limits differ from envoy.yaml's %s (-envoy.yaml +Envoy Gateway):\n%s", name, want.GetName(), diff)
		}
		authzOn := false
		for k, v := range r.GetTypedPerFilterConfig() {
			if strings.HasPrefix(k, "envoy.filters.http.ext_authz/") {
				pr := unpackAny[*extauthzv3.ExtAuthzPerRoute](t, v)
				authzOn = !pr.GetDisabled()
				if diff := cmp.Diff(checkSettings(t, want).GetContextExtensions(), pr.GetCheckSettings().GetContextExtensions(), cmp.Comparer(func(a, b map[string]string) bool { return len(a) == 0 && len(b) == 0 || cmp.Equal(a, b) })); diff != "" {
					t.Errorf("route %s: context extensions differ from envoy.yaml's:\n%s", name, diff)
				}
			}
		}
		wantOn := true
		if a := want.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]; a != nil {
			wantOn = !unpackAny[*extauthzv3.ExtAuthzPerRoute](t, a).GetDisabled()
		}
		if authzOn != wantOn {
			t.Errorf("route %s: ext_authz on %v, envoy.yaml's %s %v", name, authzOn, want.GetName(), wantOn)
		}
		// A route that drops Authorization in envoy.yaml's header_mutation
		// does it in the client address filter, before jwt_authn.
		if m := want.GetTypedPerFilterConfig()["envoy.filters.http.header_mutation"]; m != nil {
			got := r.GetTypedPerFilterConfig()["meshguard.client_ip"]
			if got == nil || !proto.Equal(unpackAny[*headermutationv3.HeaderMutationPerRoute](t, m), unpackAny[*headermutationv3.HeaderMutationPerRoute](t, got)) {
				t.Errorf("route %s: header mutations %v, want envoy.yaml's %s", name, got, want.GetName())
			}
		}
	}
}

// TestEnvoyGatewayRejects: the strict decoding catches a misspelled field,
// and a patch whose JSONPath selects nothing (a renamed route) fails, as
// Envoy Gateway reports it, instead of leaving a route unlimited.
func TestEnvoyGatewayRejects(t *testing.T) {
	doc := "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: SecurityPolicy\nmetadata: {name: x}\nspec:\n  extAuth:\n    failopen: false\n"
	var sp egv1alpha1.SecurityPolicy
	if err := unmarshalStrict([]byte(doc), &sp); err == nil || !strings.Contains(err.Error(), `unknown field "spec.extAuth.failopen"`) {
		t.Fatalf("UnmarshalStrict error = %v", err)
	}

	objs := egObjects(t)
	epp := objs["EnvoyPatchPolicy/meshguard"].(*egv1alpha1.EnvoyPatchPolicy).DeepCopy()
	i := slices.IndexFunc(epp.Spec.JSONPatches, func(p egv1alpha1.EnvoyJSONPatchConfig) bool {
		return p.Operation.JSONPath != nil && strings.Contains(*p.Operation.JSONPath, "app-login")
	})
	if i < 0 {
		t.Fatal("no patch for the login route")
	}
	renamed := strings.ReplaceAll(*epp.Spec.JSONPatches[i].Operation.JSONPath, "app-login", "app-signin")
	epp.Spec.JSONPatches[i].Operation.JSONPath = &renamed
	l, rc := egResources(t, objs)
	err := applyEnvoyPatchPolicy(epp, map[string]proto.Message{
		string(egv1alpha1.ListenerEnvoyResourceType) + "/" + l.GetName():            l,
		string(egv1alpha1.RouteConfigurationEnvoyResourceType) + "/" + rc.GetName(): rc,
	})
	if err == nil || !strings.Contains(err.Error(), "matches nothing") {
		t.Fatalf("patch for a route that does not exist: %v", err)
	}
}
