// Package h2unary is a small gRPC server for unary methods over cleartext
// HTTP/2 (h2c with prior knowledge, as Envoy's gRPC clients speak it).
//
// meshguard serves its hottest method, ShouldRateLimit, on a listener of its
// own with this server instead of grpc-go's. grpc-go's server starts a
// stream, a context, a metadata map and a control-buffer round trip per RPC;
// on BenchmarkShouldRateLimit those cost about 25 µs of CPU per call, more
// than meshguard's own work and Redis' together. This server reads frames on
// one goroutine per connection and hands each complete request to a worker,
// or, for a method registered with RegisterAsync, to a handler that answers
// later without holding a goroutine (ShouldRateLimit's, which queues its
// Redis call and is answered by the Redis pipeline's reader). Whichever
// goroutine finds the connection idle writes every response queued
// meanwhile, in one write.
//
// It implements what a unary gRPC server needs and nothing more:
//   - HTTP/2 framing, HPACK (golang.org/x/net/http2's Framer and hpack),
//     SETTINGS, PING, WINDOW_UPDATE and flow control in both directions,
//     RST_STREAM, GOAWAY, MAX_CONCURRENT_STREAMS;
//   - gRPC's length-prefixed messages, grpc-timeout deadlines, trailers and
//     trailers-only error responses, percent-encoded grpc-message;
//   - unary methods registered through grpc.ServiceRegistrar (the generated
//     Register…Server functions), run through one unary interceptor, and
//     asynchronous ones (RegisterAsync), counted through Options.Track.
//
// Streaming methods, compression, TLS and metadata are not served: a
// streaming method or unknown method gets UNIMPLEMENTED, a compressed
// message UNIMPLEMENTED, and handlers see a context with the deadline and
// cancellation of the call but no incoming metadata. Everything else
// meshguard serves stays on grpc-go's server.
//
// Limits against a hostile client: message size (RESOURCE_EXHAUSTED),
// header list size, concurrent streams per connection (counted until the
// handler returns, so resetting streams does not free a slot early), request
// bytes buffered per connection, queued control frames, and PING abuse
// (GOAWAY ENHANCE_YOUR_CALM, as grpc-go's keepalive enforcement).
package h2unary

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
)

// Options configure a Server. Zero fields take the defaults noted.
type Options struct {
	// MaxRecvMsgSize is the largest request message in bytes (4 MiB).
	MaxRecvMsgSize int
	// MaxConcurrentStreams is the most calls one connection may have open (1024).
	MaxConcurrentStreams uint32
	// KeepaliveMinTime is the shortest client ping interval tolerated when
	// the server has sent nothing in between (10s).
	KeepaliveMinTime time.Duration
	// MaxConnectionIdle closes connections without calls for this long; 0: never.
	MaxConnectionIdle time.Duration
	// ConnectionTimeout bounds the wait for the client's preface (10s).
	ConnectionTimeout time.Duration
	// Codec encodes and decodes messages (grpc-go's proto codec).
	Codec encoding.CodecV2
	// Interceptor wraps every handler; nil: none.
	Interceptor grpc.UnaryServerInterceptor
	// Workers is how many long-lived goroutines run handlers (64); when all
	// are busy a call gets a goroutine of its own.
	Workers int
	// Track, when set, is asked once per asynchronous method for what
	// counts its calls (the interceptor cannot wrap them).
	Track func(fullMethod string) Tracker
}

// Tracker counts the calls of one asynchronous method.
type Tracker interface {
	Begin()                         // a call starts
	End(start time.Time, err error) // it is answered, with err's status
}

// AsyncHandler answers a call without a goroutine of its own. It runs on
// the connection's reader goroutine, so it must not block: it decodes the
// request with dec (before returning) and calls reply exactly once, before
// returning or later from any goroutine. reply(nil, err) answers with err's
// status.
type AsyncHandler func(ctx context.Context, dec func(any) error, reply func(resp any, err error))

func (o *Options) setDefaults() {
	if o.MaxRecvMsgSize <= 0 {
		o.MaxRecvMsgSize = 4 << 20
	}
	if o.MaxConcurrentStreams == 0 {
		o.MaxConcurrentStreams = 1024
	}
	if o.KeepaliveMinTime <= 0 {
		o.KeepaliveMinTime = 10 * time.Second
	}
	if o.ConnectionTimeout <= 0 {
		o.ConnectionTimeout = 10 * time.Second
	}
	if o.Codec == nil {
		o.Codec = encoding.GetCodecV2("proto")
	}
	if o.Workers <= 0 {
		o.Workers = 64
	}
}

// method is one registered unary method.
type method struct {
	name    string // full method, "/pkg.Service/Method"
	impl    any
	handler func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error)
	info    *grpc.UnaryServerInfo
	async   AsyncHandler // instead of handler
	track   Tracker      // for async; may be nil
}

// Server serves registered unary methods. Register services before Serve.
type Server struct {
	opts    Options
	methods map[string]*method

	work chan *stream

	mu       sync.Mutex
	lis      map[net.Listener]struct{}
	conns    map[*conn]struct{}
	draining bool
	done     chan struct{} // closed by Stop and GracefulStop
	connWG   sync.WaitGroup
	startW   sync.Once
}

// NewServer returns a server with opts.
func NewServer(opts Options) *Server {
	opts.setDefaults()
	return &Server{
		opts:    opts,
		methods: map[string]*method{},
		work:    make(chan *stream),
		lis:     map[net.Listener]struct{}{},
		conns:   map[*conn]struct{}{},
		done:    make(chan struct{}),
	}
}

// RegisterService registers desc's unary methods, implemented by impl. Its
// streaming methods are not served (callers get UNIMPLEMENTED).
func (s *Server) RegisterService(desc *grpc.ServiceDesc, impl any) {
	for i := range desc.Methods {
		md := &desc.Methods[i]
		name := "/" + desc.ServiceName + "/" + md.MethodName
		s.methods[name] = &method{
			name:    name,
			impl:    impl,
			handler: md.Handler,
			info:    &grpc.UnaryServerInfo{Server: impl, FullMethod: name},
		}
	}
}

// RegisterAsync registers h as fullMethod ("/pkg.Service/Method"),
// replacing a method of that name. Register before Serve.
func (s *Server) RegisterAsync(fullMethod string, h AsyncHandler) {
	m := &method{name: fullMethod, async: h}
	if s.opts.Track != nil {
		m.track = s.opts.Track(fullMethod)
	}
	s.methods[fullMethod] = m
}

// Methods lists the full names of the methods served.
func (s *Server) Methods() []string {
	out := make([]string, 0, len(s.methods))
	for name := range s.methods {
		out = append(out, name)
	}
	return out
}

// ErrServerStopped is what Serve returns after Stop or GracefulStop.
var ErrServerStopped = errors.New("h2unary: server stopped")

// Serve accepts connections on lis until lis fails or the server stops.
// It returns ErrServerStopped after Stop or GracefulStop.
func (s *Server) Serve(lis net.Listener) error {
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		lis.Close()
		return ErrServerStopped
	}
	s.lis[lis] = struct{}{}
	s.mu.Unlock()
	s.startW.Do(func() {
		for range s.opts.Workers {
			go s.worker()
		}
	})
	var delay time.Duration
	for {
		nc, err := lis.Accept()
		if err != nil {
			select {
			case <-s.done:
				return ErrServerStopped
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Out of file descriptors and the like: back off, as net/http does.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			s.mu.Lock()
			delete(s.lis, lis)
			s.mu.Unlock()
			return fmt.Errorf("h2unary: accept: %w", err)
		}
		delay = 0
		c := newConn(s, nc)
		s.mu.Lock()
		if s.draining {
			s.mu.Unlock()
			nc.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.connWG.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.connWG.Done()
			c.serve()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// closeListeners stops accepting; the caller holds s.mu.
func (s *Server) closeListenersLocked() {
	if !s.draining {
		s.draining = true
		close(s.done)
	}
	for l := range s.lis {
		l.Close()
		delete(s.lis, l)
	}
}

// GracefulStop stops accepting connections, sends GOAWAY on every
// connection, and returns when the calls in flight have been answered and
// the connections closed.
func (s *Server) GracefulStop() {
	s.mu.Lock()
	s.closeListenersLocked()
	for c := range s.conns {
		c.goAway()
	}
	s.mu.Unlock()
	s.connWG.Wait()
}

// Stop closes every listener and connection at once; handlers still
// running see their contexts cancelled.
func (s *Server) Stop() {
	s.mu.Lock()
	s.closeListenersLocked()
	for c := range s.conns {
		c.close(errors.New("server stopped"))
	}
	s.mu.Unlock()
	s.connWG.Wait()
}

// worker runs calls until the server stops.
func (s *Server) worker() {
	for {
		select {
		case c := <-s.work:
			c.run()
		case <-s.done:
			return
		}
	}
}

// dispatch runs c on an idle worker, or on a goroutine of its own.
func (s *Server) dispatch(c *stream) {
	select {
	case s.work <- c:
	default:
		go c.run()
	}
}

// contentSubtypeOK reports whether a content-type names gRPC with the proto
// codec: application/grpc, application/grpc+proto, optionally with
// parameters.
func contentSubtypeOK(ct string) bool {
	rest, ok := strings.CutPrefix(ct, "application/grpc")
	if !ok {
		return false
	}
	if i := strings.IndexByte(rest, ';'); i >= 0 {
		rest = rest[:i]
	}
	return rest == "" || rest == "+proto"
}

// grpcContentType reports whether ct is a gRPC content type at all.
func grpcContentType(ct string) bool {
	rest, ok := strings.CutPrefix(ct, "application/grpc")
	return ok && (rest == "" || rest[0] == '+' || rest[0] == ';')
}
