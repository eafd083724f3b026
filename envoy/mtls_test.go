package envoy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/encoding/protojson"
)

// meshguardID is the SPIFFE ID meshguard's certificate carries in
// k8s/components/meshguard-mtls, which Envoy's validation context demands.
const meshguardID = "spiffe://cluster.local/ns/meshguard/sa/meshguard"

// TestMutualTLSVariant: mtls/upstream-tls.yaml decodes strictly, speaks
// what meshguard's tls.grpc serves (TLS 1.2+, ALPN h2), verifies meshguard
// by its SPIFFE ID, takes its certificates by SDS from the two files beside
// it (which decode as the DiscoveryResponses Envoy reads from a path), and
// applied to every shipped bootstrap loads on the newest and the oldest
// supported Envoy.
func TestMutualTLSVariant(t *testing.T) {
	ts, err := MutualTLS()
	if err != nil {
		t.Fatal(err)
	}
	up := unpack[*tlsv3.UpstreamTlsContext](t, ts.GetTypedConfig())
	ctc := up.GetCommonTlsContext()
	if got := ctc.GetAlpnProtocols(); len(got) != 1 || got[0] != "h2" {
		t.Errorf("ALPN %v, want [h2]: meshguard's gRPC listeners speak HTTP/2 only", got)
	}
	if v := ctc.GetTlsParams().GetTlsMinimumProtocolVersion(); v < tlsv3.TlsParameters_TLSv1_2 {
		t.Errorf("minimum TLS version %v; meshguard refuses below 1.2", v)
	}
	cvc := ctc.GetCombinedValidationContext()
	sans := cvc.GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
	if len(sans) != 1 || sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_URI || sans[0].GetMatcher().GetExact() != meshguardID {
		t.Errorf("Envoy verifies meshguard by %v, want the URI SAN %s", sans, meshguardID)
	}

	// The SDS files: each names the secret the socket asks for, and the
	// socket watches the directory it reads them from.
	sds := map[string]string{} // secret name -> path
	for _, c := range ctc.GetTlsCertificateSdsSecretConfigs() {
		sds[c.GetName()] = c.GetSdsConfig().GetPathConfigSource().GetPath()
	}
	vc := cvc.GetValidationContextSdsSecretConfig()
	sds[vc.GetName()] = vc.GetSdsConfig().GetPathConfigSource().GetPath()
	for name, path := range sds {
		file := filepath.Join("mtls", filepath.Base(path))
		if !strings.HasPrefix(path, "/etc/envoy-mtls/sds/") {
			t.Errorf("secret %s read from %s, want /etc/envoy-mtls/sds/ (upstream-tls.yaml's mounts)", name, path)
		}
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatalf("secret %s: %v", name, err)
		}
		var resp discoveryv3.DiscoveryResponse
		if _, err := decodeYAML(data, &resp); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if err := Validate(&resp); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if len(resp.GetResources()) != 1 {
			t.Fatalf("%s: %d resources, want 1", file, len(resp.GetResources()))
		}
		secret := unpack[*tlsv3.Secret](t, resp.GetResources()[0])
		if secret.GetName() != name {
			t.Errorf("%s holds secret %q, the socket asks for %q", file, secret.GetName(), name)
		}
		var files []string
		if c := secret.GetTlsCertificate(); c != nil {
			files = append(files, c.GetCertificateChain().GetFilename(), c.GetPrivateKey().GetFilename())
			if c.GetWatchedDirectory().GetPath() != "/etc/envoy-mtls/certs" {
				t.Errorf("%s: certificate files not reloaded when the Secret volume changes", file)
			}
		}
		if v := secret.GetValidationContext(); v != nil {
			files = append(files, v.GetTrustedCa().GetFilename())
			if v.GetWatchedDirectory().GetPath() != "/etc/envoy-mtls/certs" {
				t.Errorf("%s: CA file not reloaded when the Secret volume changes", file)
			}
		}
		for _, f := range files {
			if !strings.HasPrefix(f, "/etc/envoy-mtls/certs/") {
				t.Errorf("%s reads %s, want a file of the mounted Secret /etc/envoy-mtls/certs/", file, f)
			}
		}
	}
	if len(sds) != 2 {
		t.Errorf("the socket reads %d SDS secrets, want the client certificate and the CA", len(sds))
	}

	// Applied to every shipped bootstrap: valid here, and on the oldest
	// supported Envoy through the compat checker.
	dir := t.TempDir()
	var files []string
	for _, b := range bootstraps {
		parsed, err := ParseBootstrap(b.data)
		if err != nil {
			t.Fatal(err)
		}
		withTLS, err := WithMutualTLS(parsed)
		if err != nil {
			t.Fatalf("%s: %v", b.name, err)
		}
		if err := Validate(withTLS); err != nil {
			t.Fatalf("%s with mutual TLS: %v", b.name, err)
		}
		js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(withTLS)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseBootstrap(js); err != nil {
			t.Fatalf("%s with mutual TLS does not decode again: %v", b.name, err)
		}
		f := filepath.Join(dir, b.name+"-mtls.json")
		if err := os.WriteFile(f, js, 0o600); err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	if testing.Short() {
		return
	}
	if out, err := runCompat(t.Context(), files...); err != nil {
		t.Fatalf("the mutual-TLS variant does not load on Envoy %s: %v\n%s", oldestEnvoy, err, out)
	}
}
