package servertls_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshguard/meshguard/internal/metrictest"
	"github.com/meshguard/meshguard/internal/servertest"
	"github.com/meshguard/meshguard/internal/servertls"
	"github.com/meshguard/meshguard/internal/servertls/servertlstest"
)

const envoyID = "spiffe://cluster.local/ns/edge/sa/envoy"

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  servertls.Config
		want string // "" = valid
	}{
		{"off", servertls.Config{}, ""},
		{"tls", servertls.Config{CertFile: "c", KeyFile: "k"}, ""},
		{"mtls", servertls.Config{CertFile: "c", KeyFile: "k", ClientCAFile: "ca", AllowedClientSANs: []string{envoyID}}, ""},
		{"cert without key", servertls.Config{CertFile: "c"}, "tls.grpc: cert_file and key_file go together"},
		{"ca without cert", servertls.Config{ClientCAFile: "ca"}, "tls.grpc: client certificate settings need cert_file and key_file"},
		{"bad client_auth", servertls.Config{CertFile: "c", KeyFile: "k", ClientCAFile: "ca", ClientAuth: "optional"}, `tls.grpc.client_auth: must be require or verify_if_given, got "optional"`},
		{"sans without ca", servertls.Config{CertFile: "c", KeyFile: "k", AllowedClientSANs: []string{envoyID}}, "tls.grpc: client_auth and allowed_client_sans need client_ca_file"},
		{"empty san", servertls.Config{CertFile: "c", KeyFile: "k", ClientCAFile: "ca", AllowedClientSANs: []string{""}}, "tls.grpc.allowed_client_sans[0]: must not be empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate("tls.grpc")
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("Validate = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestNewRejectsBadFiles(t *testing.T) {
	ca := servertlstest.NewCA(t, "ca")
	other := servertlstest.NewCA(t, "other")
	dir := t.TempDir()
	good := ca.Server(t, "meshguard")
	cert, key := good.WriteFiles(t, dir)
	mismatched := filepath.Join(dir, "other-key.pem")
	servertlstest.WriteFile(t, mismatched, other.Server(t, "x").KeyPEM)
	garbage := filepath.Join(dir, "garbage.pem")
	servertlstest.WriteFile(t, garbage, []byte("not a certificate\n"))
	huge := filepath.Join(dir, "huge.pem")
	servertlstest.WriteFile(t, huge, make([]byte, 2<<20))

	for _, tc := range []struct {
		name string
		cfg  servertls.Config
		want string
	}{
		{"missing cert", servertls.Config{CertFile: filepath.Join(dir, "nope.pem"), KeyFile: key}, "nope.pem: no such file"},
		{"key of another cert", servertls.Config{CertFile: cert, KeyFile: mismatched}, "private key does not match public key"},
		{"garbage cert", servertls.Config{CertFile: garbage, KeyFile: key}, "failed to find any PEM data in certificate input"},
		{"garbage CA", servertls.Config{CertFile: cert, KeyFile: key, ClientCAFile: garbage}, "holds no PEM certificate"},
		{"huge CA", servertls.Config{CertFile: cert, KeyFile: key, ClientCAFile: huge}, "2097152 bytes, limit 1048576"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := servertls.New(quietLog(), servertls.NewMetrics(prometheus.NewRegistry()), "grpc", tc.cfg, "h2")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// server is a gRPC health server on a TLS Source.
type server struct {
	addr string
	src  *servertls.Source
	reg  *prometheus.Registry
	dir  string
}

func startServer(t *testing.T, ca *servertlstest.CA, cfg servertls.Config) *server {
	t.Helper()
	dir := t.TempDir()
	cfg.CertFile, cfg.KeyFile = ca.Server(t, "meshguard").WriteFiles(t, dir)
	if cfg.ClientCAFile == "" && (cfg.ClientAuth != "" || len(cfg.AllowedClientSANs) > 0) {
		cfg.ClientCAFile = filepath.Join(dir, "clients-ca.pem")
		servertlstest.WriteFile(t, cfg.ClientCAFile, ca.PEM)
	}
	reg := prometheus.NewRegistry()
	src, err := servertls.New(quietLog(), servertls.NewMetrics(reg), "grpc", cfg, "h2")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(src.Config())))
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(l)
	t.Cleanup(gs.Stop)
	return &server{addr: l.Addr().String(), src: src, reg: reg, dir: dir}
}

func dialHealth(t *testing.T, addr string, roots *servertlstest.CA, client *servertlstest.Pair) healthpb.HealthClient {
	t.Helper()
	cfg := &tls.Config{RootCAs: roots.Pool(), ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if client != nil {
		cfg.Certificates = []tls.Certificate{client.TLS}
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return healthpb.NewHealthClient(cc)
}

func check(hc healthpb.HealthClient) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(false))
	return err
}

func TestMutualTLS(t *testing.T) {
	ca := servertlstest.NewCA(t, "mesh-ca")
	wrongCA := servertlstest.NewCA(t, "wrong-ca")
	srv := startServer(t, ca, servertls.Config{AllowedClientSANs: []string{envoyID, "envoy.edge.svc"}})

	envoy := ca.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true})
	byDNS := ca.Issue(t, servertlstest.Leaf{CommonName: "envoy", DNSNames: []string{"envoy.edge.svc"}, Client: true})
	stranger := ca.Issue(t, servertlstest.Leaf{CommonName: "app", URIs: []string{"spiffe://cluster.local/ns/app/sa/app"}, Client: true})
	expired := ca.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true,
		NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)})
	foreign := wrongCA.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true})

	for _, tc := range []struct {
		name   string
		client *servertlstest.Pair
		ok     bool
	}{
		{"allowed SPIFFE ID", &envoy, true},
		{"allowed DNS name", &byDNS, true},
		{"SAN not allowed", &stranger, false},
		{"expired", &expired, false},
		{"signed by another CA", &foreign, false},
		{"no certificate", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := check(dialHealth(t, srv.addr, ca, tc.client))
			if (err == nil) != tc.ok {
				t.Fatalf("Check: err = %v, want ok = %v", err, tc.ok)
			}
		})
	}
	if got := metrictest.Sum(t, srv.reg, "meshguard_tls_client_rejections_total", map[string]string{"reason": "san_not_allowed"}); got != 1 {
		t.Errorf("rejections for SANs = %v, want 1 (the stranger)", got)
	}
	// A client that does not trust meshguard's CA refuses it too.
	if err := check(dialHealth(t, srv.addr, wrongCA, &envoy)); err == nil {
		t.Error("a client with another CA's roots connected")
	}
}

func TestVerifyIfGivenNamesThePeer(t *testing.T) {
	ca := servertlstest.NewCA(t, "mesh-ca")
	dir := t.TempDir()
	cert, key := ca.Server(t, "meshguard").WriteFiles(t, dir)
	caFile := filepath.Join(dir, "ca.pem")
	servertlstest.WriteFile(t, caFile, ca.PEM)
	src, err := servertls.New(quietLog(), servertls.NewMetrics(prometheus.NewRegistry()), "http",
		servertls.Config{CertFile: cert, KeyFile: key, ClientCAFile: caFile, ClientAuth: "verify_if_given"}, "http/1.1")
	if err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", src.Config())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ids := make(chan string, 2)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			tc := c.(*tls.Conn)
			if err := tc.Handshake(); err != nil {
				ids <- "error: " + err.Error()
			} else {
				st := tc.ConnectionState()
				ids <- "id=" + servertls.PeerID(&st)
			}
			c.Close()
		}
	}()
	envoy := ca.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true})
	for _, tc := range []struct {
		certs []tls.Certificate
		want  string
	}{
		{nil, "id="},
		{[]tls.Certificate{envoy.TLS}, "id=" + envoyID},
	} {
		c, err := tls.Dial("tcp", l.Addr().String(), &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost", Certificates: tc.certs})
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if got := <-ids; got != tc.want {
			t.Errorf("peer = %q, want %q", got, tc.want)
		}
	}
}

// peerSerial dials a new connection and returns the serial number of the
// certificate the server presents.
func peerSerial(t *testing.T, addr string, ca *servertlstest.CA) string {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

func TestRotationWhileCallsInFlight(t *testing.T) {
	ca := servertlstest.NewCA(t, "mesh-ca")
	srv := startServer(t, ca, servertls.Config{})
	first := srv.src.Leaf().SerialNumber.String()

	// Calls on one connection run throughout the rotation.
	hc := dialHealth(t, srv.addr, ca, nil)
	var calls, failures atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := check(hc); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
				calls.Add(1)
			}
		}()
	}
	servertest.WaitUntil(t, 30*time.Second, "calls before the rotation", func() bool { return calls.Load() > 20 })

	next := ca.Server(t, "meshguard")
	next.WriteFiles(t, srv.dir)
	servertest.WaitUntil(t, 30*time.Second, "a new connection to get the new certificate", func() bool {
		return peerSerial(t, srv.addr, ca) == next.Cert.SerialNumber.String()
	})
	before := calls.Load()
	servertest.WaitUntil(t, 30*time.Second, "calls after the rotation", func() bool { return calls.Load() > before+20 })
	close(stop)
	wg.Wait()
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d of %d calls failed during the rotation; first: %v", n, calls.Load(), firstErr.Load())
	}
	if got := srv.src.Leaf().SerialNumber.String(); got == first {
		t.Fatal("Leaf still reports the first certificate")
	}
	if got := metrictest.Sum(t, srv.reg, "meshguard_tls_reloads_total", map[string]string{"result": "success"}); got != 1 {
		t.Errorf("reloads = %v, want 1", got)
	}
}

func TestBrokenRotationKeepsThePreviousCertificate(t *testing.T) {
	ca := servertlstest.NewCA(t, "mesh-ca")
	srv := startServer(t, ca, servertls.Config{})
	first := srv.src.Leaf().SerialNumber.String()

	// Half a rotation: a new certificate beside the old key.
	servertlstest.WriteFile(t, filepath.Join(srv.dir, "cert.pem"), ca.Server(t, "meshguard").CertPEM)
	changed, err := srv.src.Reload()
	if changed || err == nil || !strings.Contains(err.Error(), "private key does not match public key") {
		t.Fatalf("Reload = %v, %v; want no change and a key mismatch error", changed, err)
	}
	if got := peerSerial(t, srv.addr, ca); got != first {
		t.Fatalf("after a broken rotation the server presents %s, want the previous %s", got, first)
	}
	// Files removed altogether: the same.
	if err := os.Remove(filepath.Join(srv.dir, "key.pem")); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.src.Reload(); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Reload without a key file = %v, want not-exist", err)
	}
	if err := check(dialHealth(t, srv.addr, ca, nil)); err != nil {
		t.Fatalf("a call after the broken rotations failed: %v", err)
	}
	got := metrictest.Sum(t, srv.reg, "meshguard_tls_reloads_total", map[string]string{"result": "error"})
	if got != 2 {
		t.Errorf("failed reloads = %v, want 2", got)
	}
}

func TestClientCARotation(t *testing.T) {
	oldCA := servertlstest.NewCA(t, "old-ca")
	newCA := servertlstest.NewCA(t, "new-ca")
	srv := startServer(t, oldCA, servertls.Config{ClientAuth: "require"})
	client := newCA.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true})
	if err := check(dialHealth(t, srv.addr, oldCA, &client)); err == nil {
		t.Fatal("a client of the new CA connected before the bundle had it")
	}
	servertlstest.WriteFile(t, filepath.Join(srv.dir, "clients-ca.pem"), append(append([]byte{}, oldCA.PEM...), newCA.PEM...))
	servertest.WaitUntil(t, 30*time.Second, "the new CA bundle to admit the client", func() bool {
		return check(dialHealth(t, srv.addr, oldCA, &client)) == nil
	})
}

// TestPeerInContext: HTTP handlers behind WithPeer, and gRPC handlers on
// TLS credentials, find the verified client's identity in their context.
func TestPeerInContext(t *testing.T) {
	ca := servertlstest.NewCA(t, "mesh-ca")
	dir := t.TempDir()
	cert, key := ca.Server(t, "meshguard").WriteFiles(t, dir)
	caFile := filepath.Join(dir, "ca.pem")
	servertlstest.WriteFile(t, caFile, ca.PEM)
	envoy := ca.Issue(t, servertlstest.Leaf{CommonName: "envoy", URIs: []string{envoyID}, Client: true})
	cfg := servertls.Config{CertFile: cert, KeyFile: key, ClientCAFile: caFile, ClientAuth: "verify_if_given"}

	t.Run("http", func(t *testing.T) {
		src, err := servertls.New(quietLog(), servertls.NewMetrics(prometheus.NewRegistry()), "http", cfg, "http/1.1")
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewUnstartedServer(servertls.WithPeer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "peer="+servertls.Peer(r.Context()))
		})))
		srv.TLS = src.Config()
		srv.StartTLS()
		defer srv.Close()
		for _, tc := range []struct {
			certs []tls.Certificate
			want  string
		}{{nil, "peer="}, {[]tls.Certificate{envoy.TLS}, "peer=" + envoyID}} {
			hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost", Certificates: tc.certs}}}
			resp, err := hc.Get(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			hc.CloseIdleConnections()
			if string(body) != tc.want {
				t.Errorf("handler saw %q, want %q", body, tc.want)
			}
		}
	})

	t.Run("grpc", func(t *testing.T) {
		src, err := servertls.New(quietLog(), servertls.NewMetrics(prometheus.NewRegistry()), "grpc", cfg, "h2")
		if err != nil {
			t.Fatal(err)
		}
		seen := make(chan string, 1)
		gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(src.Config())),
			grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
				seen <- servertls.Peer(ctx)
				return h(ctx, req)
			}))
		healthpb.RegisterHealthServer(gs, health.NewServer())
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go gs.Serve(l)
		defer gs.Stop()
		if err := check(dialHealth(t, l.Addr().String(), ca, &envoy)); err != nil {
			t.Fatal(err)
		}
		if got := <-seen; got != envoyID {
			t.Errorf("gRPC handler saw peer %q, want %q", got, envoyID)
		}
	})
	if got := servertls.Peer(context.Background()); got != "" {
		t.Errorf("Peer of a bare context = %q", got)
	}
}
