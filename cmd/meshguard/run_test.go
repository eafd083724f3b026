package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	rlcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// logWatcher is an io.Writer for run's logs that lets a test wait for the
// line announcing the listeners.
type logWatcher struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	ready chan map[string]any
	sent  bool
}

func newLogWatcher() *logWatcher { return &logWatcher{ready: make(chan map[string]any, 1)} }

func (w *logWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if !w.sent {
		sc := bufio.NewScanner(bytes.NewReader(w.buf.Bytes()))
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == "meshguard serving" {
				w.ready <- m
				w.sent = true
				break
			}
		}
	}
	return len(p), nil
}

func (w *logWatcher) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// testConfig writes a config that keeps every file the service makes inside
// the test's temp dir.
func testConfig(t testing.TB, extra string) string {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "meshguard.yaml")
	cfg := fmt.Sprintf(`listen: {grpc: "127.0.0.1:0", http: "127.0.0.1:0", ratelimit: "127.0.0.1:0"}
log: {format: json, level: info}
audit:
  sqlite_path: %q
  spool_dir: %q
%s`, filepath.Join(dir, "audit.db"), filepath.Join(dir, "spool"), extra)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func noEnv(string) string { return "" }

// TestRunServesAndStops drives run() itself: start on 127.0.0.1:0, wait until
// ready, call health over gRPC and HTTP, cancel, require a nil error.
func TestRunServesAndStops(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := newLogWatcher()
	errc := make(chan error, 1)
	go func() {
		errc <- run(ctx, []string{"meshguard", "serve", "--config", testConfig(t, "")}, noEnv, io.Discard, logs)
	}()
	var line map[string]any
	select {
	case line = <-logs.ready:
	case err := <-errc:
		t.Fatalf("run returned before serving: %v\nlogs:\n%s", err, logs)
	case <-time.After(30 * time.Second):
		t.Fatalf("not serving after 30s; logs:\n%s", logs)
	}
	grpcAddr, httpAddr := line["grpc_addr"].(string), line["http_addr"].(string)

	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	for _, svc := range []string{"", "envoy.service.auth.v3.Authorization",
		"envoy.service.ratelimit.v3.RateLimitService", "envoy.service.accesslog.v3.AccessLogService"} {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("gRPC health %q = %v, %v", svc, resp.GetStatus(), err)
		}
	}

	// A message over grpc.max_recv_msg_size is refused, not buffered.
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{Service: strings.Repeat("x", 5<<20)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("5 MiB message: got %v, want ResourceExhausted", err)
	}

	// The rate limit listener answers ShouldRateLimit and health checks,
	// with the same message limit, and nothing else.
	rlConn, err := grpc.NewClient(line["ratelimit_addr"].(string), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer rlConn.Close()
	rlsResp, err := rlsv3.NewRateLimitServiceClient(rlConn).ShouldRateLimit(ctx, &rlsv3.RateLimitRequest{
		Domain: "unconfigured", Descriptors: []*rlcommon.RateLimitDescriptor{{
			Entries: []*rlcommon.RateLimitDescriptor_Entry{{Key: "client", Value: "a"}}}}})
	if err != nil || rlsResp.GetOverallCode() != rlsv3.RateLimitResponse_OK || len(rlsResp.GetStatuses()) != 1 {
		t.Errorf("ShouldRateLimit on the rate limit listener = %v, %v", rlsResp, err)
	}
	_, err = rlsv3.NewRateLimitServiceClient(rlConn).ShouldRateLimit(ctx, &rlsv3.RateLimitRequest{Domain: "x"})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("ShouldRateLimit without descriptors on the rate limit listener: %v, want InvalidArgument", err)
	}
	rlHealth := healthpb.NewHealthClient(rlConn)
	if resp, err := rlHealth.Check(ctx, &healthpb.HealthCheckRequest{Service: "envoy.service.ratelimit.v3.RateLimitService"}); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health on the rate limit listener = %v, %v", resp.GetStatus(), err)
	}
	if _, err = rlHealth.Check(ctx, &healthpb.HealthCheckRequest{Service: strings.Repeat("x", 5<<20)}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("5 MiB message on the rate limit listener: got %v, want ResourceExhausted", err)
	}
	if _, err = authv3.NewAuthorizationClient(rlConn).Check(ctx, &authv3.CheckRequest{}); status.Code(err) != codes.Unimplemented {
		t.Errorf("ext_authz Check on the rate limit listener: got %v, want Unimplemented", err)
	}

	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + httpAddr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d %q", code, body)
	}
	if code, body := get("/healthz/grpc"); code != 200 || body != "serving\n" {
		t.Errorf("/healthz/grpc = %d %q", code, body)
	}
	code, body := get("/readyz")
	if code != 200 {
		t.Errorf("/readyz = %d %s", code, body)
	}
	var ready readyDoc
	if err := json.Unmarshal([]byte(body), &ready); err != nil || ready.Status != "ready" {
		t.Errorf("/readyz body %q: %v", body, err)
	}
	_, metrics := get("/metrics")
	for _, want := range []string{
		"go_goroutines", "process_cpu_seconds_total", "meshguard_build_info",
		`meshguard_grpc_server_handled_total{code="OK",method="/grpc.health.v1.Health/Check"}`,
		`meshguard_grpc_server_handled_total{code="OK",method="/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"}`,
		`meshguard_grpc_server_handled_total{code="InvalidArgument",method="/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"}`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("run returned %v after cancel; logs:\n%s", err, logs)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("run did not return within 15s of cancel; logs:\n%s", logs)
	}
}

func TestRunRejectsUnknownKeyAtStart(t *testing.T) {
	path := testConfig(t, "bogus_key: 1\n")
	var stderr bytes.Buffer
	err := run(t.Context(), []string{"meshguard", "serve", "--config", path}, noEnv, io.Discard, &stderr)
	if err == nil || !strings.Contains(err.Error(), `line 6: unknown key "bogus_key"`) {
		t.Fatalf("serve with an unknown key: err = %v", err)
	}
}

func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if err := run(t.Context(), []string{"meshguard", "version"}, noEnv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "meshguard dev go1.") {
		t.Fatalf("version printed %q", out.String())
	}
}

func TestUnknownCommand(t *testing.T) {
	var stderr bytes.Buffer
	if err := run(t.Context(), []string{"meshguard", "frobnicate"}, noEnv, io.Discard, &stderr); err == nil {
		t.Fatal("unknown command accepted")
	}
	if !strings.Contains(stderr.String(), `unknown command "frobnicate"`) {
		t.Fatalf("stderr = %q", stderr.String())
	}
}

// TestSIGTERMExitsZero builds the real binary, starts it, sends SIGTERM while
// a gRPC client holds a connection, and requires exit status 0 within 10 s.
func TestSIGTERMExitsZero(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildBinary(t)
	logs := newLogWatcher()
	cmd := exec.Command(bin, "serve", "--config", testConfig(t, ""))
	cmd.Stderr = logs
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	var line map[string]any
	select {
	case line = <-logs.ready:
	case <-time.After(30 * time.Second):
		t.Fatalf("not serving after 30s; logs:\n%s", logs)
	}
	conn, err := grpc.NewClient(line["grpc_addr"].(string), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v; logs:\n%s", err, logs)
		}
		t.Logf("exited 0 in %s after SIGTERM", time.Since(start).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatalf("still running 10s after SIGTERM; logs:\n%s", logs)
	}
}

// TestGRPCHealthOverHTTP: /healthz/grpc follows the gRPC health status,
// which turns NOT_SERVING when shutdown begins, so an HTTP readiness probe
// (the kubelet's gRPC probe speaks no TLS) takes the pod out as a gRPC one
// would.
func TestGRPCHealthOverHTTP(t *testing.T) {
	cfg, err := loadConfig(testConfig(t, ""), noEnv)
	if err != nil {
		t.Fatal(err)
	}
	s, err := build(t.Context(), cfg, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		s.closeListeners()
		s.closeComponents(t.Context())
	}()
	probe := func() (int, string) {
		rec := httptest.NewRecorder()
		s.http.Handler.ServeHTTP(rec, httptest.NewRequest("GET", "/healthz/grpc", nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := probe(); code != 200 || body != "serving\n" {
		t.Errorf("while serving: %d %q", code, body)
	}
	s.hs.Shutdown()
	if code, body := probe(); code != 503 || body != "not serving\n" {
		t.Errorf("after shutdown began: %d %q", code, body)
	}
}
