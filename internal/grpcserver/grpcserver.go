// Package grpcserver holds the gRPC server settings meshguard serves with, in
// one place, so that cmd/meshguard and the ratelimitsvc and extauthz
// benchmarks run the same stack: message and stream limits, keepalive, the
// per-RPC tuning below, and the metrics interceptors.
//
// Metrics (see NewMetrics):
//
//	meshguard_grpc_server_handled_total{method,code}   RPCs completed
//	meshguard_grpc_server_handling_seconds{method}     time to handle an RPC or stream
//	meshguard_grpc_server_in_flight{method}            RPCs and streams being handled now
package grpcserver

import (
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// Limits bounds what one client can make the server hold. The fields mirror
// cmd/meshguard's GRPCConfig (YAML section grpc).
// It is the `grpc:` section of meshguard's config.
type Limits struct {
	// MaxRecvMsgSize is the largest request message in bytes.
	MaxRecvMsgSize int `yaml:"max_recv_msg_size"`
	// MaxConcurrentStreams is the most RPCs one connection may have open.
	MaxConcurrentStreams uint32 `yaml:"max_concurrent_streams"`
	// KeepaliveMinTime is the shortest client ping interval tolerated.
	KeepaliveMinTime time.Duration `yaml:"keepalive_min_time"`
	// MaxConnectionIdle closes connections idle this long; 0: never.
	MaxConnectionIdle time.Duration `yaml:"max_connection_idle"`
	// ConnectionTimeout bounds the connection handshake.
	ConnectionTimeout time.Duration `yaml:"connection_timeout"`
}

// DefaultLimits are the defaults of the grpc section.
func DefaultLimits() Limits {
	return Limits{
		MaxRecvMsgSize:       4 << 20,
		MaxConcurrentStreams: 1024,
		KeepaliveMinTime:     10 * time.Second,
		ConnectionTimeout:    10 * time.Second,
	}
}

// Options returns the server options meshguard serves with: cfg's limits,
// keepalive, and the per-RPC tuning. Add the metrics interceptors with
// Metrics.ServerOptions.
func Options(cfg Limits) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(cfg.MaxRecvMsgSize),
		grpc.MaxConcurrentStreams(cfg.MaxConcurrentStreams),
		grpc.ConnectionTimeout(cfg.ConnectionTimeout),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             cfg.KeepaliveMinTime,
			PermitWithoutStream: true,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: cfg.MaxConnectionIdle,
			Time:              2 * time.Minute,
			Timeout:           20 * time.Second,
		}),
		grpc.NumStreamWorkers(streamWorkers),
	}
}

// streamWorkers is how many long-lived goroutines handle RPCs. Without
// workers gRPC starts a goroutine per RPC, whose stack then grows through
// the interceptors, the handler and the codec on every call
// (runtime.newstack/copystack). A worker keeps its grown stack; when all are
// busy an RPC gets its own goroutine as before. 64 covers the RPCs that are
// waiting on Redis at once under 50 concurrent streams; idle workers cost
// only their stacks.
//
// Measured on 2 shared cores, A/B interleaved in one run, each variant in its
// own server process (BenchmarkShouldRateLimitVariants and
// BenchmarkCheckVariants with MESHGUARD_BENCH_GRPC_VARIANTS), medians of 5
// rounds against no workers:
//   - ratelimitsvc hot1k: 1.12x decisions/s, 0.85x server CPU per decision;
//     two_desc: 1.17x, 0.90x. In the server's CPU profile newstack under
//     handleStream fell from 8.8% to 1.2% of samples.
//   - extauthz Check: 1.07x ops/s, 0.84x server CPU per Check.
//
// A second run (workers=0 vs these options) gave 0.85x and 0.87x server CPU
// per decision (hot1k, two_desc) and 0.82x per Check; throughput moved
// within the noise of the shared machine (0.96x-1.07x).
//
// GOMAXPROCS workers (gRPC's suggestion) helped extauthz alike but not
// ratelimitsvc, whose handlers block on Redis. Also tried and left out:
// SharedWriteBuffer(true) (0.85x Check throughput, 1.25x CPU: it saves idle
// memory, not CPU), 1 MiB InitialWindowSize/InitialConnWindowSize and 64 KiB
// Read/WriteBufferSize (within noise, ±10%, for messages of about 1 KiB; the
// defaults keep BDP window estimation).
const streamWorkers = 64

// New returns a gRPC server with meshguard's options (cfg's limits,
// keepalive, the per-RPC tuning) and m's interceptors. cmd/meshguard builds
// every listener's server with it, so that a method answers the same on
// either.
func New(cfg Limits, m *Metrics, extra ...grpc.ServerOption) *grpc.Server {
	opts := append(Options(cfg), m.ServerOptions()...)
	return grpc.NewServer(append(opts, extra...)...)
}
