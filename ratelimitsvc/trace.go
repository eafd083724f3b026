package ratelimitsvc

import (
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// StoreOption configures NewRedisStore.
type StoreOption func(*RedisStore)

// WithTracerProvider traces the store's Redis round trips with tp: a span
// per round trip, made only inside a sampled decision (the server span
// otelgrpc starts from Envoy's traceparent). Without this option, or with a
// no-op provider, the decision path does no tracing work at all.
func WithTracerProvider(tp trace.TracerProvider) StoreOption {
	return func(s *RedisStore) { s.tracer = activeTracer(tp) }
}

const tracerName = "github.com/meshguard/meshguard/ratelimitsvc"

// activeTracer is tp's tracer, or nil when tp cannot record: the hot path
// tests a nil pointer instead of making no-op spans, which would still
// cost a context per decision.
func activeTracer(tp trace.TracerProvider) trace.Tracer {
	switch tp.(type) {
	case nil, noop.TracerProvider, *noop.TracerProvider:
		return nil
	}
	return tp.Tracer(tracerName)
}

// Span attributes: OpenTelemetry's database conventions, and the mode as
// configured. Keys, values and addresses are never attributes (keys carry
// client identities).
var (
	attrRedis         = attribute.String("db.system.name", "redis")
	attrEvalSHA       = attribute.String("db.operation.name", "EVALSHA")
	attrBatchSizeKey  = attribute.Key("db.operation.batch.size")
	attrCountersKey   = attribute.Key("meshguard.ratelimit.counters")
	attrModeKey       = attribute.Key("meshguard.redis.mode")
	attrErrorTypeKey  = attribute.Key("error.type")
	attrTracedCallKey = attribute.Key("meshguard.redis.traced_decisions")
	attrFailedKey     = attribute.Key("meshguard.redis.failed_commands")
)

// endSpan ends a round trip's span with its outcome: an error names its
// class (timeout, pool_timeout, …), never its text, which may hold
// addresses.
func endSpan(span trace.Span, err error) {
	if err != nil {
		class := classifyStoreError(err)
		span.SetAttributes(attrErrorTypeKey.String(class))
		span.SetStatus(codes.Error, class)
	}
	span.End()
}
