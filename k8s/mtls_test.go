package k8s

import (
	"bytes"
	"os"
	"slices"
	"strings"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/google/go-cmp/cmp"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshguard/meshguard/envoy"
	"github.com/meshguard/meshguard/internal/servertls"
)

// TestMutualTLSComponent: overlays/production-mtls (components/meshguard-mtls)
// runs the base with meshguard's own mutual TLS and nothing else changed:
// meshguard's config is the base's plus tls.grpc over the mounted Secret,
// Envoy's bootstrap is envoy.yaml with envoy/mtls/upstream-tls.yaml in both
// meshguard clusters, the SDS files are envoy/mtls's, every path either side
// reads is mounted, readiness no longer needs a plaintext gRPC probe, and
// the SPIFFE IDs each side allows are the ones the other's certificate
// carries (certificates.example.yaml) in the overlay's namespace.
func TestMutualTLSComponent(t *testing.T) {
	o := build(t, "overlays/production-mtls")
	const dir = "components/meshguard-mtls/"

	// meshguard: the base config plus tls, decoded strictly and valid.
	mg := o.deployments["meshguard"]
	mps := &mg.Spec.Template.Spec
	mc := container(t, mps, "meshguard")
	cm, key := mountedConfigMap(t, o, mps, mc, argAfter(mc.Args, "--config"))
	if cm == nil {
		t.Fatal("meshguard's --config is not a mounted ConfigMap key")
	}
	var withTLS, base map[string]any
	baseData, err := os.ReadFile("base/meshguard.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal([]byte(cm.Data[key]), &withTLS); err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(baseData, &base); err != nil {
		t.Fatal(err)
	}
	tlsSection, _ := yaml.Marshal(withTLS["tls"])
	delete(withTLS, "tls")
	if diff := cmp.Diff(base, withTLS); diff != "" {
		t.Errorf("%smeshguard.yaml is not base/meshguard.yaml plus tls (-base +component):\n%s", dir, diff)
	}
	var tlsCfg struct {
		GRPC servertls.Config `yaml:"grpc"`
		HTTP servertls.Config `yaml:"http"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(tlsSection))
	dec.KnownFields(true)
	if err := dec.Decode(&tlsCfg); err != nil {
		t.Fatalf("tls section: %v", err)
	}
	if err := tlsCfg.GRPC.Validate("tls.grpc"); err != nil || !tlsCfg.GRPC.Enabled() || tlsCfg.GRPC.ClientCAFile == "" {
		t.Fatalf("tls.grpc %+v: %v; want mutual TLS", tlsCfg.GRPC, err)
	}
	for _, f := range []string{tlsCfg.GRPC.CertFile, tlsCfg.GRPC.KeyFile, tlsCfg.GRPC.ClientCAFile} {
		if m, v := mountFor(mps, mc, f); m == nil || v.Secret == nil || v.Secret.SecretName != "meshguard-tls" {
			t.Errorf("meshguard reads %s, which is not in the mounted Secret meshguard-tls", f)
		}
	}
	if rp := mc.ReadinessProbe; rp == nil || rp.GRPC != nil {
		t.Errorf("readinessProbe %+v: the kubelet's gRPC probe speaks no TLS", rp)
	} else {
		checkProbe(t, "readinessProbe", rp, "/healthz/grpc", "http")
	}

	// Envoy: envoy.yaml with the variant applied, nothing else.
	ed := o.deployments["envoy"]
	eps := &ed.Spec.Template.Spec
	ec := container(t, eps, "envoy")
	ecm, ekey := mountedConfigMap(t, o, eps, ec, argAfter(ec.Args, "--config-path"))
	if ecm == nil {
		t.Fatal("Envoy's --config-path is not a mounted ConfigMap key")
	}
	got, err := envoy.ParseBootstrap([]byte(ecm.Data[ekey]))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := envoy.ParseBootstrap(envoy.FrontProxy)
	if err != nil {
		t.Fatal(err)
	}
	want, err := envoy.WithMutualTLS(plain)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, want) {
		t.Errorf("%senvoy.yaml is not envoy/envoy.yaml with envoy/mtls/upstream-tls.yaml in %v", dir, envoy.MeshguardClusters)
	}
	ts, err := envoy.MutualTLS()
	if err != nil {
		t.Fatal(err)
	}
	up := &tlsv3.UpstreamTlsContext{}
	if err := ts.GetTypedConfig().UnmarshalTo(up); err != nil {
		t.Fatal(err)
	}
	// The SDS files Envoy reads are mounted, byte for byte envoy/mtls's,
	// and the files they name are in the mounted Secret.
	ctc := up.GetCommonTlsContext()
	sdsPaths := []string{ctc.GetCombinedValidationContext().GetValidationContextSdsSecretConfig().GetSdsConfig().GetPathConfigSource().GetPath()}
	for _, c := range ctc.GetTlsCertificateSdsSecretConfigs() {
		sdsPaths = append(sdsPaths, c.GetSdsConfig().GetPathConfigSource().GetPath())
	}
	for _, p := range sdsPaths {
		scm, skey := mountedConfigMap(t, o, eps, ec, p)
		if scm == nil {
			t.Errorf("Envoy reads SDS from %s, which is not a mounted ConfigMap key", p)
			continue
		}
		orig, err := os.ReadFile("../envoy/mtls/" + skey)
		if err != nil {
			t.Fatal(err)
		}
		if scm.Data[skey] != string(orig) {
			t.Errorf("%ssds/%s differs from envoy/mtls/%s: copy it", dir, skey, skey)
		}
	}
	for _, f := range []string{"tls.crt", "tls.key", "ca.crt"} {
		if m, v := mountFor(eps, ec, "/etc/envoy-mtls/certs/"+f); m == nil || v.Secret == nil || v.Secret.SecretName != "envoy-meshguard-tls" {
			t.Errorf("Envoy's SDS names /etc/envoy-mtls/certs/%s, which is not in the mounted Secret envoy-meshguard-tls", f)
		}
	}

	// The certificates each side must present carry the IDs the other
	// allows, which are the pods' service accounts in this namespace.
	ns := mg.Namespace
	meshguardID := "spiffe://cluster.local/ns/" + ns + "/sa/" + mps.ServiceAccountName
	envoyID := "spiffe://cluster.local/ns/" + ns + "/sa/" + eps.ServiceAccountName
	if !slices.Equal(tlsCfg.GRPC.AllowedClientSANs, []string{envoyID}) {
		t.Errorf("meshguard allows %v, want Envoy's %s", tlsCfg.GRPC.AllowedClientSANs, envoyID)
	}
	sans := ctc.GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
	if len(sans) != 1 || sans[0].GetMatcher().GetExact() != meshguardID {
		t.Errorf("Envoy verifies meshguard as %v, want %s", sans, meshguardID)
	}
	certs := exampleCertificates(t, dir+"certificates.example.yaml")
	for secret, id := range map[string]string{"meshguard-tls": meshguardID, "envoy-meshguard-tls": envoyID} {
		c, ok := certs[secret]
		if !ok || !slices.Equal(c.Spec.URIs, []string{id}) {
			t.Errorf("certificates.example.yaml: Secret %s has URIs %v, want [%s]", secret, c.Spec.URIs, id)
		}
	}
	if u := certs["meshguard-tls"].Spec.Usages; !slices.Contains(u, "server auth") {
		t.Errorf("meshguard's certificate usages %v lack server auth", u)
	}
	if u := certs["envoy-meshguard-tls"].Spec.Usages; !slices.Contains(u, "client auth") {
		t.Errorf("Envoy's certificate usages %v lack client auth", u)
	}
}

// certificate is the part of a cert-manager Certificate the test reads.
type certificate struct {
	Kind string
	Spec struct {
		SecretName string   `yaml:"secretName"`
		URIs       []string `yaml:"uris"`
		Usages     []string `yaml:"usages"`
	}
}

// exampleCertificates reads the Certificates of a multi-document file, by
// the Secret they write.
func exampleCertificates(t *testing.T, path string) map[string]certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]certificate{}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var c certificate
		if err := dec.Decode(&c); err != nil {
			if strings.Contains(err.Error(), "EOF") {
				return out
			}
			t.Fatal(err)
		}
		if c.Kind == "Certificate" {
			out[c.Spec.SecretName] = c
		}
	}
}
