//go:build unix

package extauthz

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"os"
	"os/exec"
	rtmetrics "runtime/metrics"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/meshguard/meshguard/internal/gctune"
	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
)

// noopServer is the baseline: the cheapest possible Authorization server on
// the same gRPC stack, allowing everything with a static answer.
type noopServer struct {
	authv3.UnimplementedAuthorizationServer
}

var noopOK = &authv3.CheckResponse{Status: statusOK}

func (noopServer) Check(context.Context, *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	return noopOK, nil
}

// benchTarget is one server under test, in a child process of its own so
// that its CPU time and allocations can be told apart from the client's.
type benchTarget struct {
	name   string
	conn   *grpc.ClientConn
	stdin  io.WriteCloser
	stdout *bufio.Reader
}

// benchServerEnv makes the test binary serve instead of testing (TestMain);
// benchVariantEnv passes the child its gRPC tuning variant (see
// grpcservertest.Options; empty: the production options).
const (
	benchServerEnv  = "MESHGUARD_EXTAUTHZ_BENCH_SERVER"
	benchVariantEnv = "MESHGUARD_EXTAUTHZ_BENCH_GRPC_VARIANT"
)

// startBenchTarget starts server kind ("noop" or "meshguard") on the
// production gRPC stack with tuning variant ("": none).
func startBenchTarget(b *testing.B, kind, variant string) *benchTarget {
	b.Helper()
	name := kind
	bin, variant := grpcservertest.Executable(variant)
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), benchServerEnv+"="+kind, benchVariantEnv+"="+variant)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	t := &benchTarget{name: name, stdin: stdin, stdout: bufio.NewReader(out)}
	line, err := t.stdout.ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "addr ")
	if err != nil || !ok {
		b.Fatalf("bench server %s: %q, %v", name, line, err)
	}
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close() })
	t.conn = cc
	return t
}

// stats asks the child for its CPU time and heap allocation count so far.
func (t *benchTarget) stats(b *testing.B) (cpu time.Duration, allocs uint64) {
	if _, err := io.WriteString(t.stdin, "stats\n"); err != nil {
		b.Fatal(err)
	}
	line, err := t.stdout.ReadString('\n')
	var ns int64
	if _, err2 := fmt.Sscanf(line, "stats %d %d", &ns, &allocs); err != nil || err2 != nil {
		b.Fatalf("bench server %s stats: %q, %v, %v", t.name, line, err, err2)
	}
	return time.Duration(ns), allocs
}

// serveBench is the child's side: serve kind on 127.0.0.1:0 with the gRPC
// options and interceptors cmd/meshguard uses (grpcserver), print the
// address, answer "stats" lines, exit when stdin closes.
func serveBench(kind, variant string) error {
	gctune.Apply(os.Getenv) // as meshguard serve does
	var srv authv3.AuthorizationServer = noopServer{}
	if kind == "meshguard" {
		s, err := New(slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry(), testConfig(), nil)
		if err != nil {
			return err
		}
		srv = s
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	// As cmd/meshguard serves it: through a Guard with the default bound.
	gs, reg, err := grpcservertest.NewServer(variant, map[string]grpcserver.MethodBounds{
		authv3.Authorization_Check_FullMethodName: {MaxBytes: 256 << 10}})
	if err != nil {
		return err
	}
	authv3.RegisterAuthorizationServer(reg, srv)
	go gs.Serve(lis)
	defer gs.Stop()
	// A CPU profile of the server, e.g. for cmd/meshguard/default.pgo; "%p"
	// in the path becomes the server's pid.
	if path := os.Getenv("MESHGUARD_EXTAUTHZ_BENCH_CPUPROFILE"); path != "" && kind == "meshguard" {
		f, err := os.Create(strings.ReplaceAll(path, "%p", strconv.Itoa(os.Getpid())))
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	fmt.Printf("addr %s\n", lis.Addr())
	sample := []rtmetrics.Sample{{Name: "/gc/heap/allocs:objects"}}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		rtmetrics.Read(sample)
		fmt.Printf("stats %d %d\n", cpuTime().Nanoseconds(), sample[0].Value.Uint64())
	}
	return nil
}

func TestMain(m *testing.M) {
	if kind := os.Getenv(benchServerEnv); kind != "" {
		if err := serveBench(kind, os.Getenv(benchVariantEnv)); err != nil {
			fmt.Fprintln(os.Stderr, "bench server:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// latencyHist is a log-linear histogram (16 sub-buckets per power of two,
// about 6% resolution) that records without allocating.
type latencyHist [64 * 16]uint64

func (h *latencyHist) record(d time.Duration) {
	ns := uint64(max(d, 1))
	e := bits.Len64(ns) - 1
	sub := uint64(0)
	if e >= 4 {
		sub = (ns >> (e - 4)) & 15
	} else {
		sub = (ns << (4 - e)) & 15
	}
	h[e*16+int(sub)]++
}

// quantile returns the lower bound of the bucket holding quantile q.
func (h *latencyHist) quantile(q float64) time.Duration {
	var total uint64
	for _, c := range h {
		total += c
	}
	want := uint64(q * float64(total))
	var seen uint64
	for i, c := range h {
		seen += c
		if seen > want {
			e, sub := i/16, uint64(i%16)
			return time.Duration((uint64(1) << e) + (sub << e >> 4))
		}
	}
	return 0
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchRequest is an allowed cross-origin GET with a typical browser header
// set, as Envoy sends it (headers map form).
func benchRequest(b *testing.B) *authv3.CheckRequest {
	return envoyReq{host: "api.example.net", path: "/api/v1/orders?page=2", headers: hdr(
		"origin", "https://dashboard.example.com",
		"accept", "application/json, text/plain, */*",
		"accept-encoding", "gzip, deflate, br",
		"accept-language", "en-GB,en;q=0.9",
		"authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1LTQyIn0.c2lnbmF0dXJl",
		"cookie", "session=7d1f0c2b9e; theme=dark",
		"referer", "https://dashboard.example.com/orders",
		"sec-fetch-mode", "cors", "sec-fetch-site", "same-site", "sec-fetch-dest", "empty",
		"x-forwarded-for", "203.0.113.7", "x-envoy-external-address", "203.0.113.7",
	), jwt: map[string]any{"sub": "u-42", "role": "admin", "iss": "https://id.example.com"}}.build(b, formHeaders)
}

// rawCodec lets the benchmark client act as a load generator: it sends a
// request encoded once and keeps answers as bytes. The servers decode and
// encode with the standard proto codec, as they do for Envoy.
type rawCodec struct{}

type rawMsg struct{ b []byte }

func (rawCodec) Marshal(v any) ([]byte, error) { return v.(*rawMsg).b, nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	v.(*rawMsg).b = data
	return nil
}
func (rawCodec) Name() string { return "proto" } // the content-subtype the servers expect

// runParallelChecks drives b.N Checks at target from GOMAXPROCS×4
// goroutines and reports throughput, client-side latency quantiles, and the
// server process's CPU time and allocations per op. Each goroutine decodes
// and verifies its first answer; every other answer must have its size.
func runParallelChecks(b *testing.B, t *benchTarget, req *authv3.CheckRequest, verify func(*authv3.CheckResponse) bool) (opsPerSec, cpuPerOp float64) {
	reqBytes, err := proto.Marshal(req)
	if err != nil {
		b.Fatal(err)
	}
	const method = "/envoy.service.auth.v3.Authorization/Check"
	var mu sync.Mutex
	var all latencyHist
	b.ReportAllocs()
	b.SetParallelism(4)
	cpu0, allocs0 := t.stats(b)
	start := time.Now()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var h latencyHist
		ctx := context.Background()
		in := &rawMsg{b: reqBytes}
		var out rawMsg
		size := -1
		for pb.Next() {
			t0 := time.Now()
			err := t.conn.Invoke(ctx, method, in, &out, grpc.ForceCodec(rawCodec{}))
			h.record(time.Since(t0))
			if err != nil {
				b.Errorf("Check: %v", err)
				return
			}
			if size < 0 {
				var resp authv3.CheckResponse
				if err := proto.Unmarshal(out.b, &resp); err != nil || !verify(&resp) {
					b.Errorf("Check answer: %v, %v", err, &resp)
					return
				}
				size = len(out.b)
			} else if len(out.b) != size {
				b.Errorf("Check answer of %d bytes, the first was %d", len(out.b), size)
				return
			}
		}
		mu.Lock()
		for i, c := range h {
			all[i] += c
		}
		mu.Unlock()
	})
	b.StopTimer()
	elapsed := time.Since(start)
	cpu1, allocs1 := t.stats(b)
	opsPerSec = float64(b.N) / elapsed.Seconds()
	cpuPerOp = float64((cpu1 - cpu0).Nanoseconds()) / 1e3 / float64(b.N)
	b.ReportMetric(opsPerSec, "ops/s")
	b.ReportMetric(float64(all.quantile(0.50).Nanoseconds())/1e3, "p50-µs")
	b.ReportMetric(float64(all.quantile(0.99).Nanoseconds())/1e3, "p99-µs")
	b.ReportMetric(cpuPerOp, "server-cpu-µs/op")
	b.ReportMetric(float64(allocs1-allocs0)/float64(b.N), "server-allocs/op")
	return opsPerSec, cpuPerOp
}

// BenchmarkCheck compares meshguard's Check for an allowed cross-origin
// request with a CSP nonce against a no-op Authorization server on the same
// gRPC stack, interleaved (noop, meshguard, noop, meshguard, …) so that
// machine noise hits both alike. Each server runs in a child process; the client in
// this one stands in for Envoy, so allocs/op and B/op are the client's and
// server-cpu-µs/op and server-allocs/op the server's. The log line gives meshguard's throughput as a
// share of the no-op server's (target: at least 80%).
func BenchmarkCheck(b *testing.B) {
	targets := []*benchTarget{startBenchTarget(b, "noop", ""), startBenchTarget(b, "meshguard", "")}
	req := benchRequest(b)
	verifyMeshguard := func(r *authv3.CheckResponse) bool {
		ok := r.GetOkResponse()
		return ok != nil && len(ok.GetResponseHeadersToAdd()) == 5 && ok.GetHeaders()[0].GetHeader().GetValue() == "user:u-42"
	}
	verifyNoop := func(r *authv3.CheckResponse) bool { return r.GetStatus().GetCode() == 0 }
	best := map[string][]float64{}
	for range 3 {
		for _, t := range targets {
			verify := verifyNoop
			if t.name == "meshguard" {
				verify = verifyMeshguard
			}
			var last float64 // the final, measured run of this sub-benchmark
			b.Run(t.name, func(b *testing.B) { last, _ = runParallelChecks(b, t, req, verify) })
			best[t.name] = append(best[t.name], last)
		}
	}
	if n, m := best["noop"], best["meshguard"]; len(n) > 0 && len(m) > 0 {
		msg := fmt.Sprintf("meshguard/noop throughput: %.0f%% (median %.0f vs %.0f ops/s over %d interleaved rounds)",
			100*median(m)/median(n), median(m), median(n), len(m))
		b.Log(msg)
		fmt.Println("BenchmarkCheck:", msg) // also without -v, for make bench
	}
}

// BenchmarkCheckVariants compares gRPC server tuning variants
// (space-separated in MESHGUARD_BENCH_GRPC_VARIANTS, see
// grpcservertest.Options; skipped when unset): for each variant a no-op and
// a meshguard server, each in its own process, measured interleaved over
// MESHGUARD_BENCH_ROUNDS rounds (default 5). It prints each variant's median
// meshguard throughput and server CPU per Check, their ratio to the first
// variant's, and the meshguard/noop throughput ratio on that variant.
func BenchmarkCheckVariants(b *testing.B) {
	variants := grpcservertest.Variants(os.Getenv)
	if len(variants) == 0 {
		b.Skip("set " + grpcservertest.VariantsEnv)
	}
	rounds, _ := strconv.Atoi(os.Getenv("MESHGUARD_BENCH_ROUNDS"))
	if rounds <= 0 {
		rounds = 5
	}
	req := benchRequest(b)
	verify := map[string]func(*authv3.CheckResponse) bool{
		"noop": func(r *authv3.CheckResponse) bool { return r.GetStatus().GetCode() == 0 },
		"meshguard": func(r *authv3.CheckResponse) bool {
			return r.GetOkResponse() != nil && len(r.GetOkResponse().GetResponseHeadersToAdd()) == 5
		},
	}
	type key struct{ variant, kind string }
	targets := map[key]*benchTarget{}
	for _, v := range variants {
		for _, kind := range []string{"noop", "meshguard"} {
			targets[key{v, kind}] = startBenchTarget(b, kind, v)
		}
	}
	perSec := map[key][]float64{}
	cpu := map[key][]float64{}
	for range rounds {
		for _, v := range variants {
			for _, kind := range []string{"noop", "meshguard"} {
				k := key{v, kind}
				t := targets[k]
				var ops, us float64
				b.Run(kind+"/"+v, func(b *testing.B) { ops, us = runParallelChecks(b, t, req, verify[kind]) })
				perSec[k] = append(perSec[k], ops)
				cpu[k] = append(cpu[k], us)
			}
		}
	}
	first := key{variants[0], "meshguard"}
	for _, v := range variants {
		m, n := key{v, "meshguard"}, key{v, "noop"}
		fmt.Printf("BenchmarkCheckVariants: %-24s meshguard median %6.0f ops/s (%.2fx) %5.1f server-cpu-µs/op (%.2fx) | noop %6.0f ops/s %5.1f µs/op | meshguard/noop %.0f%% | %d rounds\n",
			v, median(perSec[m]), median(perSec[m])/median(perSec[first]), median(cpu[m]), median(cpu[m])/median(cpu[first]),
			median(perSec[n]), median(cpu[n]), 100*median(perSec[m])/median(perSec[n]), rounds)
	}
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// BenchmarkCheckDecision measures Check alone, without gRPC: the cost and
// allocations of one decision with a nonce.
func BenchmarkCheckDecision(b *testing.B) {
	srv, _ := newTestServer(b, testConfig(), nil)
	req := benchRequest(b)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := srv.Check(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCheckPreflight measures one preflight answer without gRPC.
func BenchmarkCheckPreflight(b *testing.B) {
	srv, _ := newTestServer(b, testConfig(), nil)
	req := envoyReq{method: "OPTIONS", host: "api.example.net", headers: hdr("origin", "https://dashboard.example.com",
		"access-control-request-method", "PUT", "access-control-request-headers", "authorization,content-type")}.build(b, formHeaderMap)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := srv.Check(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}
