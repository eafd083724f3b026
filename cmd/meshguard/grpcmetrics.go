package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// grpcMetrics counts RPCs per method and status code. Method names come from
// registered services only (unknown methods are rejected before interceptors
// run), so the label set is bounded.
type grpcMetrics struct {
	handled  *prometheus.CounterVec
	duration *prometheus.HistogramVec
	inflight *prometheus.GaugeVec
}

func newGRPCMetrics(reg prometheus.Registerer) *grpcMetrics {
	m := &grpcMetrics{
		handled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_grpc_server_handled_total",
			Help: "RPCs completed, by full method and gRPC status code.",
		}, []string{"method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshguard_grpc_server_handling_seconds",
			Help:    "Time to handle an RPC (a whole stream for streaming methods), by full method.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 5, 30, 300},
		}, []string{"method"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshguard_grpc_server_in_flight",
			Help: "RPCs and streams being handled now, by full method.",
		}, []string{"method"}),
	}
	reg.MustRegister(m.handled, m.duration, m.inflight)
	return m
}

func (m *grpcMetrics) observe(method string, start time.Time, err error) {
	m.handled.WithLabelValues(method, status.Code(err).String()).Inc()
	m.duration.WithLabelValues(method).Observe(time.Since(start).Seconds())
}

func (m *grpcMetrics) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	g := m.inflight.WithLabelValues(info.FullMethod)
	g.Inc()
	resp, err := h(ctx, req)
	g.Dec()
	m.observe(info.FullMethod, start, err)
	return resp, err
}

func (m *grpcMetrics) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	start := time.Now()
	g := m.inflight.WithLabelValues(info.FullMethod)
	g.Inc()
	err := h(srv, ss)
	g.Dec()
	m.observe(info.FullMethod, start, err)
	return err
}
