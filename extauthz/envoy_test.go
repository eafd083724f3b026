package extauthz

import (
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
)

// This file builds CheckRequests the way Envoy's ext_authz filter does
// (check_request_utils.cc): pseudo-headers included, keys lower-case, either
// the headers map with duplicates joined by "," or, with encode_raw_headers,
// header_map with one raw entry per header line.

const (
	formHeaders   = "headers"
	formHeaderMap = "header_map"
)

// envoyReq describes one downstream request as Envoy saw it.
type envoyReq struct {
	method, scheme, host, path string
	headers                    [][2]string // in arrival order; keys any case
	ext                        map[string]string
	jwt                        map[string]any // jwt_authn payload_in_metadata
	jwtFailure                 map[string]any // jwt_authn failed_status_in_metadata
	source                     string         // downstream remote address
	body                       string         // with_request_body: sent as raw_body
	bodyAsString               bool           // … or, without pack_as_bytes, as body
}

func (r envoyReq) build(tb testing.TB, form string) *authv3.CheckRequest {
	tb.Helper()
	method, scheme, path := r.method, r.scheme, r.path
	if method == "" {
		method = "GET"
	}
	if scheme == "" {
		scheme = "https"
	}
	if path == "" {
		path = "/api/items?x=1"
	}
	source := r.source
	if source == "" {
		source = "203.0.113.7"
	}
	all := append([][2]string{
		{":authority", r.host}, {":path", path}, {":method", method}, {":scheme", scheme},
		{"user-agent", "Mozilla/5.0"}, {"x-forwarded-proto", scheme}, {"x-request-id", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"},
	}, r.headers...)
	h := &authv3.AttributeContext_HttpRequest{
		Id: "13519049518330544501", Method: method, Path: path, Host: r.host, Scheme: scheme, Protocol: "HTTP/2",
	}
	switch form {
	case formHeaders:
		m := map[string]string{}
		for _, kv := range all {
			k := strings.ToLower(kv[0])
			if old, ok := m[k]; ok {
				m[k] = old + "," + kv[1]
			} else {
				m[k] = kv[1]
			}
		}
		h.Headers = m
	case formHeaderMap:
		hm := &corev3.HeaderMap{}
		for _, kv := range all {
			hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: strings.ToLower(kv[0]), RawValue: []byte(kv[1])})
		}
		h.HeaderMap = hm
	default:
		tb.Fatalf("unknown form %q", form)
	}
	attrs := &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: source, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 51234}},
		}}},
		Destination: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "10.0.0.2", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 8443}},
		}}},
		Request: &authv3.AttributeContext_Request{
			Time: timestamppb.New(time.Date(2026, 11, 29, 8, 0, 0, 0, time.UTC)),
			Http: h,
		},
		ContextExtensions: r.ext,
	}
	if r.body != "" {
		if r.bodyAsString {
			h.Body = r.body
		} else {
			h.RawBody = []byte(r.body)
		}
		h.Size = int64(len(r.body))
	}
	jwtNS := map[string]*structpb.Value{}
	for key, m := range map[string]map[string]any{"jwt_payload": r.jwt, "jwt_failure": r.jwtFailure} {
		if m == nil {
			continue
		}
		v, err := structpb.NewStruct(m)
		if err != nil {
			tb.Fatal(err)
		}
		jwtNS[key] = structpb.NewStructValue(v)
	}
	if len(jwtNS) > 0 {
		attrs.MetadataContext = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{
			"envoy.filters.http.jwt_authn": {Fields: jwtNS},
		}}
	}
	return &authv3.CheckRequest{Attributes: attrs}
}

// startGRPC serves srv on 127.0.0.1:0 and returns a client connected to it,
// the way Envoy's gRPC client reaches meshguard.
func startGRPC(tb testing.TB, srv authv3.AuthorizationServer) authv3.AuthorizationClient {
	tb.Helper()
	gs := grpc.NewServer()
	authv3.RegisterAuthorizationServer(gs, srv)
	return authv3.NewAuthorizationClient(grpcservertest.Serve(tb, gs))
}

// newTestServer builds a Server over cfg with a fresh registry.
func newTestServer(tb testing.TB, cfg Config, tenants *TenantStore) (*Server, *prometheus.Registry) {
	tb.Helper()
	reg := prometheus.NewRegistry()
	s, err := New(slog.New(slog.NewTextHandler(io.Discard, nil)), reg, cfg, tenants)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	return s, reg
}

// testConfig is the DESIGN.md example configuration.
func testConfig() Config {
	cors := DefaultCORSConfig()
	cors.PublicOrigin = "https://app.example.com"
	cors.AllowedOrigins = []string{"https://dashboard.example.com", "https://*.example.com"}
	cors.Tenants = map[string][]string{"tenant1": {"https://tenant1.example.org"}}
	id := DefaultIdentityConfig()
	id.ClientIPHeader = "x-meshguard-client-ip" // as envoy/envoy.yaml overwrites it
	return Config{CORS: cors, Identity: id, CSP: DefaultCSPConfig()}
}
