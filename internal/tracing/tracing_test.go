package tracing_test

import (
	"context"
	"encoding/hex"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/meshguard/meshguard/internal/tracing"
)

// collector is an OTLP/gRPC trace collector that keeps what it is sent.
type collector struct {
	coltracepb.UnimplementedTraceServiceServer
	mu       sync.Mutex
	spans    []*tracepb.Span
	services []string
}

func (c *collector) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rs := range req.ResourceSpans {
		for _, a := range rs.GetResource().GetAttributes() {
			if a.Key == "service.name" {
				c.services = append(c.services, a.GetValue().GetStringValue())
			}
		}
		for _, ss := range rs.ScopeSpans {
			c.spans = append(c.spans, ss.Spans...)
		}
	}
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func serve(t *testing.T, opts []grpc.ServerOption, register func(*grpc.Server)) *grpc.ClientConn {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(opts...)
	register(gs)
	go gs.Serve(l)
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// rls answers OK and makes a child span, as the store call does.
type rls struct {
	rlsv3.UnimplementedRateLimitServiceServer
	tr *tracing.Tracing
}

func (s rls) ShouldRateLimit(ctx context.Context, _ *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	_, span := s.tr.TracerProvider().Tracer("test").Start(ctx, "redis")
	span.End()
	return &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_OK}, nil
}

const (
	traceID  = "4bf92f3577b34da6a3ce929d0e0e4736"
	parentID = "00f067aa0ba902b7"
)

func TestJoinsEnvoysTrace(t *testing.T) {
	col := &collector{}
	colConn := serve(t, nil, func(s *grpc.Server) { coltracepb.RegisterTraceServiceServer(s, col) })
	tr, err := tracing.New(t.Context(), tracing.Config{
		OTLPEndpoint: colConn.Target(), OTLPInsecure: true, SampleRatio: 0, ServiceName: "meshguard",
	}, "test")
	if err != nil {
		t.Fatal(err)
	}
	cc := serve(t, tr.ServerOptions(), func(s *grpc.Server) {
		rlsv3.RegisterRateLimitServiceServer(s, rls{tr: tr})
		healthpb.RegisterHealthServer(s, health.NewServer())
	})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	traced := metadata.AppendToOutgoingContext(ctx, "traceparent", "00-"+traceID+"-"+parentID+"-01")
	client := rlsv3.NewRateLimitServiceClient(cc)
	req := &rlsv3.RateLimitRequest{Domain: "api"}
	if _, err := client.ShouldRateLimit(traced, req); err != nil {
		t.Fatal(err)
	}
	// Sampled out: no traceparent and a ratio of 0; a health check is never traced.
	if _, err := client.ShouldRateLimit(ctx, req); err != nil {
		t.Fatal(err)
	}
	if _, err := healthpb.NewHealthClient(cc).Check(traced, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	if err := tr.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown (flushes to the collector): %v", err)
	}

	col.mu.Lock()
	defer col.mu.Unlock()
	if len(col.spans) != 2 {
		var names []string
		for _, s := range col.spans {
			names = append(names, s.Name)
		}
		t.Fatalf("collector got %d spans %v, want the server span and its child", len(col.spans), names)
	}
	var server, child *tracepb.Span
	for _, s := range col.spans {
		if s.Kind == tracepb.Span_SPAN_KIND_SERVER {
			server = s
		} else {
			child = s
		}
	}
	if server == nil || child == nil {
		t.Fatalf("spans %v: want one server span and one internal span", col.spans)
	}
	if got := hex.EncodeToString(server.TraceId); got != traceID {
		t.Errorf("server span trace id %s, want Envoy's %s", got, traceID)
	}
	if got := hex.EncodeToString(server.ParentSpanId); got != parentID {
		t.Errorf("server span parent %s, want Envoy's span %s", got, parentID)
	}
	if !strings.HasSuffix(server.Name, "RateLimitService/ShouldRateLimit") {
		t.Errorf("server span named %q", server.Name)
	}
	if hex.EncodeToString(child.ParentSpanId) != hex.EncodeToString(server.SpanId) {
		t.Errorf("the handler's span is not the server span's child")
	}
	for _, s := range col.services {
		if s != "meshguard" {
			t.Errorf("service.name %q, want meshguard", s)
		}
	}
}

func TestOffCostsNothing(t *testing.T) {
	tr, err := tracing.New(t.Context(), tracing.DefaultConfig(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if opts := tr.ServerOptions(); len(opts) != 0 {
		t.Errorf("tracing off installs %d server options", len(opts))
	}
	_, span := tr.TracerProvider().Tracer("test").Start(t.Context(), "x")
	if span.IsRecording() {
		t.Error("tracing off records spans")
	}
	span.End()
	if err := tr.Shutdown(t.Context()); err != nil {
		t.Error(err)
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg  tracing.Config
		want string
	}{
		{tracing.DefaultConfig(), ""},
		{tracing.Config{OTLPEndpoint: "otel-collector:4317", SampleRatio: 1, ServiceName: "m"}, ""},
		{tracing.Config{OTLPEndpoint: "http://otel-collector:4317", ServiceName: "m"}, `tracing.otlp_endpoint: must be host:port, got "http://otel-collector:4317"`},
		{tracing.Config{OTLPEndpoint: "collector", ServiceName: "m"}, `tracing.otlp_endpoint: must be host:port`},
		{tracing.Config{SampleRatio: 1.5, ServiceName: "m"}, "tracing.sample_ratio: must be between 0 and 1, got 1.5"},
		{tracing.Config{}, "tracing.service_name: must not be empty"},
	} {
		err := tc.cfg.Validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("Validate(%+v) = %v, want %q", tc.cfg, err, tc.want)
		}
	}
}
