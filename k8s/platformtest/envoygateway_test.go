package platformtest

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	egv1alpha1 "github.com/envoyproxy/gateway/api/v1alpha1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ratelimit/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/meshguard/meshguard/envoy"
)

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

// TestEnvoyGateway: the manifests decode strictly, the policies target the
// Gateway, ext_authz and the access log reach meshguard's gRPC listener,
// client addresses come from trusted ranges only, and every xDS value the
// EnvoyPatchPolicy adds is a valid Envoy API message that calls meshguard's
// rate limit listener.
func TestEnvoyGateway(t *testing.T) {
	objs := egObjects(t)
	gw, ok := objs["Gateway/meshguard-edge"].(*gwv1.Gateway)
	if !ok {
		t.Fatal("no Gateway meshguard-edge")
	}
	sp, ok := objs["SecurityPolicy/meshguard-ext-authz"].(*egv1alpha1.SecurityPolicy)
	if !ok {
		t.Fatal("no SecurityPolicy meshguard-ext-authz")
	}
	ea := sp.Spec.ExtAuth
	if ea == nil || ea.GRPC == nil || len(ea.GRPC.BackendRefs) != 1 || ea.GRPC.BackendRefs[0].Name != "meshguard" || ea.GRPC.BackendRefs[0].Port == nil || *ea.GRPC.BackendRefs[0].Port != 8081 {
		t.Errorf("SecurityPolicy extAuth %+v: want gRPC to meshguard:8081", ea)
	}
	if ea != nil && (ea.FailOpen == nil || *ea.FailOpen) {
		t.Error("SecurityPolicy extAuth must fail closed (failOpen: false)")
	}
	for _, h := range ea.HeadersToExtAuth {
		if strings.EqualFold(h, "authorization") || strings.EqualFold(h, "cookie") {
			t.Errorf("SecurityPolicy sends %s to meshguard: credentials must not reach it", h)
		}
	}
	targetsGateway := func(kind string, refs []gwv1.LocalPolicyTargetReferenceWithSectionName) {
		if len(refs) != 1 || string(refs[0].Kind) != "Gateway" || string(refs[0].Name) != gw.Name {
			t.Errorf("%s targets %+v, want Gateway %s", kind, refs, gw.Name)
		}
	}
	targetsGateway("SecurityPolicy", sp.Spec.TargetRefs)
	ctp := objs["ClientTrafficPolicy/meshguard-client-ip"].(*egv1alpha1.ClientTrafficPolicy)
	targetsGateway("ClientTrafficPolicy", ctp.Spec.TargetRefs)
	if x := ctp.Spec.ClientIPDetection; x == nil || x.XForwardedFor == nil || len(x.XForwardedFor.TrustedCIDRs) == 0 {
		t.Error("ClientTrafficPolicy must trust X-Forwarded-For from listed CIDRs only")
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

	// The patches: values decoded as the Envoy message each path holds.
	epp := objs["EnvoyPatchPolicy/meshguard-ratelimit"].(*egv1alpha1.EnvoyPatchPolicy)
	if epp.Spec.TargetRef.Name != gwv1.ObjectName(gw.Name) {
		t.Errorf("EnvoyPatchPolicy targets %s", epp.Spec.TargetRef.Name)
	}
	xdsName := fmt.Sprintf("%s/%s/%s", gw.Namespace, gw.Name, gw.Spec.Listeners[0].Name)
	var cluster *clusterv3.Cluster
	var filter *hcmv3.HttpFilter
	var actions int
	for i, p := range epp.Spec.JSONPatches {
		if p.Operation.Value == nil {
			t.Fatalf("jsonPatches[%d]: no value", i)
		}
		raw := p.Operation.Value.Raw
		var m proto.Message
		path := ""
		if p.Operation.Path != nil {
			path = *p.Operation.Path
		}
		switch {
		case p.Type == egv1alpha1.ClusterEnvoyResourceType && path == "":
			cluster = &clusterv3.Cluster{}
			m = cluster
		case p.Type == egv1alpha1.ListenerEnvoyResourceType && p.Operation.JSONPath != nil && strings.Contains(*p.Operation.JSONPath, "http_filters"):
			filter = &hcmv3.HttpFilter{}
			m = filter
			if p.Name != xdsName {
				t.Errorf("jsonPatches[%d] patches listener %q, Envoy Gateway names it %q", i, p.Name, xdsName)
			}
			if !strings.Contains(*p.Operation.JSONPath, "'envoy.filters.http.router'") || path != "" || p.Operation.Op != "add" {
				t.Errorf("jsonPatches[%d]: the rate limit filter must be added at the router's position (just before it)", i)
			}
		case p.Type == egv1alpha1.RouteConfigurationEnvoyResourceType && strings.HasSuffix(path, "/rate_limits"):
			var rls []*routev3.RateLimit
			var items []any
			if err := yaml.Unmarshal(raw, &items); err != nil {
				t.Fatal(err)
			}
			for j, it := range items {
				js, _ := yaml.Marshal(it)
				js, _ = yaml.YAMLToJSON(js)
				var rl routev3.RateLimit
				if err := protojson.Unmarshal(js, &rl); err != nil {
					t.Fatalf("jsonPatches[%d].value[%d]: %v", i, j, err)
				}
				if err := envoy.Validate(&rl); err != nil {
					t.Errorf("jsonPatches[%d].value[%d]: %v", i, j, err)
				}
				rls = append(rls, &rl)
			}
			actions = len(rls)
			continue
		default:
			t.Fatalf("jsonPatches[%d]: %s %s has no check here", i, p.Type, path)
		}
		if err := protojson.Unmarshal(raw, m); err != nil {
			t.Fatalf("jsonPatches[%d].value as %T: %v", i, m, err)
		}
		if err := envoy.Validate(m); err != nil {
			t.Errorf("jsonPatches[%d].value: %v", i, err)
		}
	}
	if cluster == nil || filter == nil || actions == 0 {
		t.Fatalf("EnvoyPatchPolicy: cluster %v, filter %v, %d rate limits; want all three", cluster != nil, filter != nil, actions)
	}
	var rl ratelimitv3.RateLimit
	if err := filter.GetTypedConfig().UnmarshalTo(&rl); err != nil {
		t.Fatal(err)
	}
	if c := rl.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName(); c != cluster.GetName() {
		t.Errorf("the rate limit filter calls cluster %q, the patch adds %q", c, cluster.GetName())
	}
	sa := cluster.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
	if !strings.HasPrefix(sa.GetAddress(), "meshguard.") || sa.GetPortValue() != 8082 {
		t.Errorf("rate limit cluster reaches %s:%d, want meshguard's rate limit listener (8082)", sa.GetAddress(), sa.GetPortValue())
	}
	if cluster.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] == nil {
		t.Error("rate limit cluster must speak HTTP/2 (gRPC)")
	}
	if rl.GetDomain() != "api" || rl.GetFailureModeDeny() {
		t.Errorf("rate limit filter: domain %q, failure_mode_deny %v", rl.GetDomain(), rl.GetFailureModeDeny())
	}
}

// TestEnvoyGatewayRejects: the strict decoding catches a misspelled field.
func TestEnvoyGatewayRejects(t *testing.T) {
	doc := "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: SecurityPolicy\nmetadata: {name: x}\nspec:\n  extAuth:\n    failopen: false\n"
	var sp egv1alpha1.SecurityPolicy
	if err := unmarshalStrict([]byte(doc), &sp); err == nil || !strings.Contains(err.Error(), `unknown field "spec.extAuth.failopen"`) {
		t.Fatalf("UnmarshalStrict error = %v", err)
	}
}
