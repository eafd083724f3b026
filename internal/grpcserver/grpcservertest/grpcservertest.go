// Package grpcservertest serves gRPC in tests: Serve runs a server on a
// free loopback port and dials it, and Options lets benchmarks run the
// production server stack (grpcserver.Options and the metrics
// interceptors) with tuning overrides, so that candidate options can be
// compared side by side.
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
// reg, followed by the overrides in variant: "prod" (or "") for none, else a
// comma-separated list of
//
//	workers=N   NumStreamWorkers(N); 0 turns workers off; Nx means N×GOMAXPROCS
//	win=N       InitialWindowSize and InitialConnWindowSize N bytes
//	rbuf=N      ReadBufferSize N bytes
//	wbuf=N      WriteBufferSize N bytes
//	procs=N     runtime.GOMAXPROCS(N) in the serving process
//	gogc=N      debug.SetGCPercent(N) in the serving process
//
// and "bin=PATH", which the benchmark strips with Executable first.
func Options(reg prometheus.Registerer, variant string) ([]grpc.ServerOption, error) {
	opts := append(grpcserver.Options(grpcserver.DefaultLimits()), grpcserver.NewMetrics(reg).ServerOptions()...)
	if variant == "" || variant == "prod" {
		return opts, nil
	}
	for _, o := range strings.Split(variant, ",") {
		k, v, _ := strings.Cut(o, "=")
		n, err := strconv.Atoi(strings.TrimSuffix(v, "x"))
		if err != nil {
			return nil, fmt.Errorf("variant %q: %q: %w", variant, o, err)
		}
		switch k {
		case "workers":
			if strings.HasSuffix(v, "x") {
				n *= runtime.GOMAXPROCS(0)
			}
			opts = append(opts, grpc.NumStreamWorkers(uint32(n)))
		case "win":
			opts = append(opts, grpc.InitialWindowSize(int32(n)), grpc.InitialConnWindowSize(int32(n)))
		case "rbuf":
			opts = append(opts, grpc.ReadBufferSize(n))
		case "wbuf":
			opts = append(opts, grpc.WriteBufferSize(n))
		case "procs":
			runtime.GOMAXPROCS(n)
		case "gogc":
			debug.SetGCPercent(n)
		default:
			return nil, fmt.Errorf("variant %q: unknown option %q", variant, o)
		}
	}
	return opts, nil
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
