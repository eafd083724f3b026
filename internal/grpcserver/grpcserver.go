// Package grpcserver holds the gRPC server settings meshguard serves with, in
// one place, so that cmd/meshguard and the ratelimitsvc and extauthz
// benchmarks run the same stack: message, stream and window limits,
// keepalive, the per-RPC tuning below, the metrics interceptors, and the
// Guard, which bounds every request before protobuf-go decodes it.
//
// Metrics (see NewMetrics):
//
//	meshguard_grpc_server_handled_total{method,code}   RPCs completed (requests a Guard refused too)
//	meshguard_grpc_server_handling_seconds{method}     time to handle an RPC or stream
//	meshguard_grpc_server_in_flight{method}            RPCs and streams being handled now
//	meshguard_grpc_server_rejected_requests_total{listener,method,reason}
//	                                                   requests a Guard refused before decoding them
//	meshguard_grpc_server_decoding_bytes{listener}     a Guard's decoding budget in use
//	meshguard_grpc_server_decode_waits_total{listener} requests that waited for it
package grpcserver

import (
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// Limits bounds what one client can make one listener hold. A connection
// buffers at most MaxConcurrentStreams × (InitialWindowSize +
// MaxRecvMsgSize) bytes of requests: grpc-go refuses a message over
// MaxRecvMsgSize from its 5-byte prefix, before reading it, and otherwise
// opens the stream's window for the whole message when the handler reads
// it. (The connection window does not bound this: grpc-go replenishes it as
// data arrives, so that a slow stream cannot stall the others.)
type Limits struct {
	// MaxRecvMsgSize is the largest request message in bytes.
	MaxRecvMsgSize int
	// MaxConcurrentStreams is the most RPCs one connection may have open.
	MaxConcurrentStreams uint32
	// MaxDecodedBytes bounds what the requests a Guard is decoding (and the
	// unary ones being handled) may take at once, estimated; beyond it they
	// wait. 0: DecodedRatio × MaxRecvMsgSize.
	MaxDecodedBytes int64
	// InitialWindowSize is each stream's flow-control window in bytes and
	// InitialConnWindowSize the connection's, fixed. 0 (both) lets grpc-go
	// grow them by its bandwidth-delay estimate, up to 16 MiB a stream.
	InitialWindowSize     int32
	InitialConnWindowSize int32
	// KeepaliveMinTime is the shortest client ping interval tolerated.
	KeepaliveMinTime time.Duration
	// MaxConnectionIdle closes connections idle this long; 0: never.
	MaxConnectionIdle time.Duration
	// ConnectionTimeout bounds the connection handshake.
	ConnectionTimeout time.Duration
}

// DefaultLimits are the limits of meshguard's gRPC listener (listen.grpc).
func DefaultLimits() Limits {
	return Limits{
		MaxRecvMsgSize:        2 << 20,
		MaxConcurrentStreams:  100,
		MaxDecodedBytes:       64 << 20,
		InitialWindowSize:     64 << 10,
		InitialConnWindowSize: 1 << 20,
		KeepaliveMinTime:      10 * time.Second,
		ConnectionTimeout:     10 * time.Second,
	}
}

// Options returns the server options meshguard serves with: cfg's limits,
// keepalive, the codec that lets a Guard see a request before it is
// decoded, and the per-RPC tuning. Add the metrics interceptors with
// Metrics.ServerOptions.
func Options(cfg Limits) []grpc.ServerOption {
	opts := []grpc.ServerOption{
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
		grpc.ForceServerCodecV2(codec{}),
	}
	if cfg.InitialWindowSize > 0 {
		opts = append(opts, grpc.StaticStreamWindowSize(cfg.InitialWindowSize))
	}
	if cfg.InitialConnWindowSize > 0 {
		opts = append(opts, grpc.StaticConnWindowSize(cfg.InitialConnWindowSize))
	}
	return opts
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
// Read/WriteBufferSize (within noise, ±10%, for messages of about 1 KiB).
// The windows are fixed since (DefaultLimits): grpc-go's BDP estimation
// made no difference to rate limit or Check throughput (0.90-0.98x, CPU
// 1.02-1.09x, within noise) and let one stream's window grow to 16 MiB.
const streamWorkers = 64

// New returns a gRPC server with meshguard's options (cfg's limits,
// keepalive, the per-RPC tuning) and m's interceptors. cmd/meshguard builds
// every listener's server with it, so that a method answers the same on
// either.
func New(cfg Limits, m *Metrics, extra ...grpc.ServerOption) *grpc.Server {
	opts := append(Options(cfg), m.ServerOptions()...)
	return grpc.NewServer(append(opts, extra...)...)
}
