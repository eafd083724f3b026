package audittrail

import (
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// WriterOption configures NewWriter.
type WriterOption func(*Writer)

// WithTracerProvider makes the writer trace its batch writes with tp: one
// span per write to the database (direct or a spool replay) with the row
// count and the outcome. Batches are background work, so each span starts
// a trace of its own, kept at the provider's sampling ratio. Without this
// option, or with a no-op provider, nothing is traced.
func WithTracerProvider(tp trace.TracerProvider) WriterOption {
	return func(w *Writer) {
		switch tp.(type) {
		case nil, noop.TracerProvider, *noop.TracerProvider:
			w.tracer = nil
		default:
			w.tracer = tp.Tracer("github.com/meshguard/meshguard/audittrail")
		}
	}
}

// endWriteSpan ends a batch write's span with its outcome: stored,
// duplicate (already stored by an earlier attempt) or failed (the batch
// waits in the spool). A failure's text stays in the log: it may name
// hosts and values of the rows.
func endWriteSpan(span trace.Span, dup bool, err error) {
	outcome := "stored"
	switch {
	case err != nil:
		outcome = "failed"
		span.SetStatus(codes.Error, "batch write failed")
	case dup:
		outcome = "duplicate"
	}
	span.SetAttributes(attribute.String("meshguard.audit.outcome", outcome))
	span.End()
}
