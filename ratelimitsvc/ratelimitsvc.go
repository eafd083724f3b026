// Package ratelimitsvc serves Envoy's Rate Limit Service
// (envoy.service.ratelimit.v3.RateLimitService).
package ratelimitsvc

import (
	"context"
	"log/slog"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
)

// Server answers ShouldRateLimit. It is safe for concurrent use.
type Server struct {
	rlsv3.UnimplementedRateLimitServiceServer
	log *slog.Logger
	cfg Config
}

// New returns a Server.
func New(log *slog.Logger, reg prometheus.Registerer, cfg Config) (*Server, error) {
	return &Server{log: log, cfg: cfg}, nil
}

// Register registers the RateLimitService on s.
func (s *Server) Register(r grpc.ServiceRegistrar) { rlsv3.RegisterRateLimitServiceServer(r, s) }

// ShouldRateLimit answers OK: no limits are configured yet.
func (s *Server) ShouldRateLimit(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	return &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_OK}, nil
}
