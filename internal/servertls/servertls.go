// Package servertls gives meshguard's listeners TLS and mutual TLS from
// PEM files that are read again when they change: cert-manager, SPIFFE
// helpers and Kubernetes Secret volumes rotate certificates in place, and a
// restart must not be the way to pick up a new one.
//
// A Source checks the files' identity (device, inode, size, modification
// time) at most once a second, from the TLS handshake itself, so rotation
// needs no goroutine and an idle listener does no work. New connections get
// the new certificate; connections already open keep theirs. A rotation that
// leaves the files unreadable or inconsistent (a key that does not match its
// certificate, a half-written file) keeps the previous certificate in force
// and is logged and counted.
//
// Client certificates, when a CA bundle is configured, are verified against
// it (chain, validity period, key usage) and then their subject alternative
// names are held against an allow-list of exact URI SANs (SPIFFE IDs such as
// spiffe://cluster.local/ns/edge/sa/envoy) or DNS names. Handlers find the
// verified client's identity with Peer: in an HTTP request's context (the
// server's handler wrapped in WithPeer) or a gRPC call's.
//
// Metrics (see NewMetrics):
//
//	meshguard_tls_reloads_total{listener,result}           success | error
//	meshguard_tls_certificate_expiry_timestamp_seconds{listener}
//	meshguard_tls_client_rejections_total{listener,reason} san_not_allowed
package servertls

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Config is one listener's TLS settings. The zero value is plaintext.
type Config struct {
	// CertFile and KeyFile are the PEM certificate chain and private key the
	// listener presents. Both or neither.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ClientCAFile is a PEM bundle of the CAs that sign client certificates.
	// Empty: clients are not asked for a certificate.
	ClientCAFile string `yaml:"client_ca_file"`
	// ClientAuth is require (a verified client certificate is needed to
	// connect) or verify_if_given (one is verified when sent). Empty means
	// require when ClientCAFile is set.
	ClientAuth string `yaml:"client_auth"`
	// AllowedClientSANs are the URI SANs (SPIFFE IDs) and DNS names a client
	// certificate may carry, compared exactly; a certificate passes when one
	// of its SANs is listed. Empty: any certificate the CAs verify.
	AllowedClientSANs []string `yaml:"allowed_client_sans"`
}

// Enabled reports whether the listener serves TLS.
func (c Config) Enabled() bool { return c.CertFile != "" || c.KeyFile != "" }

// Validate checks c without reading the files; path is the YAML path of the
// section (e.g. "tls.grpc"), which every error names.
func (c Config) Validate(path string) error {
	var errs []error
	if (c.CertFile == "") != (c.KeyFile == "") {
		errs = append(errs, fmt.Errorf("%s: cert_file and key_file go together", path))
	}
	if !c.Enabled() && (c.ClientCAFile != "" || c.ClientAuth != "" || len(c.AllowedClientSANs) > 0) {
		errs = append(errs, fmt.Errorf("%s: client certificate settings need cert_file and key_file", path))
	}
	switch c.ClientAuth {
	case "", "require", "verify_if_given":
	default:
		errs = append(errs, fmt.Errorf("%s.client_auth: must be require or verify_if_given, got %q", path, c.ClientAuth))
	}
	if c.ClientCAFile == "" && (c.ClientAuth != "" || len(c.AllowedClientSANs) > 0) {
		errs = append(errs, fmt.Errorf("%s: client_auth and allowed_client_sans need client_ca_file", path))
	}
	for i, s := range c.AllowedClientSANs {
		if s == "" {
			errs = append(errs, fmt.Errorf("%s.allowed_client_sans[%d]: must not be empty", path, i))
		}
	}
	return errors.Join(errs...)
}

// Metrics counts reloads and rejections of every Source.
type Metrics struct {
	reloads    *prometheus.CounterVec
	expiry     *prometheus.GaugeVec
	rejections *prometheus.CounterVec
}

// NewMetrics registers the TLS metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_tls_reloads_total",
			Help: "Times a listener's certificate files were read after they changed, by result.",
		}, []string{"listener", "result"}),
		expiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshguard_tls_certificate_expiry_timestamp_seconds",
			Help: "When the certificate a listener presents expires (Unix time).",
		}, []string{"listener"}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_tls_client_rejections_total",
			Help: "Client certificates the CAs verified but the listener refused, by reason.",
		}, []string{"listener", "reason"}),
	}
	reg.MustRegister(m.reloads, m.expiry, m.rejections)
	return m
}

// checkEvery is how often a handshake may look at the files.
const checkEvery = time.Second

// Source serves a listener's tls.Config and re-reads its files when they
// change. It is safe for concurrent use.
type Source struct {
	name    string
	cfg     Config
	log     *slog.Logger
	m       *Metrics
	allowed map[string]bool
	now     func() time.Time

	cur       atomic.Pointer[loaded]
	lastCheck atomic.Int64 // unix nanos of the last look at the files
	mu        sync.Mutex   // serialises reloads
}

// loaded is one reading of the files and the config built from it.
type loaded struct {
	stamps [3]stamp
	tls    *tls.Config
	leaf   *x509.Certificate
}

// stamp identifies a file's contents without reading them.
type stamp struct {
	dev, ino uint64
	size     int64
	mtime    time.Time
}

// New reads cfg's files for the listener called name (a metric label and
// log field, e.g. "grpc") and fails if they do not make a usable
// configuration. nextProtos are the ALPN protocols the listener speaks
// ("h2" for gRPC). cfg must be Enabled and valid.
func New(log *slog.Logger, m *Metrics, name string, cfg Config, nextProtos ...string) (*Source, error) {
	s := &Source{name: name, cfg: cfg, log: log, m: m, now: time.Now}
	if len(cfg.AllowedClientSANs) > 0 {
		s.allowed = make(map[string]bool, len(cfg.AllowedClientSANs))
		for _, san := range cfg.AllowedClientSANs {
			s.allowed[san] = true
		}
	}
	l, err := s.load(nextProtos)
	if err != nil {
		return nil, err
	}
	s.install(l)
	s.lastCheck.Store(s.now().UnixNano())
	return s, nil
}

// Config returns the tls.Config to serve with: every handshake takes the
// configuration of the files as they are now.
func (s *Source) Config() *tls.Config {
	first := s.cur.Load().tls
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: first.NextProtos,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			s.maybeReload()
			return s.cur.Load().tls, nil
		},
	}
}

// Leaf returns the certificate the listener presents now.
func (s *Source) Leaf() *x509.Certificate { return s.cur.Load().leaf }

// maybeReload looks at the files if it has not for checkEvery, and reads
// them again if they changed.
func (s *Source) maybeReload() {
	now := s.now().UnixNano()
	last := s.lastCheck.Load()
	if now-last < int64(checkEvery) || !s.lastCheck.CompareAndSwap(last, now) {
		return
	}
	if _, err := s.Reload(); err != nil {
		s.log.Error("TLS files changed but cannot be used; keeping the previous certificate",
			"listener", s.name, "err", err)
	}
}

// Reload reads the files again if they changed since the last reading and
// reports whether the configuration changed. On an error the previous
// configuration stays in force.
func (s *Source) Reload() (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.cur.Load()
	stamps, err := s.stampFiles()
	if err == nil && stamps == cur.stamps {
		return false, nil
	}
	l, err := s.load(cur.tls.NextProtos)
	if err != nil {
		s.m.reloads.WithLabelValues(s.name, "error").Inc()
		return false, err
	}
	s.install(l)
	s.m.reloads.WithLabelValues(s.name, "success").Inc()
	s.log.Info("TLS certificate reloaded", "listener", s.name, "subject", l.leaf.Subject.String(),
		"not_after", l.leaf.NotAfter, "serial", l.leaf.SerialNumber.String())
	return true, nil
}

func (s *Source) install(l *loaded) {
	s.cur.Store(l)
	s.m.expiry.WithLabelValues(s.name).Set(float64(l.leaf.NotAfter.Unix()))
	if s.now().After(l.leaf.NotAfter) {
		s.log.Error("the TLS certificate this listener presents has expired", "listener", s.name,
			"not_after", l.leaf.NotAfter, "cert_file", s.cfg.CertFile)
	}
}

func (s *Source) files() []string {
	return []string{s.cfg.CertFile, s.cfg.KeyFile, s.cfg.ClientCAFile}
}

func (s *Source) stampFiles() ([3]stamp, error) {
	var out [3]stamp
	for i, f := range s.files() {
		if f == "" {
			continue
		}
		fi, err := os.Stat(f)
		if err != nil {
			return out, err
		}
		out[i] = stamp{size: fi.Size(), mtime: fi.ModTime()}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			out[i].dev, out[i].ino = uint64(st.Dev), uint64(st.Ino)
		}
	}
	return out, nil
}

// maxPEMBytes bounds what a certificate, key or CA file may hold.
const maxPEMBytes = 1 << 20

func readPEM(path, what string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", what, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", what, err)
	}
	if fi.Size() > maxPEMBytes {
		return nil, fmt.Errorf("reading %s %s: %d bytes, limit %d", what, path, fi.Size(), maxPEMBytes)
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil && fi.Size() > 0 {
		return nil, fmt.Errorf("reading %s: %w", what, err)
	}
	return b, nil
}

// load reads the files (stamping them first, so a change during the read is
// seen at the next check) and builds the listener's configuration.
func (s *Source) load(nextProtos []string) (*loaded, error) {
	stamps, err := s.stampFiles()
	if err != nil {
		return nil, fmt.Errorf("tls for %s: %w", s.name, err)
	}
	certPEM, err := readPEM(s.cfg.CertFile, "cert_file")
	if err != nil {
		return nil, err
	}
	keyPEM, err := readPEM(s.cfg.KeyFile, "key_file")
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("tls for %s: cert_file %s and key_file %s: %w", s.name, s.cfg.CertFile, s.cfg.KeyFile, err)
	}
	c := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{pair},
		NextProtos:   slices.Clone(nextProtos),
	}
	if s.cfg.ClientCAFile != "" {
		caPEM, err := readPEM(s.cfg.ClientCAFile, "client_ca_file")
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("tls for %s: client_ca_file %s holds no PEM certificate", s.name, s.cfg.ClientCAFile)
		}
		c.ClientCAs = pool
		c.ClientAuth = tls.RequireAndVerifyClientCert
		if s.cfg.ClientAuth == "verify_if_given" {
			c.ClientAuth = tls.VerifyClientCertIfGiven
		}
		if s.allowed != nil {
			c.VerifyConnection = s.verifySANs
		}
	}
	return &loaded{stamps: stamps, tls: c, leaf: pair.Leaf}, nil
}

// verifySANs refuses a verified client certificate none of whose SANs is
// allowed. Without a certificate (verify_if_given) there is nothing to hold.
func (s *Source) verifySANs(cs tls.ConnectionState) error {
	if len(cs.VerifiedChains) == 0 {
		return nil
	}
	leaf := cs.VerifiedChains[0][0]
	for _, u := range leaf.URIs {
		if s.allowed[u.String()] {
			return nil
		}
	}
	for _, d := range leaf.DNSNames {
		if s.allowed[d] {
			return nil
		}
	}
	s.m.rejections.WithLabelValues(s.name, "san_not_allowed").Inc()
	return fmt.Errorf("client certificate %q: no subject alternative name is allowed on this listener", leaf.Subject.String())
}

// PeerID names the client of a connection by its verified certificate: the
// first URI SAN (a SPIFFE ID), else the first DNS SAN, else the subject's
// common name. It is empty when the client sent no verified certificate.
func PeerID(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return ""
	}
	leaf := cs.VerifiedChains[0][0]
	switch {
	case len(leaf.URIs) > 0:
		return leaf.URIs[0].String()
	case len(leaf.DNSNames) > 0:
		return leaf.DNSNames[0]
	}
	return leaf.Subject.CommonName
}

type peerKey struct{}

// WithPeer passes each request to h with the verified client certificate's
// identity (PeerID) in its context, for Peer to return.
func WithPeer(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if id := PeerID(r.TLS); id != "" {
			r = r.WithContext(context.WithValue(r.Context(), peerKey{}, id))
		}
		h.ServeHTTP(w, r)
	})
}

// Peer returns the identity (PeerID) of the verified client certificate of
// the request or RPC ctx belongs to: an HTTP request passed through
// WithPeer, or a gRPC call on a server with TLS credentials. It is empty
// for a plaintext connection and for a client that sent no certificate.
func Peer(ctx context.Context) string {
	if id, ok := ctx.Value(peerKey{}).(string); ok {
		return id
	}
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			return PeerID(&ti.State)
		}
	}
	return ""
}
