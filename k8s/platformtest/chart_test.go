package platformtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"
	"helm.sh/helm/v4/pkg/chart/common"
	chartutil "helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	jwtauthnv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/jwt_authn/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	xffv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/original_ip_detection/xff/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshguard/meshguard/envoy"
)

const chartDir = "../helm/meshguard"

var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, batchv1.AddToScheme, autoscalingv2.AddToScheme,
		policyv1.AddToScheme, networkingv1.AddToScheme,
	} {
		if err := add(s); err != nil {
			panic(err)
		}
	}
	return s
}()

// strict rejects unknown and duplicate fields.
var strict = serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()

// rendered is a chart or kustomize output, strictly decoded.
type rendered struct {
	byKind map[string]map[string]runtime.Object // kind -> name -> object
	// monitoring objects (monitoring.coreos.com/v1) as plain maps
	monitoring map[string]map[string]any // kind/name -> object
}

func (r *rendered) get(kind, name string) runtime.Object { return r.byKind[kind][name] }

func (r *rendered) deployment(name string) *appsv1.Deployment {
	d, _ := r.get("Deployment", name).(*appsv1.Deployment)
	return d
}

// decodeAll strictly decodes a multi-document YAML stream.
func decodeAll(stream string) (*rendered, error) {
	r := &rendered{byKind: map[string]map[string]runtime.Object{}, monitoring: map[string]map[string]any{}}
	for i, doc := range strings.Split(stream, "\n---") {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if head.APIVersion == "monitoring.coreos.com/v1" {
			var m map[string]any
			if err := yaml.UnmarshalStrict([]byte(doc), &m); err != nil {
				return nil, fmt.Errorf("%s %s: %w", head.Kind, head.Metadata.Name, err)
			}
			r.monitoring[head.Kind+"/"+head.Metadata.Name] = m
			continue
		}
		obj, _, err := strict.Decode([]byte(doc), nil, nil)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", head.Kind, head.Metadata.Name, err)
		}
		if r.byKind[head.Kind] == nil {
			r.byKind[head.Kind] = map[string]runtime.Object{}
		}
		if r.byKind[head.Kind][head.Metadata.Name] != nil {
			return nil, fmt.Errorf("%s %s rendered twice", head.Kind, head.Metadata.Name)
		}
		r.byKind[head.Kind][head.Metadata.Name] = obj
	}
	return r, nil
}

// unmarshalStrict decodes YAML into obj as the API server does: field names
// case-sensitive, unknown and duplicate fields rejected.
func unmarshalStrict(doc []byte, obj any) error {
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	strictErrs, err := kjson.UnmarshalStrict(js, obj, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strictErrs...)
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// monitoringAPIs are the API versions a cluster with the Prometheus Operator
// reports.
var monitoringAPIs = []string{"monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule"}

// renderChart renders the chart with Helm's engine as `helm template`
// does: values validated against values.schema.json, then every template.
func renderChart(ctx context.Context, vals map[string]any, apis ...string) (string, error) {
	ch, err := loader.Load(chartDir)
	if err != nil {
		return "", err
	}
	caps := common.DefaultCapabilities.Copy()
	caps.APIVersions = append(slices.Clone(caps.APIVersions), apis...)
	rv, err := chartutil.ToRenderValuesWithSchemaValidation(ch, vals, common.ReleaseOptions{Name: "meshguard", Namespace: "meshguard", IsInstall: true}, caps, false)
	if err != nil {
		return "", err
	}
	out, err := engine.Engine{Strict: true}.RenderWithContext(ctx, ch, rv)
	if err != nil {
		return "", err
	}
	names := make([]string, 0, len(out))
	for n := range out {
		if strings.HasSuffix(n, ".yaml") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		b.WriteString("\n---\n# Source: " + n + "\n" + out[n])
	}
	return b.String(), nil
}

func mustRender(t *testing.T, vals map[string]any, apis ...string) *rendered {
	t.Helper()
	out, err := renderChart(t.Context(), vals, apis...)
	if err != nil {
		t.Fatalf("rendering the chart: %v", err)
	}
	r, err := decodeAll(out)
	if err != nil {
		t.Fatalf("decoding the rendered chart: %v", err)
	}
	return r
}

var kustomizeBase = sync.OnceValues(func() (*rendered, error) {
	opts := krusty.MakeDefaultOptions()
	opts.LoadRestrictions = types.LoadRestrictionsRootOnly
	rm, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), "../base")
	if err != nil {
		return nil, err
	}
	y, err := rm.AsYaml()
	if err != nil {
		return nil, err
	}
	return decodeAll(string(y))
})

// TestChartFilesAreCopies: the files the chart ships are the ones the
// kustomize base and envoy/ ship (Helm cannot read outside the chart).
func TestChartFilesAreCopies(t *testing.T) {
	for chartFile, src := range map[string]string{
		"files/envoy.yaml":                    "../../envoy/envoy.yaml",
		"files/meshguard.yaml":                "../base/meshguard.yaml",
		"files/ratelimit/api.yaml":            "../base/ratelimit/api.yaml",
		"files/meshguard-prometheusrule.yaml": "../base/meshguard-prometheusrule.yaml",
		"files/envoy-prometheusrule.yaml":     "../base/envoy-prometheusrule.yaml",
		"files/meshguard-dashboard.json":      "../grafana/meshguard-dashboard.json",
	} {
		a, err := os.ReadFile(filepath.Join(chartDir, chartFile))
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("%s/%s differs from %s: cp %s k8s/helm/meshguard/%s", chartDir, chartFile, src, strings.TrimPrefix(src, "../../"), chartFile)
		}
	}
}

// TestChartDefaultRender: the default values render, every object decodes
// strictly, and the objects are those of the kustomize base.
func TestChartDefaultRender(t *testing.T) {
	r := mustRender(t, nil)
	base, err := kustomizeBase()
	if err != nil {
		t.Fatal(err)
	}
	var want, got []string
	for kind, objs := range base.byKind {
		for name := range objs {
			if kind == "ConfigMap" {
				name = strings.TrimSuffix(name, name[strings.LastIndex(name, "-"):]) // hash suffix
				if name == "meshguard" {
					name = "meshguard-ratelimit"
				}
			}
			want = append(want, kind+"/"+name)
		}
	}
	for kind, objs := range r.byKind {
		for name := range objs {
			got = append(got, kind+"/"+name)
		}
	}
	sort.Strings(want)
	sort.Strings(got)
	// The chart adds the dashboard ConfigMap (the kustomize base has it in
	// k8s/grafana).
	want = append(want, "ConfigMap/meshguard-dashboard")
	sort.Strings(want)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("objects (-kustomize base +chart):\n%s", diff)
	}
	if len(r.monitoring) != 0 {
		t.Errorf("monitoring objects rendered on a cluster without their CRDs: %v", keys(r.monitoring))
	}
}

// TestChartAgreesWithKustomize: with default values the chart and the
// kustomize base agree on what matters: ports, probes, lifecycle, security
// contexts, resources, Services, PDBs, HPAs and NetworkPolicies.
func TestChartAgreesWithKustomize(t *testing.T) {
	chart := mustRender(t, nil)
	base, err := kustomizeBase()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"meshguard", "envoy"} {
		k, h := base.deployment(name), chart.deployment(name)
		if k == nil || h == nil {
			t.Fatalf("Deployment %s: kustomize %v, chart %v", name, k != nil, h != nil)
		}
		if h.Spec.Replicas != nil {
			t.Errorf("chart Deployment %s sets replicas beside its HPA", name)
		}
		kp, hp := &k.Spec.Template.Spec, &h.Spec.Template.Spec
		same(t, "Deployment "+name+" pod security context", kp.SecurityContext, hp.SecurityContext)
		same(t, "Deployment "+name+" grace period", kp.TerminationGracePeriodSeconds, hp.TerminationGracePeriodSeconds)
		same(t, "Deployment "+name+" strategy", k.Spec.Strategy, h.Spec.Strategy)
		same(t, "Deployment "+name+" volumes", volumeNames(kp.Volumes), volumeNames(hp.Volumes))
		for i := range kp.Containers {
			kc, hc := kp.Containers[i], hp.Containers[i]
			at := "Deployment " + name + " container " + kc.Name
			same(t, at+" ports", kc.Ports, hc.Ports)
			same(t, at+" readiness", kc.ReadinessProbe, hc.ReadinessProbe)
			same(t, at+" liveness", kc.LivenessProbe, hc.LivenessProbe)
			same(t, at+" startup", kc.StartupProbe, hc.StartupProbe)
			same(t, at+" lifecycle", kc.Lifecycle, hc.Lifecycle)
			same(t, at+" security context", kc.SecurityContext, hc.SecurityContext)
			same(t, at+" resources", kc.Resources, hc.Resources)
			same(t, at+" args", kc.Args, hc.Args)
			same(t, at+" env", kc.Env, hc.Env)
			same(t, at+" envFrom", kc.EnvFrom, hc.EnvFrom)
			same(t, at+" mounts", kc.VolumeMounts, hc.VolumeMounts)
			same(t, at+" image", kc.Image, hc.Image)
		}
	}
	for name, obj := range base.byKind["Service"] {
		same(t, "Service "+name, obj.(*corev1.Service).Spec, chart.get("Service", name).(*corev1.Service).Spec)
	}
	for name, obj := range base.byKind["NetworkPolicy"] {
		same(t, "NetworkPolicy "+name, obj.(*networkingv1.NetworkPolicy).Spec, chart.get("NetworkPolicy", name).(*networkingv1.NetworkPolicy).Spec)
	}
	for name, obj := range base.byKind["PodDisruptionBudget"] {
		same(t, "PodDisruptionBudget "+name, obj.(*policyv1.PodDisruptionBudget).Spec, chart.get("PodDisruptionBudget", name).(*policyv1.PodDisruptionBudget).Spec)
	}
	for name, obj := range base.byKind["HorizontalPodAutoscaler"] {
		same(t, "HPA "+name, obj.(*autoscalingv2.HorizontalPodAutoscaler).Spec, chart.get("HorizontalPodAutoscaler", name).(*autoscalingv2.HorizontalPodAutoscaler).Spec)
	}
	kj, hj := base.get("Job", "meshguard-migrate").(*batchv1.Job), chart.get("Job", "meshguard-migrate").(*batchv1.Job)
	same(t, "migration Job pod", kj.Spec.Template.Spec.Containers[0].Args, hj.Spec.Template.Spec.Containers[0].Args)
	same(t, "migration Job pod labels", kj.Spec.Template.Labels, hj.Spec.Template.Labels)
	// The configs themselves.
	for _, c := range []struct{ prefix, key string }{{"meshguard-config", "meshguard.yaml"}, {"envoy-config", "envoy.yaml"}, {"meshguard-ratelimit", "api.yaml"}} {
		var k *corev1.ConfigMap
		for name, obj := range base.byKind["ConfigMap"] {
			if strings.HasPrefix(name, c.prefix) {
				k = obj.(*corev1.ConfigMap)
			}
		}
		h := chart.get("ConfigMap", c.prefix).(*corev1.ConfigMap)
		if k == nil {
			t.Errorf("kustomize base has no ConfigMap %s", c.prefix)
			continue
		}
		if diff := cmp.Diff(k.Data[c.key], h.Data[c.key]); diff != "" {
			t.Errorf("ConfigMap %s: the chart's %s differs from the kustomize base's (-kustomize +chart):\n%s", c.prefix, c.key, diff)
		}
	}
}

func same(t *testing.T, what string, want, got any) {
	t.Helper()
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("%s differs (-kustomize +chart):\n%s", what, diff)
	}
}

func volumeNames(vs []corev1.Volume) []string {
	var out []string
	for _, v := range vs {
		out = append(out, v.Name)
	}
	return out
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// TestChartMonitoringOnlyWithCRDs: ServiceMonitors and PrometheusRules
// render only on a cluster that has their API, and then carry the rules of
// the kustomize base.
func TestChartMonitoringOnlyWithCRDs(t *testing.T) {
	if r := mustRender(t, nil); len(r.monitoring) != 0 {
		t.Errorf("without the CRDs: %v", keys(r.monitoring))
	}
	r := mustRender(t, nil, monitoringAPIs...)
	want := []string{"PrometheusRule/envoy", "PrometheusRule/meshguard", "ServiceMonitor/envoy", "ServiceMonitor/meshguard"}
	if got := keys(r.monitoring); !slices.Equal(got, want) {
		t.Errorf("with the CRDs: %v, want %v", got, want)
	}
	if r := mustRender(t, map[string]any{"monitoring": map[string]any{"enabled": false}}, monitoringAPIs...); len(r.monitoring) != 0 {
		t.Errorf("monitoring.enabled=false: %v", keys(r.monitoring))
	}
}

// TestChartValues: each value reaches the objects it is for.
func TestChartValues(t *testing.T) {
	digest := "sha256:" + strings.Repeat("ab", 32)
	vals := map[string]any{
		"image": map[string]any{
			"meshguard": map[string]any{"digest": digest},
			"envoy":     map[string]any{"tag": "v1.40.0", "digest": digest},
		},
		"meshguard": map[string]any{
			"existingSecret": "prod-secrets",
			"autoscaling":    map[string]any{"minReplicas": 3, "maxReplicas": 20},
		},
		"envoy": map[string]any{
			"idp": map[string]any{
				"issuer":    "https://login.example.org/realms/app",
				"jwksURI":   "https://login.example.org/realms/app/protocol/openid-connect/certs",
				"host":      "login.example.org",
				"audiences": []any{"app", "dashboard"},
			},
			"trustedCIDRs": []any{"198.51.100.0/24"},
		},
		"app": map[string]any{"host": "web", "port": 8080, "service": map[string]any{"create": true, "selector": map[string]any{"app.kubernetes.io/name": "web"}}},
		"networkPolicy": map[string]any{"ingress": map[string]any{
			"namespaceSelector": map[string]any{"kubernetes.io/metadata.name": "traefik"},
			"podSelector":       map[string]any{"app.kubernetes.io/name": "traefik"},
		}},
	}
	r := mustRender(t, vals)
	mg, ev := r.deployment("meshguard"), r.deployment("envoy")
	if img := mg.Spec.Template.Spec.Containers[0].Image; img != "ghcr.io/meshguard/meshguard:0.1.0@"+digest {
		t.Errorf("meshguard image %q", img)
	}
	if img := ev.Spec.Template.Spec.Containers[0].Image; img != "envoyproxy/envoy:v1.40.0@"+digest {
		t.Errorf("envoy image %q", img)
	}
	if ref := mg.Spec.Template.Spec.Containers[0].EnvFrom[0].SecretRef.Name; ref != "prod-secrets" {
		t.Errorf("meshguard secret %q", ref)
	}
	if h := r.get("HorizontalPodAutoscaler", "meshguard").(*autoscalingv2.HorizontalPodAutoscaler); *h.Spec.MinReplicas != 3 || h.Spec.MaxReplicas != 20 {
		t.Errorf("meshguard HPA %d-%d", *h.Spec.MinReplicas, h.Spec.MaxReplicas)
	}
	if s, ok := r.get("Service", "web").(*corev1.Service); !ok || s.Spec.Selector["app.kubernetes.io/name"] != "web" || s.Spec.Ports[0].Port != 8080 {
		t.Errorf("app Service: %v", r.get("Service", "web"))
	}
	np := r.get("NetworkPolicy", "envoy").(*networkingv1.NetworkPolicy)
	from := np.Spec.Ingress[0].From
	if len(from) != 2 || from[0].NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] != "traefik" ||
		from[0].PodSelector.MatchLabels["app.kubernetes.io/name"] != "traefik" || from[1].IPBlock == nil || from[1].IPBlock.CIDR != "198.51.100.0/24" {
		t.Errorf("envoy NetworkPolicy ingress from %+v", from)
	}

	// The Envoy bootstrap with the values in it: valid on the newest and the
	// oldest supported Envoy, the identity provider and the app as given.
	cfg := r.get("ConfigMap", "envoy-config").(*corev1.ConfigMap).Data["envoy.yaml"]
	b, err := envoy.ParseBootstrap([]byte(cfg))
	if err != nil {
		t.Fatalf("rendered Envoy bootstrap: %v", err)
	}
	jwt := jwtFilter(t, b)
	p := jwt.GetProviders()["app"]
	if p.GetIssuer() != "https://login.example.org/realms/app" || p.GetRemoteJwks().GetHttpUri().GetUri() != "https://login.example.org/realms/app/protocol/openid-connect/certs" ||
		!slices.Equal(p.GetAudiences(), []string{"app", "dashboard"}) {
		t.Errorf("jwt provider: issuer %q, jwks %q, audiences %q", p.GetIssuer(), p.GetRemoteJwks().GetHttpUri().GetUri(), p.GetAudiences())
	}
	for _, c := range b.GetStaticResources().GetClusters() {
		sa := c.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
		switch c.GetName() {
		case "idp":
			var tls tlsv3.UpstreamTlsContext
			if err := c.GetTransportSocket().GetTypedConfig().UnmarshalTo(&tls); err != nil {
				t.Fatal(err)
			}
			if sa.GetAddress() != "login.example.org" || tls.GetSni() != "login.example.org" {
				t.Errorf("idp cluster reaches %s with SNI %s", sa.GetAddress(), tls.GetSni())
			}
		case "app":
			if sa.GetAddress() != "web" || sa.GetPortValue() != 8080 {
				t.Errorf("app cluster reaches %s:%d", sa.GetAddress(), sa.GetPortValue())
			}
		}
	}
	f := filepath.Join(t.TempDir(), "envoy.yaml")
	if err := os.WriteFile(f, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if testing.Short() {
		return
	}
	if out, err := runCompat(t, f); err != nil {
		t.Errorf("the rendered bootstrap does not load on the oldest supported Envoy: %v\n%s", err, out)
	}
}

// TestChartTrustedRangesAgree: the sources the Envoy NetworkPolicy admits
// to the listener and the ranges Envoy trusts to supply X-Forwarded-For
// (xff_trusted_cidrs) come from the same values: envoy.trustedCIDRs are
// both ipBlocks and trusted; the ingress controller's pods, admitted by
// selector, are trusted through networkPolicy.ingress.podCIDRs; nothing else
// is either. A client address outside them is never trusted.
func TestChartTrustedRangesAgree(t *testing.T) {
	sel := map[string]any{"kubernetes.io/metadata.name": "traefik"}
	tests := []struct {
		name     string
		vals     map[string]any
		selected bool
		blocks   []string // envoy.trustedCIDRs
		pods     []string // networkPolicy.ingress.podCIDRs
	}{
		{name: "defaults", selected: true, pods: []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"}},
		{
			name: "load balancer ranges beside the ingress controller",
			vals: map[string]any{
				"envoy":         map[string]any{"trustedCIDRs": []any{"198.51.100.0/24", "2001:db8:1::/48"}},
				"networkPolicy": map[string]any{"ingress": map[string]any{"podCIDRs": []any{"10.244.0.0/16", "fd00:10:244::/56"}}},
			},
			selected: true, blocks: []string{"198.51.100.0/24", "2001:db8:1::/48"}, pods: []string{"10.244.0.0/16", "fd00:10:244::/56"},
		},
		{
			name: "load balancer ranges only",
			vals: map[string]any{
				"envoy":         map[string]any{"trustedCIDRs": []any{"198.51.100.0/24"}},
				"networkPolicy": map[string]any{"ingress": map[string]any{"namespaceSelector": nil, "podSelector": nil}},
			},
			blocks: []string{"198.51.100.0/24"},
		},
		{
			name:     "a namespace selector alone",
			vals:     map[string]any{"networkPolicy": map[string]any{"ingress": map[string]any{"namespaceSelector": sel, "podSelector": nil, "podCIDRs": []any{"10.42.0.0/16"}}}},
			selected: true, pods: []string{"10.42.0.0/16"},
		},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := mustRender(t, tc.vals)
			b, err := envoy.ParseBootstrap([]byte(r.get("ConfigMap", "envoy-config").(*corev1.ConfigMap).Data["envoy.yaml"]))
			if err != nil {
				t.Fatalf("rendered Envoy bootstrap: %v", err)
			}
			xff := xffTrusted(t, b)
			np := r.get("NetworkPolicy", "envoy").(*networkingv1.NetworkPolicy)
			var blocks []netip.Prefix
			selected := false
			for _, rule := range np.Spec.Ingress {
				if !slices.ContainsFunc(rule.Ports, func(p networkingv1.NetworkPolicyPort) bool { return p.Port != nil && p.Port.String() == "http" }) {
					continue
				}
				for _, peer := range rule.From {
					switch {
					case peer.IPBlock != nil:
						if len(peer.IPBlock.Except) > 0 {
							t.Errorf("ipBlock %v has exceptions the trusted ranges do not", peer.IPBlock)
						}
						blocks = append(blocks, mustPrefix(t, peer.IPBlock.CIDR))
					case peer.PodSelector != nil || peer.NamespaceSelector != nil:
						selected = true
					default:
						t.Errorf("the listener admits %+v: any source", peer)
					}
				}
			}
			if selected != tc.selected {
				t.Errorf("NetworkPolicy admits selected pods: %v, want %v", selected, tc.selected)
			}
			want := prefixes(t, tc.blocks)
			if !slices.Equal(sortedPrefixes(blocks), sortedPrefixes(want)) {
				t.Errorf("NetworkPolicy ipBlocks %v, want envoy.trustedCIDRs %v", blocks, want)
			}
			// Every admitted source is trusted, and the trusted ranges are
			// exactly the admitted ones: the ipBlocks, and the pod ranges
			// only when pods are admitted by selector.
			wantXff := append(want, prefixes(t, tc.pods)...)
			if !slices.Equal(sortedPrefixes(xff), sortedPrefixes(wantXff)) {
				t.Errorf("xff_trusted_cidrs %v, want %v", xff, wantXff)
			}
			for _, a := range []string{"203.0.113.9", "2001:db8:ffff::1", "8.8.8.8"} {
				if containsAddr(xff, netip.MustParseAddr(a)) {
					t.Errorf("%s may supply X-Forwarded-For", a)
				}
			}
			if !tc.selected && containsAddr(xff, netip.MustParseAddr("10.1.2.3")) {
				t.Error("with no pods admitted, a pod address may still supply X-Forwarded-For")
			}
			if i == 1 && !testing.Short() {
				f := filepath.Join(t.TempDir(), "envoy.yaml")
				if err := os.WriteFile(f, []byte(r.get("ConfigMap", "envoy-config").(*corev1.ConfigMap).Data["envoy.yaml"]), 0o600); err != nil {
					t.Fatal(err)
				}
				if out, err := runCompat(t, f); err != nil {
					t.Errorf("the rendered bootstrap does not load on the oldest supported Envoy: %v\n%s", err, out)
				}
			}
		})
	}
}

// xffTrusted is the xff extension's xff_trusted_cidrs in b's listener.
func xffTrusted(t *testing.T, b *bootstrapv3.Bootstrap) []netip.Prefix {
	t.Helper()
	var hcm hcmv3.HttpConnectionManager
	if err := b.GetStaticResources().GetListeners()[0].GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
		t.Fatal(err)
	}
	exts := hcm.GetOriginalIpDetectionExtensions()
	if len(exts) != 1 {
		t.Fatalf("%d original IP detection extensions, want the xff one", len(exts))
	}
	var x xffv3.XffConfig
	if err := exts[0].GetTypedConfig().UnmarshalTo(&x); err != nil {
		t.Fatal(err)
	}
	var out []netip.Prefix
	for _, c := range x.GetXffTrustedCidrs().GetCidrs() {
		out = append(out, mustPrefix(t, fmt.Sprintf("%s/%d", c.GetAddressPrefix(), c.GetPrefixLen().GetValue())))
	}
	if len(out) == 0 {
		// Envoy then trusts X-Forwarded-For from any peer (one hop).
		t.Fatal("xff_trusted_cidrs is empty")
	}
	return out
}

func mustPrefix(t *testing.T, s string) netip.Prefix {
	t.Helper()
	p, err := netip.ParsePrefix(s)
	if err != nil {
		t.Fatalf("%q: %v", s, err)
	}
	return p
}

func prefixes(t *testing.T, ss []string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, mustPrefix(t, s))
	}
	return out
}

func sortedPrefixes(ps []netip.Prefix) []string {
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.String())
	}
	sort.Strings(out)
	return out
}

func containsAddr(ps []netip.Prefix, a netip.Addr) bool {
	return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a) })
}

// TestChartAccountKey: the meshguard pods get MESHGUARD_ACCOUNT_KEY, by a
// reference that is not optional, from the Secret they read everything
// else from: the existing one, or the one the chart creates, which holds a
// key of at least 16 bytes (the one given, else a random one) and only the
// other values given.
func TestChartAccountKey(t *testing.T) {
	check := func(t *testing.T, r *rendered, secret string) {
		t.Helper()
		d := r.deployment("meshguard")
		c := d.Spec.Template.Spec.Containers[0]
		if len(c.EnvFrom) != 1 || c.EnvFrom[0].SecretRef == nil || c.EnvFrom[0].SecretRef.Name != secret {
			t.Errorf("meshguard envFrom %+v, want Secret %s", c.EnvFrom, secret)
		}
		i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "MESHGUARD_ACCOUNT_KEY" })
		if i < 0 {
			t.Fatal("the meshguard container has no MESHGUARD_ACCOUNT_KEY")
		}
		ref := c.Env[i].ValueFrom.SecretKeyRef
		if ref == nil || ref.Name != secret || ref.Key != "MESHGUARD_ACCOUNT_KEY" || (ref.Optional != nil && *ref.Optional) {
			t.Errorf("MESHGUARD_ACCOUNT_KEY from %+v, want the required key MESHGUARD_ACCOUNT_KEY of Secret %s", ref, secret)
		}
	}
	t.Run("existing Secret", func(t *testing.T) {
		r := mustRender(t, map[string]any{"meshguard": map[string]any{"existingSecret": "prod-secrets"}})
		check(t, r, "prod-secrets")
		checkMigrateSecret(t, r, "meshguard-migrate-secrets")
		if len(r.byKind["Secret"]) != 0 {
			t.Errorf("the chart renders Secrets %v beside an existing one", r.byKind["Secret"])
		}
	})
	t.Run("generated Secret", func(t *testing.T) {
		r := mustRender(t, map[string]any{"meshguard": map[string]any{"existingSecret": "", "secret": map[string]any{
			"databaseURL": "postgres://meshguard:pw@db:5432/meshguard?sslmode=require",
		}}})
		check(t, r, "meshguard")
		checkMigrateSecret(t, r, "meshguard-migrate")
		sec, ok := r.get("Secret", "meshguard").(*corev1.Secret)
		if !ok {
			t.Fatal("no Secret meshguard")
		}
		if k := sec.Data["MESHGUARD_ACCOUNT_KEY"]; len(k) < 16 {
			t.Errorf("generated MESHGUARD_ACCOUNT_KEY has %d bytes, want at least 16", len(k))
		}
		if got := string(sec.Data["DATABASE_URL"]); got != "postgres://meshguard:pw@db:5432/meshguard?sslmode=require" {
			t.Errorf("DATABASE_URL %q", got)
		}
		if _, ok := sec.Data["REDIS_URL"]; ok {
			t.Error("an empty redisURL is written into the Secret (meshguard would read REDIS_URL=\"\")")
		}
	})
	t.Run("generated Secret with the key given", func(t *testing.T) {
		const key = "an-account-key-shared-by-every-replica"
		r := mustRender(t, map[string]any{"meshguard": map[string]any{"existingSecret": "", "secret": map[string]any{"accountKey": key}}})
		if got := string(r.get("Secret", "meshguard").(*corev1.Secret).Data["MESHGUARD_ACCOUNT_KEY"]); got != key {
			t.Errorf("MESHGUARD_ACCOUNT_KEY %q, want the given %q", got, key)
		}
	})
}

// checkMigrateSecret: the migration Job reads the schema owner's login from
// a Secret of its own, never the Deployment's (whose login may only INSERT
// and SELECT the audit trail).
func checkMigrateSecret(t *testing.T, r *rendered, secret string) {
	t.Helper()
	j := r.get("Job", "meshguard-migrate").(*batchv1.Job)
	if ef := j.Spec.Template.Spec.Containers[0].EnvFrom; len(ef) != 1 || ef[0].SecretRef == nil || ef[0].SecretRef.Name != secret {
		t.Errorf("migration Job envFrom %+v, want Secret %s", ef, secret)
	}
	d := r.deployment("meshguard")
	for _, ef := range d.Spec.Template.Spec.Containers[0].EnvFrom {
		if ef.SecretRef != nil && ef.SecretRef.Name == secret {
			t.Errorf("the meshguard Deployment reads the migration Secret %s", secret)
		}
	}
}

// TestChartMigrateAndAuditSecrets: the Secrets the chart creates keep the
// schema owner's login for the migration Job (a hook Secret deleted once the
// Job succeeded) and pass the audit signing key to the pods.
func TestChartMigrateAndAuditSecrets(t *testing.T) {
	const (
		writer = "postgres://meshguard_serve:pw@db:5432/meshguard?sslmode=require"
		owner  = "postgres://meshguard_owner:pw@db:5432/meshguard?sslmode=require"
		key    = "PRIVATE+KEY+prod-audit+0a1b2c3d+AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
	)
	r := mustRender(t, map[string]any{"meshguard": map[string]any{"existingSecret": "", "secret": map[string]any{
		"databaseURL": writer, "migrateDatabaseURL": owner, "auditKey": key,
	}}})
	sec := r.get("Secret", "meshguard").(*corev1.Secret)
	if got := string(sec.Data["DATABASE_URL"]); got != writer {
		t.Errorf("meshguard DATABASE_URL %q, want the writer's %q", got, writer)
	}
	if got := string(sec.Data["MESHGUARD_AUDIT_KEY"]); got != key {
		t.Errorf("MESHGUARD_AUDIT_KEY %q, want %q", got, key)
	}
	mig, ok := r.get("Secret", "meshguard-migrate").(*corev1.Secret)
	if !ok {
		t.Fatal("no Secret meshguard-migrate")
	}
	if got := string(mig.Data["DATABASE_URL"]); got != owner {
		t.Errorf("meshguard-migrate DATABASE_URL %q, want the owner's %q", got, owner)
	}
	if len(mig.Data) != 1 {
		t.Errorf("meshguard-migrate holds %v, want DATABASE_URL only", keys(mig.Data))
	}
	if hook := mig.Annotations["helm.sh/hook"]; hook != "post-install,pre-upgrade" {
		t.Errorf("meshguard-migrate hook %q: it must exist when the pre-upgrade Job runs", hook)
	}
	if del := mig.Annotations["helm.sh/hook-delete-policy"]; !strings.Contains(del, "hook-succeeded") {
		t.Errorf("meshguard-migrate delete policy %q: the owner's password would stay in the cluster", del)
	}

	r = mustRender(t, map[string]any{"meshguard": map[string]any{"existingSecret": "", "migrate": false}})
	if _, ok := r.byKind["Secret"]["meshguard-migrate"]; ok {
		t.Error("Secret meshguard-migrate rendered with migrate=false")
	}
}

// TestChartDefaultEnvoyConfig: with default values the chart's bootstrap is
// envoy/envoy.yaml.
func TestChartDefaultEnvoyConfig(t *testing.T) {
	r := mustRender(t, nil)
	got, err := envoy.ParseBootstrap([]byte(r.get("ConfigMap", "envoy-config").(*corev1.ConfigMap).Data["envoy.yaml"]))
	if err != nil {
		t.Fatal(err)
	}
	want, err := envoy.ParseBootstrap(envoy.FrontProxy)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
		t.Errorf("default render differs from envoy/envoy.yaml (-want +got):\n%s", diff)
	}
}

// jwtFilter is the jwt_authn filter of the bootstrap's first listener.
func jwtFilter(t *testing.T, b *bootstrapv3.Bootstrap) *jwtauthnv3.JwtAuthentication {
	t.Helper()
	var hcm hcmv3.HttpConnectionManager
	if err := b.GetStaticResources().GetListeners()[0].GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
		t.Fatal(err)
	}
	for _, f := range hcm.GetHttpFilters() {
		if f.GetName() == "envoy.filters.http.jwt_authn" {
			var m jwtauthnv3.JwtAuthentication
			if err := f.GetTypedConfig().UnmarshalTo(&m); err != nil {
				t.Fatal(err)
			}
			return &m
		}
	}
	t.Fatal("no jwt_authn filter")
	return nil
}

// runCompat runs envoy/compat (the oldest supported Envoy API) on files.
func runCompat(t *testing.T, files ...string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(), append([]string{"run", "."}, files...)...)
	cmd.Dir = "../../envoy/compat"
	return cmd.CombinedOutput()
}

// goTool is the go command of the toolchain running the tests.
func goTool() string {
	if root := os.Getenv("GOROOT"); root != "" {
		if p := filepath.Join(root, "bin", "go"); fileExists(p) {
			return p
		}
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// TestChartRejects: values that would produce an invalid or unsafe object
// fail the render with a message that names the value.
func TestChartRejects(t *testing.T) {
	tests := []struct {
		name string
		vals map[string]any
		want string
	}{
		{"floating image tag", map[string]any{"image": map[string]any{"envoy": map[string]any{"tag": "v1.40-latest"}}}, "/image/envoy/tag"},
		{"digest not sha256", map[string]any{"image": map[string]any{"meshguard": map[string]any{"digest": "latest"}}}, "/image/meshguard/digest"},
		{"unknown value", map[string]any{"meshguard": map[string]any{"replicas": 3}}, "replicas"},
		{"replica bounds", map[string]any{"envoy": map[string]any{"autoscaling": map[string]any{"minReplicas": 0}}}, "/envoy/autoscaling/minReplicas"},
		{"JWKS over plain HTTP", map[string]any{"envoy": map[string]any{"idp": map[string]any{"jwksURI": "http://idp.example.com/jwks"}}}, "/envoy/idp/jwksURI"},
		{"not a CIDR", map[string]any{"envoy": map[string]any{"trustedCIDRs": []any{"10.0.0.1"}}}, "/envoy/trustedCIDRs/0"},
		{"not an address", map[string]any{"envoy": map[string]any{"trustedCIDRs": []any{"10.0.0.300/8"}}}, "/envoy/trustedCIDRs/0"},
		{"prefix too long", map[string]any{"networkPolicy": map[string]any{"ingress": map[string]any{"podCIDRs": []any{"10.0.0.0/33"}}}}, "/networkPolicy/ingress/podCIDRs/0"},
		{"selected pods not trusted", map[string]any{"networkPolicy": map[string]any{"ingress": map[string]any{"podCIDRs": []any{}}}}, "networkPolicy.ingress.podCIDRs is empty"},
		{"secret name", map[string]any{"meshguard": map[string]any{"existingSecret": "Bad_Name"}}, "/meshguard/existingSecret"},
		{"secret values beside an existing Secret", map[string]any{"meshguard": map[string]any{"secret": map[string]any{"accountKey": "0123456789abcdef"}}}, "meshguard.secret is for the Secret the chart creates"},
		{"existing Secret without a migration Secret", map[string]any{"meshguard": map[string]any{"existingMigrateSecret": ""}}, "meshguard.existingMigrateSecret is empty"},
		{"audit key not in note format", map[string]any{"meshguard": map[string]any{"existingSecret": "", "secret": map[string]any{"auditKey": "0123456789abcdef"}}}, "/meshguard/secret/auditKey"},
		{"short account key", map[string]any{"meshguard": map[string]any{"existingSecret": "", "secret": map[string]any{"accountKey": "short"}}}, "/meshguard/secret/accountKey"},
		{"database URL of another kind", map[string]any{"meshguard": map[string]any{"existingSecret": "", "secret": map[string]any{"databaseURL": "mysql://db/meshguard"}}}, "/meshguard/secret/databaseURL"},
		{"Envoy open to any source", map[string]any{"networkPolicy": map[string]any{"ingress": map[string]any{"namespaceSelector": nil, "podSelector": nil}}}, "Envoy's listener would be open to any source"},
		{"app Service without selector", map[string]any{"app": map[string]any{"service": map[string]any{"create": true}}}, "app.service.create needs app.service.selector"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := renderChart(t.Context(), tc.vals)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("render error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}
