package tracing_test

import (
	"context"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"go.opentelemetry.io/otel/trace"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
	"github.com/meshguard/meshguard/internal/servertest"
	"github.com/meshguard/meshguard/internal/tracing"
	"github.com/meshguard/meshguard/internal/tracing/tracingtest"
)

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
	col := tracingtest.Start(t)
	tr, err := tracing.New(t.Context(), tracing.Config{
		OTLPEndpoint: col.Addr, OTLPInsecure: true, SampleRatio: 0, ServiceName: "meshguard",
	}, "test", tracing.WithBatchTimeout(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(tr.ServerOptions()...)
	rlsv3.RegisterRateLimitServiceServer(gs, rls{tr: tr})
	healthpb.RegisterHealthServer(gs, health.NewServer())
	cc := grpcservertest.Serve(t, gs)
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
	// The server span ends after the reply is sent; wait for it and its
	// child, then flush whatever else there is.
	servertest.WaitUntil(t, 10*time.Second, "the server span and its child exported", func() bool { return len(col.Spans()) >= 2 })
	if err := tr.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown (flushes to the collector): %v", err)
	}

	spans := col.Spans()
	if len(spans) != 2 {
		t.Fatalf("collector got %d spans, want the server span and its child:\n%s", len(spans), tracingtest.Describe(spans))
	}
	var server, child *tracepb.Span
	for _, s := range spans {
		if s.Kind == tracepb.Span_SPAN_KIND_SERVER {
			server = s
		} else {
			child = s
		}
	}
	if server == nil || child == nil {
		t.Fatalf("want one server span and one internal span:\n%s", tracingtest.Describe(spans))
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
	for _, s := range col.Services() {
		if s != "meshguard" {
			t.Errorf("service.name %q, want meshguard", s)
		}
	}
}

// spanSeen records whether each call's context held a span context.
type spanSeen struct {
	rlsv3.UnimplementedRateLimitServiceServer
	seen chan trace.SpanContext
}

func (s spanSeen) ShouldRateLimit(ctx context.Context, _ *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	s.seen <- trace.SpanContextFromContext(ctx)
	return &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_OK}, nil
}

// TestCallerUnsampledSkipsSpans: a call whose traceparent says Envoy did
// not sample it gets no server span and no span context at all (otelgrpc
// is skipped), even with every new trace sampled; a sampled one, or one
// whose traceparent is not a well-formed version-00 header, goes through
// otelgrpc as before.
func TestCallerUnsampledSkipsSpans(t *testing.T) {
	col := tracingtest.Start(t)
	tr, err := tracing.New(t.Context(), tracing.Config{
		OTLPEndpoint: col.Addr, OTLPInsecure: true, SampleRatio: 1, ServiceName: "meshguard",
	}, "test", tracing.WithBatchTimeout(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	srv := spanSeen{seen: make(chan trace.SpanContext, 1)}
	gs := grpc.NewServer(tr.ServerOptions()...)
	rlsv3.RegisterRateLimitServiceServer(gs, srv)
	client := rlsv3.NewRateLimitServiceClient(grpcservertest.Serve(t, gs))
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		traceparent string
		wantSpan    bool
	}{
		{"00-" + traceID + "-" + parentID + "-00", false},
		{"00-" + traceID + "-" + parentID + "-02", false}, // other flags, sampled clear
		{"00-" + traceID + "-" + parentID + "-01", true},
		{"00-" + traceID + "-" + parentID + "-03", true},
		{"", true}, // no traceparent: sampled at the ratio (1)
		{"00-" + strings.ToUpper(traceID) + "-" + parentID + "-00", true}, // not lower hex: otelgrpc's call
		{"00-00000000000000000000000000000000-" + parentID + "-00", true}, // invalid trace id
		{"01-" + traceID + "-" + parentID + "-00", true},                  // another version
		{"00-" + traceID + "-" + parentID + "-00-extra", true},            // not version 00's length
	} {
		call := ctx
		if tc.traceparent != "" {
			call = metadata.AppendToOutgoingContext(ctx, "traceparent", tc.traceparent)
		}
		if _, err := client.ShouldRateLimit(call, &rlsv3.RateLimitRequest{Domain: "api"}); err != nil {
			t.Fatal(err)
		}
		if sc := <-srv.seen; sc.IsValid() != tc.wantSpan {
			t.Errorf("traceparent %q: handler's span context %v (valid %v), want a span: %v", tc.traceparent, sc, sc.IsValid(), tc.wantSpan)
		}
	}
	// A server span ends after its reply is on the way: wait for all six
	// to be exported, then check that no more come with the flush.
	servertest.WaitUntil(t, 10*time.Second, "six server spans exported", func() bool { return len(col.Spans()) >= 6 })
	if err := tr.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if spans := col.Spans(); len(spans) != 6 {
		t.Errorf("collector got %d spans, want one for each of the 6 calls not refused by their caller:\n%s", len(spans), tracingtest.Describe(spans))
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
