// Package tracingtest is an OTLP/gRPC trace collector for tests: a real
// gRPC server implementing OpenTelemetry's TraceService that keeps every
// span it is sent, so tests check what meshguard's exporter really sends.
package tracingtest

import (
	"context"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"

	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
)

// Collector keeps the spans exporters send it.
type Collector struct {
	coltracepb.UnimplementedTraceServiceServer
	// Addr is the collector's host:port, for tracing.otlp_endpoint (plaintext).
	Addr string

	mu       sync.Mutex
	spans    []*tracepb.Span
	services []string
}

// Start serves a Collector on a free 127.0.0.1 port until the test ends.
func Start(tb testing.TB) *Collector {
	tb.Helper()
	c := &Collector{}
	gs := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(gs, c)
	c.Addr = grpcservertest.Serve(tb, gs).Target()
	return c
}

// Export implements TraceService.
func (c *Collector) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
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

// Spans returns the spans received so far.
func (c *Collector) Spans() []*tracepb.Span {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.spans)
}

// Services returns the service.name of every resource received so far.
func (c *Collector) Services() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.services)
}

// Attr returns the value of s's attribute key, or nil.
func Attr(s *tracepb.Span, key string) *commonpb.AnyValue {
	for _, a := range s.Attributes {
		if a.Key == key {
			return a.Value
		}
	}
	return nil
}

// ID is a trace or span id as W3C traceparent writes it.
func ID(b []byte) string { return hex.EncodeToString(b) }

// Describe lists spans one a line (name, kind, ids, attributes), for
// failure messages.
func Describe(spans []*tracepb.Span) string {
	var b strings.Builder
	for _, s := range spans {
		fmt.Fprintf(&b, "  %s %s trace=%s span=%s parent=%s", s.Name, s.Kind, ID(s.TraceId), ID(s.SpanId), ID(s.ParentSpanId))
		for _, a := range s.Attributes {
			fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		}
		b.WriteByte('\n')
	}
	return b.String()
}
