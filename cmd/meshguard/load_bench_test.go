package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rlcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
	"github.com/meshguard/meshguard/internal/redistest"
)

// Good load: what Envoy sends for loadClients distinct clients, at the rate
// the machine allows (closed loop), each call with Envoy's deadline.
const (
	loadClients       = 10_000
	loadCheckWorkers  = 24
	loadRLSWorkers    = 24
	loadConns         = 4                      // per listener, as a few Envoy workers would hold
	checkDeadline     = 250 * time.Millisecond // envoy.yaml's ext_authz timeout
	rateLimitDeadline = 100 * time.Millisecond // envoy.yaml's rate limit timeout
)

// goodLoad is the well-behaved clients: ext_authz checks on listen.grpc and
// rate limit calls on listen.ratelimit, for loadClients addresses.
type goodLoad struct {
	checks []*authv3.CheckRequest
	rls    []*rlsv3.RateLimitRequest
	authz  []authv3.AuthorizationClient
	rl     []rlsv3.RateLimitServiceClient
}

func newGoodLoad(b *testing.B, grpcAddr, rlAddr string) *goodLoad {
	g := &goodLoad{}
	for i := range loadClients {
		ip := fmt.Sprintf("10.%d.%d.%d", i>>16, i>>8&0xff, i&0xff)
		g.checks = append(g.checks, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
				SocketAddress: &corev3.SocketAddress{Address: "10.200.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 40000}}}}},
			Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
				Id: strconv.Itoa(i), Method: "GET", Scheme: "https", Host: "app.example.com", Path: "/api/items?page=" + strconv.Itoa(i%7),
				Headers: map[string]string{
					":authority": "app.example.com", ":method": "GET", ":path": "/api/items", ":scheme": "https",
					"accept": "application/json", "user-agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0",
					"x-request-id": strconv.Itoa(i), "x-meshguard-client-ip": ip,
				},
			}},
		}})
		g.rls = append(g.rls, &rlsv3.RateLimitRequest{Domain: "api", Descriptors: []*rlcommon.RateLimitDescriptor{{
			Entries: []*rlcommon.RateLimitDescriptor_Entry{{Key: "preset", Value: "relaxed"}, {Key: "client", Value: "ip:" + ip}}}}})
	}
	for range loadConns {
		g.authz = append(g.authz, authv3.NewAuthorizationClient(grpcservertest.Dial(b, grpcAddr)))
		g.rl = append(g.rl, rlsv3.NewRateLimitServiceClient(grpcservertest.Dial(b, rlAddr)))
	}
	return g
}

// calls is what one kind of good call saw in a round.
type calls struct {
	lat    []time.Duration
	errors map[codes.Code]int
}

func (c *calls) add(o calls) {
	c.lat = append(c.lat, o.lat...)
	if c.errors == nil {
		c.errors = map[codes.Code]int{}
	}
	for k, v := range o.errors {
		c.errors[k] += v
	}
}

func (c calls) errorCount() int {
	n := 0
	for _, v := range c.errors {
		n += v
	}
	return n
}

// quantile of sorted latencies, in milliseconds.
func quantile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return float64(sorted[min(len(sorted)-1, int(q*float64(len(sorted))))]) / 1e6
}

// round is one measured interval of the good load.
type round struct {
	check, rls calls
	took       time.Duration
	peakRSS    int64
	steal      float64 // share of the machine's CPU time stolen
	serverCPU  time.Duration
}

// runRound runs the good load for d, with hostile (if any) attacking in the
// benchmark's goroutine meanwhile (it returns at the deadline it is given),
// and returns what the good clients saw and the server's peak RSS.
func (g *goodLoad) runRound(b *testing.B, pid int, d time.Duration, hostile func(deadline time.Time)) round {
	resetPeakRSS(b, pid)
	stealBefore, totalBefore := machineSteal()
	cpuBefore := processCPU(b, pid)
	start := time.Now()
	deadline := start.Add(d)
	var mu sync.Mutex
	var r round
	var wg sync.WaitGroup
	worker := func(w int, call func(i int) error, into *calls) {
		wg.Go(func() {
			local := calls{errors: map[codes.Code]int{}}
			for i := w; time.Now().Before(deadline); i += loadCheckWorkers + loadRLSWorkers {
				t0 := time.Now()
				err := call(i % loadClients)
				local.lat = append(local.lat, time.Since(t0))
				if err != nil {
					local.errors[status.Code(err)]++
				}
			}
			mu.Lock()
			into.add(local)
			mu.Unlock()
		})
	}
	for w := range loadCheckWorkers {
		worker(w, func(i int) error {
			ctx, cancel := context.WithTimeout(context.Background(), checkDeadline)
			defer cancel()
			resp, err := g.authz[i%loadConns].Check(ctx, g.checks[i])
			if err == nil && resp.GetStatus().GetCode() != int32(codes.OK) {
				err = status.Errorf(codes.PermissionDenied, "denied: %v", resp.GetStatus())
			}
			return err
		}, &r.check)
	}
	for w := range loadRLSWorkers {
		worker(loadCheckWorkers+w, func(i int) error {
			ctx, cancel := context.WithTimeout(context.Background(), rateLimitDeadline)
			defer cancel()
			resp, err := g.rl[i%loadConns].ShouldRateLimit(ctx, g.rls[i])
			if err == nil && resp.GetOverallCode() != rlsv3.RateLimitResponse_OK {
				err = status.Errorf(codes.ResourceExhausted, "over limit")
			}
			return err
		}, &r.rls)
	}
	if hostile != nil {
		hostile(deadline)
	}
	wg.Wait()
	r.took = time.Since(start)
	r.serverCPU = processCPU(b, pid) - cpuBefore
	r.peakRSS = procMem(b, pid, "VmHWM")
	if steal, total := machineSteal(); total > totalBefore {
		r.steal = float64(steal-stealBefore) / float64(total-totalBefore)
	}
	return r
}

// machineSteal reads the machine's stolen and total CPU time (/proc/stat).
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

// processCPU is the user and system CPU time pid has used
// (/proc/pid/stat; the kernel counts in 100ths of a second).
func processCPU(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		b.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(data), ") ") // the command may hold spaces
	f := strings.Fields(rest)
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// loadAverage is the first field of /proc/loadavg.
func loadAverage() string {
	data, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

// hostilePattern attacks until deadline.
type hostilePattern struct {
	name string
	run  func(t testing.TB, deadline time.Time)
}

// hostilePatterns are TestHTTP2Abuse's attacks on listen.grpc (which serves
// ext_authz, fail-closed), each repeated on a new connection until the
// deadline, and TestHostileRequests' requests, 16 at a time over 8
// connections.
func hostilePatterns(grpcAddr, rlAddr string) []hostilePattern {
	var out []hostilePattern
	for _, a := range abuses {
		out = append(out, hostilePattern{"h2_" + a.name, func(t testing.TB, deadline time.Time) {
			for time.Now().Before(deadline) {
				rc := dialRaw(t, grpcAddr)
				a.run(t, rc)
				rc.nc.Close()
			}
		}})
	}
	for _, h := range []struct {
		name, addr, request string
		size                int
	}{
		{"huge_ratelimit_4MiB", rlAddr, "ratelimit_descriptors", 4<<20 - 64},
		{"huge_check_4MiB", grpcAddr, "authz_headers", 4<<20 - 64},
		{"accesslog_entries_2MiB", grpcAddr, "accesslog_entries", 2<<20 - 64},
		{"check_headers_128KiB", grpcAddr, "authz_headers", 128 << 10}, // 14k headers: refused by the cap
		{"check_headers_492", grpcAddr, "authz_headers", 3400},         // within the cap: decoded and answered
	} {
		req := hostileRequests[h.request]
		msg := req.build(h.size)
		out = append(out, hostilePattern{h.name, func(t testing.TB, deadline time.Time) {
			conns := dialHostile(t, h.addr)
			for time.Now().Before(deadline) {
				sendHostileRequests(t, conns, req.method, req.stream, msg)
			}
			for _, cc := range conns {
				cc.Close()
			}
		}})
	}
	return out
}

// hostileEnv carries TestHostileProcess its orders.
const hostileEnv = "MESHGUARD_LOAD_HOSTILE"

// runHostileProcess runs pattern in a process of its own (this test binary,
// TestHostileProcess) until deadline: the attacker must not share the good
// clients' Go scheduler, or its busy loops would slow them down in the
// load generator rather than in meshguard.
func runHostileProcess(b *testing.B, pattern, grpcAddr, rlAddr string, deadline time.Time) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestHostileProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %s %s %d", hostileEnv, pattern, grpcAddr, rlAddr, deadline.UnixNano()))
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("hostile client %s: %v\n%s", pattern, err, out)
	}
}

// TestHostileProcess is BenchmarkHostileLoad's hostile client, in a process
// of its own; it runs only when the benchmark starts it.
func TestHostileProcess(t *testing.T) {
	f := strings.Fields(os.Getenv(hostileEnv))
	if len(f) != 4 {
		t.Skip("run by BenchmarkHostileLoad")
	}
	ns, err := strconv.ParseInt(f[3], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range hostilePatterns(f[1], f[2]) {
		if p.name == f[0] {
			p.run(t, time.Unix(0, ns))
			return
		}
	}
	t.Fatalf("no hostile pattern %q", f[0])
}

// BenchmarkHostileLoad runs a real `meshguard serve` with Redis and 10,000
// distinct good clients calling ext_authz Check on listen.grpc and
// ShouldRateLimit on listen.ratelimit as fast as the machine allows, each
// call with Envoy's deadline, while one hostile client runs one pattern;
// the hostile client runs in a process of its own (TestHostileProcess);
// every pattern's rounds alternate with rounds of the same load without it
// (MESHGUARD_LOAD_ROUNDS pairs of MESHGUARD_LOAD_SECONDS each, default 2 of
// 3 s). It reports the good clients' p50/p99 and errors and the server's
// peak RSS, with and without the hostile client, and the machine's load.
func BenchmarkHostileLoad(b *testing.B) {
	rounds, _ := strconv.Atoi(os.Getenv("MESHGUARD_LOAD_ROUNDS"))
	if rounds <= 0 {
		rounds = 2
	}
	secs, _ := strconv.ParseFloat(os.Getenv("MESHGUARD_LOAD_SECONDS"), 64)
	if secs <= 0 {
		secs = 3
	}
	d := time.Duration(secs * float64(time.Second))
	rds := redistest.Start(b)
	pid, line, _ := startBinary(b, testConfig(b, ""), "REDIS_URL="+rds.URL())
	grpcAddr, rlAddr := line["grpc_addr"].(string), line["ratelimit_addr"].(string)
	good := newGoodLoad(b, grpcAddr, rlAddr)
	good.runRound(b, pid, time.Second, nil) // warm-up: connections, scripts, heap

	patterns := hostilePatterns(grpcAddr, rlAddr)
	if only := strings.Fields(os.Getenv("MESHGUARD_LOAD_PATTERNS")); len(only) > 0 {
		patterns = slices.DeleteFunc(patterns, func(p hostilePattern) bool {
			return !slices.ContainsFunc(only, func(o string) bool { return strings.Contains(p.name, o) })
		})
	}
	for _, p := range patterns {
		b.Run(p.name, func(b *testing.B) {
			load := loadAverage()
			var base, hostile round
			var baseRSS, hostileRSS int64
			var baseSteal, hostileSteal float64
			for range rounds {
				rb := good.runRound(b, pid, d, nil)
				rh := good.runRound(b, pid, d, func(deadline time.Time) { runHostileProcess(b, p.name, grpcAddr, rlAddr, deadline) })
				base.check.add(rb.check)
				base.rls.add(rb.rls)
				base.took += rb.took
				base.serverCPU += rb.serverCPU
				hostile.check.add(rh.check)
				hostile.rls.add(rh.rls)
				hostile.took += rh.took
				hostile.serverCPU += rh.serverCPU
				baseRSS, hostileRSS = max(baseRSS, rb.peakRSS), max(hostileRSS, rh.peakRSS)
				baseSteal, hostileSteal = max(baseSteal, rb.steal), max(hostileSteal, rh.steal)
			}
			for _, r := range []*round{&base, &hostile} {
				slices.Sort(r.check.lat)
				slices.Sort(r.rls.lat)
			}
			report := func(unit string, v float64) { b.ReportMetric(v, unit) }
			report("check-p50-ms", quantile(hostile.check.lat, 0.5))
			report("check-p99-ms", quantile(hostile.check.lat, 0.99))
			report("rls-p50-ms", quantile(hostile.rls.lat, 0.5))
			report("rls-p99-ms", quantile(hostile.rls.lat, 0.99))
			report("errors", float64(hostile.check.errorCount()+hostile.rls.errorCount()))
			report("peak-rss-MiB", float64(hostileRSS>>20))
			report("base-check-p99-ms", quantile(base.check.lat, 0.99))
			report("base-rls-p99-ms", quantile(base.rls.lat, 0.99))
			report("base-errors", float64(base.check.errorCount()+base.rls.errorCount()))
			report("base-peak-rss-MiB", float64(baseRSS>>20))
			cores := func(r round) float64 { return r.serverCPU.Seconds() / r.took.Seconds() }
			report("server-cores", cores(hostile))
			report("base-server-cores", cores(base))
			b.ReportMetric(0, "ns/op")
			perSec := func(r round, c calls) float64 { return float64(len(c.lat)) / r.took.Seconds() }
			fmt.Printf("BenchmarkHostileLoad: %-30s | Check %6.0f/s p50 %5.2f p99 %6.2f ms err %-5d | RLS %6.0f/s p50 %5.2f p99 %6.2f ms err %-5d | RSS %4d MiB | "+
				"server %.2f cores | without: Check %6.0f/s p50 %5.2f p99 %6.2f ms err %-5d | RLS %6.0f/s p50 %5.2f p99 %6.2f ms err %-5d | RSS %4d MiB | server %.2f cores | load %s steal %.0f%%/%.0f%%\n",
				p.name,
				perSec(hostile, hostile.check), quantile(hostile.check.lat, 0.5), quantile(hostile.check.lat, 0.99), hostile.check.errorCount(),
				perSec(hostile, hostile.rls), quantile(hostile.rls.lat, 0.5), quantile(hostile.rls.lat, 0.99), hostile.rls.errorCount(), hostileRSS>>20, cores(hostile),
				perSec(base, base.check), quantile(base.check.lat, 0.5), quantile(base.check.lat, 0.99), base.check.errorCount(),
				perSec(base, base.rls), quantile(base.rls.lat, 0.5), quantile(base.rls.lat, 0.99), base.rls.errorCount(), baseRSS>>20, cores(base),
				load, 100*hostileSteal, 100*baseSteal)
			if n := hostile.check.errorCount() + hostile.rls.errorCount(); n > 0 {
				fmt.Printf("BenchmarkHostileLoad: %-30s   errors with the hostile client: Check %v, RLS %v; without: Check %v, RLS %v\n",
					p.name, hostile.check.errors, hostile.rls.errors, base.check.errors, base.rls.errors)
			}
		})
	}
}
