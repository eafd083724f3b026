package grpcserver

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// startHealth serves the health service on a server New builds and
// returns a client and the server's metrics.
func startHealth(t *testing.T, lim Limits) (healthpb.HealthClient, *Metrics) {
	t.Helper()
	m := NewMetrics(prometheus.NewRegistry())
	gs := New(lim, m)
	hs := health.NewServer()
	hs.SetServingStatus("up", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	// Not grpcservertest.Serve: it imports this package.
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
	return healthpb.NewHealthClient(cc), m
}

func TestMetricsCountMethodsAndCodes(t *testing.T) {
	hc, m := startHealth(t, DefaultLimits())
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
	const check = "/grpc.health.v1.Health/Check"
	for name, c := range map[string]struct {
		got, want float64
	}{
		"handled OK":       {testutil.ToFloat64(m.handled.WithLabelValues(check, "OK")), 3},
		"handled NotFound": {testutil.ToFloat64(m.handled.WithLabelValues(check, "NotFound")), 1},
		"in flight":        {testutil.ToFloat64(m.inflight.WithLabelValues(check)), 0},
	} {
		if c.got != c.want {
			t.Errorf("%s %s = %v, want %v", check, name, c.got, c.want)
		}
	}
	if n := testutil.CollectAndCount(m.duration, "meshguard_grpc_server_handling_seconds"); n != 2 {
		t.Errorf("handling_seconds series = %d, want Check and Watch", n)
	}
	// The Watch stream is in flight until the server sees the cancel.
	if n := testutil.CollectAndCount(m.inflight); n != 2 {
		t.Errorf("in_flight series = %d, want Check and Watch", n)
	}
}

func TestMaxRecvMsgSizeEnforced(t *testing.T) {
	lim := DefaultLimits()
	lim.MaxRecvMsgSize = 1 << 10
	hc, _ := startHealth(t, lim)
	_, err := hc.Check(t.Context(), &healthpb.HealthCheckRequest{Service: strings.Repeat("x", 2<<10)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("Check(2 KiB) = %v, want ResourceExhausted", err)
	}
}

// TestInterceptorDoesNotAllocate: once a method and code have been seen, the
// metrics interceptor adds no allocation per RPC.
func TestInterceptorDoesNotAllocate(t *testing.T) {
	m := NewMetrics(prometheus.NewRegistry())
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
	for code, want := range map[string]float64{"PermissionDenied": 1002, "OK": 1002, "Code(99)": 1} {
		if got := testutil.ToFloat64(m.handled.WithLabelValues(info.FullMethod, code)); got != want {
			t.Errorf("handled_total{code=%q} = %v, want %v", code, got, want)
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
