package grpcserver

import (
	"context"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Metrics counts RPCs per method and status code. Method names come from
// registered services only (gRPC rejects unknown methods before interceptors
// run), so the label set is bounded.
//
// The hot path does not allocate: each method's gauge, observer and
// per-code counters are looked up once and kept in a copy-on-write map.
type Metrics struct {
	handled  *prometheus.CounterVec
	duration *prometheus.HistogramVec
	inflight *prometheus.GaugeVec
	rejected *prometheus.CounterVec
	// A Guard's decoding budget: bytes held, and requests that waited.
	decoding    *prometheus.GaugeVec
	decodeWaits *prometheus.CounterVec

	methods atomic.Pointer[map[string]*methodMetrics]
	mu      sync.Mutex // serialises additions to methods
}

// numCodes covers the canonical codes OK..Unauthenticated; any other code
// takes the slower labelled path.
const numCodes = int(codes.Unauthenticated) + 1

type methodMetrics struct {
	name     string
	inflight prometheus.Gauge
	duration prometheus.Observer
	handled  [numCodes]atomic.Pointer[prometheus.Counter] // created on first use
}

// NewMetrics registers the gRPC server metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
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
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_grpc_server_rejected_requests_total",
			Help: "Request messages refused before they were decoded, by listener, full method and reason (too_large, decoded_too_large, too_many, too_deep, malformed).",
		}, []string{"listener", "method", "reason"}),
		decoding: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshguard_grpc_server_decoding_bytes",
			Help: "Estimated bytes of the requests being decoded or handled now, of the listener's max_decoded_bytes.",
		}, []string{"listener"}),
		decodeWaits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_grpc_server_decode_waits_total",
			Help: "Requests that waited for the listener's decoding budget.",
		}, []string{"listener"}),
	}
	empty := map[string]*methodMetrics{}
	m.methods.Store(&empty)
	reg.MustRegister(m.handled, m.duration, m.inflight, m.rejected, m.decoding, m.decodeWaits)
	return m
}

// ServerOptions returns the options that install the interceptors.
func (m *Metrics) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(m.Unary),
		grpc.ChainStreamInterceptor(m.Stream),
	}
}

func (m *Metrics) method(name string) *methodMetrics {
	if mm := (*m.methods.Load())[name]; mm != nil {
		return mm
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	old := *m.methods.Load()
	if mm := old[name]; mm != nil {
		return mm
	}
	mm := &methodMetrics{
		name:     name,
		inflight: m.inflight.WithLabelValues(name),
		duration: m.duration.WithLabelValues(name),
	}
	next := maps.Clone(old)
	next[name] = mm
	m.methods.Store(&next)
	return mm
}

func (m *Metrics) done(mm *methodMetrics, start time.Time, err error) {
	mm.inflight.Dec()
	mm.duration.Observe(time.Since(start).Seconds())
	m.count(mm, status.Code(err))
}

// count adds one RPC completed with code.
func (m *Metrics) count(mm *methodMetrics, code codes.Code) {
	if int(code) >= numCodes {
		m.handled.WithLabelValues(mm.name, code.String()).Inc()
		return
	}
	p := mm.handled[code].Load()
	if p == nil {
		c := m.handled.WithLabelValues(mm.name, code.String())
		mm.handled[code].CompareAndSwap(nil, &c)
		p = mm.handled[code].Load()
	}
	(*p).Inc()
}

// Unary is the unary server interceptor.
func (m *Metrics) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	mm := m.method(info.FullMethod)
	start := time.Now()
	mm.inflight.Inc()
	resp, err := h(ctx, req)
	m.done(mm, start, err)
	return resp, err
}

// Stream is the stream server interceptor.
func (m *Metrics) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	mm := m.method(info.FullMethod)
	start := time.Now()
	mm.inflight.Inc()
	err := h(srv, ss)
	m.done(mm, start, err)
	return err
}
