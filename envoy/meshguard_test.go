package envoy

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/structpb"

	mutationrulesv3 "github.com/envoyproxy/go-control-plane/envoy/config/common/mutation_rules/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rlcommonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	headermutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	earlymutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"

	"github.com/meshguard/meshguard/extauthz"
	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/internal/metrictest"
	"github.com/meshguard/meshguard/ratelimitsvc"
)

// This file plays Envoy: it walks a request through the front proxy's
// configuration (the xff original IP detection, header_mutation with its
// per-route additions, jwt_authn's metadata with allow_missing_or_failed,
// ext_authz with per-route settings and request bodies, the rate limit filter
// with the route's actions) and calls real meshguard servers
// (extauthz, ratelimitsvc with its in-process store) through
// go-control-plane's generated clients. meshguard's two gRPC listeners run
// as serve.go builds them, on 127.0.0.1:0: grpc-go's server for listen.grpc
// (:8081; extauthz, ratelimitsvc, health) and a second grpc-go server for
// listen.ratelimit (:8082; ratelimitsvc and health only). Each gRPC service
// of the configuration is called on the listener whose port its cluster
// names, so a filter pointed at the wrong cluster calls the wrong server. It
// checks that the configuration and meshguard agree: descriptors hit
// meshguard's preset rules, context_extensions turn the nonce off where they
// should, client headers cannot choose a quota bucket, preflights never reach
// the rate limit service, every gRPC cluster's health check is answered
// SERVING, and rate limit calls reach the rate limit listener, never the gRPC
// one. It does not replace running Envoy; it only interprets the parts of
// the configuration listed above, as Envoy documents them.

const (
	lbAddr     = "10.0.0.1"    // the load balancer: the connection peer
	clientAddr = "203.0.113.7" // the client, which the load balancer appends to X-Forwarded-For
	host       = "app.example.com"
)

// meshguard's gRPC listener ports, as the Envoy clusters name them
// (listen.grpc and listen.ratelimit: meshguard's defaults and
// k8s/base/meshguard.yaml).
const (
	grpcPort      = 8081
	ratelimitPort = 8082
)

type simEnvoy struct {
	fp    *frontProxy
	authz authv3.AuthorizationClient
	rls   rlsv3.RateLimitServiceClient
	// conns reach meshguard's listeners by port (grpcPort, ratelimitPort).
	conns map[uint32]*grpc.ClientConn
	// grpcReg and rlReg hold the gRPC server metrics of listen.grpc and of
	// listen.ratelimit: which listener handled which calls.
	grpcReg, rlReg *prometheus.Registry
}

// newSimEnvoy starts meshguard's servers with its defaults (the client
// address header, the JWT failure key), the origins below and a shared
// account key; mod, if not nil, changes the extauthz configuration first.
func newSimEnvoy(t *testing.T, bootstrap []byte, mod func(*extauthz.Config)) *simEnvoy {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := prometheus.NewRegistry()

	acfg := extauthz.Config{CORS: extauthz.DefaultCORSConfig(), Identity: extauthz.DefaultIdentityConfig(), CSP: extauthz.DefaultCSPConfig()}
	acfg.CORS.PublicOrigin = "https://" + host
	acfg.CORS.AllowedOrigins = []string{"https://dashboard.example.com"}
	acfg.Identity.AccountKey = "0123456789abcdef0123456789abcdef"
	if mod != nil {
		mod(&acfg)
	}
	az, err := extauthz.New(log, reg, acfg, nil)
	if err != nil {
		t.Fatalf("extauthz.New: %v", err)
	}
	rcfg := ratelimitsvc.DefaultConfig()
	rcfg.ResponseHeaders = false // Envoy adds them (enable_x_ratelimit_headers)
	rl, err := ratelimitsvc.New(log, reg, rcfg, ratelimitsvc.NewMemoryStore())
	if err != nil {
		t.Fatalf("ratelimitsvc.New: %v", err)
	}
	e := &simEnvoy{fp: load(t, bootstrap), conns: map[uint32]*grpc.ClientConn{}, grpcReg: prometheus.NewRegistry(), rlReg: prometheus.NewRegistry()}

	// listen.grpc: every service, on grpc-go's server.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	limits := grpcserver.DefaultLimits()
	gs := grpc.NewServer(append(grpcserver.Options(limits), grpcserver.NewMetrics(e.grpcReg).ServerOptions()...)...)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	az.Register(gs)
	rl.Register(gs)
	for svc := range gs.GetServiceInfo() {
		hs.SetServingStatus(svc, healthpb.HealthCheckResponse_SERVING)
	}
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)

	// listen.ratelimit: ShouldRateLimit and health only, on a second server
	// with the same options.
	rlis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	us := grpcserver.New(limits, grpcserver.NewMetrics(e.rlReg))
	healthpb.RegisterHealthServer(us, hs)
	rl.Register(us)
	go us.Serve(rlis)
	t.Cleanup(us.Stop)

	for port, addr := range map[uint32]string{grpcPort: lis.Addr().String(), ratelimitPort: rlis.Addr().String()} {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		e.conns[port] = conn
	}
	e.authz = authv3.NewAuthorizationClient(e.dial(t, "ext_authz", e.fp.authz.GetGrpcService().GetEnvoyGrpc().GetClusterName()))
	e.rls = rlsv3.NewRateLimitServiceClient(e.dial(t, "the rate limit filter", e.fp.rl.GetRateLimitService().GetGrpcService().GetEnvoyGrpc().GetClusterName()))
	return e
}

// dial returns the connection to the meshguard listener that cluster (named
// by what) reaches: the one on the cluster's port.
func (e *simEnvoy) dial(t *testing.T, what, cluster string) *grpc.ClientConn {
	t.Helper()
	c := e.fp.clusters[cluster]
	if c == nil {
		t.Fatalf("%s calls cluster %q, which is not defined", what, cluster)
	}
	conn := e.conns[clusterPort(c)]
	if conn == nil {
		t.Fatalf("%s calls cluster %s on port %d, which is no meshguard gRPC listener (listen.grpc %d, listen.ratelimit %d)", what, cluster, clusterPort(c), grpcPort, ratelimitPort)
	}
	return conn
}

// handled is how many calls of method (a full method name) the server
// whose metrics reg holds has completed.
func handled(t *testing.T, reg *prometheus.Registry, method string) float64 {
	t.Helper()
	return metrictest.Sum(t, reg, "meshguard_grpc_server_handled_total", map[string]string{"method": method})
}

type simRequest struct {
	method, path string
	headers      map[string]string
	// jwt is a valid token's payload, as jwt_authn leaves it; badToken a
	// token that fails verification. Either sends Authorization.
	jwt      map[string]any
	badToken bool
	body     string
	// peer is the connection's peer (default: the load balancer) and xff the
	// X-Forwarded-For it sends (default: the client, when the peer is the
	// load balancer).
	peer, xff string
}

type simResult struct {
	route    string
	status   int               // 0: forwarded upstream
	upstream map[string]string // request headers the app would get
	sent     map[string]string // request headers ext_authz sent meshguard (nil: not called)
	respAdd  []*corev3.HeaderValueOption
	check    *authv3.CheckResponse    // nil: ext_authz was not called
	rls      *rlsv3.RateLimitResponse // nil: the rate limit service was not called
}

// downstream is the client address Envoy derives with the xff original IP
// detection extension (Envoy's getLastNonTrustedAddressFromXFF): a trusted
// peer's X-Forwarded-For is read from the right, and the first address not
// itself trusted is the client (all trusted: the leftmost); an entry that is
// no address, no X-Forwarded-For, or a peer that is not trusted: the peer.
func (e *simEnvoy) downstream(t *testing.T, peer, xff string) netip.Addr {
	t.Helper()
	x := xffConfig(t, e.fp)
	p := netip.MustParseAddr(peer)
	if xff == "" || !trustedPeer(t, x, p) {
		return p
	}
	parts := strings.Split(xff, ",")
	var a netip.Addr
	for i := len(parts) - 1; i >= 0; i-- {
		var err error
		a, err = netip.ParseAddr(strings.TrimSpace(parts[i]))
		if err != nil {
			return p
		}
		if !trustedPeer(t, x, a) {
			return a
		}
	}
	return a
}

func (e *simEnvoy) do(t *testing.T, r simRequest) simResult {
	t.Helper()
	h := map[string]string{}
	for k, v := range r.headers {
		h[strings.ToLower(k)] = v
	}
	if r.jwt != nil || r.badToken {
		h["authorization"] = "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"
	}
	peer, xff := r.peer, r.xff
	if peer == "" {
		peer = lbAddr
		if xff == "" {
			xff = clientAddr
		}
	}
	// The connection manager, before any filter runs (Envoy's
	// ConnectionManagerUtility::mutateRequestHeaders): the early header
	// mutations first, while the downstream address is still the
	// connection's peer; then the client address (the xff extension); then
	// the request id, which Envoy generates when the request has none (or an
	// empty one) and replaces only on an edge request (use_remote_address,
	// which the shipped configs leave unset; internal peers are not
	// modelled) unless preserve_external_request_id.
	for _, ext := range e.fp.hcm.GetEarlyHeaderMutationExtensions() {
		applyMutations(t, h, unpack[*earlymutationv3.HeaderMutation](t, ext.GetTypedConfig()).GetMutations(), netip.MustParseAddr(peer))
	}
	client := e.downstream(t, peer, xff)
	if g := e.fp.hcm.GetGenerateRequestId(); g == nil || g.GetValue() {
		edge := e.fp.hcm.GetUseRemoteAddress().GetValue()
		if h["x-request-id"] == "" || (edge && !e.fp.hcm.GetPreserveExternalRequestId()) {
			h["x-request-id"] = newUUID(t)
		}
	}
	rt := route(t, e.fp.vhost, r.path)
	if rt == nil {
		return simResult{status: 404}
	}
	res := simResult{route: rt.GetName()}

	// header_mutation: the filter's mutations, then the route's.
	mutations := e.fp.mutation.GetMutations().GetRequestMutations()
	if pr := rt.GetTypedPerFilterConfig()["envoy.filters.http.header_mutation"]; pr != nil {
		mutations = append(slices.Clone(mutations), unpack[*headermutationv3.HeaderMutationPerRoute](t, pr).GetMutations().GetRequestMutations()...)
	}
	applyMutations(t, h, mutations, client)
	if d := rt.GetDirectResponse(); d != nil {
		res.status = int(d.GetStatus())
		return res
	}

	// jwt_authn: with allow_missing_or_failed every request passes on, and
	// the provider's failed_status_in_metadata says why a token did not
	// verify, or that there was none (Jwt is missing).
	jwtNS := map[string]*structpb.Value{}
	prov := e.fp.jwt.GetProviders()["app"]
	failure := func(code float64, msg string) {
		if k := prov.GetFailedStatusInMetadata(); k != "" {
			jwtNS[k] = structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
				"code": structpb.NewNumberValue(code), "message": structpb.NewStringValue(msg)}})
		}
	}
	switch _, token := h["authorization"]; {
	case !token:
		failure(1, "Jwt is missing")
	case r.badToken:
		failure(3, "Jwt is expired")
	default:
		payload, err := structpb.NewStruct(r.jwt)
		if err != nil {
			t.Fatal(err)
		}
		jwtNS[prov.GetPayloadInMetadata()] = structpb.NewStructValue(payload)
	}

	// ext_authz, unless the route turns it off.
	var settings *extauthzv3.CheckSettings
	authzOn := true
	if pr := rt.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]; pr != nil {
		p := unpack[*extauthzv3.ExtAuthzPerRoute](t, pr)
		authzOn, settings = !p.GetDisabled(), p.GetCheckSettings()
	}
	if authzOn {
		allowed := e.fp.authz.GetAllowedHeaders().GetPatterns()
		sent := map[string]string{}
		for k, v := range h {
			if anyMatch(allowed, k) {
				sent[k] = v
			}
		}
		hr := &authv3.AttributeContext_HttpRequest{
			Method: r.method, Path: r.path, Host: host, Scheme: "https", Protocol: "HTTP/1.1", Headers: sent,
		}
		if b := settings.GetWithRequestBody(); b != nil && r.body != "" {
			if len(r.body) > int(b.GetMaxRequestBytes()) && !b.GetAllowPartialMessage() {
				res.status = 413 // Envoy's own answer; meshguard is not called
				return res
			}
			if b.GetPackAsBytes() {
				hr.RawBody = []byte(r.body)
			} else {
				hr.Body = r.body
			}
		}
		req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Source:            &authv3.AttributeContext_Peer{Address: sockAddr(peer, 40123)},
			Request:           &authv3.AttributeContext_Request{Http: hr},
			ContextExtensions: settings.GetContextExtensions(),
		}}
		ns := "envoy.filters.http.jwt_authn"
		if slices.Contains(e.fp.authz.GetMetadataContextNamespaces(), ns) && len(jwtNS) > 0 {
			req.Attributes.MetadataContext = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{ns: {Fields: jwtNS}}}
		}
		resp, err := e.authz.Check(t.Context(), req)
		if err != nil {
			t.Fatalf("Check: %v", err)
		}
		res.check, res.sent = resp, sent
		if codes.Code(resp.GetStatus().GetCode()) != codes.OK {
			res.status = int(resp.GetDeniedResponse().GetStatus().GetCode())
			if res.status == 0 {
				res.status = 403
			}
			return res
		}
		ok := resp.GetOkResponse()
		for _, o := range ok.GetHeaders() {
			setHeader(h, o, o.GetHeader().GetValue())
		}
		for _, k := range ok.GetHeadersToRemove() {
			delete(h, strings.ToLower(k))
		}
		res.respAdd = ok.GetResponseHeadersToAdd()
	}
	res.upstream = h

	// Rate limit filter: one descriptor per rate_limits entry whose actions
	// all produce an entry.
	var descs []*rlcommonv3.RateLimitDescriptor
	for _, rl := range rt.GetRoute().GetRateLimits() {
		if d := descriptorFor(t, rl, h, client); d != nil {
			descs = append(descs, d)
		}
	}
	if len(descs) > 0 {
		rr, err := e.rls.ShouldRateLimit(t.Context(), &rlsv3.RateLimitRequest{Domain: e.fp.rl.GetDomain(), Descriptors: descs, HitsAddend: 1})
		if err != nil {
			t.Fatalf("ShouldRateLimit: %v", err)
		}
		res.rls = rr
		if rr.GetOverallCode() == rlsv3.RateLimitResponse_OVER_LIMIT {
			res.status = 429
		}
	}
	return res
}

// applyMutations applies header mutations to h the way Envoy's
// header_mutation filter and early header mutation extension do: removals
// and appends, with %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% being addr (the
// address Envoy knows at that point).
func applyMutations(t *testing.T, h map[string]string, ms []*mutationrulesv3.HeaderMutation, addr netip.Addr) {
	t.Helper()
	for _, m := range ms {
		switch {
		case m.GetRemove() != "":
			delete(h, strings.ToLower(m.GetRemove()))
		case m.GetAppend() != nil:
			a := m.GetAppend()
			v := strings.ReplaceAll(a.GetHeader().GetValue(), "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", addr.String())
			if strings.Contains(v, "%") {
				t.Fatalf("header mutation value %q uses a formatter this test does not know", v)
			}
			setHeader(h, a, v)
		default:
			t.Fatalf("header mutation %v: this test knows remove and append only", m)
		}
	}
}

// newUUID is a random (version 4) UUID, as Envoy generates for x-request-id.
func newUUID(t *testing.T) string {
	t.Helper()
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	b[6], b[8] = b[6]&0x0f|0x40, b[8]&0x3f|0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// descriptorFor builds the descriptor Envoy sends for rl, or nil when an
// action produces no entry (a request header is absent).
func descriptorFor(t *testing.T, rl *routev3.RateLimit, h map[string]string, client netip.Addr) *rlcommonv3.RateLimitDescriptor {
	d := &rlcommonv3.RateLimitDescriptor{}
	for _, a := range rl.GetActions() {
		switch {
		case a.GetGenericKey() != nil:
			d.Entries = append(d.Entries, &rlcommonv3.RateLimitDescriptor_Entry{Key: a.GetGenericKey().GetDescriptorKey(), Value: a.GetGenericKey().GetDescriptorValue()})
		case a.GetRequestHeaders() != nil:
			v, ok := h[strings.ToLower(a.GetRequestHeaders().GetHeaderName())]
			if !ok {
				return nil // Envoy sends no descriptor when a header is absent
			}
			d.Entries = append(d.Entries, &rlcommonv3.RateLimitDescriptor_Entry{Key: a.GetRequestHeaders().GetDescriptorKey(), Value: v})
		case a.GetMaskedRemoteAddress() != nil:
			// Envoy masks the derived address as it stands (a mapped IPv4
			// address is IPv6 to it) and prints the CIDR range.
			m := a.GetMaskedRemoteAddress()
			bits := 32
			if l := m.GetV4PrefixMaskLen(); l != nil {
				bits = int(l.GetValue())
			}
			if client.Is6() {
				bits = 128
				if l := m.GetV6PrefixMaskLen(); l != nil {
					bits = int(l.GetValue())
				}
			}
			p, err := client.Prefix(bits)
			if err != nil {
				t.Fatal(err)
			}
			d.Entries = append(d.Entries, &rlcommonv3.RateLimitDescriptor_Entry{Key: "masked_remote_address", Value: p.String()})
		default:
			t.Fatalf("rate limit action %v is not simulated", a)
		}
	}
	return d
}

func setHeader(h map[string]string, o *corev3.HeaderValueOption, v string) {
	k := strings.ToLower(o.GetHeader().GetKey())
	switch o.GetAppendAction() {
	case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD, corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:
		h[k] = v
	case corev3.HeaderValueOption_ADD_IF_ABSENT:
		if _, ok := h[k]; !ok {
			h[k] = v
		}
	default: // APPEND_IF_EXISTS_OR_ADD, the proto default
		if old, ok := h[k]; ok {
			h[k] = old + "," + v
		} else {
			h[k] = v
		}
	}
}

func sockAddr(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func respHeader(opts []*corev3.HeaderValueOption, name string) (*corev3.HeaderValueOption, bool) {
	for _, o := range opts {
		if strings.EqualFold(o.GetHeader().GetKey(), name) {
			return o, true
		}
	}
	return nil, false
}

func TestEnvoyAndMeshguardAgree(t *testing.T) {
	for _, b := range bootstraps {
		t.Run(b.name, func(t *testing.T) { testEnvoyAndMeshguardAgree(t, newSimEnvoy(t, b.data, nil)) })
	}
}

func testEnvoyAndMeshguardAgree(t *testing.T, e *simEnvoy) {
	// Envoy's gRPC health checks: each meshguard gRPC cluster asks its
	// listener for a service that listener answers SERVING.
	t.Run("every gRPC cluster's health check passes", func(t *testing.T) {
		n := 0
		for name, c := range e.fp.clusters {
			for _, hc := range c.GetHealthChecks() {
				g := hc.GetGrpcHealthCheck()
				if g == nil {
					continue
				}
				n++
				resp, err := healthpb.NewHealthClient(e.dial(t, "health check", name)).Check(t.Context(), &healthpb.HealthCheckRequest{Service: g.GetServiceName()})
				if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
					t.Errorf("cluster %s: health check of service %q = %v, %v; want SERVING", name, g.GetServiceName(), resp.GetStatus(), err)
				}
			}
		}
		if n < 2 {
			t.Errorf("%d clusters with a gRPC health check, want meshguard and meshguard_ratelimit", n)
		}
	})

	t.Run("page gets a nonce CSP that overwrites the static one", func(t *testing.T) {
		r := e.do(t, simRequest{method: "GET", path: "/", headers: map[string]string{"x-csp-nonce": "attacker"}})
		if r.status != 0 {
			t.Fatalf("status %d, want forwarded", r.status)
		}
		csp, ok := respHeader(r.respAdd, "Content-Security-Policy")
		if !ok || !strings.Contains(csp.GetHeader().GetValue(), "'nonce-") || csp.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
			t.Errorf("ext_authz CSP = %v, want a nonce policy with overwrite", csp)
		}
		nonce := r.upstream["x-csp-nonce"]
		if nonce == "" || nonce == "attacker" || !strings.Contains(csp.GetHeader().GetValue(), "'nonce-"+nonce+"'") {
			t.Errorf("upstream x-csp-nonce = %q, not the nonce of the CSP %q", nonce, csp.GetHeader().GetValue())
		}
		if r.rls == nil || r.rls.GetOverallCode() != rlsv3.RateLimitResponse_OK {
			t.Errorf("rate limit answer %v, want OK", r.rls)
		}
	})

	t.Run("API routes keep the route's static CSP", func(t *testing.T) {
		r := e.do(t, simRequest{method: "GET", path: "/api/users/1"})
		if r.status != 0 {
			t.Fatalf("status %d", r.status)
		}
		if csp, ok := respHeader(r.respAdd, "Content-Security-Policy"); ok {
			t.Errorf("ext_authz sends CSP %q on a csp: off route", csp.GetHeader().GetValue())
		}
		if _, ok := r.upstream["x-csp-nonce"]; ok {
			t.Error("a nonce reaches the upstream on a csp: off route")
		}
	})

	t.Run("the client cannot pick its quota bucket", func(t *testing.T) {
		r := e.do(t, simRequest{method: "GET", path: "/api/users/1", headers: map[string]string{
			"x-meshguard-client": "user:victim", "x-meshguard-client-ip": "198.51.100.1",
		}})
		// extauthz keys anonymous clients on x-meshguard-client-ip, which the
		// header_mutation filter overwrites with Envoy's XFF-derived address;
		// the connection peer is the load balancer.
		if got := r.upstream["x-meshguard-client"]; got != "ip:"+clientAddr {
			t.Errorf("x-meshguard-client = %q, want ip:%s (not the forged values, not the load balancer %s)", got, clientAddr, lbAddr)
		}
		descs := r.rls.GetStatuses()
		if len(descs) != 1 {
			t.Fatalf("rate limit statuses %v, want one descriptor", descs)
		}
	})

	t.Run("only the load balancer's ranges may supply X-Forwarded-For", func(t *testing.T) {
		for _, tc := range []struct{ name, peer, xff, want string }{
			{"rightmost untrusted entry", lbAddr, "198.51.100.1, 203.0.113.50", "ip:203.0.113.50"},
			{"trusted hops are skipped", lbAddr, "203.0.113.51, 10.1.2.3", "ip:203.0.113.51"},
			{"a peer around the load balancer is the client", "192.0.2.66", "203.0.113.52", "ip:192.0.2.66"},
			{"IPv6 client keyed by its /64", lbAddr, "2001:db8:1:2::1", "ip:2001:db8:1:2::/64"},
			{"IPv4-mapped client unmapped", lbAddr, "::ffff:203.0.113.9", "ip:203.0.113.9"},
			{"garbage in X-Forwarded-For: the peer", lbAddr, "203.0.113.53, not-an-address", "ip:" + lbAddr},
		} {
			t.Run(tc.name, func(t *testing.T) {
				r := e.do(t, simRequest{method: "GET", path: "/api/users/1", peer: tc.peer, xff: tc.xff,
					headers: map[string]string{"x-meshguard-client-ip": "1.2.3.4"}}) // a forged copy, overwritten
				if r.status != 0 || r.upstream["x-meshguard-client"] != tc.want || r.upstream["x-meshguard-ip"] != tc.want {
					t.Errorf("status %d, x-meshguard-client %q, x-meshguard-ip %q; want %s", r.status, r.upstream["x-meshguard-client"], r.upstream["x-meshguard-ip"], tc.want)
				}
			})
		}
	})

	t.Run("a failed token gets meshguard's 401, which the browser can read", func(t *testing.T) {
		r := e.do(t, simRequest{method: "GET", path: "/api/users/1", badToken: true, headers: map[string]string{"origin": "https://dashboard.example.com"}})
		if r.status != 401 || r.rls != nil {
			t.Fatalf("status %d, rate limit called %v; want 401 from ext_authz", r.status, r.rls != nil)
		}
		h := r.check.GetDeniedResponse().GetHeaders()
		acao, _ := respHeader(h, "Access-Control-Allow-Origin")
		www, _ := respHeader(h, "WWW-Authenticate")
		expose, _ := respHeader(h, "Access-Control-Expose-Headers")
		if acao.GetHeader().GetValue() != "https://dashboard.example.com" || www.GetHeader().GetValue() != `Bearer error="invalid_token"` ||
			!strings.Contains(expose.GetHeader().GetValue(), "WWW-Authenticate") {
			t.Errorf("401 headers %v: want ACAO for the dashboard, WWW-Authenticate invalid_token, exposed", h)
		}
		if r := e.do(t, simRequest{method: "GET", path: "/api/users/1", xff: "203.0.113.60"}); r.status != 0 || r.upstream["x-meshguard-client"] != "ip:203.0.113.60" {
			t.Errorf("no token: status %d, client %q; want forwarded, anonymous", r.status, r.upstream["x-meshguard-client"])
		}
		if r := e.do(t, simRequest{method: "GET", path: "/api/users/1", jwt: map[string]any{"sub": "erin"}}); r.status != 0 || r.upstream["x-meshguard-user"] != "erin" {
			t.Errorf("good token: status %d, user %q", r.status, r.upstream["x-meshguard-user"])
		}
	})

	t.Run("login: five attempts per account, a higher ceiling per address", func(t *testing.T) {
		login := func(from, account string) simResult {
			return e.do(t, simRequest{method: "POST", path: "/api/auth/login", xff: from,
				headers: map[string]string{"content-type": "application/json"},
				body:    `{"email":"` + account + `","password":"wrong"}`})
		}
		for i := 1; i <= 5; i++ {
			r := login("203.0.113.70", "alice@example.com")
			if r.status != 0 || len(r.rls.GetStatuses()) != 2 {
				t.Fatalf("attempt %d: status %d, %d descriptors; want forwarded, counted per account and per address", i, r.status, len(r.rls.GetStatuses()))
			}
			if strings.Contains(r.upstream["x-meshguard-account"], "alice") || !strings.HasPrefix(r.upstream["x-meshguard-account"], "account:") {
				t.Fatalf("x-meshguard-account %q: want a keyed hash", r.upstream["x-meshguard-account"])
			}
		}
		r := login("203.0.113.70", "alice@example.com")
		if r.status != 429 {
			t.Fatalf("6th attempt: status %d, want 429", r.status)
		}
		if st := r.rls.GetStatuses()[0]; st.GetCode() != rlsv3.RateLimitResponse_OVER_LIMIT || st.GetCurrentLimit().GetRequestsPerUnit() != 5 {
			t.Errorf("per-account status %v, want over the auth preset (5)", st)
		}
		// The account is limited wherever the attempt comes from, however
		// its name is spelled.
		if r := login("198.51.100.71", " ALICE@Example.com"); r.status != 429 {
			t.Errorf("alice from another address: status %d, want 429", r.status)
		}
		// Others behind the same address are not.
		if r := login("203.0.113.70", "bob@example.com"); r.status != 0 {
			t.Errorf("bob from alice's address: status %d, want forwarded", r.status)
		}
		// A hospital: 40 staff behind one NAT, two attempts each.
		for i := range 40 {
			for try := range 2 {
				if r := login("203.0.113.72", fmt.Sprintf("nurse%d@example.com", i)); r.status != 0 {
					t.Fatalf("nurse %d attempt %d: status %d; one NAT must not lock its staff out", i, try+1, r.status)
				}
			}
		}
		// One address trying many accounts meets the auth_ip ceiling.
		ceiling := int(r.rls.GetStatuses()[1].GetCurrentLimit().GetRequestsPerUnit())
		if ceiling <= 5 {
			t.Fatalf("per-address limit %d: want a ceiling above the per-account 5", ceiling)
		}
		for i := range ceiling {
			if r := login("203.0.113.73", fmt.Sprintf("victim%d@example.com", i)); r.status != 0 {
				t.Fatalf("account %d from one address: status %d, want forwarded below the ceiling of %d", i, r.status, ceiling)
			}
		}
		if r := login("203.0.113.73", "one-more@example.com"); r.status != 429 || r.rls.GetStatuses()[1].GetCode() != rlsv3.RateLimitResponse_OVER_LIMIT {
			t.Errorf("past the per-address ceiling: status %d, statuses %v; want 429 from auth_ip", r.status, r.rls.GetStatuses())
		}

		if r := e.do(t, simRequest{method: "POST", path: "/api/auth/login", xff: "203.0.113.74",
			headers: map[string]string{"content-type": "application/json"}, body: `{"user":"alice"}`}); r.status != 400 || r.rls != nil {
			t.Errorf("login without an account: status %d, rate limit called %v; want 400 from meshguard", r.status, r.rls != nil)
		}
		if r := e.do(t, simRequest{method: "POST", path: "/api/auth/login", xff: "203.0.113.74",
			headers: map[string]string{"content-type": "application/json"}, body: `{"email":"a@example.com","x":"` + strings.Repeat("x", 9000) + `"}`}); r.status != 413 || r.check != nil {
			t.Errorf("login body over Envoy's buffer: status %d, checked %v; want Envoy's 413", r.status, r.check != nil)
		}
		if r := e.do(t, simRequest{method: "GET", path: "/api/auth/login", xff: "203.0.113.74"}); r.status != 0 || len(r.rls.GetStatuses()) != 1 {
			t.Errorf("GET of the login page: status %d, %d descriptors; want forwarded, per address only", r.status, len(r.rls.GetStatuses()))
		}
	})

	t.Run("static assets skip ext_authz and the nonce, with a quota of their own", func(t *testing.T) {
		r := e.do(t, simRequest{method: "GET", path: "/assets/app.3f9a.js", badToken: true, xff: "2001:db8:7:7::1"})
		if r.status != 0 || r.check != nil {
			t.Fatalf("status %d, checked %v; want forwarded without ext_authz", r.status, r.check != nil)
		}
		if _, ok := r.upstream["authorization"]; ok {
			t.Error("a token nobody verified reaches the app")
		}
		if _, ok := r.upstream["x-csp-nonce"]; ok || len(r.respAdd) != 0 {
			t.Errorf("nonce %q, response headers %v: want the virtual host's static CSP only", r.upstream["x-csp-nonce"], r.respAdd)
		}
		st := r.rls.GetStatuses()
		if len(st) != 1 || st[0].GetCurrentLimit().GetRequestsPerUnit() < 1000 {
			t.Fatalf("statuses %v: want one generous static quota", st)
		}
		// Another address of the same /64 spends the same quota.
		r2 := e.do(t, simRequest{method: "GET", path: "/assets/logo.svg", xff: "2001:db8:7:7::2"})
		if got, want := r2.rls.GetStatuses()[0].GetLimitRemaining(), st[0].GetLimitRemaining()-1; got != want {
			t.Errorf("remaining %d after the /64's second asset, want %d", got, want)
		}
	})

	t.Run("CSP reports do not spend the page quota", func(t *testing.T) {
		for range 3 {
			r := e.do(t, simRequest{method: "POST", path: "/v1/csp-reports", xff: "203.0.113.80",
				headers: map[string]string{"content-type": "application/csp-report", "x-meshguard-client-ip": "192.0.2.1"}})
			if r.status != 0 || r.rls.GetStatuses()[0].GetCurrentLimit().GetRequestsPerUnit() == 300 {
				t.Fatalf("report: status %d, limit %v; want forwarded under the csp_report preset", r.status, r.rls.GetStatuses())
			}
			// meshguard's CSP report budgets key the client by this header.
			if got := r.upstream["x-meshguard-client-ip"]; got != "203.0.113.80" {
				t.Errorf("x-meshguard-client-ip reaching meshguard's HTTP listener = %q, want Envoy's derived 203.0.113.80 (not the forged copy)", got)
			}
		}
		r := e.do(t, simRequest{method: "GET", path: "/", xff: "203.0.113.80"})
		if st := r.rls.GetStatuses()[0]; r.status != 0 || st.GetLimitRemaining() != st.GetCurrentLimit().GetRequestsPerUnit()-1 {
			t.Errorf("page after three reports: status %d, %v; want the page quota untouched by reports", r.status, st)
		}
	})

	t.Run("CORS", func(t *testing.T) {
		r := e.do(t, simRequest{method: "GET", path: "/api/users/1", headers: map[string]string{"origin": "https://evil.example"}})
		if r.status != 403 || r.rls != nil {
			t.Errorf("disallowed origin: status %d, rate limit called %v; want 403 before the rate limit", r.status, r.rls != nil)
		}
		r = e.do(t, simRequest{method: "GET", path: "/api/users/1", headers: map[string]string{"origin": "https://dashboard.example.com"}})
		if acao, ok := respHeader(r.respAdd, "Access-Control-Allow-Origin"); r.status != 0 || !ok || acao.GetHeader().GetValue() != "https://dashboard.example.com" {
			t.Errorf("allowed origin: status %d, ACAO %v", r.status, acao)
		}
		r = e.do(t, simRequest{method: "OPTIONS", path: "/api/users/1", headers: map[string]string{
			"origin": "https://dashboard.example.com", "access-control-request-method": "PUT",
		}})
		if r.status != 204 || r.rls != nil {
			t.Errorf("preflight: status %d, rate limit called %v; want 204 answered by ext_authz", r.status, r.rls != nil)
		}
	})

	t.Run("admin API requires the admin role", func(t *testing.T) {
		if r := e.do(t, simRequest{method: "GET", path: "/api/admin/users"}); r.status != 401 && r.status != 403 {
			t.Errorf("anonymous: status %d, want 401 or 403", r.status)
		}
		if r := e.do(t, simRequest{method: "GET", path: "/api/admin/users", jwt: map[string]any{"sub": "carol", "role": "user"}}); r.status != 403 {
			t.Errorf("role user: status %d, want 403", r.status)
		}
		if r := e.do(t, simRequest{method: "GET", path: "/api/admin/users", jwt: map[string]any{"sub": "dave", "role": "admin"}}); r.status != 0 {
			t.Errorf("role admin: status %d, want forwarded", r.status)
		}
	})

	t.Run("meshguard's admin API is not exposed", func(t *testing.T) {
		if r := e.do(t, simRequest{method: "GET", path: "/v1/audit/logs"}); r.status != 404 || r.check != nil {
			t.Errorf("status %d, checked %v; want 404 without reaching meshguard", r.status, r.check != nil)
		}
	})

	// Rate limit decisions went to the rate limit listener, Checks to
	// the gRPC listener (the rate limit listener cannot serve them).
	t.Run("each call reached the listener meant for it", func(t *testing.T) {
		rls := "/" + rlsv3.RateLimitService_ServiceDesc.ServiceName + "/ShouldRateLimit"
		check := "/" + authv3.Authorization_ServiceDesc.ServiceName + "/Check"
		if n := handled(t, e.rlReg, rls); n == 0 {
			t.Errorf("the rate limit listener (:%d) handled no ShouldRateLimit", ratelimitPort)
		}
		if n := handled(t, e.grpcReg, rls); n != 0 {
			t.Errorf("the gRPC listener (:%d) handled %v ShouldRateLimit calls; the rate limit filter must use the rate limit listener (:%d)", grpcPort, n, ratelimitPort)
		}
		if n := handled(t, e.grpcReg, check); n == 0 {
			t.Errorf("the gRPC listener (:%d) handled no Check", grpcPort)
		}
	})
}

// TestForgedIdentityHeaders: with meshguard told to trust x-auth-user and
// x-auth-role (identity.trusted_user_header / trusted_role_header), a client
// that sends x-auth-user: ceo and x-auth-role: admin does not pass
// require_role: admin, because the shipped header_mutation removes them.
// The same request against the config without those removals passes, so
// the removal is what protects.
func TestForgedIdentityHeaders(t *testing.T) {
	trust := func(c *extauthz.Config) {
		c.Identity.TrustedUserHeader = "x-auth-user"
		c.Identity.TrustedRoleHeader = "x-auth-role"
	}
	forged := simRequest{method: "GET", path: "/api/admin/users", headers: map[string]string{"x-auth-user": "ceo", "x-auth-role": "admin"}}
	for _, b := range bootstraps {
		t.Run(b.name, func(t *testing.T) {
			if r := newSimEnvoy(t, b.data, trust).do(t, forged); r.status != 401 {
				t.Errorf("forged x-auth-user/x-auth-role: status %d, want 401", r.status)
			}
			unsafe := b.data
			for _, h := range []string{"x-auth-user", "x-auth-role"} {
				line := []byte("                - remove: " + h + "\n")
				if !bytes.Contains(unsafe, line) {
					t.Fatalf("%s has no %q", b.name, line)
				}
				unsafe = bytes.Replace(unsafe, line, nil, 1)
			}
			if r := newSimEnvoy(t, unsafe, trust).do(t, forged); r.status != 0 || r.upstream["x-meshguard-role"] != "admin" {
				t.Errorf("without the removals: status %d, role %q; the control should let the forgery through", r.status, r.upstream["x-meshguard-role"])
			}
		})
	}
}

// TestClientRequestIDDiscarded: a request id a client sends never reaches
// meshguard or the app (and so never an audit row): the early header
// mutation removes it before Envoy decides whether to generate one, and
// Envoy, which keeps an id on every request that is not an edge request
// (the xff extension rules use_remote_address out), generates its own. The
// same request against the config without the early mutation keeps the
// client's id, so the removal is what protects.
func TestClientRequestIDDiscarded(t *testing.T) {
	const chosen = "00000000-0000-4000-8000-000000000001"
	req := simRequest{method: "GET", path: "/api/users/1", headers: map[string]string{
		"x-request-id": chosen, "x-client-trace-id": "forced",
		"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=forced",
	}}
	for _, b := range bootstraps {
		t.Run(b.name, func(t *testing.T) {
			r := newSimEnvoy(t, b.data, nil).do(t, req)
			if r.status != 0 {
				t.Fatalf("status %d, want forwarded", r.status)
			}
			id := r.sent["x-request-id"]
			if id == "" || id == chosen {
				t.Errorf("meshguard's Check got x-request-id %q, want one Envoy generated", id)
			}
			if r.upstream["x-request-id"] != id {
				t.Errorf("the app gets x-request-id %q, meshguard %q: one request, one id", r.upstream["x-request-id"], id)
			}
			// Envoy's tracer sets traceparent and tracestate of its own;
			// the client's values must not be the ones that travel on.
			for _, k := range []string{"x-client-trace-id", "traceparent", "tracestate"} {
				if v := r.upstream[k]; v != "" && v == req.headers[k] {
					t.Errorf("the client's %s %q reaches the app", k, v)
				}
				if v := r.sent[k]; v != "" && v == req.headers[k] {
					t.Errorf("the client's %s %q reaches meshguard", k, v)
				}
			}
			early := []byte("              - remove: x-request-id\n")
			if !bytes.Contains(b.data, early) {
				t.Fatalf("%s has no %q", b.name, early)
			}
			unsafe := bytes.Replace(b.data, early, nil, 1)
			if r := newSimEnvoy(t, unsafe, nil).do(t, req); r.sent["x-request-id"] != chosen {
				t.Errorf("without the early removal meshguard got x-request-id %q; the control should keep the client's %q", r.sent["x-request-id"], chosen)
			}
		})
	}
}
