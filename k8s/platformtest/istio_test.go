package platformtest

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	securityv1beta1api "istio.io/api/security/v1beta1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	networkingv1alpha3 "istio.io/client-go/pkg/apis/networking/v1alpha3"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	telemetryv1 "istio.io/client-go/pkg/apis/telemetry/v1"
	istioscheme "istio.io/client-go/pkg/clientset/versioned/scheme"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// envelope is a Kubernetes object with its spec left raw, so that the spec
// can be decoded by the platform's own (stricter) decoder.
type envelope struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       json.RawMessage   `json:"spec"`
}

// splitDocs returns the YAML documents of a file, comments-only ones left out.
func splitDocs(t *testing.T, file string) [][]byte {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, d := range strings.Split(string(data), "\n---") {
		if strings.TrimSpace(stripComments(d)) != "" {
			out = append(out, []byte(d))
		}
	}
	return out
}

// istioObjects decodes every Istio object in files: the envelope strictly,
// the kind against istio.io/client-go's scheme, and the spec with protojson
// into the istio.io/api message (the generated UnmarshalJSON of the
// client-go types allows unknown fields; protojson does not).
func istioObjects(t *testing.T, files ...string) map[string]proto.Message {
	t.Helper()
	out := map[string]proto.Message{}
	for _, f := range files {
		for _, doc := range splitDocs(t, f) {
			var e envelope
			if err := unmarshalStrict(doc, &e); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			gv, err := schema.ParseGroupVersion(e.APIVersion)
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if !istioscheme.Scheme.Recognizes(gv.WithKind(e.Kind)) {
				t.Fatalf("%s: %s %s is no kind istio.io/client-go knows", f, e.APIVersion, e.Kind)
			}
			var spec proto.Message
			switch e.Kind {
			case "AuthorizationPolicy":
				spec = &(&securityv1.AuthorizationPolicy{}).Spec
			case "PeerAuthentication":
				spec = &(&securityv1.PeerAuthentication{}).Spec
			case "Telemetry":
				spec = &(&telemetryv1.Telemetry{}).Spec
			case "EnvoyFilter":
				spec = &(&networkingv1alpha3.EnvoyFilter{}).Spec
			case "Gateway":
				spec = &(&networkingv1.Gateway{}).Spec
			case "VirtualService":
				spec = &(&networkingv1.VirtualService{}).Spec
			case "ServiceEntry":
				spec = &(&networkingv1.ServiceEntry{}).Spec
			case "DestinationRule":
				spec = &(&networkingv1.DestinationRule{}).Spec
			default:
				t.Fatalf("%s: kind %s has no check here; add it", f, e.Kind)
			}
			if err := protojson.Unmarshal(e.Spec, spec); err != nil {
				t.Fatalf("%s: %s %s: spec: %v", f, e.Kind, e.Metadata.Name, err)
			}
			out[e.Kind+"/"+e.Metadata.Name] = spec
		}
	}
	return out
}

func meshConfig(t *testing.T) *meshv1alpha1.MeshConfig {
	t.Helper()
	data, err := os.ReadFile("../istio/meshconfig.yaml")
	if err != nil {
		t.Fatal(err)
	}
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		t.Fatal(err)
	}
	var mc meshv1alpha1.MeshConfig
	if err := protojson.Unmarshal(js, &mc); err != nil {
		t.Fatalf("meshconfig.yaml: %v", err)
	}
	return &mc
}

// TestIstio: the Istio manifests decode strictly against istio.io/api, use
// only providers meshconfig.yaml defines, reach meshguard's listeners on
// their ports, and the rate limit EnvoyFilter's values are valid Envoy API
// messages.
func TestIstio(t *testing.T) {
	mc := meshConfig(t)
	providers := map[string]*meshv1alpha1.MeshConfig_ExtensionProvider{}
	for _, p := range mc.GetExtensionProviders() {
		providers[p.GetName()] = p
	}
	authz := providers["meshguard-ext-authz"].GetEnvoyExtAuthzGrpc()
	if authz == nil || authz.GetPort() != 8081 || authz.GetFailOpen() || authz.GetStatusOnError() != "503" || !strings.HasPrefix(authz.GetService(), "meshguard.") {
		t.Errorf("ext_authz provider %v: want meshguard's gRPC listener (8081), closed on failure with 503", authz)
	}
	als := providers["meshguard-audit"].GetEnvoyHttpAls()
	if als == nil || als.GetPort() != 8081 || als.GetLogName() != "meshguard_audit" {
		t.Errorf("ALS provider %v: want meshguard's gRPC listener (8081), log_name meshguard_audit", als)
	}
	files, _ := filepath.Glob("../istio/*.yaml")
	files = slices.DeleteFunc(files, func(f string) bool { return strings.HasSuffix(f, "meshconfig.yaml") })
	objs := istioObjects(t, files...)
	ap, ok := objs["AuthorizationPolicy/meshguard-ext-authz"].(*securityv1beta1api.AuthorizationPolicy)
	if !ok {
		t.Fatal("no AuthorizationPolicy meshguard-ext-authz")
	}
	if ap.GetAction() != securityv1beta1api.AuthorizationPolicy_CUSTOM || ap.GetProvider().GetName() != "meshguard-ext-authz" {
		t.Errorf("AuthorizationPolicy: action %v provider %q, want CUSTOM meshguard-ext-authz", ap.GetAction(), ap.GetProvider().GetName())
	}
	tel := objs["Telemetry/meshguard"]
	if tel == nil {
		t.Fatal("no Telemetry meshguard")
	}
	for _, name := range providerNames(t, objs) {
		if providers[name] == nil {
			t.Errorf("a manifest uses extension provider %q, which meshconfig.yaml does not define", name)
		}
	}
}

// providerNames are the extension providers the objects name (an
// EnvoyFilter's values are Envoy messages, whose "providers" are not
// Istio's).
func providerNames(t *testing.T, objs map[string]proto.Message) []string {
	t.Helper()
	var out []string
	for k, m := range objs {
		if strings.HasPrefix(k, "EnvoyFilter/") {
			continue
		}
		js, err := protojson.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var v any
		if err := json.Unmarshal(js, &v); err != nil {
			t.Fatal(err)
		}
		collectProviderNames(v, false, &out)
	}
	return out
}

// collectProviderNames finds {"name": X} inside any "provider" or
// "providers" value.
func collectProviderNames(v any, inProvider bool, out *[]string) {
	switch v := v.(type) {
	case map[string]any:
		for k, c := range v {
			switch {
			case k == "provider" || k == "providers":
				collectProviderNames(c, true, out)
			case k == "name" && inProvider:
				*out = append(*out, fmt.Sprint(c))
			default:
				collectProviderNames(c, inProvider, out)
			}
		}
	case []any:
		for _, c := range v {
			collectProviderNames(c, inProvider, out)
		}
	}
}

// TestIstioStrictComponent: the component that hands transport security to
// Istio builds on top of the base, decodes against istio.io/api, requires
// STRICT mutual TLS and injects sidecars into both workloads.
func TestIstioStrictComponent(t *testing.T) {
	fs := filesys.MakeFsInMemory()
	root, _ := filepath.Abs("..")
	disk := filesys.MakeFsOnDisk()
	if err := copyTree(disk, fs, root, "/k8s"); err != nil {
		t.Fatal(err)
	}
	if err := fs.WriteFile("/k8s/overlays/istio-test/kustomization.yaml", []byte("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- ../../base\ncomponents:\n- ../../components/istio-strict\n")); err != nil {
		t.Fatal(err)
	}
	opts := krusty.MakeDefaultOptions()
	opts.LoadRestrictions = types.LoadRestrictionsRootOnly
	rm, err := krusty.MakeKustomizer(opts).Run(fs, "/k8s/overlays/istio-test")
	if err != nil {
		t.Fatal(err)
	}
	y, err := rm.AsYaml()
	if err != nil {
		t.Fatal(err)
	}
	var istioDocs, k8sDocs []string
	for _, d := range strings.Split(string(y), "\n---\n") {
		if strings.Contains(d, "apiVersion: security.istio.io/") {
			istioDocs = append(istioDocs, d)
		} else {
			k8sDocs = append(k8sDocs, d)
		}
	}
	f := filepath.Join(t.TempDir(), "istio.yaml")
	if err := os.WriteFile(f, []byte(strings.Join(istioDocs, "\n---\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	objs := istioObjects(t, f)
	pa := objs["PeerAuthentication/meshguard-strict"]
	if pa == nil || !strings.Contains(protojson.Format(pa), `"STRICT"`) {
		t.Errorf("PeerAuthentication meshguard-strict: %v", pa)
	}
	r, err := decodeAll(strings.Join(k8sDocs, "\n---\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"meshguard", "envoy"} {
		if d := r.deployment(name); d == nil || d.Spec.Template.Labels["sidecar.istio.io/inject"] != "true" {
			t.Errorf("Deployment %s: no sidecar injection label", name)
		}
	}
}

// copyTree copies the directory src on disk into dst of an in-memory file
// system.
func copyTree(from, to filesys.FileSystem, src, dst string) error {
	return from.Walk(src, func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		target := filepath.Join(dst, rel)
		if info.IsDir() {
			if info.Name() == "platformtest" || info.Name() == "helm" {
				return filepath.SkipDir
			}
			return to.MkdirAll(target)
		}
		data, err := from.ReadFile(path)
		if err != nil {
			return err
		}
		return to.WriteFile(target, data)
	})
}
