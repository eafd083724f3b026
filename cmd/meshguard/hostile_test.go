package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// startBinary runs `meshguard serve --config cfgPath` from the test build
// of the binary and returns its pid and the "meshguard serving" log line.
func startBinary(t testing.TB, cfgPath string, env ...string) (int, map[string]any, *logWatcher) {
	t.Helper()
	bin := buildBinary(t)
	logs := newLogWatcher()
	cmd := exec.Command(bin, "serve", "--config", cfgPath)
	cmd.Stderr = logs
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	select {
	case line := <-logs.ready:
		return cmd.Process.Pid, line, logs
	case <-time.After(30 * time.Second):
		t.Fatalf("not serving after 30s; logs:\n%s", logs)
	}
	return 0, nil, nil
}

// hostileGrowthLimit bounds how far 16 hostile requests may raise the
// serving process' resident memory above what it held before them.
const hostileGrowthLimit = 100 << 20

// hostileRequests are messages of about size bytes built to cost the most
// memory once decoded: many tiny repeated elements, each of which
// protobuf-go would turn into a struct (or a map entry).
var hostileRequests = map[string]struct {
	method string
	stream bool // sent on a client stream (the access-log service)
	build  func(size int) []byte
}{
	"ratelimit_descriptors": {"/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", false, func(size int) []byte {
		// domain "api", then ~600k descriptors of one entry {key: "k"}.
		b := protowire.AppendTag(nil, 1, protowire.BytesType)
		b = protowire.AppendString(b, "api")
		entry := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "k")
		desc := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), entry)
		for len(b)+len(desc)+2 <= size {
			b = protowire.AppendTag(b, 2, protowire.BytesType)
			b = protowire.AppendBytes(b, desc)
		}
		return b
	}},
	"authz_headers": {"/envoy.service.auth.v3.Authorization/Check", false, func(size int) []byte {
		// attributes.request.http.headers with ~400k distinct names.
		var headers []byte
		for i := 0; len(headers) < size-64; i++ {
			kv := protowire.AppendTag(nil, 1, protowire.BytesType)
			kv = protowire.AppendString(kv, strconv.Itoa(i))
			headers = protowire.AppendTag(headers, 3, protowire.BytesType)
			headers = protowire.AppendBytes(headers, kv)
		}
		http := protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), headers)
		req := protowire.AppendBytes(protowire.AppendTag(nil, 4, protowire.BytesType), http)
		return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), req)
	}},
	"accesslog_entries": {"/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs", true, func(size int) []byte {
		// http_logs with ~2M empty HTTPAccessLogEntry.
		var entries []byte
		for len(entries)+2 <= size-16 {
			entries = protowire.AppendTag(entries, 1, protowire.BytesType)
			entries = protowire.AppendVarint(entries, 0)
		}
		return protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), entries)
	}},
}

// rawCodec sends pre-encoded messages and does not decode answers: the
// test speaks gRPC through grpc-go but chooses every byte of the request.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*v.(*[]byte) = append((*v.(*[]byte))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// sendHostile sends msg as one call of method on cc (or one message on a
// client stream) and returns the status code the server answered with.
func sendHostile(ctx context.Context, cc *grpc.ClientConn, method string, stream bool, msg []byte) codes.Code {
	var reply []byte
	if !stream {
		return status.Code(cc.Invoke(ctx, method, &msg, &reply, grpc.ForceCodec(rawCodec{})))
	}
	cs, err := cc.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true}, method, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return status.Code(err)
	}
	if err := cs.SendMsg(&msg); err != nil {
		return status.Code(cs.RecvMsg(&reply))
	}
	cs.CloseSend()
	return status.Code(cs.RecvMsg(&reply))
}

// hostileResult is what one round of hostile requests did to the server.
type hostileResult struct {
	codes               map[codes.Code]int
	before, peak, after int64 // resident bytes
	took                time.Duration
}

// dialHostile opens the 8 connections hostile requests are sent on.
func dialHostile(t testing.TB, addr string) []*grpc.ClientConn {
	t.Helper()
	conns := make([]*grpc.ClientConn, 8)
	for i := range conns {
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		cc.Connect()
		conns[i] = cc
	}
	return conns
}

// sendHostileRequests sends 16 copies of msg over conns at once and
// returns how they were answered.
func sendHostileRequests(t testing.TB, conns []*grpc.ClientConn, method string, stream bool, msg []byte) map[codes.Code]int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	answers := map[codes.Code]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			c := sendHostile(ctx, conns[i%len(conns)], method, stream, msg)
			mu.Lock()
			answers[c]++
			mu.Unlock()
		})
	}
	wg.Wait()
	return answers
}

// sendHostileRound sends 16 copies of msg over 8 connections at once, with
// the process' peak RSS reset first, and reports their statuses and the
// process' memory.
func sendHostileRound(t testing.TB, pid int, addr, method string, stream bool, msg []byte) hostileResult {
	t.Helper()
	conns := dialHostile(t, addr)
	defer func() {
		for _, cc := range conns {
			cc.Close()
		}
	}()
	res := hostileResult{before: procMem(t, pid, "VmRSS")}
	resetPeakRSS(t, pid)
	start := time.Now()
	res.codes = sendHostileRequests(t, conns, method, stream, msg)
	res.took = time.Since(start)
	res.peak, res.after = procMem(t, pid, "VmHWM"), procMem(t, pid, "VmRSS")
	return res
}

// resetPeakRSS sets the process' VmHWM to its current RSS (Linux 4.0+), so
// each round measures its own peak.
func resetPeakRSS(t testing.TB, pid int) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Fatalf("resetting the peak RSS: %v", err)
	}
}

// TestHostileRequests runs a real `meshguard serve` and sends, to the gRPC
// listeners, 16 requests at once over 8 connections, each built to cost the
// most memory once decoded, and checks how they are answered, that the
// process' resident memory grows by less than hostileGrowthLimit, and that
// a well-behaved client is answered. Each case runs a process of its own,
// so that none inherits the heap an earlier one grew.
func TestHostileRequests(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	// Every size limit raised to 4 MiB: the requests are read whole, and
	// only the scan stands between them and protobuf-go.
	const raised = `grpc:
  max_recv_msg_size: 4194304
  ratelimit_listener: {max_recv_msg_size: 4194304}
  max_request_bytes: {check: 4194304, should_rate_limit: 4194304}
`
	const mib4 = 4<<20 - 64 // room for the gRPC prefix
	for _, tc := range []struct {
		name, config, listener, request string
		size                            int
		admitted                        bool // within every limit: decoded and answered
	}{
		// The attack: 4 MiB, over every default limit; grpc-go
		// refuses it from the 5-byte prefix.
		{"defaults/grpc/ratelimit_descriptors", "", "grpc", "ratelimit_descriptors", mib4, false},
		{"defaults/grpc/authz_headers", "", "grpc", "authz_headers", mib4, false},
		{"defaults/grpc/accesslog_entries", "", "grpc", "accesslog_entries", mib4, false},
		{"defaults/ratelimit/ratelimit_descriptors", "", "ratelimit", "ratelimit_descriptors", mib4, false},
		// At the defaults' own limits: read whole, refused by the scan.
		{"defaults/grpc/accesslog_entries_2MiB", "", "grpc", "accesslog_entries", 2<<20 - 64, false},
		{"defaults/grpc/authz_headers_256KiB", "", "grpc", "authz_headers", 256<<10 - 64, false},
		{"defaults/ratelimit/ratelimit_descriptors_64KiB", "", "ratelimit", "ratelimit_descriptors", 64<<10 - 64, false},
		// A check with more headers than Envoy sends (14k): refused by the
		// cap though within every size limit.
		{"defaults/grpc/authz_headers_128KiB", "", "grpc", "authz_headers", 128 << 10, false},
		// A check of tiny headers just within the cap (492 of 512), 16 at
		// once: decoded and answered.
		{"defaults/grpc/authz_headers_492", "", "grpc", "authz_headers", 3400, true},
		{"limits_4MiB/grpc/ratelimit_descriptors", raised, "grpc", "ratelimit_descriptors", mib4, false},
		{"limits_4MiB/grpc/authz_headers", raised, "grpc", "authz_headers", mib4, false},
		{"limits_4MiB/grpc/accesslog_entries", raised, "grpc", "accesslog_entries", mib4, false},
		{"limits_4MiB/ratelimit/ratelimit_descriptors", raised, "ratelimit", "ratelimit_descriptors", mib4, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := hostileRequests[tc.request]
			testHostile(t, tc.config, tc.listener, h.method, h.stream, h.build(tc.size), tc.admitted)
		})
	}
}

func testHostile(t *testing.T, cfgYAML, listener, method string, stream bool, msg []byte, admitted bool) {
	pid, line, logs := startBinary(t, testConfig(t, cfgYAML))
	addr := line[listener+"_addr"].(string)
	r := sendHostileRound(t, pid, addr, method, stream, msg)
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("meshguard died: %v; logs:\n%s", err, logs)
	}
	checkHealth(t, addr)
	growth := r.peak - r.before
	t.Logf("%d-byte requests: answers %v in %s; RSS %d MiB before, peak %d MiB (+%d MiB), %d MiB after",
		len(msg), r.codes, r.took.Round(time.Millisecond), r.before>>20, r.peak>>20, growth>>20, r.after>>20)
	for c := range r.codes {
		refused := c == codes.InvalidArgument || c == codes.ResourceExhausted
		if refused == admitted {
			t.Errorf("answered %v; want admitted = %v", c, admitted)
		}
	}
	if growth > hostileGrowthLimit {
		t.Errorf("RSS grew by %d MiB, limit %d MiB", growth>>20, hostileGrowthLimit>>20)
	}
}
