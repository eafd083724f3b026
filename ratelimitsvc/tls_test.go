package ratelimitsvc

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/servertest"
)

// writeTestPKI writes a CA and a server certificate for 127.0.0.1 into dir.
func writeTestPKI(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "meshguard test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	write := func(name, typ string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("server.pem", "CERTIFICATE", der), write("server.key", "EC PRIVATE KEY", keyDER)
}

// TestRedissURL: a rediss:// URL speaks TLS, verified with redis.tls_ca_file.
func TestRedissURL(t *testing.T) {
	skipShort(t)
	bin := servertest.LookPath(t, "redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
	dir := t.TempDir()
	caFile, certFile, keyFile := writeTestPKI(t, dir)
	port := servertest.FreePort(t)
	p, err := servertest.Start(bin, []string{"--port", "0", "--tls-port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--tls-cert-file", certFile, "--tls-key-file", keyFile, "--tls-ca-cert-file", caFile, "--tls-auth-clients", "no",
		"--save", "", "--appendonly", "no", "--dir", dir}, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if err := servertest.WaitTCP(addr, 10*time.Second); err != nil {
		t.Skipf("redis-server without TLS support? %v\n%s", err, p.Output())
	}
	cfg := RedisConfig{URL: secret.URL("rediss://" + addr + "/0"), TLSCAFile: caFile, Timeout: time.Second}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	rs := newTestRedis(t, cfg)
	h := startServer(t, testConfig(), rs, newFakeClock())
	for i := range 2 {
		resp, err := h.client.ShouldRateLimit(t.Context(), request("basic", kv("remote_address", "tls")))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Statuses[0].DurationUntilReset == nil || resp.Statuses[0].LimitRemaining != uint32(2-i) {
			t.Fatalf("request %d over TLS not counted: %v", i, resp)
		}
	}
	// Without the CA the server is not trusted: failure_mode answers.
	untrusted := newTestRedis(t, RedisConfig{URL: secret.URL("rediss://" + addr + "/0"), Timeout: time.Second})
	if err := untrusted.Ping(t.Context()); err == nil {
		t.Error("TLS to a server signed by an unknown CA succeeded")
	}
}
