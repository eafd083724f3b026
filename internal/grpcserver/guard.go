package grpcserver

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	encproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// MethodBounds bounds one method's request messages.
type MethodBounds struct {
	// MaxBytes is the largest encoded request; 0 or more than the
	// listener's MaxRecvMsgSize: that. Over it: ResourceExhausted.
	MaxBytes int
	// Caps bounds repeated (and map) fields, keyed by the field's full
	// name (e.g. envoy.service.ratelimit.v3.RateLimitRequest.descriptors):
	// at most that many in each message that holds the field. Over it:
	// InvalidArgument, naming the field.
	Caps map[protoreflect.FullName]int
}

// DecodedRatio bounds what a request may cost once decoded: at most this
// many times its method's MaxBytes (estimated by the scan, before decoding;
// over it: ResourceExhausted). Envoy's requests take 5-7 times their
// encoded size once decoded, which the scan estimates at 7-10 times; one
// made of tiny repeated elements takes 20-60 times.
const DecodedRatio = 16

// Guard bounds every request of the services registered through it (see
// Wrap) before protobuf-go decodes it: the method's size limit, then a scan
// of the encoded bytes for the decoded size, the services' caps on
// repeated fields and the nesting depth. A refused request is answered
// with ResourceExhausted or InvalidArgument and a message naming the limit,
// and counted by listener, method and reason.
//
// What the requests being decoded at once may take is bounded for the
// whole listener too (Limits.MaxDecodedBytes, estimated, with the encoded
// bytes): a request waits, within its deadline, until that is free. A
// unary request holds its share until its handler returns; a streamed
// message only while it is decoded, so that a stream whose handler waits
// (the audit sink's backpressure) holds nothing from ext_authz.
//
// Safe for concurrent use.
type Guard struct {
	listener   string
	maxBytes   int
	budget     int64 // the listener's MaxDecodedBytes
	sem        *semaphore.Weighted
	m          *Metrics
	bounds     map[string]MethodBounds
	shapes     *shapes
	waits      prometheus.Counter
	decodedNow prometheus.Gauge
}

// NewGuard returns the Guard of the listener called listener (a metric
// label) served with lim, with per-method bounds keyed by full method name
// (/package.Service/Method).
func NewGuard(listener string, lim Limits, m *Metrics, bounds map[string]MethodBounds) *Guard {
	caps := map[protoreflect.FullName]int{}
	for _, b := range bounds {
		for f, n := range b.Caps {
			caps[f] = n
		}
	}
	budget := lim.MaxDecodedBytes
	if budget <= 0 {
		budget = int64(lim.MaxRecvMsgSize) * DecodedRatio
	}
	return &Guard{listener: listener, maxBytes: lim.MaxRecvMsgSize, budget: budget, sem: semaphore.NewWeighted(budget),
		m: m, bounds: bounds, shapes: newShapes(caps),
		waits: m.decodeWaits.WithLabelValues(listener), decodedNow: m.decoding.WithLabelValues(listener)}
}

// Wrap returns a Registrar that registers services on r with every
// method's requests bounded by g.
func (g *Guard) Wrap(r grpc.ServiceRegistrar) Registrar {
	return Registrar{g: g, r: r}
}

// Registrar registers services with their requests bounded by a Guard. It
// also provides the underlying server's GetServiceInfo, for server
// reflection.
type Registrar struct {
	g *Guard
	r grpc.ServiceRegistrar
}

// RegisterService registers desc's service with each method's handler
// decoding through the Guard.
func (gr Registrar) RegisterService(desc *grpc.ServiceDesc, impl any) {
	d := *desc
	d.Methods = make([]grpc.MethodDesc, len(desc.Methods))
	for i, md := range desc.Methods {
		m := gr.g.method("/" + desc.ServiceName + "/" + md.MethodName)
		d.Methods[i] = grpc.MethodDesc{MethodName: md.MethodName, Handler: m.unary(md.Handler)}
	}
	d.Streams = make([]grpc.StreamDesc, len(desc.Streams))
	for i, sd := range desc.Streams {
		m := gr.g.method("/" + desc.ServiceName + "/" + sd.StreamName)
		d.Streams[i] = sd
		d.Streams[i].Handler = m.stream(sd.Handler)
	}
	gr.r.RegisterService(&d, impl)
}

// GetServiceInfo returns the underlying server's services.
func (gr Registrar) GetServiceInfo() map[string]grpc.ServiceInfo {
	if p, ok := gr.r.(interface {
		GetServiceInfo() map[string]grpc.ServiceInfo
	}); ok {
		return p.GetServiceInfo()
	}
	return nil
}

// Reasons a request is refused, the values of the metric's reason label.
var reasons = [...]string{"too_large", "decoded_too_large", "too_many", "too_deep", "malformed"}

// method is one method's bounds and counters.
type method struct {
	g        *Guard
	name     string
	maxBytes int
	budget   int64
	shape    atomic.Pointer[shape] // the request type's, from the first request
	mm       *methodMetrics
	rejected [len(reasons)]prometheus.Counter
}

func (g *Guard) method(name string) *method {
	b := g.bounds[name]
	m := &method{g: g, name: name, maxBytes: g.maxBytes, mm: g.m.method(name)}
	if b.MaxBytes > 0 && b.MaxBytes < m.maxBytes {
		m.maxBytes = b.MaxBytes
	}
	m.budget = min(int64(m.maxBytes)*DecodedRatio, g.budget)
	for i, r := range reasons {
		m.rejected[i] = g.m.rejected.WithLabelValues(g.listener, name, r)
	}
	return m
}

func (m *method) reject(reason string) {
	for i, r := range reasons {
		if r == reason {
			m.rejected[i].Inc()
		}
	}
}

// rawMessage takes a request's bytes from codec undecoded; chunks is
// scratch space to scan them in.
type rawMessage struct {
	data   mem.BufferSlice
	chunks [][]byte
}

// codec is gRPC's protobuf codec, except that it hands a rawMessage the
// request's bytes (with a reference of its own) for a Guard to check
// before it decodes them.
type codec struct{}

var protoCodec = encoding.GetCodecV2(encproto.Name)

func (codec) Marshal(v any) (mem.BufferSlice, error) { return protoCodec.Marshal(v) }

func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	if r, ok := v.(*rawMessage); ok {
		data.Ref()
		r.data = data
		return nil
	}
	return protoCodec.Unmarshal(data, v)
}

func (codec) Name() string { return encproto.Name }

// decode receives one request with recv (grpc-go's, which holds the
// listener's MaxRecvMsgSize), bounds it, takes its share of the listener's
// decoding budget and decodes it into v. It returns the share, for the
// caller to release.
func (m *method) decode(ctx context.Context, recv func(any) error, raw *rawMessage, v any) (int64, error) {
	if err := recv(raw); err != nil {
		if status.Code(err) == codes.ResourceExhausted {
			m.reject("too_large")
		}
		return 0, err
	}
	data := raw.data
	raw.data = nil
	n := data.Len()
	if n > m.maxBytes {
		data.Free()
		m.reject("too_large")
		return 0, status.Errorf(codes.ResourceExhausted, "request of %d bytes; the limit of %s is %d", n, m.name, m.maxBytes)
	}
	defer data.Free()
	msg, ok := v.(proto.Message)
	if !ok {
		return 0, status.Errorf(codes.Internal, "grpcserver: %T is not a protobuf message", v)
	}
	sh := m.shape.Load()
	if sh == nil {
		sh = m.g.shapes.of(msg.ProtoReflect().Descriptor())
		m.shape.Store(sh)
	}
	// The scan reads the frames' buffers where they are: a refused request
	// is never copied.
	raw.chunks = raw.chunks[:0]
	for _, b := range data {
		raw.chunks = append(raw.chunks, b.ReadOnlyData())
	}
	est, err := scan(raw.chunks, sh, m.budget)
	clear(raw.chunks)
	if err != nil {
		se := err.(*scanError)
		m.reject(se.reason)
		return 0, status.Error(se.code, se.Error())
	}
	share := min(est+int64(n), m.g.budget)
	if !m.g.sem.TryAcquire(share) {
		m.g.waits.Inc()
		if err := m.g.sem.Acquire(ctx, share); err != nil {
			return 0, status.FromContextError(err).Err()
		}
	}
	m.g.decodedNow.Add(float64(share))
	// protobuf-go wants one contiguous copy (as gRPC's codec makes): the
	// share includes it.
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	err = proto.Unmarshal(buf.ReadOnlyData(), msg)
	buf.Free()
	if err != nil {
		m.release(share)
		m.reject("malformed")
		return 0, status.Errorf(codes.InvalidArgument, "malformed request: %v", err)
	}
	return share, nil
}

func (m *method) release(share int64) {
	if share > 0 {
		m.g.decodedNow.Sub(float64(share))
		m.g.sem.Release(share)
	}
}

// unaryCall is one unary call's decoding state, pooled with its bound
// decode function, so that a call allocates nothing here.
type unaryCall struct {
	m        *method
	ctx      context.Context
	recv     func(any) error
	raw      rawMessage
	share    int64 // of the decoding budget, held until the handler returns
	failed   bool  // decoding failed, so the interceptors never saw the call
	decodeFn func(any) error
}

var unaryCalls = sync.Pool{New: func() any {
	c := &unaryCall{}
	c.decodeFn = c.decode
	return c
}}

func (c *unaryCall) decode(v any) error {
	share, err := c.m.decode(c.ctx, c.recv, &c.raw, v)
	c.share += share
	c.failed = err != nil
	return err
}

func (m *method) unary(h grpc.MethodHandler) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
		c := unaryCalls.Get().(*unaryCall)
		c.m, c.ctx, c.recv, c.share, c.failed = m, ctx, dec, 0, false
		resp, err := h(srv, ctx, c.decodeFn, ic)
		m.release(c.share)
		if c.failed {
			m.g.m.count(m.mm, status.Code(err))
		}
		c.m, c.ctx, c.recv = nil, nil, nil
		unaryCalls.Put(c)
		return resp, err
	}
}

// guardedStream bounds every message a stream handler receives. A refused
// message ends the stream with the handler's error, which the stream
// interceptor counts.
type guardedStream struct {
	grpc.ServerStream
	m    *method
	recv func(any) error
	raw  rawMessage
}

func (s *guardedStream) RecvMsg(v any) error {
	share, err := s.m.decode(s.Context(), s.recv, &s.raw, v)
	s.m.release(share)
	return err
}

func (m *method) stream(h grpc.StreamHandler) grpc.StreamHandler {
	return func(srv any, ss grpc.ServerStream) error {
		gs := &guardedStream{ServerStream: ss, m: m}
		gs.recv = ss.RecvMsg
		return h(srv, gs)
	}
}
