package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	rlcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/servertest"
	"github.com/meshguard/meshguard/internal/tracing"
	"github.com/meshguard/meshguard/internal/tracing/tracingtest"
)

// TestTracesJoinEnvoys runs meshguard (run itself) with tracing pointed at
// an OTLP/gRPC collector and calls it as a tracing Envoy does, with a W3C
// traceparent on each call: the collector receives server spans that are
// children of Envoy's spans, the Redis round trip under ShouldRateLimit,
// and the audit batch write of the access log, and no span carries the
// client's address, identity or path.
func TestTracesJoinEnvoys(t *testing.T) {
	if testing.Short() {
		t.Skip("starts redis-server")
	}
	rds := redistest.Start(t)
	col := tracingtest.Start(t)
	// Spans leave in batches; a short batch timeout shows them while meshguard runs.
	old := tracingOptions
	tracingOptions = []tracing.Option{tracing.WithBatchTimeout(20 * time.Millisecond)}
	t.Cleanup(func() { tracingOptions = old })

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "meshguard.yaml")
	err := os.WriteFile(cfgPath, fmt.Appendf(nil, `
listen: {grpc: "127.0.0.1:0", http: "127.0.0.1:0", ratelimit: "127.0.0.1:0"}
log: {format: json}
redis: {url: %q, timeout: 5s}
tracing: {otlp_endpoint: %q, otlp_insecure: true, sample_ratio: 1}
ratelimit:
  domains:
    - domain: api
      descriptors:
        - key: client
          rate_limit: {unit: minute, requests_per_unit: 100}
audit:
  spool_dir: %q
  sqlite_path: %q
  batch_interval: 20ms
`, rds.URL(), col.Addr, filepath.Join(dir, "spool"), filepath.Join(dir, "audit.db")), 0o600)
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	line, errc, logs := startRun(t, ctx, cfgPath, noEnv)
	conn := grpcservertest.Dial(t, line["grpc_addr"].(string))
	rlConn := grpcservertest.Dial(t, line["ratelimit_addr"].(string))

	// One trace, as Envoy's router starts it; each call is the child of
	// its own Envoy span (the filter's or the access logger's).
	const traceID = "0af7651916cd43dd8448eb211c80319c"
	const checkParent, rlsParent, alsParent = "b7ad6b7169203331", "c8be7c827a314442", "d9cf8d938b425553"
	traced := func(parent string) context.Context {
		return metadata.AppendToOutgoingContext(ctx, "traceparent", "00-"+traceID+"-"+parent+"-01")
	}
	const clientIP, path = "203.0.113.77", "/api/patients/4711"

	check, err := authv3.NewAuthorizationClient(conn).Check(traced(checkParent), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: socketAddr("10.0.0.1", 51000)},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: "req-traced", Method: "GET", Scheme: "https", Host: "app.example.com", Path: path,
			Headers: map[string]string{"x-meshguard-client-ip": clientIP},
		}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if check.GetStatus().GetCode() != 0 {
		t.Fatalf("Check denied: %v", check)
	}
	resp, err := rlsv3.NewRateLimitServiceClient(rlConn).ShouldRateLimit(traced(rlsParent), &rlsv3.RateLimitRequest{
		Domain: "api", HitsAddend: 1, Descriptors: []*rlcommon.RateLimitDescriptor{{
			Entries: []*rlcommon.RateLimitDescriptor_Entry{{Key: "client", Value: "ip:" + clientIP}},
		}}})
	if err != nil || resp.GetOverallCode() != rlsv3.RateLimitResponse_OK || resp.GetStatuses()[0].GetLimitRemaining() != 99 {
		t.Fatalf("ShouldRateLimit = %v, %v (want OK counted in Redis)", resp, err)
	}
	als, err := alsv3.NewAccessLogServiceClient(conn).StreamAccessLogs(traced(alsParent))
	if err != nil {
		t.Fatal(err)
	}
	err = als.Send(&alsv3.StreamAccessLogsMessage{
		Identifier: &alsv3.StreamAccessLogsMessage_Identifier{Node: &corev3.Node{Id: "envoy-1"}, LogName: "meshguard"},
		LogEntries: &alsv3.StreamAccessLogsMessage_HttpLogs{HttpLogs: &alsv3.StreamAccessLogsMessage_HTTPAccessLogEntries{
			LogEntry: []*accesslogv3.HTTPAccessLogEntry{{
				CommonProperties: &accesslogv3.AccessLogCommon{
					StartTime: timestamppb.Now(), DownstreamRemoteAddress: socketAddr(clientIP, 51000),
				},
				Request: &accesslogv3.HTTPRequestProperties{
					RequestMethod: corev3.RequestMethod_POST, Authority: "app.example.com", Path: path, RequestId: "req-traced",
				},
				Response: &accesslogv3.HTTPResponseProperties{ResponseCode: wrapperspb.UInt32(201)},
			}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := als.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}

	var checkSpan, rlsSpan, alsSpan, redisSpan, auditSpan *tracepb.Span
	servertest.WaitFor(t, 30*time.Second, func() error {
		spans := col.Spans()
		checkSpan = findSpan(spans, func(s *tracepb.Span) bool { return strings.HasSuffix(s.Name, "Authorization/Check") })
		rlsSpan = findSpan(spans, func(s *tracepb.Span) bool { return strings.HasSuffix(s.Name, "RateLimitService/ShouldRateLimit") })
		alsSpan = findSpan(spans, func(s *tracepb.Span) bool { return strings.HasSuffix(s.Name, "AccessLogService/StreamAccessLogs") })
		redisSpan = findSpan(spans, func(s *tracepb.Span) bool {
			return tracingtest.Attr(s, "db.system.name").GetStringValue() == "redis"
		})
		auditSpan = findSpan(spans, func(s *tracepb.Span) bool {
			return s.Name == "audit batch write" && tracingtest.Attr(s, "meshguard.audit.outcome").GetStringValue() == "stored"
		})
		if checkSpan == nil || rlsSpan == nil || alsSpan == nil || redisSpan == nil || auditSpan == nil {
			return fmt.Errorf("spans so far:\n%s", tracingtest.Describe(spans))
		}
		return nil
	})

	for _, c := range []struct {
		name   string
		span   *tracepb.Span
		parent string
	}{{"Check", checkSpan, checkParent}, {"ShouldRateLimit", rlsSpan, rlsParent}, {"StreamAccessLogs", alsSpan, alsParent}} {
		if c.span.Kind != tracepb.Span_SPAN_KIND_SERVER || tracingtest.ID(c.span.TraceId) != traceID || tracingtest.ID(c.span.ParentSpanId) != c.parent {
			t.Errorf("%s span %s trace %s parent %s, want a server span in trace %s under Envoy's span %s", c.name,
				c.span.Kind, tracingtest.ID(c.span.TraceId), tracingtest.ID(c.span.ParentSpanId), traceID, c.parent)
		}
	}
	if tracingtest.ID(redisSpan.TraceId) != traceID || tracingtest.ID(redisSpan.ParentSpanId) != tracingtest.ID(rlsSpan.SpanId) ||
		redisSpan.Kind != tracepb.Span_SPAN_KIND_CLIENT {
		t.Errorf("Redis span is not a client span under ShouldRateLimit's:\n%s", tracingtest.Describe([]*tracepb.Span{rlsSpan, redisSpan}))
	}
	if n := tracingtest.Attr(auditSpan, "meshguard.audit.records").GetIntValue(); n < 1 {
		t.Errorf("audit batch span carries %d records:\n%s", n, tracingtest.Describe([]*tracepb.Span{auditSpan}))
	}
	// Spans go to another system, with other readers: no client address,
	// identity or path in them.
	if all := tracingtest.Describe(col.Spans()); strings.Contains(all, clientIP) || strings.Contains(all, "patients") {
		t.Errorf("a span carries the client's address or path:\n%s", all)
	}
	for _, s := range col.Services() {
		if s != "meshguard" {
			t.Errorf("service.name %q", s)
		}
	}

	cancel()
	if err := waitRun(t, errc, logs); err != nil {
		t.Fatalf("run returned %v", err)
	}
}

func findSpan(spans []*tracepb.Span, match func(*tracepb.Span) bool) *tracepb.Span {
	for _, s := range spans {
		if match(s) {
			return s
		}
	}
	return nil
}
