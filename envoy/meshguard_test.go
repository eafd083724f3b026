package envoy

import (
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/structpb"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rlcommonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"

	"github.com/meshguard/meshguard/extauthz"
	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/ratelimitsvc"
)

// This file plays Envoy: it walks a request through the front proxy's
// configuration (header_mutation, jwt_authn metadata, ext_authz, the rate
// limit filter with the route's actions) and calls real meshguard servers
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
	clientAddr = "203.0.113.7" // the client, as xff_num_trusted_hops computes it
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

func newSimEnvoy(t *testing.T, bootstrap []byte) *simEnvoy {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	reg := prometheus.NewRegistry()

	acfg := extauthz.Config{CORS: extauthz.DefaultCORSConfig(), Identity: extauthz.DefaultIdentityConfig(), CSP: extauthz.DefaultCSPConfig()}
	acfg.Identity.ClientIPHeader = "x-meshguard-client-ip" // as k8s/base/meshguard.yaml sets it
	acfg.CORS.PublicOrigin = "https://" + host
	acfg.CORS.AllowedOrigins = []string{"https://dashboard.example.com"}
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
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "meshguard_grpc_server_handled_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "method" && l.GetValue() == method {
					n += m.GetCounter().GetValue()
				}
			}
		}
	}
	return n
}

type simRequest struct {
	method, path string
	headers      map[string]string
	jwt          map[string]any // verified payload, as jwt_authn leaves it; nil: anonymous
}

type simResult struct {
	route    string
	status   int               // 0: forwarded upstream
	upstream map[string]string // request headers the app would get
	respAdd  []*corev3.HeaderValueOption
	check    *authv3.CheckResponse
	rls      *rlsv3.RateLimitResponse // nil: the rate limit service was not called
}

func (e *simEnvoy) do(t *testing.T, r simRequest) simResult {
	t.Helper()
	h := map[string]string{}
	for k, v := range r.headers {
		h[strings.ToLower(k)] = v
	}
	// header_mutation.
	for _, m := range e.fp.mutation.GetMutations().GetRequestMutations() {
		if k := m.GetRemove(); k != "" {
			delete(h, k)
		}
		if a := m.GetAppend(); a != nil {
			v := strings.ReplaceAll(a.GetHeader().GetValue(), "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", clientAddr)
			if strings.Contains(v, "%") {
				t.Fatalf("header_mutation value %q uses a formatter this test does not know", v)
			}
			setHeader(h, a, v)
		}
	}
	rt := route(t, e.fp.vhost, r.path)
	if rt == nil {
		return simResult{status: 404}
	}
	res := simResult{route: rt.GetName()}
	if d := rt.GetDirectResponse(); d != nil {
		res.status = int(d.GetStatus())
		return res
	}

	// ext_authz.
	allowed := e.fp.authz.GetAllowedHeaders().GetPatterns()
	sent := map[string]string{}
	for k, v := range h {
		if anyMatch(allowed, k) {
			sent[k] = v
		}
	}
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: sockAddr(lbAddr, 40123)},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: r.method, Path: r.path, Host: host, Scheme: "https", Protocol: "HTTP/1.1", Headers: sent,
		}},
	}}
	if pr := rt.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]; pr != nil {
		req.Attributes.ContextExtensions = unpack[*extauthzv3.ExtAuthzPerRoute](t, pr).GetCheckSettings().GetContextExtensions()
	}
	if r.jwt != nil {
		payload, err := structpb.NewStruct(r.jwt)
		if err != nil {
			t.Fatal(err)
		}
		ns := "envoy.filters.http.jwt_authn"
		for _, want := range e.fp.authz.GetMetadataContextNamespaces() {
			if want == ns {
				key := e.fp.jwt.GetProviders()["app"].GetPayloadInMetadata()
				req.Attributes.MetadataContext = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{
					ns: {Fields: map[string]*structpb.Value{key: structpb.NewStructValue(payload)}},
				}}
			}
		}
	}
	resp, err := e.authz.Check(t.Context(), req)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	res.check = resp
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
	res.upstream = h

	// Rate limit filter: one descriptor per rate_limits entry whose actions
	// all produce an entry.
	var descs []*rlcommonv3.RateLimitDescriptor
	for _, rl := range rt.GetRoute().GetRateLimits() {
		if d := descriptorFor(t, rl, h); d != nil {
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

func descriptorFor(t *testing.T, rl *routev3.RateLimit, h map[string]string) *rlcommonv3.RateLimitDescriptor {
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
		t.Run(b.name, func(t *testing.T) { testEnvoyAndMeshguardAgree(t, newSimEnvoy(t, b.data)) })
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

	t.Run("auth preset: five logins per client, then 429, per user", func(t *testing.T) {
		login := func(user string) simResult {
			return e.do(t, simRequest{method: "POST", path: "/api/auth/login", jwt: map[string]any{"sub": user}})
		}
		for i := 1; i <= 5; i++ {
			if r := login("alice"); r.status != 0 {
				t.Fatalf("login %d: status %d, want forwarded", i, r.status)
			}
		}
		r := login("alice")
		if r.status != 429 {
			t.Fatalf("6th login: status %d, want 429", r.status)
		}
		if st := r.rls.GetStatuses()[0]; st.GetCurrentLimit().GetRequestsPerUnit() != 5 {
			t.Errorf("limit %v, want the auth preset (5 per 15 min)", st.GetCurrentLimit())
		}
		if r.upstream["x-meshguard-client"] != "user:alice" {
			t.Errorf("x-meshguard-client = %q, want user:alice", r.upstream["x-meshguard-client"])
		}
		if r := login("bob"); r.status != 0 {
			t.Errorf("bob's first login: status %d; one user's quota must not spend another's", r.status)
		}
		// The standard preset is a separate quota for the same user.
		if r := e.do(t, simRequest{method: "GET", path: "/api/users/1", jwt: map[string]any{"sub": "alice"}}); r.status != 0 {
			t.Errorf("alice on /api/: status %d; presets must not share a quota", r.status)
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
