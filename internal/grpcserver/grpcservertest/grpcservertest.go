// Package grpcservertest serves gRPC in tests: Serve runs a server on a
// free loopback port and dials it, and NewServer and Options let benchmarks
// run the production server stack (grpcserver.Options, the metrics
// interceptors and a Guard) with tuning overrides, so that candidate
// options can be compared side by side.
package grpcservertest

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshguard/meshguard/internal/grpcserver"
)

// VariantsEnv names the environment variable benchmarks read the variants
// to compare from: space-separated variant specs (see Options).
const VariantsEnv = "MESHGUARD_BENCH_GRPC_VARIANTS"

// Variants returns the variants in VariantsEnv, or nil.
func Variants(getenv func(string) string) []string {
	return strings.Fields(getenv(VariantsEnv))
}

// Executable splits "bin=PATH" off variant: the benchmark serves that
// variant from the test binary at PATH (built with other flags, e.g. -pgo)
// instead of from its own. bin is os.Args[0] when variant names none.
func Executable(variant string) (bin, rest string) {
	bin = os.Args[0]
	var kept []string
	for _, o := range strings.Split(variant, ",") {
		if p, ok := strings.CutPrefix(o, "bin="); ok {
			bin = p
			continue
		}
		kept = append(kept, o)
	}
	return bin, strings.Join(kept, ",")
}

// Options returns the production server options with metrics registered in
// reg, with the overrides in variant: "prod" (or "") for none, else a
// comma-separated list of
//
//	workers=N   NumStreamWorkers(N); 0 turns workers off; Nx means N×GOMAXPROCS
//	win=N       stream and connection windows of N bytes
//	swin=N      stream window of N bytes; 0: grpc-go's dynamic (BDP) windows
//	cwin=N      connection window of N bytes; 0: dynamic
//	rbuf=N      ReadBufferSize N bytes
//	wbuf=N      WriteBufferSize N bytes
//	procs=N     runtime.GOMAXPROCS(N) in the serving process
//	gogc=N      debug.SetGCPercent(N) in the serving process
//	guard=0     NewServer registers services without a Guard
//
// and "bin=PATH", which the benchmark strips with Executable first.
func Options(reg prometheus.Registerer, variant string) ([]grpc.ServerOption, error) {
	opts, _, _, err := options(reg, variant)
	return opts, err
}

// NewServer returns a server with Options(variant) and extra (e.g. a
// tracing stats handler) and a registrar that registers services on it
// through a Guard with bounds, as cmd/meshguard does (unless variant says
// guard=0).
func NewServer(variant string, bounds map[string]grpcserver.MethodBounds, extra ...grpc.ServerOption) (*grpc.Server, grpc.ServiceRegistrar, error) {
	opts, lim, guard, err := options(prometheus.NewRegistry(), variant)
	if err != nil {
		return nil, nil, err
	}
	gs := grpc.NewServer(append(opts, extra...)...)
	if !guard {
		return gs, gs, nil
	}
	return gs, grpcserver.NewGuard("bench", lim, grpcserver.NewMetrics(prometheus.NewRegistry()), bounds).Wrap(gs), nil
}

func options(reg prometheus.Registerer, variant string) (opts []grpc.ServerOption, lim grpcserver.Limits, guard bool, err error) {
	lim, guard = grpcserver.DefaultLimits(), true
	var extra []grpc.ServerOption
	if variant != "" && variant != "prod" {
		for _, o := range strings.Split(variant, ",") {
			k, v, _ := strings.Cut(o, "=")
			n, err := strconv.Atoi(strings.TrimSuffix(v, "x"))
			if err != nil {
				return nil, lim, false, fmt.Errorf("variant %q: %q: %w", variant, o, err)
			}
			switch k {
			case "workers":
				if strings.HasSuffix(v, "x") {
					n *= runtime.GOMAXPROCS(0)
				}
				extra = append(extra, grpc.NumStreamWorkers(uint32(n)))
			case "win":
				lim.InitialWindowSize, lim.InitialConnWindowSize = int32(n), int32(n)
			case "swin":
				lim.InitialWindowSize = int32(n)
			case "cwin":
				lim.InitialConnWindowSize = int32(n)
			case "rbuf":
				extra = append(extra, grpc.ReadBufferSize(n))
			case "wbuf":
				extra = append(extra, grpc.WriteBufferSize(n))
			case "procs":
				runtime.GOMAXPROCS(n)
			case "gogc":
				debug.SetGCPercent(n)
			case "guard":
				guard = n != 0
			default:
				return nil, lim, false, fmt.Errorf("variant %q: unknown option %q", variant, o)
			}
		}
	}
	opts = append(grpcserver.Options(lim), grpcserver.NewMetrics(reg).ServerOptions()...)
	return append(opts, extra...), lim, guard, nil
}

// Serve serves gs on a free 127.0.0.1 port until the test ends and returns
// a client connection to it (plaintext, as Envoy's clusters dial meshguard
// in the tests).
func Serve(tb testing.TB, gs *grpc.Server) *grpc.ClientConn {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		gs.Serve(lis)
	}()
	tb.Cleanup(func() {
		gs.Stop()
		<-served
	})
	return Dial(tb, lis.Addr().String())
}

// Dial returns a plaintext client connection to addr, closed when the test
// ends.
func Dial(tb testing.TB, addr string) *grpc.ClientConn {
	tb.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cc.Close() })
	return cc
}
