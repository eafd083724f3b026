package auditsink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshguard/meshguard/audittrail"
	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// testNow is the fixed clock of these tests.
var testNow = time.Date(2026, 11, 29, 8, 0, 0, 0, time.UTC)

// collectSink is a recordSink that keeps what it is given; err, when set,
// is returned instead.
type collectSink struct {
	mu    sync.Mutex
	recs  []audittrail.Record
	calls int
	err   error
}

func (c *collectSink) Enqueue(_ context.Context, recs []audittrail.Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	if c.err != nil {
		return c.err
	}
	c.recs = append(c.recs, recs...)
	return nil
}

func (c *collectSink) records() []audittrail.Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]audittrail.Record(nil), c.recs...)
}

func (c *collectSink) setErr(err error) {
	c.mu.Lock()
	c.err = err
	c.mu.Unlock()
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func newTestServer(t testing.TB, cfg Config, sink recordSink) (*Server, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := New(discardLogger(), reg, cfg, sink)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	s.now = func() time.Time { return testNow }
	return s, reg
}

// startALS serves s on 127.0.0.1:0 and returns a client, as Envoy would
// connect.
func startALS(t testing.TB, s *Server, opts ...grpc.ServerOption) alsv3.AccessLogServiceClient {
	t.Helper()
	gs := grpc.NewServer(opts...)
	s.Register(gs)
	return alsv3.NewAccessLogServiceClient(grpcservertest.Serve(t, gs))
}

func identifier(node, logName string) *alsv3.StreamAccessLogsMessage_Identifier {
	return &alsv3.StreamAccessLogsMessage_Identifier{Node: &corev3.Node{Id: node, Cluster: "front"}, LogName: logName}
}

func httpBatch(id *alsv3.StreamAccessLogsMessage_Identifier, entries ...*accesslogv3.HTTPAccessLogEntry) *alsv3.StreamAccessLogsMessage {
	return &alsv3.StreamAccessLogsMessage{
		Identifier: id,
		LogEntries: &alsv3.StreamAccessLogsMessage_HttpLogs{HttpLogs: &alsv3.StreamAccessLogsMessage_HTTPAccessLogEntries{LogEntry: entries}},
	}
}

// entryOpts describe a test entry; the zero value of each field is left out.
type entryOpts struct {
	method  corev3.RequestMethod
	path    string
	status  uint32 // 0: no response
	reqID   string
	ua      string
	ip      string
	flags   *accesslogv3.ResponseFlags
	authz   map[string]any
	headers map[string]string
	logType accesslogv3.AccessLogType
	start   time.Time
}

func entry(o entryOpts) *accesslogv3.HTTPAccessLogEntry {
	start := o.start
	if start.IsZero() {
		start = testNow.Add(-time.Second)
	}
	ip := o.ip
	if ip == "" {
		ip = "203.0.113.7"
	}
	e := &accesslogv3.HTTPAccessLogEntry{
		CommonProperties: &accesslogv3.AccessLogCommon{
			StartTime: timestamppb.New(start),
			Duration:  durationpb.New(12345 * time.Microsecond),
			DownstreamRemoteAddress: &corev3.Address{Address: &corev3.Address_SocketAddress{
				SocketAddress: &corev3.SocketAddress{Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 51234}}}},
			ResponseFlags:   o.flags,
			UpstreamCluster: "app",
			RouteName:       "app_route",
			AccessLogType:   o.logType,
		},
		ProtocolVersion: accesslogv3.HTTPAccessLogEntry_HTTP11,
		Request: &accesslogv3.HTTPRequestProperties{
			RequestMethod:  o.method,
			Scheme:         "https",
			Authority:      "app.example.com",
			Path:           o.path,
			UserAgent:      o.ua,
			RequestId:      o.reqID,
			RequestHeaders: o.headers,
		},
		Response: &accesslogv3.HTTPResponseProperties{},
	}
	if o.status != 0 {
		e.Response.ResponseCode = wrapperspb.UInt32(o.status)
	}
	if o.authz != nil {
		st, err := structpb.NewStruct(o.authz)
		if err != nil {
			panic(err)
		}
		e.CommonProperties.Metadata = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{extAuthzNamespace: st}}
	}
	return e
}

// TestStreamAccessLogsEndToEnd streams like several Envoy workers at once:
// each stream sends its identifier in the first message only, then
// batches. Every kept entry arrives exactly once, attributed to its own
// stream's node, and the counters add up.
func TestStreamAccessLogsEndToEnd(t *testing.T) {
	sink := &collectSink{}
	s, reg := newTestServer(t, DefaultConfig(), sink)
	client := startALS(t, s)

	const workers, batches, perBatch = 4, 25, 20
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stream, err := client.StreamAccessLogs(t.Context())
			if err != nil {
				errs <- err
				return
			}
			for b := range batches {
				var id *alsv3.StreamAccessLogsMessage_Identifier
				if b == 0 {
					id = identifier(fmt.Sprintf("envoy-%d", w), "meshguard_als")
				}
				var es []*accesslogv3.HTTPAccessLogEntry
				for i := range perBatch {
					n := (b*perBatch + i)
					o := entryOpts{method: corev3.RequestMethod_POST, path: "/api/orders", status: 201,
						reqID: fmt.Sprintf("w%d-%d", w, n)}
					if n%2 == 1 { // every other entry is a plain GET, dropped
						o = entryOpts{method: corev3.RequestMethod_GET, path: "/api/orders", status: 200, reqID: fmt.Sprintf("w%d-%d", w, n)}
					}
					es = append(es, entry(o))
				}
				if err := stream.Send(httpBatch(id, es...)); err != nil {
					errs <- err
					return
				}
			}
			if _, err := stream.CloseAndRecv(); err != nil {
				errs <- fmt.Errorf("CloseAndRecv: %w", err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	recs := sink.records()
	const total = workers * batches * perBatch
	if len(recs) != total/2 {
		t.Fatalf("got %d records, want %d", len(recs), total/2)
	}
	seen := map[string]bool{}
	for _, r := range recs {
		if seen[r.RequestID] {
			t.Fatalf("request %s stored twice", r.RequestID)
		}
		seen[r.RequestID] = true
		var w int
		fmt.Sscanf(r.RequestID, "w%d-", &w)
		var md struct {
			Node    string `json:"node"`
			Cluster string `json:"cluster"`
			LogName string `json:"log_name"`
		}
		if err := json.Unmarshal(r.Metadata, &md); err != nil {
			t.Fatalf("metadata %s: %v", r.Metadata, err)
		}
		if want := fmt.Sprintf("envoy-%d", w); md.Node != want || md.LogName != "meshguard_als" || md.Cluster != "front" {
			t.Fatalf("record %s: identity %+v, want node %s", r.RequestID, md, want)
		}
		if r.Action != "CREATE" || r.EntityType != "orders" {
			t.Fatalf("record %s: action %s entity %s", r.RequestID, r.Action, r.EntityType)
		}
	}
	for name, c := range map[string]struct {
		got, want float64
	}{
		"received http":  {metricValue(s.m.received.WithLabelValues("http")), total},
		"kept CREATE":    {metricValue(s.m.kept.WithLabelValues("CREATE")), total / 2},
		"dropped rule":   {metricValue(s.m.dropped.WithLabelValues("rule")), total / 2},
		"rule reads":     {metricValue(s.m.ruleMatches.WithLabelValues("reads")), total / 2},
		"streams open":   {metricValue(s.m.streamsOpen), 0},
		"malformed":      {metricValue(s.m.malformed.WithLabelValues("no_identifier")), 0},
		"enqueue errors": {metricValue(s.m.enqueueErrors), 0},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", name, c.got, c.want)
		}
	}
	// Series are bounded by the configured actions, whatever the traffic.
	actions := map[string]bool{}
	for _, r := range DefaultRules() {
		if !r.Drop {
			actions[r.Action] = true
		}
	}
	if n, err := testutil.GatherAndCount(reg, "meshguard_auditsink_entries_kept_total"); err != nil || n != len(actions) {
		t.Errorf("kept series = %d, want %d (one per configured action)", n, len(actions))
	}
}

// TestStreamAccessLogsOneEntryPerRequest: newer Envoys also log start and
// periodic entries; only the end-of-request entry becomes a row.
func TestStreamAccessLogsOneEntryPerRequest(t *testing.T) {
	sink := &collectSink{}
	s, _ := newTestServer(t, DefaultConfig(), sink)
	client := startALS(t, s)
	stream, err := client.StreamAccessLogs(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	base := entryOpts{method: corev3.RequestMethod_DELETE, path: "/api/users/42", status: 204, reqID: "r1"}
	var es []*accesslogv3.HTTPAccessLogEntry
	for _, lt := range []accesslogv3.AccessLogType{
		accesslogv3.AccessLogType_DownstreamStart, accesslogv3.AccessLogType_DownstreamPeriodic,
		accesslogv3.AccessLogType_UpstreamPoolReady, accesslogv3.AccessLogType_UpstreamEnd,
		accesslogv3.AccessLogType_DownstreamEnd,
	} {
		o := base
		o.logType = lt
		es = append(es, entry(o))
	}
	if err := stream.Send(httpBatch(identifier("envoy-0", "als"), es...)); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	recs := sink.records()
	if len(recs) != 1 || recs[0].Action != "DELETE" || recs[0].EntityID != "42" {
		t.Fatalf("records = %+v, want one DELETE of 42", recs)
	}
	if got := metricValue(s.m.dropped.WithLabelValues("intermediate")); got != 4 {
		t.Errorf("intermediate drops = %v, want 4", got)
	}
}

// TestStreamAccessLogsMalformed: protocol violations are counted and
// nothing Envoy sent is refused; an oversized message gets a clear
// ResourceExhausted from gRPC.
func TestStreamAccessLogsMalformed(t *testing.T) {
	t.Run("no identifier first", func(t *testing.T) {
		sink := &collectSink{}
		s, _ := newTestServer(t, DefaultConfig(), sink)
		stream, err := startALS(t, s).StreamAccessLogs(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		e := entry(entryOpts{method: corev3.RequestMethod_POST, path: "/api/auth/logout", status: 200, reqID: "x"})
		for range 2 {
			if err := stream.Send(httpBatch(nil, e)); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := stream.CloseAndRecv(); err != nil {
			t.Fatal(err)
		}
		if got := metricValue(s.m.malformed.WithLabelValues("no_identifier")); got != 1 {
			t.Errorf("no_identifier = %v, want 1 (once per stream)", got)
		}
		recs := sink.records()
		if len(recs) != 2 || recs[0].Action != "LOGOUT" || strings.Contains(string(recs[0].Metadata), `"node"`) {
			t.Fatalf("records = %+v, want two LOGOUT rows without node", recs)
		}
	})
	t.Run("empty batches", func(t *testing.T) {
		sink := &collectSink{}
		s, _ := newTestServer(t, DefaultConfig(), sink)
		stream, err := startALS(t, s).StreamAccessLogs(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		msgs := []*alsv3.StreamAccessLogsMessage{
			httpBatch(identifier("envoy-0", "als")),
			{LogEntries: &alsv3.StreamAccessLogsMessage_TcpLogs{TcpLogs: &alsv3.StreamAccessLogsMessage_TCPAccessLogEntries{}}},
			{},
		}
		for _, m := range msgs {
			if err := stream.Send(m); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := stream.CloseAndRecv(); err != nil {
			t.Fatal(err)
		}
		if got := metricValue(s.m.malformed.WithLabelValues("empty_batch")); got != 3 {
			t.Errorf("empty_batch = %v, want 3", got)
		}
		if sink.calls != 0 {
			t.Errorf("sink called %d times for empty batches", sink.calls)
		}
	})
	t.Run("absurd field sizes are bounded", func(t *testing.T) {
		sink := &collectSink{}
		s, _ := newTestServer(t, DefaultConfig(), sink)
		stream, err := startALS(t, s).StreamAccessLogs(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		huge := strings.Repeat("é", 100_000) // 200 KB per field
		e := entry(entryOpts{method: corev3.RequestMethod_POST, path: "/api/notes?x=" + huge, status: 201,
			ua: huge, reqID: huge, headers: map[string]string{"origin": huge}, authz: map[string]any{"user": huge, "tenant": huge}})
		if err := stream.Send(httpBatch(identifier(huge, huge), e)); err != nil {
			t.Fatal(err)
		}
		if _, err := stream.CloseAndRecv(); err != nil {
			t.Fatal(err)
		}
		recs := sink.records()
		if len(recs) != 1 {
			t.Fatalf("got %d records", len(recs))
		}
		r := recs[0]
		for name, c := range map[string]struct {
			s   string
			max int
		}{"path": {r.Path, maxPathLen}, "user_agent": {r.UserAgent, maxUserAgentLen}, "request_id": {r.RequestID, maxIDLen},
			"origin": {r.Origin, maxShortLen}, "user": {r.UserID, maxIDLen}, "tenant": {r.Tenant, maxIDLen}} {
			if len(c.s) > c.max || len(c.s) < c.max-1 || !utf8Valid(c.s) {
				t.Errorf("%s: %d bytes (valid UTF-8 %v), want ≤ %d", name, len(c.s), utf8Valid(c.s), c.max)
			}
		}
		if len(r.Metadata) > 8<<10 || !json.Valid(r.Metadata) {
			t.Errorf("metadata %d bytes, valid %v", len(r.Metadata), json.Valid(r.Metadata))
		}
	})
	t.Run("message over the receive limit", func(t *testing.T) {
		sink := &collectSink{}
		s, _ := newTestServer(t, DefaultConfig(), sink)
		stream, err := startALS(t, s, grpc.MaxRecvMsgSize(64<<10)).StreamAccessLogs(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		e := entry(entryOpts{method: corev3.RequestMethod_POST, path: "/api/x", status: 201, ua: strings.Repeat("a", 100<<10)})
		stream.Send(httpBatch(identifier("envoy-0", "als"), e))
		_, err = stream.CloseAndRecv()
		if status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("err = %v, want ResourceExhausted", err)
		}
		if len(sink.records()) != 0 {
			t.Fatal("oversized message produced records")
		}
	})
}

// TestStreamAccessLogsSinkErrors: a refused batch is counted and logged,
// the stream stays open, and later batches go through.
func TestStreamAccessLogsSinkErrors(t *testing.T) {
	sink := &collectSink{err: errors.New("spool full")}
	s, _ := newTestServer(t, DefaultConfig(), sink)
	stream, err := startALS(t, s).StreamAccessLogs(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	e := func(id string) *accesslogv3.HTTPAccessLogEntry {
		return entry(entryOpts{method: corev3.RequestMethod_PATCH, path: "/api/users/1", status: 200, reqID: id})
	}
	if err := stream.Send(httpBatch(identifier("envoy-0", "als"), e("a"), e("b"))); err != nil {
		t.Fatal(err)
	}
	// The server reads messages in order; wait until the first is refused.
	servertest.WaitUntil(t, 5*time.Second, "the enqueue error to be counted", func() bool { return metricValue(s.m.enqueueErrors) == 1 })
	sink.setErr(nil)
	if err := stream.Send(httpBatch(nil, e("c"))); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatalf("stream ended with %v, want OK", err)
	}
	if got := metricValue(s.m.enqueueLost); got != 2 {
		t.Errorf("failed records = %v, want 2", got)
	}
	if recs := sink.records(); len(recs) != 1 || recs[0].RequestID != "c" {
		t.Fatalf("records = %+v, want only c", recs)
	}
}

// TestStreamAccessLogsTCP: TCP entries are counted and dropped unless a
// tcp rule keeps them.
func TestStreamAccessLogsTCP(t *testing.T) {
	tcpEntry := &accesslogv3.TCPAccessLogEntry{
		CommonProperties: &accesslogv3.AccessLogCommon{
			StartTime: timestamppb.New(testNow.Add(-time.Minute)),
			DownstreamRemoteAddress: &corev3.Address{Address: &corev3.Address_SocketAddress{
				SocketAddress: &corev3.SocketAddress{Address: "198.51.100.4"}}},
			ResponseFlags:   &accesslogv3.ResponseFlags{UpstreamConnectionFailure: true},
			UpstreamCluster: "db",
		},
		ConnectionProperties: &accesslogv3.ConnectionProperties{ReceivedBytes: 10, SentBytes: 20},
	}
	msg := &alsv3.StreamAccessLogsMessage{
		Identifier: identifier("envoy-0", "tcp_als"),
		LogEntries: &alsv3.StreamAccessLogsMessage_TcpLogs{TcpLogs: &alsv3.StreamAccessLogsMessage_TCPAccessLogEntries{
			LogEntry: []*accesslogv3.TCPAccessLogEntry{tcpEntry}}},
	}
	for _, tc := range []struct {
		name  string
		rules []RuleConfig
		want  []audittrail.Record
	}{
		{name: "default rules ignore tcp", rules: nil},
		{name: "tcp rule keeps failures", rules: []RuleConfig{
			{Name: "tcp_failures", Kind: "tcp", ResponseFlags: []string{"UF", "UH"}, Action: "UPSTREAM_FAILURE", Severity: audittrail.SeverityHigh},
		}, want: []audittrail.Record{{
			CreatedAt: testNow.Add(-time.Minute), Action: "UPSTREAM_FAILURE", Severity: audittrail.SeverityHigh, IPAddress: "198.51.100.4",
			Metadata: json.RawMessage(`{"node":"envoy-0","cluster":"front","log_name":"tcp_als","rule":"tcp_failures","protocol":"tcp","response_flags":"UF","upstream_cluster":"db","bytes_received":10,"bytes_sent":20}`),
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sink := &collectSink{}
			cfg := DefaultConfig()
			cfg.Rules = tc.rules
			s, _ := newTestServer(t, cfg, sink)
			stream, err := startALS(t, s).StreamAccessLogs(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if err := stream.Send(msg); err != nil {
				t.Fatal(err)
			}
			if _, err := stream.CloseAndRecv(); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, sink.records()); diff != "" {
				t.Errorf("records (-want +got):\n%s", diff)
			}
			if got := metricValue(s.m.received.WithLabelValues("tcp")); got != 1 {
				t.Errorf("tcp received = %v", got)
			}
		})
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Rules = []RuleConfig{{Path: "api"}}
	if _, err := New(discardLogger(), prometheus.NewRegistry(), cfg, &collectSink{}); err == nil ||
		!strings.Contains(err.Error(), `audit.rules[0].path: must start with /, got "api"`) {
		t.Fatalf("err = %v", err)
	}
	if _, err := New(discardLogger(), prometheus.NewRegistry(), DefaultConfig(), nil); err == nil {
		t.Fatal("nil sink accepted")
	}
	reg := prometheus.NewRegistry()
	if _, err := New(discardLogger(), reg, DefaultConfig(), &collectSink{}); err != nil {
		t.Fatal(err)
	}
	if _, err := New(discardLogger(), reg, DefaultConfig(), &collectSink{}); err == nil {
		t.Fatal("second registration on one registry accepted")
	}
}

func utf8Valid(s string) bool { return strings.ToValidUTF8(s, "\uFFFD") == s }

// metricValue reads a counter or gauge.
func metricValue(c prometheus.Collector) float64 { return testutil.ToFloat64(c) }

// TestStreamAccessLogsLargeMessage: an Envoy with a large
// buffer_size_bytes sends thousands of entries at once; they reach the
// sink in bounded pieces, all of them, in order.
func TestStreamAccessLogsLargeMessage(t *testing.T) {
	sink := &collectSink{}
	s, _ := newTestServer(t, DefaultConfig(), sink)
	stream, err := startALS(t, s).StreamAccessLogs(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	const n = 2*maxEnqueue + 7
	var es []*accesslogv3.HTTPAccessLogEntry
	for i := range n {
		es = append(es, entry(entryOpts{method: corev3.RequestMethod_POST, path: "/api/items", status: 201, reqID: fmt.Sprint(i)}))
	}
	if err := stream.Send(httpBatch(identifier("envoy-0", "als"), es...)); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	recs := sink.records()
	if len(recs) != n || sink.calls != 3 {
		t.Fatalf("%d records in %d calls, want %d in 3", len(recs), sink.calls, n)
	}
	for i, r := range recs {
		if r.RequestID != fmt.Sprint(i) {
			t.Fatalf("record %d is %s: order lost", i, r.RequestID)
		}
	}
}
