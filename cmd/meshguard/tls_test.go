package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	rlcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshguard/meshguard/internal/servertest"
	"github.com/meshguard/meshguard/internal/servertls/servertlstest"
)

const envoyID = "spiffe://cluster.local/ns/edge/sa/envoy"

// mtlsSetup is a CA, meshguard's certificate files and a config that
// serves every listener with them: mutual TLS with a SAN allow-list on the
// gRPC listeners, client certificates verified if given on HTTP.
type mtlsSetup struct {
	ca      *servertlstest.CA
	dir     string // holds cert.pem and key.pem, rotated in place
	cfgPath string
	envoy   servertlstest.Pair
}

func newMTLS(t *testing.T) *mtlsSetup {
	t.Helper()
	m := &mtlsSetup{ca: servertlstest.NewCA(t, "mesh-ca"), dir: t.TempDir()}
	cert, key := m.ca.Server(t, "meshguard").WriteFiles(t, m.dir)
	caFile := filepath.Join(m.dir, "ca.pem")
	servertlstest.WriteFile(t, caFile, m.ca.PEM)
	m.envoy = m.ca.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true})
	m.cfgPath = testConfig(t, fmt.Sprintf(`tls:
  grpc: {cert_file: %[1]q, key_file: %[2]q, client_ca_file: %[3]q, allowed_client_sans: [%[4]q]}
  http: {cert_file: %[1]q, key_file: %[2]q, client_ca_file: %[3]q, client_auth: verify_if_given}
`, cert, key, caFile, envoyID))
	return m
}

// clientTLS is a client configuration that trusts m's CA and presents
// cert, if any, even when the server's request names other CAs (Go's
// client would otherwise send nothing, and a wrong CA's certificate would
// never be tested).
func (m *mtlsSetup) clientTLS(cert *servertlstest.Pair) *tls.Config {
	c := &tls.Config{RootCAs: m.ca.Pool(), ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if cert != nil {
		c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert.TLS, nil }
	}
	return c
}

func dialTLS(t *testing.T, addr string, c *tls.Config) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(c)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func rlsCall(ctx context.Context, cc *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := rlsv3.NewRateLimitServiceClient(cc).ShouldRateLimit(ctx, &rlsv3.RateLimitRequest{
		Domain: "api", Descriptors: []*rlcommon.RateLimitDescriptor{{Entries: []*rlcommon.RateLimitDescriptor_Entry{
			{Key: "preset", Value: "relaxed"}, {Key: "client", Value: "ip:203.0.113.7"}}}}})
	return err
}

// TestRunMutualTLS drives run() with mutual TLS on both gRPC listeners and
// TLS on HTTP, and calls it as Envoy (an allowed SPIFFE ID), as clients
// that must be refused, and as the kubelet and Prometheus would.
func TestRunMutualTLS(t *testing.T) {
	m := newMTLS(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	line, errc, logs := startRun(t, ctx, m.cfgPath, noEnv)
	if line["grpc_tls"] != "mtls" || line["http_tls"] != "mtls_if_given" {
		t.Errorf("start-up line says grpc_tls=%v http_tls=%v", line["grpc_tls"], line["http_tls"])
	}
	grpcAddr, rlAddr, httpAddr := line["grpc_addr"].(string), line["ratelimit_addr"].(string), line["http_addr"].(string)

	// Envoy, with its SPIFFE ID, is served on both gRPC listeners.
	for _, addr := range []string{grpcAddr, rlAddr} {
		cc := dialTLS(t, addr, m.clientTLS(&m.envoy))
		if err := rlsCall(ctx, cc); err != nil {
			t.Errorf("ShouldRateLimit as Envoy on %s: %v", addr, err)
		}
	}
	envoyConn := dialTLS(t, grpcAddr, m.clientTLS(&m.envoy))
	if _, err := authv3.NewAuthorizationClient(envoyConn).Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Host: "app.example.com", Path: "/", Scheme: "https"}},
	}}); err != nil {
		t.Errorf("Check as Envoy: %v", err)
	}

	wrongCA := servertlstest.NewCA(t, "wrong-ca")
	expired := m.ca.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true,
		NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
	foreign := wrongCA.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true})
	stranger := m.ca.Issue(t, servertlstest.Leaf{CommonName: "app", URIs: []string{"spiffe://cluster.local/ns/app/sa/app"}, Client: true})
	for _, tc := range []struct {
		name string
		cert *servertlstest.Pair
	}{
		{"expired certificate", &expired},
		{"certificate of another CA", &foreign},
		{"SAN not allowed", &stranger},
		{"no certificate", nil},
	} {
		for _, addr := range []string{grpcAddr, rlAddr} {
			if err := rlsCall(ctx, dialTLS(t, addr, m.clientTLS(tc.cert))); err == nil {
				t.Errorf("%s: served on %s", tc.name, addr)
			}
		}
	}
	plain, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if err := rlsCall(ctx, plain); err == nil {
		t.Error("a plaintext client was served")
	}

	// HTTP: probes and scrapes without a certificate are served; a
	// certificate that is sent is verified.
	httpGetTLS := func(c *tls.Config, path string) (int, error) {
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: c}, Timeout: 10 * time.Second}
		defer hc.CloseIdleConnections()
		resp, err := hc.Get("https://" + httpAddr + path)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, nil
	}
	for _, c := range []struct {
		name string
		cert *servertlstest.Pair
		path string
	}{{"probe without a certificate", nil, "/healthz"}, {"scrape with Envoy's certificate", &m.envoy, "/metrics"}} {
		if code, err := httpGetTLS(m.clientTLS(c.cert), c.path); err != nil || code != 200 {
			t.Errorf("HTTP %s: %d, %v", c.name, code, err)
		}
	}
	if _, err := httpGetTLS(m.clientTLS(&foreign), "/healthz"); err == nil {
		t.Error("HTTP accepted a certificate of another CA")
	}
	if resp, err := http.Get("http://" + httpAddr + "/healthz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Error("plaintext HTTP was served")
		}
	}

	// Every refused certificate the CA signed is counted by reason.
	_, metrics := httpGetTLSBody(t, m.clientTLS(nil), "https://"+httpAddr+"/metrics")
	for _, want := range []string{
		`meshguard_tls_client_rejections_total{listener="grpc",reason="san_not_allowed"} 2`,
		`meshguard_tls_certificate_expiry_timestamp_seconds{listener="http"}`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	cancel()
	if err := waitRun(t, errc, logs); err != nil {
		t.Fatal(err)
	}
}

func httpGetTLSBody(t *testing.T, c *tls.Config, url string) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: c}, Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestRunTLSRotation rotates meshguard's certificate files while Envoy-like
// clients call both gRPC listeners: no call fails, new connections get the
// new certificate, and connections already open keep working.
func TestRunTLSRotation(t *testing.T) {
	m := newMTLS(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	line, errc, logs := startRun(t, ctx, m.cfgPath, noEnv)
	addrs := []string{line["grpc_addr"].(string), line["ratelimit_addr"].(string)}

	var calls, failures atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, addr := range addrs {
		cc := dialTLS(t, addr, m.clientTLS(&m.envoy)) // one connection, open throughout
		for range 3 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					if err := rlsCall(ctx, cc); err != nil {
						failures.Add(1)
						firstErr.CompareAndSwap(nil, err)
					}
					calls.Add(1)
				}
			})
		}
	}
	servertest.WaitFor(t, 30*time.Second, func() error {
		if calls.Load() < 50 {
			return fmt.Errorf("%d calls before the rotation", calls.Load())
		}
		return nil
	})

	next := m.ca.Server(t, "meshguard")
	next.WriteFiles(t, m.dir)
	want := next.Cert.SerialNumber.String()
	for _, addr := range addrs {
		servertest.WaitFor(t, 30*time.Second, func() error {
			c, err := tls.Dial("tcp", addr, m.clientTLS(&m.envoy))
			if err != nil {
				return err
			}
			defer c.Close()
			if got := c.ConnectionState().PeerCertificates[0].SerialNumber.String(); got != want {
				return fmt.Errorf("%s presents serial %s, want the rotated %s", addr, got, want)
			}
			return nil
		})
		// A new connection after the rotation is served too.
		if err := rlsCall(ctx, dialTLS(t, addr, m.clientTLS(&m.envoy))); err != nil {
			t.Errorf("a new connection to %s after the rotation: %v", addr, err)
		}
	}
	before := calls.Load()
	servertest.WaitFor(t, 30*time.Second, func() error {
		if calls.Load() < before+50 {
			return fmt.Errorf("%d calls after the rotation", calls.Load()-before)
		}
		return nil
	})
	close(stop)
	wg.Wait()
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d of %d calls failed during the rotation; first: %v", n, calls.Load(), firstErr.Load())
	}
	// The HTTP listener shares the files; its next handshake (at most a
	// second after its last look at them) reads them again.
	servertest.WaitFor(t, 30*time.Second, func() error {
		_, metrics := httpGetTLSBody(t, m.clientTLS(nil), "https://"+line["http_addr"].(string)+"/metrics")
		for _, l := range []string{"grpc", "http"} {
			if want := fmt.Sprintf(`meshguard_tls_reloads_total{listener=%q,result="success"} 1`, l); !strings.Contains(metrics, want) {
				return fmt.Errorf("/metrics lacks %s", want)
			}
		}
		return nil
	})
	cancel()
	if err := waitRun(t, errc, logs); err != nil {
		t.Fatal(err)
	}
}
