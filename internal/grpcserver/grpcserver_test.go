package grpcserver

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// startHealth serves the health service on the production options and
// returns a client.
func startHealth(t *testing.T, reg prometheus.Registerer, lim Limits) healthpb.HealthClient {
	t.Helper()
	gs := grpc.NewServer(append(Options(lim), NewMetrics(reg).ServerOptions()...)...)
	hs := health.NewServer()
	hs.SetServingStatus("up", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return healthpb.NewHealthClient(cc)
}

func TestMetricsCountMethodsAndCodes(t *testing.T) {
	reg := prometheus.NewRegistry()
	hc := startHealth(t, reg, DefaultLimits())
	ctx := t.Context()
	for range 3 {
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "up"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "absent"}); status.Code(err) != codes.NotFound {
		t.Fatalf("Check(absent) = %v, want NotFound", err)
	}
	// A stream: Watch until the first answer, then cancel.
	wctx, cancel := context.WithCancel(ctx)
	w, err := hc.Watch(wctx, &healthpb.HealthCheckRequest{Service: "up"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatal(err)
	}
	cancel()
	got := gather(t, reg)
	for k, want := range map[string]float64{
		`meshguard_grpc_server_handled_total{code="OK",method="/grpc.health.v1.Health/Check"}`:       3,
		`meshguard_grpc_server_handled_total{code="NotFound",method="/grpc.health.v1.Health/Check"}`: 1,
		`meshguard_grpc_server_in_flight{method="/grpc.health.v1.Health/Check"}`:                     0,
		`meshguard_grpc_server_handling_seconds{method="/grpc.health.v1.Health/Check"}`:              4, // sample count
	} {
		if v, ok := got[k]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", k, v, ok, want)
		}
	}
	// The Watch stream is in flight until the server sees the cancel.
	if _, ok := got[`meshguard_grpc_server_in_flight{method="/grpc.health.v1.Health/Watch"}`]; !ok {
		t.Errorf("no in_flight series for Watch; have %v", got)
	}
}

// gather returns every metric of reg as name{label="value",…} → value
// (sample count for histograms), labels in name order.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+`="`+l.GetValue()+`"`)
			}
			k := mf.GetName() + "{" + strings.Join(ls, ",") + "}"
			switch {
			case m.Counter != nil:
				out[k] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				out[k] = m.GetGauge().GetValue()
			case m.Histogram != nil:
				out[k] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

func TestMaxRecvMsgSizeEnforced(t *testing.T) {
	lim := DefaultLimits()
	lim.MaxRecvMsgSize = 1 << 10
	hc := startHealth(t, prometheus.NewRegistry(), lim)
	_, err := hc.Check(t.Context(), &healthpb.HealthCheckRequest{Service: strings.Repeat("x", 2<<10)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("Check(2 KiB) = %v, want ResourceExhausted", err)
	}
}

// TestInterceptorDoesNotAllocate: once a method and code have been seen, the
// metrics interceptor adds no allocation per RPC.
func TestInterceptorDoesNotAllocate(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	info := &grpc.UnaryServerInfo{FullMethod: "/envoy.service.auth.v3.Authorization/Check"}
	errDenied := status.Error(codes.PermissionDenied, "no")
	ok := func(context.Context, any) (any, error) { return nil, nil }
	denied := func(context.Context, any) (any, error) { return nil, errDenied }
	ctx := t.Context()
	m.Unary(ctx, nil, info, ok)
	m.Unary(ctx, nil, info, denied)
	if n := testing.AllocsPerRun(1000, func() {
		m.Unary(ctx, nil, info, ok)
		m.Unary(ctx, nil, info, denied)
	}); n != 0 {
		t.Errorf("allocations per RPC pair = %v, want 0", n)
	}
	// A code outside the canonical set is still counted.
	m.Unary(ctx, nil, info, func(context.Context, any) (any, error) { return nil, status.Error(codes.Code(99), "odd") })
	got := gather(t, reg)
	for k, want := range map[string]float64{
		`meshguard_grpc_server_handled_total{code="PermissionDenied",method="/envoy.service.auth.v3.Authorization/Check"}`: 1002,
		`meshguard_grpc_server_handled_total{code="OK",method="/envoy.service.auth.v3.Authorization/Check"}`:               1002,
		`meshguard_grpc_server_handled_total{code="Code(99)",method="/envoy.service.auth.v3.Authorization/Check"}`:         1,
	} {
		if got[k] != want {
			t.Errorf("%s = %v, want %v", k, got[k], want)
		}
	}
}

func BenchmarkUnaryInterceptor(b *testing.B) {
	m := NewMetrics(prometheus.NewRegistry())
	info := &grpc.UnaryServerInfo{FullMethod: "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"}
	h := func(context.Context, any) (any, error) { return nil, nil }
	ctx := b.Context()
	b.ReportAllocs()
	for b.Loop() {
		m.Unary(ctx, nil, info, h)
	}
}
