// Package k8s holds meshguard's Kubernetes manifests (a kustomize base, two
// overlays and a Grafana dashboard); see README.md. Its tests build every
// kustomization with kustomize's own library, under the same root-only load
// restriction as `kubectl apply -k`, decode every object strictly against the
// Kubernetes API types (an unknown or misspelled field fails), and check the
// wiring between the objects, the meshguard config and the Envoy bootstrap.
package k8s

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	grpcalsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ratelimit/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/meshguard/meshguard/auditapi"
	"github.com/meshguard/meshguard/auditsink"
	"github.com/meshguard/meshguard/audittrail"
	"github.com/meshguard/meshguard/envoy"
	"github.com/meshguard/meshguard/extauthz"
	"github.com/meshguard/meshguard/internal/pgpool"
	"github.com/meshguard/meshguard/ratelimitsvc"
)

// kustomizations are the directories a user applies with kubectl apply -k.
var kustomizations = []string{"base", "grafana", "overlays/production", "overlays/development", "overlays/production-mtls"}

// objects is one built kustomization, decoded.
type objects struct {
	all             []runtime.Object
	deployments     map[string]*appsv1.Deployment
	services        map[string]*corev1.Service
	configMaps      map[string]*corev1.ConfigMap // by name as generated (with hash suffix)
	secrets         map[string]*corev1.Secret
	jobs            map[string]*batchv1.Job
	hpas            map[string]*autoscalingv2.HorizontalPodAutoscaler
	pdbs            map[string]*policyv1.PodDisruptionBudget
	netpols         map[string]*networkingv1.NetworkPolicy
	serviceMonitors map[string]*unstructured.Unstructured
	prometheusRules map[string]*unstructured.Unstructured
	namespaces      map[string]*corev1.Namespace
	serviceAccounts map[string]*corev1.ServiceAccount
}

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

// built caches each kustomization's objects: building is the slow part and
// the tests only read the result.
var built sync.Map // dir -> func() (*objects, error)

// build returns dir's objects, built and strictly decoded once per test
// binary; a build or decode error fails the calling test.
func build(t *testing.T, dir string) *objects {
	t.Helper()
	f, _ := built.LoadOrStore(dir, sync.OnceValues(func() (*objects, error) { return buildDir(dir) }))
	o, err := f.(func() (*objects, error))()
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func buildDir(dir string) (*objects, error) {
	opts := krusty.MakeDefaultOptions()
	opts.LoadRestrictions = types.LoadRestrictionsRootOnly
	rm, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	o := &objects{
		deployments: map[string]*appsv1.Deployment{}, services: map[string]*corev1.Service{},
		configMaps: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{},
		jobs: map[string]*batchv1.Job{}, hpas: map[string]*autoscalingv2.HorizontalPodAutoscaler{},
		pdbs: map[string]*policyv1.PodDisruptionBudget{}, netpols: map[string]*networkingv1.NetworkPolicy{},
		serviceMonitors: map[string]*unstructured.Unstructured{}, namespaces: map[string]*corev1.Namespace{},
		prometheusRules: map[string]*unstructured.Unstructured{},
		serviceAccounts: map[string]*corev1.ServiceAccount{},
	}
	var errs []error
	for _, r := range rm.Resources() {
		data, err := r.AsYAML()
		if err != nil {
			return nil, err
		}
		id := fmt.Sprintf("%s %s/%s", r.GetKind(), r.GetNamespace(), r.GetName())
		if r.GetApiVersion() == "monitoring.coreos.com/v1" {
			decode, into := decodeServiceMonitor, o.serviceMonitors
			if r.GetKind() == "PrometheusRule" {
				decode, into = decodePrometheusRule, o.prometheusRules
			}
			u, err := decode(data)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %s: %w", dir, id, err))
				continue
			}
			into[u.GetName()] = u
			o.all = append(o.all, u)
			continue
		}
		obj, _, err := strict.Decode(data, nil, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %s: %w", dir, id, err))
			continue
		}
		o.all = append(o.all, obj)
		switch v := obj.(type) {
		case *appsv1.Deployment:
			o.deployments[v.Name] = v
		case *corev1.Service:
			o.services[v.Name] = v
		case *corev1.ConfigMap:
			o.configMaps[v.Name] = v
		case *corev1.Secret:
			o.secrets[v.Name] = v
		case *batchv1.Job:
			o.jobs[v.Name] = v
		case *autoscalingv2.HorizontalPodAutoscaler:
			o.hpas[v.Name] = v
		case *policyv1.PodDisruptionBudget:
			o.pdbs[v.Name] = v
		case *networkingv1.NetworkPolicy:
			o.netpols[v.Name] = v
		case *corev1.Namespace:
			o.namespaces[v.Name] = v
		case *corev1.ServiceAccount:
			o.serviceAccounts[v.Name] = v
		default:
			errs = append(errs, fmt.Errorf("%s: %s: kind %T has no checks here; add them", dir, id, obj))
		}
	}
	return o, errors.Join(errs...)
}

// decodeServiceMonitor checks a monitoring.coreos.com/v1 ServiceMonitor
// against the part of its schema the manifests use. Its Go types live in the
// Prometheus operator, not in k8s.io/api, so unknown fields are caught here
// by listing the known ones.
func decodeServiceMonitor(data []byte) (*unstructured.Unstructured, error) {
	u, err := decodeMonitoringObject(data, "ServiceMonitor")
	if err != nil {
		return nil, err
	}
	spec, _, _ := unstructured.NestedMap(u.Object, "spec")
	if err := onlyKeys(spec, "spec", "selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit"); err != nil {
		return nil, err
	}
	sel, ok, _ := unstructured.NestedStringMap(u.Object, "spec", "selector", "matchLabels")
	if !ok || len(sel) == 0 {
		return nil, fmt.Errorf("spec.selector.matchLabels: required")
	}
	eps, ok, _ := unstructured.NestedSlice(u.Object, "spec", "endpoints")
	if !ok || len(eps) == 0 {
		return nil, fmt.Errorf("spec.endpoints: required")
	}
	for i, e := range eps {
		em, ok := e.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("spec.endpoints[%d]: not an object", i)
		}
		if err := onlyKeys(em, fmt.Sprintf("spec.endpoints[%d]", i), "port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings"); err != nil {
			return nil, err
		}
		if p, _ := em["port"].(string); p == "" {
			return nil, fmt.Errorf("spec.endpoints[%d].port: a Service port name is required", i)
		}
		for _, k := range []string{"interval", "scrapeTimeout"} {
			if v, ok := em[k]; ok {
				s, _ := v.(string)
				if _, err := time.ParseDuration(s); err != nil {
					return nil, fmt.Errorf("spec.endpoints[%d].%s: %v", i, k, err)
				}
			}
		}
	}
	return u, nil
}

// decodeMonitoringObject turns a monitoring.coreos.com/v1 document into an
// Unstructured of the expected kind, rejecting unknown top-level fields.
func decodeMonitoringObject(data []byte, kind string) (*unstructured.Unstructured, error) {
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, err
	}
	js, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(js); err != nil {
		return nil, err
	}
	if u.GetKind() != kind {
		return nil, fmt.Errorf("want kind %s, got %q", kind, u.GetKind())
	}
	if err := onlyKeys(u.Object, "", "apiVersion", "kind", "metadata", "spec"); err != nil {
		return nil, err
	}
	return u, nil
}

// decodePrometheusRule checks a PrometheusRule against the part of its
// schema the manifests use: groups of alerting rules, each with an expr, a
// parseable for, a severity meshguard uses and a summary.
func decodePrometheusRule(data []byte) (*unstructured.Unstructured, error) {
	u, err := decodeMonitoringObject(data, "PrometheusRule")
	if err != nil {
		return nil, err
	}
	spec, _, _ := unstructured.NestedMap(u.Object, "spec")
	if err := onlyKeys(spec, "spec", "groups"); err != nil {
		return nil, err
	}
	groups, _, _ := unstructured.NestedSlice(u.Object, "spec", "groups")
	if len(groups) == 0 {
		return nil, errors.New("spec.groups: required")
	}
	alerts := map[string]bool{}
	for i, g := range groups {
		gm, ok := g.(map[string]any)
		at := fmt.Sprintf("spec.groups[%d]", i)
		if !ok {
			return nil, fmt.Errorf("%s: not an object", at)
		}
		if err := onlyKeys(gm, at, "name", "interval", "rules"); err != nil {
			return nil, err
		}
		if n, _ := gm["name"].(string); n == "" {
			return nil, fmt.Errorf("%s.name: required", at)
		}
		rules, _ := gm["rules"].([]any)
		if len(rules) == 0 {
			return nil, fmt.Errorf("%s.rules: required", at)
		}
		for j, r := range rules {
			rm, ok := r.(map[string]any)
			rat := fmt.Sprintf("%s.rules[%d]", at, j)
			if !ok {
				return nil, fmt.Errorf("%s: not an object", rat)
			}
			if err := onlyKeys(rm, rat, "alert", "expr", "for", "labels", "annotations"); err != nil {
				return nil, err
			}
			name, _ := rm["alert"].(string)
			if name == "" || alerts[name] {
				return nil, fmt.Errorf("%s.alert: missing or duplicate %q", rat, name)
			}
			alerts[name] = true
			if e, _ := rm["expr"].(string); strings.TrimSpace(e) == "" {
				return nil, fmt.Errorf("%s.expr: required", rat)
			}
			if f, ok := rm["for"]; ok {
				fs, _ := f.(string)
				if _, err := time.ParseDuration(fs); err != nil {
					return nil, fmt.Errorf("%s.for: %v", rat, err)
				}
			}
			labels, _ := rm["labels"].(map[string]any)
			if sev, _ := labels["severity"].(string); sev != "warning" && sev != "critical" {
				return nil, fmt.Errorf("%s.labels.severity: want warning or critical, got %q", rat, sev)
			}
			ann, _ := rm["annotations"].(map[string]any)
			if sum, _ := ann["summary"].(string); sum == "" {
				return nil, fmt.Errorf("%s.annotations.summary: required", rat)
			}
		}
	}
	return u, nil
}

// TestAlerts: every alert queries metrics that exist: meshguard's as its
// code registers them, Envoy's as Envoy names its stats, up for a scraped
// Service; and both meshguard and Envoy have an alert that fires when they
// export nothing at all.
func TestAlerts(t *testing.T) {
	o := build(t, "base")
	for _, name := range []string{"meshguard", "envoy"} {
		if o.prometheusRules[name] == nil {
			t.Fatalf("no PrometheusRule %s", name)
		}
	}
	registered := registeredMetrics(t, "..")
	clusters := bootstrapClusters(t)
	absentOf := map[string]bool{}
	n := 0
	for _, pr := range o.prometheusRules {
		groups, _, _ := unstructured.NestedSlice(pr.Object, "spec", "groups")
		for _, g := range groups {
			for _, r := range g.(map[string]any)["rules"].([]any) {
				rm := r.(map[string]any)
				alert, expr := rm["alert"].(string), rm["expr"].(string)
				if strings.Count(expr, "(") != strings.Count(expr, ")") || strings.Count(expr, "{") != strings.Count(expr, "}") {
					t.Errorf("alert %s: unbalanced expr", alert)
				}
				names, jobs := queriedMetrics(expr)
				if len(names) == 0 && len(jobs) == 0 {
					t.Errorf("alert %s: expr names no meshguard_ or envoy_ metric and no up{job=...}", alert)
				}
				for _, m := range names {
					if err := knownMetric(m, registered); err != nil {
						t.Errorf("alert %s: %v", alert, err)
					}
				}
				for _, j := range jobs {
					if o.services[j] == nil || o.serviceMonitors[j] == nil {
						t.Errorf("alert %s: up{job=%q} names no scraped Service (job is the Service name)", alert, j)
					}
					if strings.Contains(expr, "absent(") {
						absentOf[j] = true
					}
				}
				for _, c := range clusterNamesIn(expr) {
					if !clusters[c] {
						t.Errorf("alert %s: envoy_cluster_name %q is no cluster of envoy.yaml", alert, c)
					}
				}
				n++
			}
		}
	}
	if n == 0 {
		t.Error("no alerts")
	}
	for _, job := range []string{"meshguard", "envoy"} {
		if !absentOf[job] {
			t.Errorf("no absent(up{job=%q}...) alert: with every %s pod down, nothing would fire", job, job)
		}
	}
}

// envoyStats are the Envoy stats the alerts and the dashboard read, as
// Envoy names them (shared/reference/envoy-ext-authz-cors-csp.md 1.5 and
// envoy-access-log-and-postgres.md 1.6; the rate limit filter's and the
// cluster manager's statistics pages). "<cluster>" is the part Envoy's
// Prometheus output moves into the envoy_cluster_name label; ext_authz's
// stat_prefix ("meshguard" in envoy.yaml) may stay in the name.
var envoyStats = []string{
	"cluster.<cluster>.ext_authz.ok", "cluster.<cluster>.ext_authz.denied", "cluster.<cluster>.ext_authz.error",
	"cluster.<cluster>.ext_authz.disabled", "cluster.<cluster>.ext_authz.failure_mode_allowed", "cluster.<cluster>.ext_authz.invalid",
	"cluster.<cluster>.ext_authz.meshguard.ok", "cluster.<cluster>.ext_authz.meshguard.denied", "cluster.<cluster>.ext_authz.meshguard.error",
	"cluster.<cluster>.ext_authz.meshguard.disabled", "cluster.<cluster>.ext_authz.meshguard.failure_mode_allowed", "cluster.<cluster>.ext_authz.meshguard.invalid",
	"cluster.<cluster>.ratelimit.ok", "cluster.<cluster>.ratelimit.over_limit", "cluster.<cluster>.ratelimit.error",
	"cluster.<cluster>.ratelimit.failure_mode_allowed",
	"access_logs.grpc_access_log.logs_dropped", "access_logs.grpc_access_log.logs_written",
	"cluster.<cluster>.membership_healthy", "cluster.<cluster>.membership_total",
	"cluster.<cluster>.outlier_detection.ejections_active", "cluster.<cluster>.upstream_cx_connect_fail",
	"cluster.<cluster>.health_check.failure", "cluster.<cluster>.upstream_rq_retry", "cluster.<cluster>.upstream_rq_retry_overflow",
}

// envoyPromName is a stat's name in Envoy's /stats/prometheus output.
func envoyPromName(stat string) string {
	return "envoy_" + strings.ReplaceAll(strings.ReplaceAll(stat, "<cluster>.", ""), ".", "_")
}

var (
	metricNameRE  = regexp.MustCompile(`\b(?:meshguard|envoy)_[a-z0-9_]+`)
	nameMatchRE   = regexp.MustCompile(`__name__=~"([^"]*)"`)
	optionalRE    = regexp.MustCompile(`\(([a-z0-9_]+)\)\?`)
	upJobRE       = regexp.MustCompile(`\bup\{job="([^"]+)"`)
	quotedRE      = regexp.MustCompile(`"[^"]*"`)
	clusterNameRE = regexp.MustCompile(`envoy_cluster_name=~?"([^"]*)"`)
)

// queriedMetrics returns the meshguard_ and envoy_ metric names a PromQL
// expression reads (a __name__ regex with one optional group counts as both
// names) and the jobs of its up{job="..."} selectors. Names inside other
// label values do not count.
func queriedMetrics(expr string) (names, jobs []string) {
	for _, m := range nameMatchRE.FindAllStringSubmatch(expr, -1) {
		with := optionalRE.ReplaceAllString(m[1], "$1")
		without := optionalRE.ReplaceAllString(m[1], "")
		names = append(names, with)
		if without != with {
			names = append(names, without)
		}
	}
	for _, m := range upJobRE.FindAllStringSubmatch(expr, -1) {
		jobs = append(jobs, m[1])
	}
	for _, n := range metricNameRE.FindAllString(quotedRE.ReplaceAllString(expr, `""`), -1) {
		if n != "envoy_cluster_name" { // the label Envoy puts cluster names in
			names = append(names, n)
		}
	}
	return names, jobs
}

// knownMetric reports whether a queried metric exists: registered by
// meshguard's code, or one of envoyStats.
func knownMetric(m string, registered map[string]bool) error {
	if strings.HasPrefix(m, "envoy_") {
		for _, s := range envoyStats {
			if envoyPromName(s) == m {
				return nil
			}
		}
		return fmt.Errorf("%s is not an Envoy stat meshguard knows (envoyStats)", m)
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		m = strings.TrimSuffix(m, suffix)
	}
	if !registered[m] {
		return fmt.Errorf("%s is registered by no meshguard package", m)
	}
	return nil
}

// clusterNamesIn returns the cluster names an expression selects by
// envoy_cluster_name (exact or an alternation).
func clusterNamesIn(expr string) []string {
	var out []string
	for _, m := range clusterNameRE.FindAllStringSubmatch(expr, -1) {
		out = append(out, strings.Split(m[1], "|")...)
	}
	return out
}

// bootstrapClusters are the cluster names of envoy/envoy.yaml.
func bootstrapClusters(t *testing.T) map[string]bool {
	t.Helper()
	b, err := envoy.ParseBootstrap(envoy.FrontProxy)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, c := range b.GetStaticResources().GetClusters() {
		out[c.GetName()] = true
	}
	return out
}

func onlyKeys(m map[string]any, at string, known ...string) error {
	for k := range m {
		if !slices.Contains(known, k) {
			return fmt.Errorf("%s: unknown field %q", strings.TrimPrefix(at+"."+k, "."), k)
		}
	}
	return nil
}

// TestKustomizationsBuild builds each kustomization and decodes every object
// strictly; build fails the test on the first problem.
func TestKustomizationsBuild(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			o := build(t, dir)
			if len(o.all) == 0 {
				t.Fatal("no objects")
			}
		})
	}
}

// TestStrictDecodeRejects shows the decoders fail on the mistakes they are
// there for.
func TestStrictDecodeRejects(t *testing.T) {
	tests := []struct {
		name, doc, wantErr string
	}{
		{"misspelled field", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {selectr: {a: b}}\n", `unknown field "spec.selectr"`},
		{"duplicate field", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\ndata: {c: d}\n", "already set"},
		{"wrong type", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: two}\n", "replicas"},
		{"unknown kind", "apiVersion: v1\nkind: Servise\nmetadata: {name: x}\n", "no kind"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := strict.Decode([]byte(tc.doc), nil, nil)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Decode error = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
	pr := []struct{ name, doc, wantErr string }{
		{"bad severity", "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: x}\nspec:\n  groups: [{name: g, rules: [{alert: A, expr: up, labels: {severity: page}, annotations: {summary: s}}]}]\n", "severity"},
		{"bad for", "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: x}\nspec:\n  groups: [{name: g, rules: [{alert: A, expr: up, for: ten, labels: {severity: warning}, annotations: {summary: s}}]}]\n", ".for"},
		{"duplicate alert", "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: x}\nspec:\n  groups: [{name: g, rules: [{alert: A, expr: up, labels: {severity: warning}, annotations: {summary: s}}, {alert: A, expr: up, labels: {severity: warning}, annotations: {summary: s}}]}]\n", "duplicate"},
		{"unknown rule field", "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: x}\nspec:\n  groups: [{name: g, rules: [{alert: A, expr: up, fro: 5m, labels: {severity: warning}, annotations: {summary: s}}]}]\n", `unknown field "fro"`},
	}
	for _, tc := range pr {
		t.Run("PrometheusRule "+tc.name, func(t *testing.T) {
			_, err := decodePrometheusRule([]byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("decodePrometheusRule error = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
	sm := []struct{ name, doc, wantErr string }{
		{"unknown endpoint field", "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  endpoints: [{port: http, intervall: 15s}]\n", `unknown field "intervall"`},
		{"bad interval", "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  endpoints: [{port: http, interval: 15}]\n", "interval"},
		{"no selector", "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\nspec:\n  endpoints: [{port: http}]\n", "matchLabels"},
	}
	for _, tc := range sm {
		t.Run("ServiceMonitor "+tc.name, func(t *testing.T) {
			_, err := decodeServiceMonitor([]byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("decodeServiceMonitor error = %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestBaseHasEveryPart(t *testing.T) {
	o := build(t, "base")
	for _, d := range []string{"meshguard", "envoy"} {
		if o.deployments[d] == nil || o.services[d] == nil || o.hpas[d] == nil || o.pdbs[d] == nil || o.netpols[d] == nil || o.serviceMonitors[d] == nil {
			t.Errorf("%s: want Deployment, Service, HPA, PDB, NetworkPolicy and ServiceMonitor", d)
		}
	}
	if o.jobs["meshguard-migrate"] == nil {
		t.Error("no migration Job")
	}
	for _, prefix := range []string{"meshguard-config-", "envoy-config-"} {
		if cm := configMapByPrefix(o, prefix); cm == nil {
			t.Errorf("no generated ConfigMap %s<hash>", prefix)
		}
	}
	if o.configMaps["meshguard-ratelimit"] == nil {
		t.Error("no meshguard-ratelimit ConfigMap (without hash suffix, so edits hot-reload)")
	}
}

func configMapByPrefix(o *objects, prefix string) *corev1.ConfigMap {
	for name, cm := range o.configMaps {
		if strings.HasPrefix(name, prefix) {
			return cm
		}
	}
	return nil
}

// TestWorkloadsHardened: every container of every workload, in every
// kustomization, runs as non-root with a read-only root, no privilege
// escalation, no capabilities, the runtime's seccomp profile and set
// resources; service account tokens are not mounted.
func TestWorkloadsHardened(t *testing.T) {
	for _, dir := range kustomizations {
		o := build(t, dir)
		pods := map[string]*corev1.PodSpec{}
		for n, d := range o.deployments {
			pods["Deployment "+n] = &d.Spec.Template.Spec
		}
		for n, j := range o.jobs {
			pods["Job "+n] = &j.Spec.Template.Spec
		}
		for name, ps := range pods {
			t.Run(dir+"/"+name, func(t *testing.T) {
				if ps.AutomountServiceAccountToken == nil || *ps.AutomountServiceAccountToken {
					t.Error("automountServiceAccountToken must be false")
				}
				psc := ps.SecurityContext
				if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
					t.Error("pod must run as a non-root numeric user")
				}
				if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
					t.Error("pod seccompProfile must be RuntimeDefault")
				}
				if len(ps.InitContainers) > 0 {
					t.Error("init containers are not checked; add them here")
				}
				for _, c := range ps.Containers {
					sc := c.SecurityContext
					switch {
					case sc == nil:
						t.Errorf("container %s: no securityContext", c.Name)
						continue
					case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
						t.Errorf("container %s: allowPrivilegeEscalation must be false", c.Name)
					case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
						t.Errorf("container %s: readOnlyRootFilesystem must be true", c.Name)
					case sc.Privileged != nil && *sc.Privileged:
						t.Errorf("container %s: privileged", c.Name)
					case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0:
						t.Errorf("container %s: capabilities must drop ALL and add none", c.Name)
					}
					for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
						if c.Resources.Requests.Name(r, "").IsZero() {
							t.Errorf("container %s: no %s request", c.Name, r)
						}
					}
					if c.Resources.Limits.Memory().IsZero() {
						t.Errorf("container %s: no memory limit", c.Name)
					}
					if strings.HasSuffix(c.Image, ":latest") && strings.Contains(dir, "production") {
						t.Errorf("container %s: production runs image %s", c.Name, c.Image)
					}
				}
			})
		}
	}
}

// expectedDrainDelay is the least time meshguard must keep serving after
// SIGTERM while answering NOT_SERVING (shutdown.drain_delay): envoy.yaml's
// health checks take a draining pod out of rotation well within it (envoy's
// TestMeshguardClustersForRollouts).
const expectedDrainDelay = 10 * time.Second

// meshguardConfig is the part of the meshguard config file the manifests
// depend on; the full file is parsed by cmd/meshguard's own parser (see
// README.md).
type meshguardConfig struct {
	Listen   struct{ GRPC, HTTP, RateLimit string }
	Shutdown struct {
		Timeout    string
		DrainDelay string `yaml:"drain_delay"`
	}
	Ratelimit struct {
		ConfigDir string `yaml:"config_dir"`
		Response  bool   `yaml:"response_headers"`
	}
	Audit struct {
		SpoolDir        string   `yaml:"spool_dir"`
		SpoolMaxBytes   int64    `yaml:"spool_max_bytes"`
		SQLitePath      string   `yaml:"sqlite_path"`
		BatchSize       int      `yaml:"batch_size"`
		RequestHeaders  []string `yaml:"request_headers"`
		ResponseHeaders []string `yaml:"response_headers"`
	}
	CSP struct {
		ReportURI string `yaml:"report_uri"`
	} `yaml:"csp"`
}

func TestMeshguardDeployment(t *testing.T) {
	for _, dir := range []string{"base", "overlays/production", "overlays/development"} {
		t.Run(dir, func(t *testing.T) {
			o := build(t, dir)
			d := o.deployments["meshguard"]
			ps := &d.Spec.Template.Spec
			c := container(t, ps, "meshguard")

			// Ports and probes. ratelimit is listen.ratelimit, the
			// listener Envoy's meshguard_ratelimit cluster calls.
			wantPorts := map[string]int32{"grpc": 8081, "ratelimit": 8082, "http": 8080}
			for name, port := range wantPorts {
				if p := containerPort(c, name); p == nil || p.ContainerPort != port {
					t.Errorf("port %s: want containerPort %d", name, port)
				}
			}
			// Readiness is the gRPC health of listen.grpc, which turns
			// NOT_SERVING at SIGTERM and stays SERVING through a database
			// outage (/readyz does not).
			if rp := c.ReadinessProbe; rp == nil || rp.GRPC == nil || rp.GRPC.Port != wantPorts["grpc"] || (rp.GRPC.Service != nil && *rp.GRPC.Service != "") {
				t.Errorf("readinessProbe %+v: want a gRPC probe of the whole server on the grpc port (%d)", rp, wantPorts["grpc"])
			}
			checkProbe(t, "livenessProbe", c.LivenessProbe, "/healthz", "http")
			if c.StartupProbe != nil {
				checkProbe(t, "startupProbe", c.StartupProbe, "/healthz", "http")
			}

			// The config file: the --config argument names a mounted key.
			cfgPath := argAfter(c.Args, "--config")
			cm, key := mountedConfigMap(t, o, ps, c, cfgPath)
			if cm == nil {
				t.Fatalf("--config %s is not a key of a mounted ConfigMap", cfgPath)
			}
			var cfg meshguardConfig
			if err := yaml.Unmarshal([]byte(cm.Data[key]), &cfg); err != nil {
				t.Fatalf("meshguard config: %v", err)
			}
			for name, addr := range map[string]string{"grpc": cfg.Listen.GRPC, "ratelimit": cfg.Listen.RateLimit, "http": cfg.Listen.HTTP} {
				if want := fmt.Sprintf("0.0.0.0:%d", wantPorts[name]); addr != want && envValue(c, "MESHGUARD_"+strings.ToUpper(name)+"_ADDR") != want {
					t.Errorf("listen.%s = %q, want %s (the container port, on every interface)", name, addr, want)
				}
			}

			// Shutdown fits in the grace period, after the preStop sleep and
			// the drain delay, which must cover the time Envoy's health
			// checks need to take a draining pod out of rotation.
			drainDelay, err := time.ParseDuration(cfg.Shutdown.DrainDelay)
			if err != nil {
				t.Fatalf("shutdown.drain_delay %q: %v", cfg.Shutdown.DrainDelay, err)
			}
			if drainDelay < expectedDrainDelay {
				t.Errorf("shutdown.drain_delay %s < %s: Envoy's health checks may still send calls when the listeners close", drainDelay, expectedDrainDelay)
			}
			shutdown, err := time.ParseDuration(cfg.Shutdown.Timeout)
			if err != nil {
				t.Fatalf("shutdown.timeout: %v", err)
			}
			var preStop time.Duration
			if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Sleep != nil {
				preStop = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
			}
			grace := 30 * time.Second
			if ps.TerminationGracePeriodSeconds != nil {
				grace = time.Duration(*ps.TerminationGracePeriodSeconds) * time.Second
			}
			if grace <= preStop+drainDelay+shutdown {
				t.Errorf("terminationGracePeriodSeconds %s <= preStop %s + drain delay %s + shutdown.timeout %s: SIGKILL would cut the audit drain", grace, preStop, drainDelay, shutdown)
			}

			// The spool and the SQLite file are on a writable volume.
			for what, p := range map[string]string{"audit.spool_dir": cfg.Audit.SpoolDir, "audit.sqlite_path": filepath.Dir(cfg.Audit.SQLitePath)} {
				m, v := mountFor(ps, c, p)
				if m == nil || m.ReadOnly || v.EmptyDir == nil && v.PersistentVolumeClaim == nil && v.Ephemeral == nil {
					t.Errorf("%s %q is not on a writable emptyDir or volume claim (the root filesystem is read-only)", what, p)
				}
			}

			// The spool stops before its emptyDir's sizeLimit: the kubelet
			// evicts a pod whose emptyDir outgrows it, spool and all.
			if _, v := mountFor(ps, c, cfg.Audit.SpoolDir); v != nil && v.EmptyDir != nil {
				limit := v.EmptyDir.SizeLimit
				if limit == nil || limit.IsZero() {
					t.Error("the spool's emptyDir has no sizeLimit")
				} else if cfg.Audit.SpoolMaxBytes <= 0 || cfg.Audit.SpoolMaxBytes > limit.Value()*7/8 {
					t.Errorf("audit.spool_max_bytes %d is not below 7/8 of the emptyDir sizeLimit %s (the spool may exceed its limit by one batch)", cfg.Audit.SpoolMaxBytes, limit)
				}
			}

			// Rate limit domains: the config_dir is a whole ConfigMap mount (a
			// subPath mount never sees updates, so hot reload would not work).
			if cfg.Ratelimit.ConfigDir != "" {
				m, v := mountFor(ps, c, cfg.Ratelimit.ConfigDir)
				if m == nil || m.MountPath != cfg.Ratelimit.ConfigDir || m.SubPath != "" || v.ConfigMap == nil {
					t.Errorf("ratelimit.config_dir %q is not a ConfigMap mounted there without subPath", cfg.Ratelimit.ConfigDir)
				} else if rl := o.configMaps[v.ConfigMap.Name]; rl == nil || len(rl.Data) == 0 {
					t.Errorf("ConfigMap %s for ratelimit.config_dir is missing or empty", v.ConfigMap.Name)
				}
			}
			if cfg.Ratelimit.Response {
				t.Error("ratelimit.response_headers duplicates the X-RateLimit-* headers Envoy's enable_x_ratelimit_headers adds")
			}

			// Secrets come from a Secret, never from the ConfigMap.
			if !slices.ContainsFunc(c.EnvFrom, func(e corev1.EnvFromSource) bool {
				return e.SecretRef != nil && strings.HasPrefix(e.SecretRef.Name, "meshguard-secrets")
			}) {
				t.Error("no envFrom secretRef meshguard-secrets")
			}
			if regexp.MustCompile(`(?i)postgres(ql)?://[^@\s]*:[^@\s]*@|admin_token:`).MatchString(cm.Data[key]) {
				t.Error("the config ConfigMap holds a credential")
			}
			if dir == "overlays/development" && secretByPrefix(o, "meshguard-secrets") == nil {
				t.Error("development overlay should generate meshguard-secrets")
			}
			// The login account key, by name from the same Secret and
			// required: replicas with keys of their own would each count an
			// account's attempts apart.
			checkAccountKey(t, c, o)

			// Service: headless, selects the pods, names existing ports.
			s := o.services["meshguard"]
			if s.Spec.ClusterIP != corev1.ClusterIPNone {
				t.Error("the meshguard Service must be headless so Envoy's STRICT_DNS cluster sees every pod")
			}
			if s.Spec.PublishNotReadyAddresses {
				t.Error("meshguard Service publishes not-ready addresses: a terminating pod would keep receiving calls while it stops")
			}
			checkServiceTargets(t, s, d)
			// Every listener is a Service port of the same number and name,
			// targeting its container port; the gRPC ones speak h2c.
			for name, port := range wantPorts {
				i := slices.IndexFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == name })
				if i < 0 {
					t.Errorf("Service meshguard has no port %s", name)
					continue
				}
				sp := s.Spec.Ports[i]
				if cp := serviceTarget(d, sp); sp.Port != port || cp == nil || cp.ContainerPort != port || cp.Name != name {
					t.Errorf("Service port %s: %d -> %s, want %d -> container port %s (%d)", name, sp.Port, sp.TargetPort.String(), port, name, port)
				}
				if name != "http" && (sp.AppProtocol == nil || *sp.AppProtocol != "kubernetes.io/h2c") {
					t.Errorf("Service port %s: appProtocol %v, want kubernetes.io/h2c (cleartext gRPC)", name, sp.AppProtocol)
				}
			}

			// Migration Job runs `meshguard migrate` with the same config.
			j := o.jobs["meshguard-migrate"]
			jc := container(t, &j.Spec.Template.Spec, "migrate")
			if len(jc.Args) == 0 || jc.Args[0] != "migrate" || jc.Image != c.Image {
				t.Errorf("migration Job runs %s %v, want the meshguard image with `migrate`", jc.Image, jc.Args)
			}
			// Least privilege: the Job migrates as the schema owner from a
			// Secret of its own; serve's Secret holds the writer login.
			if !slices.ContainsFunc(jc.EnvFrom, func(e corev1.EnvFromSource) bool {
				return e.SecretRef != nil && strings.HasPrefix(e.SecretRef.Name, "meshguard-migrate-secrets")
			}) || slices.ContainsFunc(jc.EnvFrom, func(e corev1.EnvFromSource) bool {
				return e.SecretRef != nil && e.SecretRef.Name == "meshguard-secrets"
			}) {
				t.Error("migration Job must read meshguard-migrate-secrets, not the Deployment's meshguard-secrets")
			}
			if dir == "overlays/development" && secretByPrefix(o, "meshguard-migrate-secrets") == nil {
				t.Error("development overlay should generate meshguard-migrate-secrets")
			}
			if jcm, _ := mountedConfigMap(t, o, &j.Spec.Template.Spec, jc, argAfter(jc.Args, "--config")); jcm != cm {
				t.Error("migration Job does not read the same config as the Deployment")
			}
			if j.Spec.Template.Spec.RestartPolicy != corev1.RestartPolicyNever && j.Spec.Template.Spec.RestartPolicy != corev1.RestartPolicyOnFailure {
				t.Errorf("Job restartPolicy %q", j.Spec.Template.Spec.RestartPolicy)
			}
			if j.Spec.BackoffLimit == nil || j.Spec.ActiveDeadlineSeconds == nil {
				t.Error("migration Job needs backoffLimit and activeDeadlineSeconds")
			}
			if l := j.Spec.Template.Labels["app.kubernetes.io/name"]; l == "meshguard" {
				t.Error("migration pods must not carry the meshguard pod label (the Service and PDB would select them)")
			}
		})
	}
}

// checkAccountKey: the container gets MESHGUARD_ACCOUNT_KEY from the
// Secret its envFrom names, by a reference that is not optional, and a
// Secret the build generates holds a key of at least 16 bytes.
func checkAccountKey(t *testing.T, c *corev1.Container, o *objects) {
	t.Helper()
	var from string
	for _, e := range c.EnvFrom {
		if e.SecretRef != nil {
			from = e.SecretRef.Name
		}
	}
	i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "MESHGUARD_ACCOUNT_KEY" })
	if i < 0 {
		t.Error("no MESHGUARD_ACCOUNT_KEY: every replica would hash login accounts with a key of its own")
		return
	}
	ref := c.Env[i].ValueFrom
	if ref == nil || ref.SecretKeyRef == nil || ref.SecretKeyRef.Name != from || ref.SecretKeyRef.Key != "MESHGUARD_ACCOUNT_KEY" {
		t.Errorf("MESHGUARD_ACCOUNT_KEY from %+v, want key MESHGUARD_ACCOUNT_KEY of Secret %s (the envFrom one)", ref, from)
		return
	}
	if o := ref.SecretKeyRef.Optional; o != nil && *o {
		t.Error("MESHGUARD_ACCOUNT_KEY is optional: a Secret without it would start replicas with keys of their own")
	}
	if sec := o.secrets[from]; sec != nil {
		v, ok := sec.Data["MESHGUARD_ACCOUNT_KEY"]
		if !ok {
			v, ok = []byte(sec.StringData["MESHGUARD_ACCOUNT_KEY"]), sec.StringData["MESHGUARD_ACCOUNT_KEY"] != ""
		}
		if !ok || len(v) < 16 {
			t.Errorf("Secret %s: MESHGUARD_ACCOUNT_KEY %d bytes, want at least 16", from, len(v))
		}
	}
}

// TestSelectorsAndTargets: HPAs, PDBs, NetworkPolicies and ServiceMonitors
// point at objects that exist, with ports that exist.
func TestSelectorsAndTargets(t *testing.T) {
	for _, dir := range []string{"base", "overlays/production", "overlays/development"} {
		t.Run(dir, func(t *testing.T) {
			o := build(t, dir)
			for name, h := range o.hpas {
				d := o.deployments[h.Spec.ScaleTargetRef.Name]
				if h.Spec.ScaleTargetRef.Kind != "Deployment" || d == nil {
					t.Errorf("HPA %s targets a missing %s %s", name, h.Spec.ScaleTargetRef.Kind, h.Spec.ScaleTargetRef.Name)
					continue
				}
				if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas > h.Spec.MaxReplicas {
					t.Errorf("HPA %s: minReplicas %v > maxReplicas %d", name, h.Spec.MinReplicas, h.Spec.MaxReplicas)
				}
				for _, c := range d.Spec.Template.Spec.Containers {
					if c.Resources.Requests.Cpu().IsZero() {
						t.Errorf("HPA %s scales on CPU but container %s has no CPU request", name, c.Name)
					}
				}
			}
			for name, p := range o.pdbs {
				if !selectsSome(t, p.Spec.Selector.MatchLabels, o) {
					t.Errorf("PDB %s selects no Deployment's pods", name)
				}
				if p.Spec.MaxUnavailable == nil && p.Spec.MinAvailable == nil {
					t.Errorf("PDB %s sets neither maxUnavailable nor minAvailable", name)
				}
			}
			for name, np := range o.netpols {
				d := deploymentSelectedBy(o, np.Spec.PodSelector.MatchLabels)
				if d == nil {
					t.Errorf("NetworkPolicy %s selects no Deployment's pods", name)
					continue
				}
				for _, rule := range np.Spec.Ingress {
					for _, p := range rule.Ports {
						if p.Port != nil && p.Port.Type == intstr.String && !hasNamedPort(d, p.Port.StrVal) {
							t.Errorf("NetworkPolicy %s: ingress port %q is not a port of %s", name, p.Port.StrVal, d.Name)
						}
					}
				}
			}
			// Envoy may reach meshguard on the ports the Service exposes:
			// meshguard admits it, and Envoy's own policy lets it out.
			if np := o.netpols["meshguard"]; np != nil {
				for _, port := range []string{"grpc", "ratelimit", "http"} {
					if !ingressAllowsFrom(np, o.deployments["envoy"].Spec.Template.Labels, port) {
						t.Errorf("meshguard NetworkPolicy does not admit Envoy on the %s port", port)
					}
				}
			}
			if np, md := o.netpols["envoy"], o.deployments["meshguard"]; np != nil && md != nil {
				for _, sp := range o.services["meshguard"].Spec.Ports {
					if cp := serviceTarget(md, sp); cp == nil || !egressAllowsTo(np, md.Spec.Template.Labels, *cp) {
						t.Errorf("envoy NetworkPolicy does not let Envoy reach meshguard's %s port (%d)", sp.Name, sp.Port)
					}
				}
			}
			for name, sm := range o.serviceMonitors {
				sel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
				var svc *corev1.Service
				for _, s := range o.services {
					if labels.SelectorFromSet(sel).Matches(labels.Set(s.Labels)) {
						svc = s
					}
				}
				if svc == nil {
					t.Errorf("ServiceMonitor %s selects no Service", name)
					continue
				}
				eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
				for _, e := range eps {
					port := e.(map[string]any)["port"].(string)
					if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == port }) {
						t.Errorf("ServiceMonitor %s: Service %s has no port %q", name, svc.Name, port)
					}
				}
			}
			for _, d := range o.deployments {
				if sa := d.Spec.Template.Spec.ServiceAccountName; sa != "" && o.serviceAccounts[sa] == nil {
					t.Errorf("Deployment %s uses missing ServiceAccount %s", d.Name, sa)
				}
				for _, v := range d.Spec.Template.Spec.Volumes {
					if v.ConfigMap != nil && o.configMaps[v.ConfigMap.Name] == nil {
						t.Errorf("Deployment %s mounts missing ConfigMap %s", d.Name, v.ConfigMap.Name)
					}
				}
			}
		})
	}
}

// TestEnvoyDeployment: the Envoy ConfigMap carries envoy/envoy.yaml unchanged
// (so the tests of package envoy cover what Kubernetes runs), and the pod,
// Service and probes match the bootstrap's listeners and clusters.
func TestEnvoyDeployment(t *testing.T) {
	raw, err := os.ReadFile("base/envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw, envoy.FrontProxy) {
		t.Fatal("k8s/base/envoy.yaml differs from envoy/envoy.yaml: copy it (cp envoy/envoy.yaml k8s/base/envoy.yaml)")
	}
	o := build(t, "overlays/production")
	d := o.deployments["envoy"]
	ps := &d.Spec.Template.Spec
	c := container(t, ps, "envoy")
	cm, key := mountedConfigMap(t, o, ps, c, argAfter(c.Args, "--config-path"))
	if cm == nil {
		t.Fatalf("--config-path %q is not a key of a mounted ConfigMap", argAfter(c.Args, "--config-path"))
	}
	if cm.Data[key] != string(envoy.FrontProxy) {
		t.Error("the Envoy ConfigMap is not envoy/envoy.yaml")
	}
	b, err := envoy.ParseBootstrap([]byte(cm.Data[key]))
	if err != nil {
		t.Fatal(err)
	}
	listeners := map[string]uint32{}
	for _, l := range b.GetStaticResources().GetListeners() {
		listeners[l.GetName()] = l.GetAddress().GetSocketAddress().GetPortValue()
	}
	for port, listener := range map[string]string{"http": "ingress_http", "admin": "envoy_admin"} {
		if p := containerPort(c, port); p == nil || uint32(p.ContainerPort) != listeners[listener] {
			t.Errorf("container port %s does not match listener %s (:%d)", port, listener, listeners[listener])
		}
	}
	checkProbe(t, "readinessProbe", c.ReadinessProbe, "/ready", "admin")
	if !slices.Contains(c.Args, "--disable-hot-restart") {
		t.Error("hot restart needs shared memory that a read-only, non-root container does not give")
	}
	checkServiceTargets(t, o.services["envoy"], d)

	// The bootstrap's meshguard clusters resolve the meshguard Service's DNS
	// name (same namespace) on its ports.
	mg := o.services["meshguard"]
	for _, cl := range b.GetStaticResources().GetClusters() {
		if !strings.HasPrefix(cl.GetName(), "meshguard") {
			continue
		}
		sa := cl.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
		if sa.GetAddress() != mg.Name {
			t.Errorf("cluster %s resolves %q, want the Service name %q", cl.GetName(), sa.GetAddress(), mg.Name)
		}
		if !slices.ContainsFunc(mg.Spec.Ports, func(p corev1.ServicePort) bool { return uint32(p.Port) == sa.GetPortValue() }) {
			t.Errorf("cluster %s uses port %d, not a port of Service %s", cl.GetName(), sa.GetPortValue(), mg.Name)
		}
	}
}

// TestEnvoyReachesMeshguard follows each meshguard gRPC API Envoy calls,
// in every kustomization, from the filter to the meshguard listener that
// serves it: the filter's cluster, the cluster's port, the meshguard Service
// port of that number, its target container port, and the listen address
// of that port in meshguard's config. ext_authz and the access log must
// land on listen.grpc (the gRPC listener); the rate limit service on
// listen.ratelimit (the listener that serves only ShouldRateLimit and
// health). Both NetworkPolicies must let each of those connections through.
func TestEnvoyReachesMeshguard(t *testing.T) {
	for _, dir := range []string{"base", "overlays/production", "overlays/development"} {
		t.Run(dir, func(t *testing.T) {
			o := build(t, dir)
			ed, md, svc := o.deployments["envoy"], o.deployments["meshguard"], o.services["meshguard"]
			if ed == nil || md == nil || svc == nil {
				t.Fatal("want Deployments envoy and meshguard and Service meshguard")
			}
			ec := container(t, &ed.Spec.Template.Spec, "envoy")
			ecm, ekey := mountedConfigMap(t, o, &ed.Spec.Template.Spec, ec, argAfter(ec.Args, "--config-path"))
			mc := container(t, &md.Spec.Template.Spec, "meshguard")
			mcm, mkey := mountedConfigMap(t, o, &md.Spec.Template.Spec, mc, argAfter(mc.Args, "--config"))
			if ecm == nil || mcm == nil {
				t.Fatal("the Envoy bootstrap or the meshguard config is not a mounted ConfigMap key")
			}
			b, err := envoy.ParseBootstrap([]byte(ecm.Data[ekey]))
			if err != nil {
				t.Fatal(err)
			}
			var cfg meshguardConfig
			if err := yaml.Unmarshal([]byte(mcm.Data[mkey]), &cfg); err != nil {
				t.Fatal(err)
			}
			clusters := map[string]*clusterv3.Cluster{}
			for _, c := range b.GetStaticResources().GetClusters() {
				clusters[c.GetName()] = c
			}
			callers := envoyCallers(t, b)
			for _, want := range []struct {
				api, cluster, listen, addr string
			}{
				{"ext_authz", "meshguard", "listen.grpc", cfg.Listen.GRPC},
				{"access log", "meshguard", "listen.grpc", cfg.Listen.GRPC},
				{"rate limit service", "meshguard_ratelimit", "listen.ratelimit", cfg.Listen.RateLimit},
			} {
				name := callers[want.api]
				if name != want.cluster {
					t.Errorf("Envoy's %s calls cluster %q, want %s (meshguard's %s)", want.api, name, want.cluster, want.listen)
				}
				c := clusters[name]
				eps := c.GetLoadAssignment().GetEndpoints()
				if c == nil || len(eps) == 0 || len(eps[0].GetLbEndpoints()) == 0 {
					t.Errorf("%s: cluster %q is missing or has no endpoint", want.api, name)
					continue
				}
				sa := eps[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
				i := slices.IndexFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return uint32(p.Port) == sa.GetPortValue() })
				if sa.GetAddress() != svc.Name || i < 0 {
					t.Errorf("%s: cluster %s reaches %s:%d, not a port of Service %s", want.api, name, sa.GetAddress(), sa.GetPortValue(), svc.Name)
					continue
				}
				cp := serviceTarget(md, svc.Spec.Ports[i])
				if cp == nil {
					t.Errorf("%s: Service port %s targets no container port", want.api, svc.Spec.Ports[i].Name)
					continue
				}
				_, port, err := net.SplitHostPort(want.addr)
				if err != nil || port != strconv.Itoa(int(cp.ContainerPort)) {
					t.Errorf("%s: cluster %s reaches container port %s (%d), but meshguard's %s is %q", want.api, name, cp.Name, cp.ContainerPort, want.listen, want.addr)
				}
				if np := o.netpols["meshguard"]; np == nil || !ingressAdmits(np, ed.Spec.Template.Labels, *cp) {
					t.Errorf("%s: meshguard's NetworkPolicy does not admit Envoy on %s (%d)", want.api, cp.Name, cp.ContainerPort)
				}
				if np := o.netpols["envoy"]; np == nil || !egressAllowsTo(np, md.Spec.Template.Labels, *cp) {
					t.Errorf("%s: Envoy's NetworkPolicy does not let it reach meshguard on %s (%d)", want.api, cp.Name, cp.ContainerPort)
				}
			}
		})
	}
}

// TestRatelimitDomainFile: the domain file shipped for ratelimit.config_dir
// parses and validates with meshguard's own code, and is the "api" domain
// envoy.yaml's routes send descriptors for (the same rules as meshguard's
// built-in default, kept as a file so operators can edit it live).
func TestRatelimitDomainFile(t *testing.T) {
	data, err := os.ReadFile("base/ratelimit/api.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d, err := ratelimitsvc.ParseDomain(data)
	if err != nil {
		t.Fatalf("ParseDomain: %v", err)
	}
	cfg := ratelimitsvc.DefaultConfig()
	cfg.Domains = []ratelimitsvc.DomainConfig{d}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	var def *ratelimitsvc.DomainConfig
	for i, dd := range ratelimitsvc.DefaultConfig().Domains {
		if dd.Domain == d.Domain {
			def = &ratelimitsvc.DefaultConfig().Domains[i]
		}
	}
	if def == nil {
		t.Fatalf("domain %q is not meshguard's default domain", d.Domain)
	}
	byValue := cmpopts.SortSlices(func(a, b ratelimitsvc.DescriptorConfig) bool { return a.Value < b.Value })
	if diff := cmp.Diff(*def, d, byValue); diff != "" {
		t.Errorf("base/ratelimit/api.yaml differs from the default %q domain (-default +file):\n%s", d.Domain, diff)
	}
}

// TestMeshguardConfigSections decodes base/meshguard.yaml strictly into the
// packages' own section types and runs their Validate, as meshguard's
// top-level parser does (cmd/meshguard is package main and cannot be
// imported; its own test of this file is the authority). config_dir is
// pointed at the shipped directory so the domain files are compiled too.
func TestMeshguardConfigSections(t *testing.T) {
	data, err := os.ReadFile("base/meshguard.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := struct {
		Environment string `yaml:"environment"`
		Listen      struct {
			GRPC      string `yaml:"grpc"`
			HTTP      string `yaml:"http"`
			RateLimit string `yaml:"ratelimit"`
		} `yaml:"listen"`
		Log struct {
			Level  string `yaml:"level"`
			Format string `yaml:"format"`
		} `yaml:"log"`
		Shutdown struct {
			DrainDelay time.Duration `yaml:"drain_delay"`
			Timeout    time.Duration `yaml:"timeout"`
		} `yaml:"shutdown"`
		Redis     ratelimitsvc.RedisConfig `yaml:"redis"`
		Database  pgpool.Config            `yaml:"database"`
		Ratelimit ratelimitsvc.Config      `yaml:"ratelimit"`
		CORS      extauthz.CORSConfig      `yaml:"cors"`
		Identity  extauthz.IdentityConfig  `yaml:"identity"`
		CSP       extauthz.CSPConfig       `yaml:"csp"`
		Audit     struct {
			audittrail.Config `yaml:",inline"`
			Ingest            auditsink.Config `yaml:",inline"`
			API               auditapi.Config  `yaml:",inline"`
		} `yaml:"audit"`
	}{
		Redis: ratelimitsvc.DefaultRedisConfig(), Database: pgpool.DefaultConfig(), Ratelimit: ratelimitsvc.DefaultConfig(),
		CORS: extauthz.DefaultCORSConfig(), Identity: extauthz.DefaultIdentityConfig(), CSP: extauthz.DefaultCSPConfig(),
	}
	cfg.Audit.Config, cfg.Audit.Ingest, cfg.Audit.API = audittrail.DefaultConfig(), auditsink.DefaultConfig(), auditapi.DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("decoding base/meshguard.yaml: %v", err)
	}
	if cfg.Environment != "production" || cfg.Shutdown.Timeout <= 0 {
		t.Errorf("environment %q, shutdown.timeout %s", cfg.Environment, cfg.Shutdown.Timeout)
	}
	// All three listeners on every interface, on the container ports; the
	// rate limit listener must be on ("" turns it off), since Envoy's rate
	// limit cluster calls it.
	for key, want := range map[string][2]string{
		"listen.grpc":      {cfg.Listen.GRPC, "0.0.0.0:8081"},
		"listen.ratelimit": {cfg.Listen.RateLimit, "0.0.0.0:8082"},
		"listen.http":      {cfg.Listen.HTTP, "0.0.0.0:8080"},
	} {
		if want[0] != want[1] {
			t.Errorf("%s = %q, want %q", key, want[0], want[1])
		}
	}
	const mounted = "/etc/meshguard/ratelimit"
	if cfg.Ratelimit.ConfigDir != mounted {
		t.Fatalf("ratelimit.config_dir = %q, want %s", cfg.Ratelimit.ConfigDir, mounted)
	}
	cfg.Ratelimit.ConfigDir = "base/ratelimit"
	for name, err := range map[string]error{
		"redis":                  cfg.Redis.Validate(),
		"database":               cfg.Database.Validate(),
		"ratelimit":              cfg.Ratelimit.Validate(),
		"cors, identity and csp": extauthz.Config{CORS: cfg.CORS, Identity: cfg.Identity, CSP: cfg.CSP}.Validate(),
		"audit":                  errors.Join(cfg.Audit.Config.Validate(), cfg.Audit.Ingest.Validate(), cfg.Audit.API.Validate()),
	} {
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if !cfg.CSP.Nonce || cfg.CSP.ReportURI != "/v1/csp-reports" {
		t.Errorf("csp: nonce %v, report_uri %q; envoy.yaml routes /v1/csp-reports to meshguard", cfg.CSP.Nonce, cfg.CSP.ReportURI)
	}
}

// TestAuditHeadersLoggedByEnvoy: the headers the audit sink keeps
// (audit.request_headers, audit.response_headers, and Origin, which it always
// reads) are ones Envoy's access logger actually sends.
func TestAuditHeadersLoggedByEnvoy(t *testing.T) {
	o := build(t, "base")
	var cfg meshguardConfig
	if err := yaml.Unmarshal([]byte(configMapByPrefix(o, "meshguard-config-").Data["meshguard.yaml"]), &cfg); err != nil {
		t.Fatal(err)
	}
	b, err := envoy.ParseBootstrap(envoy.FrontProxy)
	if err != nil {
		t.Fatal(err)
	}
	var als *grpcalsv3.HttpGrpcAccessLogConfig
	for _, l := range b.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				m, err := f.GetTypedConfig().UnmarshalNew()
				if err != nil {
					t.Fatal(err)
				}
				if hcm, ok := m.(*hcmv3.HttpConnectionManager); ok {
					for _, al := range hcm.GetAccessLog() {
						if a, err := al.GetTypedConfig().UnmarshalNew(); err == nil {
							if c, ok := a.(*grpcalsv3.HttpGrpcAccessLogConfig); ok {
								als = c
							}
						}
					}
				}
			}
		}
	}
	if als == nil {
		t.Fatal("envoy.yaml has no gRPC access logger")
	}
	for _, h := range append([]string{"origin"}, cfg.Audit.RequestHeaders...) {
		if !slices.Contains(als.GetAdditionalRequestHeadersToLog(), strings.ToLower(h)) {
			t.Errorf("audit keeps request header %s, but Envoy does not log it", h)
		}
	}
	for _, h := range cfg.Audit.ResponseHeaders {
		if !slices.Contains(als.GetAdditionalResponseHeadersToLog(), strings.ToLower(h)) {
			t.Errorf("audit keeps response header %s, but Envoy does not log it", h)
		}
	}
}

// dashboard is the part of a Grafana dashboard the test reads.
type dashboard struct {
	Title  string  `json:"title"`
	UID    string  `json:"uid"`
	Panels []panel `json:"panels"`
}

type panel struct {
	ID      int    `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

// checkDashboard returns the meshguard metric names the dashboard queries
// (histogram suffixes stripped) and every problem it found.
func checkDashboard(raw []byte) (map[string]bool, []error) {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		return nil, []error{fmt.Errorf("dashboard JSON: %w", err)}
	}
	if d.Title == "" || d.UID == "" {
		bad("dashboard needs a title and a uid")
	}
	metrics := map[string]bool{}
	ids := map[int]bool{}
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			if ids[p.ID] {
				bad("panel id %d used twice", p.ID)
			}
			ids[p.ID] = true
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			if len(p.Targets) == 0 {
				bad("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				names, _ := queriedMetrics(tg.Expr)
				if len(names) == 0 {
					bad("panel %q: expr %q names no meshguard_ or envoy_ metric", p.Title, tg.Expr)
				}
				if strings.Count(tg.Expr, "(") != strings.Count(tg.Expr, ")") || strings.Count(tg.Expr, "{") != strings.Count(tg.Expr, "}") {
					bad("panel %q: unbalanced expr %q", p.Title, tg.Expr)
				}
				for _, n := range names {
					metrics[n] = true
				}
			}
		}
	}
	walk(d.Panels)
	if len(metrics) == 0 {
		bad("dashboard queries no meshguard metric")
	}
	return metrics, errs
}

func TestDashboard(t *testing.T) {
	raw, err := os.ReadFile("grafana/meshguard-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	metrics, errs := checkDashboard(raw)
	for _, err := range errs {
		t.Error(err)
	}
	for _, group := range []string{"meshguard_grpc_server_", "meshguard_extauthz_", "meshguard_ratelimitsvc_", "meshguard_auditsink_", "meshguard_db_pool_"} {
		if !slices.ContainsFunc(keys(metrics), func(m string) bool { return strings.HasPrefix(m, group) }) {
			t.Errorf("no panel shows %s* metrics", group)
		}
	}
	if !slices.ContainsFunc(keys(metrics), func(m string) bool { return strings.HasPrefix(m, "envoy_") }) {
		t.Error("no panel shows Envoy's side (envoy_* metrics)")
	}
	// Every metric the dashboard queries is registered somewhere in meshguard
	// or is an Envoy stat Envoy documents, so a rename cannot silently blank
	// a panel.
	registered := registeredMetrics(t, "..")
	for _, m := range keys(metrics) {
		if err := knownMetric(m, registered); err != nil {
			t.Errorf("dashboard: %v", err)
		}
	}
	for _, want := range []string{"envoy_cluster_ext_authz_error", "envoy_cluster_ratelimit_error", "envoy_cluster_ratelimit_failure_mode_allowed", "envoy_access_logs_grpc_access_log_logs_dropped", "envoy_cluster_membership_healthy"} {
		if !metrics[want] {
			t.Errorf("no panel shows %s", want)
		}
	}
	// Shipped as a ConfigMap for Grafana's dashboard sidecar.
	o := build(t, "grafana")
	cm := o.configMaps["meshguard-dashboard"]
	if cm == nil || cm.Labels["grafana_dashboard"] != "1" || cm.Data["meshguard-dashboard.json"] != string(raw) {
		t.Error("the dashboard ConfigMap does not carry the dashboard with label grafana_dashboard=1")
	}
}

// registeredMetrics returns the metric names meshguard's Go code (under
// root, tests excluded) registers: every string literal that starts with
// "meshguard_", and for a literal prefix ending in "_" (names built as
// prefix+name, as pgpool's and ratelimitsvc's collectors do) the prefix
// joined with the first argument of each plain call in that file whose first
// argument is a snake_case literal, e.g. d("total_conns", "...").
func registeredMetrics(t *testing.T, root string) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	snake := regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); n == "testdata" || strings.HasPrefix(n, ".") && path != root {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		var prefixes, parts []string
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.BasicLit:
				if v, err := strconv.Unquote(n.Value); err == nil && n.Kind == token.STRING && strings.HasPrefix(v, "meshguard_") {
					if strings.HasSuffix(v, "_") {
						prefixes = append(prefixes, v)
					} else {
						out[v] = true
					}
				}
			case *ast.CallExpr:
				if _, plain := n.Fun.(*ast.Ident); plain && len(n.Args) > 0 {
					if lit, ok := n.Args[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
						if v, err := strconv.Unquote(lit.Value); err == nil && snake.MatchString(v) {
							parts = append(parts, v)
						}
					}
				}
			}
			return true
		})
		for _, p := range prefixes {
			for _, part := range parts {
				out[p+part] = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("scanning the code for metric names: %v", err)
	}
	if !out["meshguard_grpc_server_handled_total"] {
		t.Fatal("scan found no meshguard_grpc_server_handled_total: is root the module root?")
	}
	return out
}

func TestCheckDashboardRejects(t *testing.T) {
	tests := []struct{ name, doc, wantErr string }{
		{"not JSON", `{"title":`, "dashboard JSON"},
		{"foreign metric", `{"title":"x","uid":"x","panels":[{"id":1,"type":"timeseries","title":"p","targets":[{"expr":"rate(up[5m])"}]}]}`, "names no meshguard_ or envoy_ metric"},
		{"no query", `{"title":"x","uid":"x","panels":[{"id":1,"type":"timeseries","title":"p","targets":[]}]}`, "has no query"},
		{"unbalanced", `{"title":"x","uid":"x","panels":[{"id":1,"type":"timeseries","title":"p","targets":[{"expr":"rate(meshguard_x_total[5m]"}]}]}`, "unbalanced"},
		{"duplicate id in a row", `{"title":"x","uid":"x","panels":[{"id":1,"type":"row","title":"r","panels":[{"id":1,"type":"stat","title":"p","targets":[{"expr":"meshguard_x"}]}]}]}`, "used twice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, errs := checkDashboard([]byte(tc.doc))
			if !slices.ContainsFunc(errs, func(err error) bool { return strings.Contains(err.Error(), tc.wantErr) }) {
				t.Fatalf("errors %v, want one containing %q", errs, tc.wantErr)
			}
		})
	}
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func container(t *testing.T, ps *corev1.PodSpec, name string) *corev1.Container {
	t.Helper()
	for i := range ps.Containers {
		if ps.Containers[i].Name == name {
			return &ps.Containers[i]
		}
	}
	t.Fatalf("no container %q", name)
	return nil
}

func containerPort(c *corev1.Container, name string) *corev1.ContainerPort {
	for i := range c.Ports {
		if c.Ports[i].Name == name {
			return &c.Ports[i]
		}
	}
	return nil
}

func hasNamedPort(d *appsv1.Deployment, name string) bool {
	for _, c := range d.Spec.Template.Spec.Containers {
		if containerPort(&c, name) != nil {
			return true
		}
	}
	return false
}

func checkProbe(t *testing.T, what string, p *corev1.Probe, path, port string) {
	t.Helper()
	if p == nil || p.HTTPGet == nil {
		t.Errorf("%s: want an httpGet probe on %s", what, path)
		return
	}
	if p.HTTPGet.Path != path || p.HTTPGet.Port != intstr.FromString(port) {
		t.Errorf("%s: probes %s on %s, want %s on %s", what, p.HTTPGet.Path, p.HTTPGet.Port.String(), path, port)
	}
}

func argAfter(args []string, flag string) string {
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, flag+"="); ok {
			return v
		}
	}
	return ""
}

func envValue(c *corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value
		}
	}
	return ""
}

// mountFor returns the deepest volume mount of c that contains path, and its
// volume.
func mountFor(ps *corev1.PodSpec, c *corev1.Container, path string) (*corev1.VolumeMount, *corev1.Volume) {
	var best *corev1.VolumeMount
	for i, m := range c.VolumeMounts {
		if path == m.MountPath || strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/") {
			if best == nil || len(m.MountPath) > len(best.MountPath) {
				best = &c.VolumeMounts[i]
			}
		}
	}
	if best == nil {
		return nil, nil
	}
	for i := range ps.Volumes {
		if ps.Volumes[i].Name == best.Name {
			return best, &ps.Volumes[i]
		}
	}
	return nil, nil
}

// mountedConfigMap resolves a file path inside the container to the
// ConfigMap and key that provide it.
func mountedConfigMap(t *testing.T, o *objects, ps *corev1.PodSpec, c *corev1.Container, path string) (*corev1.ConfigMap, string) {
	t.Helper()
	m, v := mountFor(ps, c, path)
	if m == nil || v.ConfigMap == nil {
		return nil, ""
	}
	cm := o.configMaps[v.ConfigMap.Name]
	if cm == nil {
		return nil, ""
	}
	key := strings.TrimPrefix(strings.TrimPrefix(path, m.MountPath), "/")
	if m.SubPath != "" {
		key = m.SubPath
	}
	if _, ok := cm.Data[key]; !ok {
		return nil, ""
	}
	return cm, key
}

func checkServiceTargets(t *testing.T, s *corev1.Service, d *appsv1.Deployment) {
	t.Helper()
	if s == nil || d == nil {
		t.Fatal("missing Service or Deployment")
	}
	if !labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Errorf("Service %s does not select Deployment %s's pods", s.Name, d.Name)
	}
	for _, p := range s.Spec.Ports {
		if p.TargetPort.Type == intstr.String && !hasNamedPort(d, p.TargetPort.StrVal) {
			t.Errorf("Service %s: targetPort %q is not a container port of %s", s.Name, p.TargetPort.StrVal, d.Name)
		}
	}
}

func selectsSome(t *testing.T, sel map[string]string, o *objects) bool {
	t.Helper()
	return deploymentSelectedBy(o, sel) != nil
}

func deploymentSelectedBy(o *objects, sel map[string]string) *appsv1.Deployment {
	if len(sel) == 0 {
		return nil
	}
	for _, d := range o.deployments {
		if labels.SelectorFromSet(sel).Matches(labels.Set(d.Spec.Template.Labels)) {
			return d
		}
	}
	return nil
}

func ingressAllowsFrom(np *networkingv1.NetworkPolicy, podLabels map[string]string, port string) bool {
	for _, rule := range np.Spec.Ingress {
		from := len(rule.From) == 0
		for _, peer := range rule.From {
			if peer.PodSelector != nil && peer.NamespaceSelector == nil &&
				labels.SelectorFromSet(peer.PodSelector.MatchLabels).Matches(labels.Set(podLabels)) {
				from = true
			}
		}
		if !from {
			continue
		}
		if len(rule.Ports) == 0 {
			return true
		}
		for _, p := range rule.Ports {
			if p.Port != nil && p.Port.String() == port {
				return true
			}
		}
	}
	return false
}

func secretByPrefix(o *objects, prefix string) *corev1.Secret {
	for name, s := range o.secrets {
		if strings.HasPrefix(name, prefix) {
			return s
		}
	}
	return nil
}

// serviceTarget is the container port of d that Service port sp sends to:
// by name for a named targetPort, by number otherwise; nil if none.
func serviceTarget(d *appsv1.Deployment, sp corev1.ServicePort) *corev1.ContainerPort {
	for _, c := range d.Spec.Template.Spec.Containers {
		for i, cp := range c.Ports {
			switch {
			case sp.TargetPort.Type == intstr.String && cp.Name == sp.TargetPort.StrVal,
				sp.TargetPort.Type == intstr.Int && sp.TargetPort.IntVal != 0 && cp.ContainerPort == sp.TargetPort.IntVal,
				sp.TargetPort.Type == intstr.Int && sp.TargetPort.IntVal == 0 && cp.ContainerPort == sp.Port:
				return &c.Ports[i]
			}
		}
	}
	return nil
}

// policyPortCovers reports whether a NetworkPolicy port entry covers
// container port cp: by number (or range), by name, or every port.
func policyPortCovers(p networkingv1.NetworkPolicyPort, cp corev1.ContainerPort) bool {
	proto := corev1.ProtocolTCP
	if p.Protocol != nil {
		proto = *p.Protocol
	}
	cproto := cp.Protocol
	if cproto == "" {
		cproto = corev1.ProtocolTCP
	}
	if proto != cproto {
		return false
	}
	switch {
	case p.Port == nil:
		return true
	case p.Port.Type == intstr.String:
		return p.Port.StrVal == cp.Name
	case p.EndPort != nil:
		return p.Port.IntVal <= cp.ContainerPort && cp.ContainerPort <= *p.EndPort
	default:
		return p.Port.IntVal == cp.ContainerPort
	}
}

// egressAllowsTo reports whether np lets its pods open connections to pods
// labelled podLabels (in the same namespace) on container port cp.
func egressAllowsTo(np *networkingv1.NetworkPolicy, podLabels map[string]string, cp corev1.ContainerPort) bool {
	for _, rule := range np.Spec.Egress {
		if ruleAllows(rule.To, rule.Ports, podLabels, cp) {
			return true
		}
	}
	return false
}

// ingressAdmits reports whether np admits pods labelled podLabels (in the
// same namespace) on container port cp.
func ingressAdmits(np *networkingv1.NetworkPolicy, podLabels map[string]string, cp corev1.ContainerPort) bool {
	for _, rule := range np.Spec.Ingress {
		if ruleAllows(rule.From, rule.Ports, podLabels, cp) {
			return true
		}
	}
	return false
}

// ruleAllows reports whether one policy rule, with its peers and ports,
// covers pods labelled podLabels (in the same namespace) on port cp.
func ruleAllows(peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort, podLabels map[string]string, cp corev1.ContainerPort) bool {
	matched := len(peers) == 0
	for _, peer := range peers {
		if peer.PodSelector != nil && peer.NamespaceSelector == nil &&
			labels.SelectorFromSet(peer.PodSelector.MatchLabels).Matches(labels.Set(podLabels)) {
			matched = true
		}
	}
	if !matched {
		return false
	}
	if len(ports) == 0 {
		return true
	}
	for _, p := range ports {
		if policyPortCovers(p, cp) {
			return true
		}
	}
	return false
}

// envoyCallers returns the cluster on which Envoy's bootstrap b calls each
// of meshguard's gRPC APIs: "ext_authz", "rate limit service" and
// "access log".
func envoyCallers(t *testing.T, b *bootstrapv3.Bootstrap) map[string]string {
	t.Helper()
	unpack := func(a *anypb.Any) proto.Message {
		m, err := a.UnmarshalNew()
		if err != nil {
			t.Fatalf("unpacking %s: %v", a.GetTypeUrl(), err)
		}
		return m
	}
	out := map[string]string{}
	for _, l := range b.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				hcm, ok := unpack(f.GetTypedConfig()).(*hcmv3.HttpConnectionManager)
				if !ok {
					continue
				}
				for _, hf := range hcm.GetHttpFilters() {
					switch c := unpack(hf.GetTypedConfig()).(type) {
					case *extauthzv3.ExtAuthz:
						out["ext_authz"] = c.GetGrpcService().GetEnvoyGrpc().GetClusterName()
					case *ratelimitv3.RateLimit:
						out["rate limit service"] = c.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName()
					}
				}
				for _, al := range hcm.GetAccessLog() {
					if c, ok := unpack(al.GetTypedConfig()).(*grpcalsv3.HttpGrpcAccessLogConfig); ok {
						out["access log"] = c.GetCommonConfig().GetGrpcService().GetEnvoyGrpc().GetClusterName()
					}
				}
			}
		}
	}
	return out
}
