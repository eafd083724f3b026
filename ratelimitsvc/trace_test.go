package ratelimitsvc

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/secret"
)

// tracedStore is a store on srv that records its spans (the SDK's own
// recorder, sampling as production does: after the parent).
func tracedStore(t *testing.T, srv *redistest.Server, autopipeline bool) (*RedisStore, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.NeverSample())))
	cfg := RedisConfig{URL: secret.URL(srv.URL()), Timeout: 10 * time.Second, Autopipeline: autopipeline, KeyPrefix: "mg:rl:"}
	rs, err := NewRedisStore(discardLogger(), prometheus.NewRegistry(), cfg, WithTracerProvider(tp))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close() })
	return rs, rec
}

// spanContext is a span context of Envoy's, sampled or not.
func spanContext(trace0, span0 byte, sampled bool) trace.SpanContext {
	cfg := trace.SpanContextConfig{TraceID: trace.TraceID{trace0, 1}, SpanID: trace.SpanID{span0, 1}, Remote: true}
	if sampled {
		cfg.TraceFlags = trace.FlagsSampled
	}
	return trace.NewSpanContext(cfg)
}

func decideIn(t *testing.T, ctx context.Context, rs *RedisStore, id string) {
	t.Helper()
	res := make([]counterRes, 1)
	if _, err := rs.evaluate(ctx, time.Now().UnixMilli(), []counterReq{testCounter(id, 10, 1)}, res); err != nil {
		t.Error(err)
	}
}

func attrs(s sdktrace.ReadOnlySpan) map[attribute.Key]attribute.Value {
	m := map[attribute.Key]attribute.Value{}
	for _, a := range s.Attributes() {
		m[a.Key] = a.Value
	}
	return m
}

// TestTraceDirectRoundTrip: without the pipeline, a sampled decision's
// round trip is a client span under the decision's span; unsampled and
// untraced decisions make none; a failed round trip says its error class.
func TestTraceDirectRoundTrip(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	rs, rec := tracedStore(t, srv, false)
	parent := spanContext(1, 1, true)
	decideIn(t, trace.ContextWithSpanContext(t.Context(), parent), rs, "direct")
	decideIn(t, trace.ContextWithSpanContext(t.Context(), spanContext(2, 2, false)), rs, "direct")
	decideIn(t, t.Context(), rs, "direct")
	spans := rec.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans, want one for the sampled decision", len(spans))
	}
	s := spans[0]
	a := attrs(s)
	if s.Name() != "EVALSHA" || s.SpanKind() != trace.SpanKindClient || s.Parent().SpanID() != parent.SpanID() ||
		s.SpanContext().TraceID() != parent.TraceID() || a["db.system.name"].AsString() != "redis" ||
		a["meshguard.ratelimit.counters"].AsInt64() != 1 || a["meshguard.redis.mode"].AsString() != "standalone" ||
		s.Status().Code != codes.Unset {
		t.Errorf("span %s kind %s parent %s status %v attributes %v", s.Name(), s.SpanKind(), s.Parent().SpanID(), s.Status(), a)
	}

	srv.Kill()
	res := make([]counterRes, 1)
	if _, err := rs.evaluate(trace.ContextWithSpanContext(t.Context(), parent), time.Now().UnixMilli(), []counterReq{testCounter("x", 10, 1)}, res); err == nil {
		t.Fatal("decision with Redis down succeeded")
	}
	spans = rec.Ended()
	if s := spans[len(spans)-1]; s.Status().Code != codes.Error || attrs(s)["error.type"].AsString() == "" {
		t.Errorf("failed round trip: status %v attributes %v", s.Status(), attrs(s))
	}
}

// TestTraceBatch: a pipelined batch makes one span, the child of its oldest
// sampled decision, linking the other sampled ones; a batch without a
// sampled decision makes none.
func TestTraceBatch(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	t.Cleanup(srv.Resume)
	rs, rec := tracedStore(t, srv, true)
	decideIn(t, t.Context(), rs, "warm") // dial and load the script

	// An untraced call in flight while Redis is stopped, and three queued
	// behind it in this order: untraced, sampled A, sampled B.
	srv.Pause()
	a, b := spanContext(3, 3, true), spanContext(4, 4, true)
	done := make(chan struct{}, 4)
	queue := func(ctx context.Context, inflight, queued int) {
		go func() {
			decideIn(t, ctx, rs, "batch")
			done <- struct{}{}
		}()
		waitPipeline(t, rs, inflight, queued)
	}
	queue(t.Context(), 1, 0)
	queue(trace.ContextWithSpanContext(t.Context(), spanContext(5, 5, false)), 1, 1)
	queue(trace.ContextWithSpanContext(t.Context(), a), 1, 2)
	queue(trace.ContextWithSpanContext(t.Context(), b), 1, 3)
	srv.Resume()
	for range 4 {
		<-done
	}
	spans := rec.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans, want one for the batch with sampled decisions", len(spans))
	}
	s := spans[0]
	at := attrs(s)
	if s.Name() != "BATCH EVALSHA" || s.SpanKind() != trace.SpanKindClient || s.Parent().SpanID() != a.SpanID() ||
		s.SpanContext().TraceID() != a.TraceID() || at["db.operation.batch.size"].AsInt64() != 3 ||
		at["meshguard.redis.traced_decisions"].AsInt64() != 2 {
		t.Errorf("span %s parent %s trace %s attributes %v", s.Name(), s.Parent().SpanID(), s.SpanContext().TraceID(), at)
	}
	if l := s.Links(); len(l) != 1 || l[0].SpanContext.SpanID() != b.SpanID() || l[0].SpanContext.TraceID() != b.TraceID() {
		t.Errorf("links %v, want decision B's span", l)
	}

	// A failed round trip: the batch's span says so.
	srv.Kill()
	res := make([]counterRes, 1)
	if _, err := rs.evaluate(trace.ContextWithSpanContext(t.Context(), a), time.Now().UnixMilli(), []counterReq{testCounter("x", 10, 1)}, res); err == nil {
		t.Fatal("decision with Redis down succeeded")
	}
	spans = rec.Ended()
	if s := spans[len(spans)-1]; len(spans) != 2 || s.Status().Code != codes.Error ||
		attrs(s)["meshguard.redis.failed_commands"].AsInt64() != 1 || attrs(s)["error.type"].AsString() == "" {
		t.Errorf("%d spans; failed batch: status %v attributes %v", len(spans), s.Status(), attrs(s))
	}
}

// TestTraceOff: no provider or a no-op one leaves the store without a
// tracer, so decisions do no tracing work.
func TestTraceOff(t *testing.T) {
	for _, tp := range []trace.TracerProvider{nil, noop.NewTracerProvider()} {
		if tr := activeTracer(tp); tr != nil {
			t.Errorf("activeTracer(%T) = %v, want nil", tp, tr)
		}
	}
	if activeTracer(sdktrace.NewTracerProvider()) == nil {
		t.Error("an SDK provider gives no tracer")
	}
}
