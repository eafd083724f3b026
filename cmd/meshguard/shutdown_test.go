package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// TestShutdownKeepsAcceptedAuditRecords: records the sink has accepted but not
// yet written when the process is told to stop (what SIGTERM does in main)
// are not lost: they drain to PostgreSQL, or, when PostgreSQL is down, to the
// spool, from which the next start replays them, each exactly once.
func TestShutdownKeepsAcceptedAuditRecords(t *testing.T) {
	if testing.Short() {
		t.Skip("starts postgres")
	}
	for _, pgDown := range []bool{false, true} {
		t.Run(fmt.Sprintf("postgres_down=%v", pgDown), func(t *testing.T) {
			pg := pgtest.Start(t)
			dbURL := pg.NewDatabase(t)
			dir := t.TempDir()
			cfgPath := filepath.Join(dir, "meshguard.yaml")
			// A long batch interval keeps accepted records queued in memory
			// until shutdown forces them out.
			os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
listen: {grpc: "127.0.0.1:0", http: "127.0.0.1:0", ratelimit: "127.0.0.1:0"}
log: {format: json}
shutdown: {timeout: 5s}
audit:
  spool_dir: %q
  batch_interval: 1h
  batch_size: 100000
  write_timeout: 1s
`, filepath.Join(dir, "spool"))), 0o600)
			env := func(k string) string {
				if k == "DATABASE_URL" {
					return dbURL
				}
				return ""
			}
			const n = 500

			// First run: accept n records, then stop.
			ctx, cancel := context.WithCancel(t.Context())
			line, errc, logs := startRun(t, ctx, cfgPath, env)
			streamEntries(t, ctx, line["grpc_addr"].(string), n)
			if pgDown {
				pg.Kill()
			}
			cancel()
			if err := waitRun(t, errc, logs); err != nil {
				t.Fatalf("first run: %v", err)
			}

			// The shutdown drained the queue: to PostgreSQL when it was up,
			// else to the spool only.
			if pgDown {
				pg.Restart(t)
			}
			var before int
			if err := pgCount(t.Context(), dbURL, "SELECT count(*) FROM audit_logs WHERE request_id LIKE 'shutdown-%'", &before); err != nil {
				t.Fatal(err)
			}
			if want := map[bool]int{false: n, true: 0}[pgDown]; before != want {
				t.Fatalf("after the first run audit_logs holds %d rows, want %d", before, want)
			}

			// Second run on the same spool: everything lands once.
			ctx2, cancel2 := context.WithCancel(t.Context())
			defer cancel2()
			_, errc2, logs2 := startRun(t, ctx2, cfgPath, env)
			var got, distinct int
			servertest.WaitFor(t, 30*time.Second, func() error {
				if err := pgCount(ctx2, dbURL, "SELECT count(*) FROM audit_logs WHERE request_id LIKE 'shutdown-%'", &got); err != nil {
					return err
				}
				if err := pgCount(ctx2, dbURL, "SELECT count(DISTINCT request_id) FROM audit_logs WHERE request_id LIKE 'shutdown-%'", &distinct); err != nil {
					return err
				}
				if got != n || distinct != n {
					return fmt.Errorf("audit_logs holds %d rows (%d distinct) of %d accepted", got, distinct, n)
				}
				return nil
			})
			cancel2()
			if err := waitRun(t, errc2, logs2); err != nil {
				t.Fatalf("second run: %v", err)
			}
		})
	}
}

func startRun(t *testing.T, ctx context.Context, cfgPath string, env func(string) string) (map[string]any, chan error, *logWatcher) {
	t.Helper()
	logs := newLogWatcher()
	errc := make(chan error, 1)
	go func() { errc <- run(ctx, []string{"meshguard", "serve", "--config", cfgPath}, env, io.Discard, logs) }()
	select {
	case line := <-logs.ready:
		return line, errc, logs
	case err := <-errc:
		t.Fatalf("run returned before serving: %v\nlogs:\n%s", err, logs)
	case <-time.After(60 * time.Second):
		t.Fatalf("not serving after 60s; logs:\n%s", logs)
	}
	return nil, nil, nil
}

func waitRun(t *testing.T, errc chan error, logs *logWatcher) error {
	t.Helper()
	select {
	case err := <-errc:
		if err != nil {
			t.Logf("logs:\n%s", logs)
		}
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("run did not return within 30s; logs:\n%s", logs)
	}
	return nil
}

// streamEntries sends n POST entries (kept as CREATE by the default rules) on
// one access-log stream and waits until the server has read them all.
func streamEntries(t *testing.T, ctx context.Context, addr string, n int) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := alsv3.NewAccessLogServiceClient(conn).StreamAccessLogs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const per = 50
	for i := 0; i < n; i += per {
		msg := &alsv3.StreamAccessLogsMessage{LogEntries: &alsv3.StreamAccessLogsMessage_HttpLogs{
			HttpLogs: &alsv3.StreamAccessLogsMessage_HTTPAccessLogEntries{},
		}}
		if i == 0 {
			msg.Identifier = &alsv3.StreamAccessLogsMessage_Identifier{Node: &corev3.Node{Id: "envoy-shutdown"}, LogName: "meshguard"}
		}
		logs := msg.GetHttpLogs()
		for j := i; j < i+per && j < n; j++ {
			logs.LogEntry = append(logs.LogEntry, &accesslogv3.HTTPAccessLogEntry{
				CommonProperties: &accesslogv3.AccessLogCommon{
					StartTime:               timestamppb.Now(),
					DownstreamRemoteAddress: socketAddr("198.51.100.4", 40000),
				},
				Request: &accesslogv3.HTTPRequestProperties{
					RequestMethod: corev3.RequestMethod_POST, Authority: "app.example.com",
					Path: fmt.Sprintf("/api/orders/%d", j), RequestId: fmt.Sprintf("shutdown-%d", j),
				},
				Response: &accesslogv3.HTTPResponseProperties{ResponseCode: wrapperspb.UInt32(201)},
			})
		}
		if err := stream.Send(msg); err != nil {
			t.Fatal(err)
		}
	}
	// The server answers only after it has read (and accepted) every entry.
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
}

// TestDrainDelayKeepsServing: after the stop signal meshguard answers
// NOT_SERVING to health checks but keeps answering calls, on connections
// already open and on new ones, for shutdown.drain_delay, so that Envoy
// moves away before any connection closes.
func TestDrainDelayKeepsServing(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "meshguard.yaml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
environment: development
listen: {grpc: "127.0.0.1:0", http: "127.0.0.1:0", ratelimit: "127.0.0.1:0"}
log: {format: json}
shutdown: {drain_delay: 6s, timeout: 5s}
audit: {spool_dir: %q, sqlite_path: %q}
`, filepath.Join(dir, "spool"), filepath.Join(dir, "audit.db"))), 0o600)
	ctx, cancel := context.WithCancel(t.Context())
	line, errc, logs := startRun(t, ctx, cfgPath, func(string) string { return "" })
	addr := line["ratelimit_addr"].(string)
	dial := func() *grpc.ClientConn {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	decide := func(conn *grpc.ClientConn) error {
		cctx, ccancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer ccancel()
		_, err := rlsv3.NewRateLimitServiceClient(conn).ShouldRateLimit(cctx, &rlsv3.RateLimitRequest{
			Domain: "api", Descriptors: []*rlv3.RateLimitDescriptor{{Entries: []*rlv3.RateLimitDescriptor_Entry{
				{Key: "preset", Value: "relaxed"}, {Key: "client", Value: "ip:203.0.113.7"}}}}})
		return err
	}
	open := dial()
	if err := decide(open); err != nil {
		t.Fatal(err)
	}

	cancel()
	servertest.WaitFor(t, 5*time.Second, func() error {
		cctx, ccancel := context.WithTimeout(t.Context(), time.Second)
		defer ccancel()
		r, err := healthpb.NewHealthClient(open).Check(cctx, &healthpb.HealthCheckRequest{})
		if err == nil && r.Status != healthpb.HealthCheckResponse_NOT_SERVING {
			err = fmt.Errorf("health: %s, want NOT_SERVING", r.Status)
		}
		return err
	})
	if err := decide(open); err != nil {
		t.Errorf("a call on an open connection while draining: %v", err)
	}
	if err := decide(dial()); err != nil {
		t.Errorf("a call on a new connection while draining: %v", err)
	}
	if err := waitRun(t, errc, logs); err != nil {
		t.Fatalf("run: %v", err)
	}
}
