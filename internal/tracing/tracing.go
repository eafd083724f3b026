// Package tracing joins meshguard to the traces Envoy starts. With an OTLP
// collector configured, every gRPC call that carries a W3C traceparent (as
// Envoy's ext_authz, rate limit and access-log clients send when the HTTP
// connection manager traces) gets a server span that is the child of
// Envoy's, the packages add spans of their own inside it (the Redis round
// trip of a decision, an audit batch), and the spans go to the collector
// over OTLP/gRPC in batches. Calls without a traceparent start new traces
// at the configured ratio. Health checks and reflection are never traced.
//
// Tracing is off by default: no collector, no stats handler on the gRPC
// servers, and a no-op TracerProvider whose spans cost nothing.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
)

// Config is the `tracing:` section.
type Config struct {
	// OTLPEndpoint is the collector's OTLP/gRPC address, host:port. Empty:
	// tracing is off.
	OTLPEndpoint string `yaml:"otlp_endpoint"`
	// OTLPInsecure sends spans in plaintext (a collector on the pod network
	// or a sidecar); false uses TLS with the system's roots.
	OTLPInsecure bool `yaml:"otlp_insecure"`
	// SampleRatio is the share of new traces kept, for calls that carry no
	// traceparent and for background work such as audit batches; calls with
	// one follow the caller's sampling decision.
	SampleRatio float64 `yaml:"sample_ratio"`
	// ServiceName is the service.name resource attribute.
	ServiceName string `yaml:"service_name"`
}

// DefaultConfig is tracing off, sampling 1% of new traces when turned on.
func DefaultConfig() Config {
	return Config{SampleRatio: 0.01, ServiceName: "meshguard"}
}

// Enabled reports whether spans are exported.
func (c Config) Enabled() bool { return c.OTLPEndpoint != "" }

// Validate checks c; every error names its YAML path.
func (c Config) Validate() error {
	var errs []error
	if c.OTLPEndpoint != "" {
		if _, _, err := net.SplitHostPort(c.OTLPEndpoint); err != nil || strings.Contains(c.OTLPEndpoint, "://") {
			errs = append(errs, fmt.Errorf("tracing.otlp_endpoint: must be host:port, got %q", c.OTLPEndpoint))
		}
	}
	if c.SampleRatio < 0 || c.SampleRatio > 1 {
		errs = append(errs, fmt.Errorf("tracing.sample_ratio: must be between 0 and 1, got %v", c.SampleRatio))
	}
	if c.ServiceName == "" {
		errs = append(errs, errors.New("tracing.service_name: must not be empty"))
	}
	return errors.Join(errs...)
}

// Tracing holds the process's tracer provider. The zero value is not
// usable; New returns one that is off when the config is.
type Tracing struct {
	sdk      *sdktrace.TracerProvider // nil when off
	provider trace.TracerProvider
}

// Option changes how New exports; the defaults suit production.
type Option func(*options)

type options struct {
	batchTimeout time.Duration
}

// WithBatchTimeout sends a batch of spans at the latest d after its first
// span ended (the SDK's default is 5 s). Tests use a short one to see spans
// while the process runs.
func WithBatchTimeout(d time.Duration) Option {
	return func(o *options) { o.batchTimeout = d }
}

// New starts exporting to cfg's collector, or returns tracing that is off.
// The exporter connects lazily: a collector that is down costs dropped
// spans, never a failed start or a blocked call.
func New(ctx context.Context, cfg Config, version string, opts ...Option) (*Tracing, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if !cfg.Enabled() {
		return &Tracing{provider: noop.NewTracerProvider()}, nil
	}
	eopts := []otlptracegrpc.Option{otlptracegrpc.WithEndpoint(cfg.OTLPEndpoint), otlptracegrpc.WithTimeout(5 * time.Second)}
	if cfg.OTLPInsecure {
		eopts = append(eopts, otlptracegrpc.WithInsecure())
	}
	exp, err := otlptracegrpc.New(ctx, eopts...)
	if err != nil {
		return nil, fmt.Errorf("tracing: OTLP exporter for %s: %w", cfg.OTLPEndpoint, err)
	}
	var bopts []sdktrace.BatchSpanProcessorOption
	if o.batchTimeout > 0 {
		bopts = append(bopts, sdktrace.WithBatchTimeout(o.batchTimeout))
	}
	res := resource.NewSchemaless(
		attribute.String("service.name", cfg.ServiceName),
		attribute.String("service.version", version),
	)
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithResource(res),
		// Bounded queue; a full one drops spans rather than blocking a call.
		sdktrace.WithBatcher(exp, bopts...),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(cfg.SampleRatio))),
	)
	return &Tracing{sdk: tp, provider: tp}, nil
}

// TracerProvider is what packages make their spans with: a no-op provider
// when tracing is off.
func (t *Tracing) TracerProvider() trace.TracerProvider { return t.provider }

// ServerOptions returns the gRPC server options that join Envoy's traces:
// none when tracing is off.
func (t *Tracing) ServerOptions() []grpc.ServerOption {
	if t.sdk == nil {
		return nil
	}
	return []grpc.ServerOption{grpc.StatsHandler(ServerHandler(t.sdk))}
}

// ServerHandler is the stats handler ServerOptions installs: otelgrpc's
// server spans, except for calls whose W3C traceparent says the caller
// did not sample them. Those skip otelgrpc altogether: with Envoy
// sampling 1%, that is nearly every call, and otelgrpc's per-call work
// (context, attributes, a non-recording span, its metrics) costs a
// decision several microseconds for a span nobody keeps. Their context
// then carries no span, so the packages, which make spans only under a
// sampled parent, make none either.
func ServerHandler(tp trace.TracerProvider) stats.Handler {
	return skipUnsampled{next: otelgrpc.NewServerHandler(
		otelgrpc.WithTracerProvider(tp),
		otelgrpc.WithPropagators(propagation.TraceContext{}),
		otelgrpc.WithFilter(filters.None(
			filters.ServiceName(healthpb.Health_ServiceDesc.ServiceName),
			filters.ServicePrefix("grpc.reflection."),
		)),
	)}
}

type skipUnsampled struct{ next stats.Handler }

type skippedKey struct{}

func (h skipUnsampled) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	if callerDidNotSample(ctx) {
		return context.WithValue(ctx, skippedKey{}, true)
	}
	return h.next.TagRPC(ctx, info)
}

func (h skipUnsampled) HandleRPC(ctx context.Context, s stats.RPCStats) {
	if ctx.Value(skippedKey{}) != nil {
		return
	}
	h.next.HandleRPC(ctx, s)
}

func (h skipUnsampled) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	return h.next.TagConn(ctx, info)
}

func (h skipUnsampled) HandleConn(ctx context.Context, s stats.ConnStats) {
	h.next.HandleConn(ctx, s)
}

// callerDidNotSample reports whether the call carries exactly one
// well-formed version-00 traceparent (W3C Trace Context:
// 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>) whose sampled
// flag is clear. Anything else, no traceparent included, goes to otelgrpc,
// which samples it or rejects it by its own rules.
func callerDidNotSample(ctx context.Context) bool {
	vs := metadata.ValueFromIncomingContext(ctx, "traceparent")
	if len(vs) != 1 {
		return false
	}
	v := vs[0]
	if len(v) != 55 || v[:3] != "00-" || v[35] != '-' || v[52] != '-' {
		return false
	}
	if !lowerHex(v[3:35]) || !lowerHex(v[36:52]) || !lowerHex(v[53:55]) {
		return false
	}
	if v[3:35] == "00000000000000000000000000000000" || v[36:52] == "0000000000000000" {
		return false // invalid ids: not a caller's decision
	}
	return fromHex(v[54])&1 == 0 // the sampled bit is the flags' lowest
}

func lowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func fromHex(c byte) byte {
	if c <= '9' {
		return c - '0'
	}
	return c - 'a' + 10
}

// Shutdown exports what is buffered, within ctx's deadline.
func (t *Tracing) Shutdown(ctx context.Context) error {
	if t.sdk == nil {
		return nil
	}
	return t.sdk.Shutdown(ctx)
}
