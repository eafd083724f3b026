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
type Limits struct {
	// MaxRecvMsgSize is the largest request message in bytes.
	MaxRecvMsgSize int
	// MaxConcurrentStreams is the most RPCs one connection may have open.
	MaxConcurrentStreams uint32
	// KeepaliveMinTime is the shortest client ping interval tolerated.
	KeepaliveMinTime time.Duration
	// MaxConnectionIdle closes connections idle this long; 0: never.
	MaxConnectionIdle time.Duration
	// ConnectionTimeout bounds the connection handshake.
	ConnectionTimeout time.Duration
}

// DefaultLimits are cmd/meshguard's defaults.
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
	}
}
