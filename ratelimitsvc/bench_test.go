package ratelimitsvc

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshguard/meshguard/internal/gctune"
	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/servertest"
	"github.com/meshguard/meshguard/internal/tracing"
)

// benchServeEnv makes the test binary a bare meshguard RLS (see TestMain):
// the benchmark runs it as a separate process so that meshguard's own CPU
// is measured apart from the load generator's and redis-server's.
const benchServeEnv = "MESHGUARD_RLS_BENCH_REDIS_URL"

// benchVariantEnv passes the child its gRPC tuning variant (see
// grpcservertest.Options); empty: the production options.
const benchVariantEnv = "MESHGUARD_RLS_BENCH_GRPC_VARIANT"

func TestMain(m *testing.M) {
	if url := os.Getenv(benchServeEnv); url != "" {
		if err := benchServe(url); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// benchConfig: every decision goes to Redis (limits are never reached, so
// the over-limit cache never answers).
func benchConfig() Config {
	cfg := DefaultConfig()
	big := uint32(1_000_000_000)
	cfg.Domains = []DomainConfig{{Domain: "bench", Descriptors: []DescriptorConfig{
		{Key: "client", RateLimit: &RateLimitConfig{Window: 15 * time.Minute, RequestsPerUnit: &big}},
		{Key: "route", Value: "api", Descriptors: []DescriptorConfig{
			{Key: "client", RateLimit: &RateLimitConfig{Unit: "minute", RequestsPerUnit: &big}},
		}},
		{Key: "route", Value: "login", Descriptors: []DescriptorConfig{
			{Key: "client", RateLimit: &RateLimitConfig{Preset: "auth"}},
		}},
	}}}
	return cfg
}

func newBenchRedis(url string, opts ...StoreOption) (*RedisStore, error) {
	rc := DefaultRedisConfig()
	rc.URL = secret.URL(url)
	rc.Timeout = time.Second
	return NewRedisStore(discardLogger(), prometheus.NewRegistry(), rc, opts...)
}

// benchTracing reads a "trace=MODE" option off the front of variant:
// "off" (no option: a no-op provider, as cmd/meshguard passes when tracing
// is off), "server" (the server span of tracing.ServerHandler for every
// call, no store spans), "all" (server spans and the store's Redis spans),
// "unsampled" (as "all", with calls whose traceparent says Envoy did not
// sample them, which tracing.ServerHandler passes by) or
// "unsampled-otelgrpc" (the same calls through otelgrpc's handler alone,
// which makes a non-recording span for each). Traced modes hand spans to a
// batch processor whose exporter discards them: meshguard's cost of making
// spans, not of sending them. The load sends each trace= variant a
// traceparent (benchTraceparent), as Envoy's tracing HCM does every call.
func benchTracing(variant string) (rest string, store []StoreOption, server []grpc.ServerOption, err error) {
	off := []StoreOption{WithTracerProvider(noop.NewTracerProvider())}
	spec, ok := strings.CutPrefix(variant, "trace=")
	if !ok {
		return variant, off, nil, nil
	}
	mode, rest, _ := strings.Cut(spec, ",")
	if mode == "off" {
		return rest, off, nil, nil
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(discardExporter{}),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.AlwaysSample())))
	server = []grpc.ServerOption{grpc.StatsHandler(tracing.ServerHandler(tp))}
	switch mode {
	case "server":
		return rest, nil, server, nil
	case "all", "unsampled":
		return rest, []StoreOption{WithTracerProvider(tp)}, server, nil
	case "unsampled-otelgrpc":
		server = []grpc.ServerOption{grpc.StatsHandler(otelgrpc.NewServerHandler(
			otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(propagation.TraceContext{})))}
		return rest, []StoreOption{WithTracerProvider(tp)}, server, nil
	}
	return "", nil, nil, fmt.Errorf("variant %q: trace must be off, server, all, unsampled or unsampled-otelgrpc", variant)
}

// benchTraceparent is what the load sends a variant: for "trace=MODE", a
// traceparent whose sampled flag is set for server and all and clear
// otherwise (off included, so that off and unsampled read the same
// header); none for other variants.
func benchTraceparent(variant string) string {
	spec, ok := strings.CutPrefix(variant, "trace=")
	if !ok {
		return ""
	}
	flags := "00"
	if mode, _, _ := strings.Cut(spec, ","); mode == "server" || mode == "all" {
		flags = "01"
	}
	return "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-" + flags
}

type discardExporter struct{}

func (discardExporter) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discardExporter) Shutdown(context.Context) error                             { return nil }

// benchNoop is passed as the Redis URL to serve the no-op baseline instead.
const benchNoop = "noop"

// noopRLS answers OK with one status per descriptor and does nothing else: the
// floor the gRPC stack sets under any rate limit service on this machine.
type noopRLS struct {
	rlsv3.UnimplementedRateLimitServiceServer
}

func (noopRLS) ShouldRateLimit(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	resp := &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_OK}
	for range req.GetDescriptors() {
		resp.Statuses = append(resp.Statuses, &rlsv3.RateLimitResponse_DescriptorStatus{Code: rlsv3.RateLimitResponse_OK})
	}
	return resp, nil
}

// benchServe serves on 127.0.0.1:0, prints the address, and stops when
// stdin closes. url benchNoop serves noopRLS.
func benchServe(url string) error {
	variant, storeOpts, serverOpts, err := benchTracing(os.Getenv(benchVariantEnv))
	if err != nil {
		return err
	}
	var register func(grpc.ServiceRegistrar)
	var rs *RedisStore
	if url == benchNoop {
		register = func(r grpc.ServiceRegistrar) { rlsv3.RegisterRateLimitServiceServer(r, noopRLS{}) }
	} else {
		if rs, err = newBenchRedis(url, storeOpts...); err != nil {
			return err
		}
		srv, err := New(discardLogger(), prometheus.NewRegistry(), benchConfig(), rs)
		if err != nil {
			return err
		}
		register = srv.Register
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	gctune.Apply(os.Getenv) // as meshguard serve does
	if v, ok := strings.CutPrefix(variant, "store=direct"); ok {
		// Decisions through go-redis, one round trip each, instead of the
		// pipeline, to compare the two on one load.
		variant = strings.TrimPrefix(v, ",")
		if rs != nil {
			rs.pipe.close()
			rs.pipe = nil
		}
	}
	// grpc-go's server as cmd/meshguard's listeners run it: its options and
	// interceptors, and the tuning variant that follows.
	gs, reg, err := grpcservertest.NewServer(variant, benchBounds, serverOpts...)
	if err != nil {
		return err
	}
	register(reg)
	go gs.Serve(lis)
	stop := gs.Stop
	// A CPU profile of the server, e.g. for cmd/meshguard/default.pgo;
	// "%p" in the path becomes the server's pid, so that every case's
	// server keeps its own.
	if path := os.Getenv("MESHGUARD_RLS_BENCH_CPUPROFILE"); path != "" {
		f, err := os.Create(strings.ReplaceAll(path, "%p", strconv.Itoa(os.Getpid())))
		if err != nil {
			return err
		}
		pprof.StartCPUProfile(f)
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	fmt.Println(lis.Addr().String())
	buf := make([]byte, 1)
	os.Stdin.Read(buf) // EOF when the benchmark ends
	stop()
	if rs == nil {
		return nil
	}
	return rs.Close()
}

// benchBounds are meshguard's default bounds on rate limit requests.
var benchBounds = map[string]grpcserver.MethodBounds{
	rlsv3.RateLimitService_ShouldRateLimit_FullMethodName: {MaxBytes: 64 << 10, Caps: RequestCaps()},
}

// benchRequests builds the request mix: 1,000 clients with one descriptor,
// or the same clients with two descriptors (two Redis counters each).
func benchRequests(twoDesc bool) []*rlsv3.RateLimitRequest { return benchMix(twoDesc, "api") }

// benchMix: route "login" is limited by the auth preset (5 per 15 minutes),
// so after the warm-up every client is over limit there.
func benchMix(twoDesc bool, route string) []*rlsv3.RateLimitRequest {
	reqs := make([]*rlsv3.RateLimitRequest, 1000)
	for i := range reqs {
		client := "ip:10.0." + strconv.Itoa(i/256) + "." + strconv.Itoa(i%256)
		if twoDesc {
			reqs[i] = request("bench", kv("client", client), kv("route", route, "client", client))
		} else {
			reqs[i] = request("bench", kv("client", client))
		}
	}
	return reqs
}

// procCPU is the user+system CPU time of process pid (0: this process).
func procCPU(b *testing.B, pid int) time.Duration {
	if pid == 0 {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name (which is in parentheses): utime is the
	// 14th field overall, stime the 15th, in clock ticks (100 per second).
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// machineSteal returns the machine's CPU time stolen by the hypervisor and
// its total CPU time so far (/proc/stat, in clock ticks): the share stolen
// during a run tells how busy the host was, which moves every figure.
func machineSteal() (steal, total int64) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(data), "\n")
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseInt(f, 10, 64)
		total += v
		if i == 7 {
			steal = v
		}
	}
	return steal, total
}

// procSyscalls is how many read and write system calls process pid has
// made (/proc/pid/io: syscr, syscw).
func procSyscalls(b *testing.B, pid int) (reads, writes int64) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.Lines(string(data)) {
		name, val, _ := strings.Cut(strings.TrimSpace(line), ": ")
		n, _ := strconv.ParseInt(val, 10, 64)
		switch name {
		case "syscr":
			reads = n
		case "syscw":
			writes = n
		}
	}
	return reads, writes
}

// startBenchServer runs the RLS in a child process against url and returns
// a client and the child's pid. variant "" (or "prod") serves it as
// cmd/meshguard's listeners do; otherwise it names a tuning variant
// ("workers=0", see grpcservertest.Options), optionally after
// "store=direct".
func startBenchServer(b *testing.B, url, variant string) (rlsv3.RateLimitServiceClient, int) {
	bin, variant := grpcservertest.Executable(variant)
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), benchServeEnv+"="+url, benchVariantEnv+"="+variant)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatalf("bench server: %v", err)
	}
	dopts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if tp := benchTraceparent(variant); tp != "" {
		dopts = append(dopts, grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(metadata.AppendToOutgoingContext(ctx, "traceparent", tp), method, req, reply, cc, opts...)
		}))
	}
	conn, err := grpc.NewClient(strings.TrimSpace(addr), dopts...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return rlsv3.NewRateLimitServiceClient(conn), cmd.Process.Pid
}

func startInProcessServer(b *testing.B, url string) rlsv3.RateLimitServiceClient {
	rs, err := newBenchRedis(url)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rs.Close() })
	srv, err := New(discardLogger(), prometheus.NewRegistry(), benchConfig(), rs)
	if err != nil {
		b.Fatal(err)
	}
	gs, reg, err := grpcservertest.NewServer("", benchBounds)
	if err != nil {
		b.Fatal(err)
	}
	srv.Register(reg)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go gs.Serve(lis)
	b.Cleanup(gs.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return rlsv3.NewRateLimitServiceClient(conn)
}

// runLoad drives client with 50 concurrent streams over the request mix and
// reports throughput, p50/p99 latency, and CPU per decision of the server
// process (serverPid; 0 when the server is in this process), of this
// process, and of redis-server (redisPid; 0: none). The server's read and
// write system calls per decision show how well its batching amortises
// them: on loopback a write also pays for the receiver's TCP processing.
func runLoad(b *testing.B, client rlsv3.RateLimitServiceClient, reqs []*rlsv3.RateLimitRequest, serverPid, redisPid int, want rlsv3.RateLimitResponse_Code) benchResult {
	ctx := b.Context()
	// Warm up connections, pools, the script cache (and use up 5-per-client
	// limits), once per client and request mix: b.Run calls this for every
	// b.N it tries.
	if _, done := warmedUp.LoadOrStore(warmKey{client, &reqs[0]}, true); !done {
		for i := range 6 * len(reqs) {
			if _, err := client.ShouldRateLimit(ctx, reqs[i%len(reqs)]); err != nil {
				b.Fatal(err)
			}
		}
	}
	const streams = 50
	b.SetParallelism((streams + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
	var next atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	b.ReportAllocs()
	selfBefore := procCPU(b, 0)
	var srvBefore time.Duration
	var readsBefore, writesBefore int64
	if serverPid != 0 {
		srvBefore = procCPU(b, serverPid)
		readsBefore, writesBefore = procSyscalls(b, serverPid)
	}
	stealBefore, totalBefore := machineSteal()
	var redisBefore time.Duration
	if redisPid != 0 {
		redisBefore = procCPU(b, redisPid)
	}
	start := time.Now()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		mine := make([]time.Duration, 0, 1024)
		for pb.Next() {
			req := reqs[next.Add(1)%int64(len(reqs))]
			t0 := time.Now()
			// Envoy's rate limit filter sends a deadline (grpc-timeout) with
			// every call, and the server starts a timer for it; 1s here so that
			// only a stuck call hits it.
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			resp, err := client.ShouldRateLimit(cctx, req)
			cancel()
			mine = append(mine, time.Since(t0))
			if err != nil || resp.OverallCode != want {
				b.Errorf("answer %v %v", resp.GetOverallCode(), err)
				return
			}
		}
		mu.Lock()
		lat = append(lat, mine...)
		mu.Unlock()
	})
	b.StopTimer()
	elapsed := time.Since(start)
	self := procCPU(b, 0) - selfBefore
	n := float64(b.N)
	var res benchResult
	res.perSec = n / elapsed.Seconds()
	if serverPid != 0 {
		srv := procCPU(b, serverPid) - srvBefore
		res.cpuPerOp = float64(srv.Microseconds()) / n
		b.ReportMetric(res.cpuPerOp, "server-cpu-µs/op")
		reads, writes := procSyscalls(b, serverPid)
		b.ReportMetric(float64(reads-readsBefore)/n, "server-reads/op")
		b.ReportMetric(float64(writes-writesBefore)/n, "server-writes/op")
		b.ReportMetric(float64(self.Microseconds())/n, "loadgen-cpu-µs/op")
	} else {
		b.ReportMetric(float64(self.Microseconds())/n, "process-cpu-µs/op")
	}
	if steal, total := machineSteal(); total > totalBefore {
		b.ReportMetric(100*float64(steal-stealBefore)/float64(total-totalBefore), "steal-%")
	}
	if redisPid != 0 {
		b.ReportMetric(float64((procCPU(b, redisPid)-redisBefore).Microseconds())/n, "redis-cpu-µs/op")
	}
	slices.Sort(lat)
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	}
	b.ReportMetric(res.perSec, "decisions/s")
	return res
}

// warmedUp records the clients and request mixes runLoad has warmed up.
var warmedUp sync.Map

type warmKey struct {
	client rlsv3.RateLimitServiceClient
	reqs   **rlsv3.RateLimitRequest
}

// benchResult is what one measured run gives for comparing variants.
type benchResult struct {
	perSec   float64 // decisions per second
	cpuPerOp float64 // server CPU µs per decision
}

// BenchmarkShouldRateLimit measures meshguard as deployed: a separate
// process serving the rate limit listener's gRPC stack, real
// redis-server, 50 concurrent streams.
// server-cpu-µs/op is the server process's CPU per decision (redis-server
// and the load generator excluded). Its allocations are not in allocs/op,
// which counts the load generator; BenchmarkShouldRateLimitInProcess shows
// client plus server allocations.
func BenchmarkShouldRateLimit(b *testing.B) {
	for _, tc := range []struct {
		name string
		reqs []*rlsv3.RateLimitRequest
		want rlsv3.RateLimitResponse_Code
	}{
		{"hot1k", benchRequests(false), rlsv3.RateLimitResponse_OK},
		{"two_desc", benchRequests(true), rlsv3.RateLimitResponse_OK},
		// Every client over its login limit: answered from the over-limit cache.
		{"two_desc_over_limit", benchMix(true, "login"), rlsv3.RateLimitResponse_OVER_LIMIT},
	} {
		b.Run(tc.name, func(b *testing.B) {
			srv := redistest.Start(b)
			client, pid := startBenchServer(b, srv.URL(), "")
			runLoad(b, client, tc.reqs, pid, srv.Pid(), tc.want)
		})
	}
	// The same load on a server that decides nothing: what the gRPC stack
	// alone costs per call here, to read the figures above against.
	b.Run("noop_server", func(b *testing.B) {
		client, pid := startBenchServer(b, benchNoop, "")
		runLoad(b, client, benchRequests(false), pid, 0, rlsv3.RateLimitResponse_OK)
	})
	b.Run("noop_server_two_desc", func(b *testing.B) {
		client, pid := startBenchServer(b, benchNoop, "")
		runLoad(b, client, benchRequests(true), pid, 0, rlsv3.RateLimitResponse_OK)
	})
}

// BenchmarkShouldRateLimitVariants compares gRPC server tuning variants
// (space-separated in MESHGUARD_BENCH_GRPC_VARIANTS, see
// grpcservertest.Options; "trace=off|server|all|unsampled|unsampled-otelgrpc" first in a variant for
// tracing, see benchTracing, then "store=direct" for decisions through
// go-redis, one round trip each, instead of the pipeline; skipped
// when unset) on BenchmarkShouldRateLimit's
// load, each variant in its own server process against one redis-server per
// case, interleaved A B A B … over -rounds so machine noise hits all alike.
// It prints each variant's median throughput and server CPU per decision,
// and their ratio to the first variant's.
func BenchmarkShouldRateLimitVariants(b *testing.B) {
	variants := grpcservertest.Variants(os.Getenv)
	if len(variants) == 0 {
		b.Skip("set " + grpcservertest.VariantsEnv)
	}
	rounds, _ := strconv.Atoi(os.Getenv("MESHGUARD_BENCH_ROUNDS"))
	if rounds <= 0 {
		rounds = 5
	}
	for _, tc := range []struct {
		name string
		reqs []*rlsv3.RateLimitRequest
	}{{"hot1k", benchRequests(false)}, {"two_desc", benchRequests(true)}} {
		b.Run(tc.name, func(b *testing.B) {
			srv := redistest.Start(b)
			type target struct {
				client rlsv3.RateLimitServiceClient
				pid    int
			}
			targets := make([]target, len(variants))
			for i, v := range variants {
				targets[i].client, targets[i].pid = startBenchServer(b, srv.URL(), v)
			}
			perSec := make([][]float64, len(variants))
			cpu := make([][]float64, len(variants))
			for range rounds {
				for i, v := range variants {
					var last benchResult
					b.Run(v, func(b *testing.B) {
						last = runLoad(b, targets[i].client, tc.reqs, targets[i].pid, srv.Pid(), rlsv3.RateLimitResponse_OK)
					})
					perSec[i] = append(perSec[i], last.perSec)
					cpu[i] = append(cpu[i], last.cpuPerOp)
				}
			}
			for i, v := range variants {
				// Rounds run A B A B …, so each round's ratio to the first
				// variant compares neighbours in time: its median shrugs off
				// the machine's drift better than the ratio of medians.
				ratios := make([]float64, rounds)
				for r := range ratios {
					ratios[r] = cpu[i][r] / cpu[0][r]
				}
				fmt.Printf("BenchmarkShouldRateLimitVariants/%s: %-24s median %6.0f decisions/s (%.2fx)  %5.1f server-cpu-µs/op (%.2fx; per round %.2fx)  over %d rounds\n",
					tc.name, v, median(perSec[i]), median(perSec[i])/median(perSec[0]),
					median(cpu[i]), median(cpu[i])/median(cpu[0]), median(ratios), rounds)
			}
		})
	}
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// BenchmarkShouldRateLimitInProcess is the same load with the server in the
// benchmark process: allocs/op and process-cpu-µs/op are client + server.
func BenchmarkShouldRateLimitInProcess(b *testing.B) {
	for _, tc := range []struct {
		name    string
		twoDesc bool
	}{{"hot1k", false}, {"two_desc", true}} {
		b.Run(tc.name, func(b *testing.B) {
			srv := redistest.Start(b)
			runLoad(b, startInProcessServer(b, srv.URL()), benchRequests(tc.twoDesc), 0, srv.Pid(), rlsv3.RateLimitResponse_OK)
		})
	}
}

// BenchmarkDecide calls the handler directly against the in-process store:
// the cost of matching, counting and building the answer, without gRPC or
// Redis.
func BenchmarkDecide(b *testing.B) {
	srv, err := New(discardLogger(), prometheus.NewRegistry(), benchConfig(), NewMemoryStore())
	if err != nil {
		b.Fatal(err)
	}
	reqs := benchRequests(true)
	ctx := b.Context()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := srv.ShouldRateLimit(ctx, reqs[i%len(reqs)]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkDecideRedis calls the handler directly against a real Redis,
// 50 goroutines: meshguard's decision path without gRPC.
func BenchmarkDecideRedis(b *testing.B) {
	benchDecideRedis(b, func(s *Server) func(context.Context, *rlsv3.RateLimitRequest) error {
		return func(ctx context.Context, req *rlsv3.RateLimitRequest) error {
			_, err := s.ShouldRateLimit(ctx, req)
			return err
		}
	})
}

// benchDecideRedis runs decisions against a real Redis from 50 goroutines,
// each deciding with what decider returns for it.
func benchDecideRedis(b *testing.B, decider func(*Server) func(context.Context, *rlsv3.RateLimitRequest) error) {
	for _, tc := range []struct {
		name    string
		twoDesc bool
	}{{"hot1k", false}, {"two_desc", true}} {
		b.Run(tc.name, func(b *testing.B) {
			srv := redistest.Start(b)
			rs, err := newBenchRedis(srv.URL())
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { rs.Close() })
			s, err := New(discardLogger(), prometheus.NewRegistry(), benchConfig(), rs)
			if err != nil {
				b.Fatal(err)
			}
			reqs := benchRequests(tc.twoDesc)
			ctx := b.Context()
			var next atomic.Int64
			b.SetParallelism((50 + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			b.ReportAllocs()
			before := procCPU(b, 0)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				decide := decider(s)
				for pb.Next() {
					if err := decide(ctx, reqs[next.Add(1)%int64(len(reqs))]); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64((procCPU(b, 0)-before).Microseconds())/float64(b.N), "cpu-µs/op")
		})
	}
}

// referenceBinEnv names an envoyproxy/ratelimit binary (built outside this
// repository) for BenchmarkVersusReference.
const referenceBinEnv = "MESHGUARD_BENCH_REFERENCE_BIN"

// referenceConfig is benchConfig's domain in envoyproxy/ratelimit's format
// (hour windows: its units are fixed; the limits are never reached).
const referenceConfig = `domain: bench
descriptors:
  - key: client
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
  - key: route
    value: api
    descriptors:
      - key: client
        rate_limit: {unit: minute, requests_per_unit: 1000000000}
`

// startReference runs envoyproxy/ratelimit from bin against redisAddr and
// returns a client and its pid: stats off, warnings only, its default Redis
// pool.
func startReference(b *testing.B, bin, redisAddr string) (rlsv3.RateLimitServiceClient, int) {
	dir := b.TempDir()
	cfgDir := filepath.Join(dir, "ratelimit", "config")
	if err := os.MkdirAll(cfgDir, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cfgDir, "bench.yaml"), []byte(referenceConfig), 0o644); err != nil {
		b.Fatal(err)
	}
	grpcPort := servertest.FreePort(b)
	env := []string{
		"REDIS_SOCKET_TYPE=tcp", "REDIS_URL=" + redisAddr, "USE_STATSD=false", "DISABLE_STATS=true", "LOG_LEVEL=warn",
		"RUNTIME_ROOT=" + dir, "RUNTIME_SUBDIRECTORY=ratelimit", "RUNTIME_WATCH_ROOT=false",
		"GRPC_HOST=127.0.0.1", "GRPC_PORT=" + strconv.Itoa(grpcPort),
		"HOST=127.0.0.1", "PORT=" + strconv.Itoa(servertest.FreePort(b)),
		"DEBUG_HOST=127.0.0.1", "DEBUG_PORT=" + strconv.Itoa(servertest.FreePort(b)),
	}
	cmd := exec.Command(bin)
	cmd.Env = env
	cmd.Dir = dir
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(grpcPort))
	if err := servertest.WaitTCP(addr, 30*time.Second); err != nil {
		b.Fatal(err)
	}
	return rlsv3.NewRateLimitServiceClient(grpcservertest.Dial(b, addr)), cmd.Process.Pid
}

// BenchmarkVersusReference runs meshguard (as deployed: its own process,
// the rate limit listener's stack) and envoyproxy/ratelimit (from
// MESHGUARD_BENCH_REFERENCE_BIN; skipped when unset) under the same load
// against one redis-server, interleaved A B A B over -rounds
// (MESHGUARD_BENCH_ROUNDS, default 5), and prints each one's median
// throughput and server CPU per decision and meshguard's ratios.
func BenchmarkVersusReference(b *testing.B) {
	bin := os.Getenv(referenceBinEnv)
	if bin == "" {
		b.Skip("set " + referenceBinEnv + " to an envoyproxy/ratelimit binary")
	}
	rounds, _ := strconv.Atoi(os.Getenv("MESHGUARD_BENCH_ROUNDS"))
	if rounds <= 0 {
		rounds = 5
	}
	for _, tc := range []struct {
		name    string
		twoDesc bool
	}{{"hot1k", false}, {"two_desc", true}} {
		b.Run(tc.name, func(b *testing.B) {
			srv := redistest.Start(b)
			reqs := benchRequests(tc.twoDesc)
			type target struct {
				name   string
				client rlsv3.RateLimitServiceClient
				pid    int
				perSec []float64
				cpu    []float64
			}
			mg := &target{name: "meshguard"}
			mg.client, mg.pid = startBenchServer(b, srv.URL(), "")
			ref := &target{name: "envoyproxy-ratelimit"}
			ref.client, ref.pid = startReference(b, bin, srv.Addr())
			for range rounds {
				for _, tg := range []*target{mg, ref} {
					var last benchResult
					b.Run(tg.name, func(b *testing.B) {
						last = runLoad(b, tg.client, reqs, tg.pid, srv.Pid(), rlsv3.RateLimitResponse_OK)
					})
					tg.perSec = append(tg.perSec, last.perSec)
					tg.cpu = append(tg.cpu, last.cpuPerOp)
				}
			}
			for _, tg := range []*target{mg, ref} {
				fmt.Printf("BenchmarkVersusReference/%s: %-22s median %6.0f decisions/s  %6.1f server-cpu-µs/op  over %d rounds\n",
					tc.name, tg.name, median(tg.perSec), median(tg.cpu), rounds)
			}
			fmt.Printf("BenchmarkVersusReference/%s: meshguard/reference throughput %.2fx, CPU per decision %.2fx\n",
				tc.name, median(mg.perSec)/median(ref.perSec), median(mg.cpu)/median(ref.cpu))
		})
	}
}
