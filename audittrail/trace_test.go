package audittrail

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// TestWriterTraces: every batch write is a span with its row count, path
// and outcome: stored, failed while PostgreSQL is down (the batch goes to
// the spool), and stored again by the replay once it is back.
func TestWriterTraces(t *testing.T) {
	srv := pgtest.Start(t)
	s, _ := openPG(t, srv, Config{})
	cfg := writerConfig(t)
	cfg.WriteTimeout = 500 * time.Millisecond
	rec := tracetest.NewSpanRecorder()
	w, _, _ := startWriter(t, cfg, s, WithTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))))
	if w.tracer == nil {
		t.Fatal("an SDK provider gives the writer no tracer")
	}
	waitSpan := func(records int64, path, outcome string) sdktrace.ReadOnlySpan {
		t.Helper()
		var found sdktrace.ReadOnlySpan
		servertest.WaitFor(t, 30*time.Second, func() error {
			var seen []string
			for _, sp := range rec.Ended() {
				a := map[attribute.Key]attribute.Value{}
				for _, kv := range sp.Attributes() {
					a[kv.Key] = kv.Value
				}
				if sp.Name() == "audit batch write" && a["meshguard.audit.records"].AsInt64() == records &&
					a["meshguard.audit.path"].AsString() == path && a["meshguard.audit.outcome"].AsString() == outcome {
					found = sp
					return nil
				}
				seen = append(seen, fmt.Sprint(sp.Name(), a))
			}
			return fmt.Errorf("no %s span of %d records with outcome %s; spans: %v", path, records, outcome, seen)
		})
		return found
	}
	base := time.Now().Add(-time.Hour)
	if err := w.Enqueue(context.Background(), genRecords(3, base, "up")); err != nil {
		t.Fatal(err)
	}
	if sp := waitSpan(3, "direct", "stored"); sp.Status().Code == codes.Error || sp.Parent().IsValid() {
		t.Errorf("stored batch: status %v, parent %v (want a root span without error)", sp.Status(), sp.Parent())
	}

	srv.Kill()
	if err := w.Enqueue(context.Background(), genRecords(2, base, "down")); err != nil {
		t.Fatal(err)
	}
	if sp := waitSpan(2, "direct", "failed"); sp.Status().Code != codes.Error || sp.Status().Description != "batch write failed" {
		t.Errorf("failed batch: status %v", sp.Status())
	}
	srv.Restart(t)
	waitSpan(2, "replay", "stored")
}

// TestWriterTracingOff: no provider or a no-op one leaves the writer
// without a tracer.
func TestWriterTracingOff(t *testing.T) {
	for _, opts := range [][]WriterOption{nil, {WithTracerProvider(nil)}, {WithTracerProvider(noop.NewTracerProvider())}} {
		w, _, _ := startWriter(t, writerConfig(t), openSQLite(t, Config{}), opts...)
		if w.tracer != nil {
			t.Errorf("options %v: the writer has a tracer", opts)
		}
	}
}
