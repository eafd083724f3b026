package h2unary_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	ratelimitv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/meshguard/meshguard/internal/h2unary"
)

// rlsMethod is the full name of the method meshguard serves on h2unary.
const rlsMethod = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

// rlsFunc implements ShouldRateLimit for a test.
type rlsFunc func(context.Context, *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error)

// rls is a RateLimitService whose ShouldRateLimit is a test's function.
type rls struct {
	rlsv3.UnimplementedRateLimitServiceServer
	fn rlsFunc
}

func (s rls) ShouldRateLimit(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	return s.fn(ctx, req)
}

// echo answers with the request's domain as raw_body and, per descriptor,
// one status whose LimitRemaining is the length of the descriptor's first
// entry value: every response tells which request it answers.
func echo(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	resp := &rlsv3.RateLimitResponse{
		OverallCode: rlsv3.RateLimitResponse_OK,
		RawBody:     []byte(req.GetDomain()),
	}
	for _, d := range req.GetDescriptors() {
		n := 0
		if es := d.GetEntries(); len(es) > 0 {
			n = len(es[0].GetValue())
		}
		resp.Statuses = append(resp.Statuses, &rlsv3.RateLimitResponse_DescriptorStatus{
			Code:           rlsv3.RateLimitResponse_OK,
			LimitRemaining: uint32(n),
		})
	}
	return resp, nil
}

// request builds a request with domain and one descriptor per value.
func request(domain string, values ...string) *rlsv3.RateLimitRequest {
	req := &rlsv3.RateLimitRequest{Domain: domain, HitsAddend: 1}
	for i, v := range values {
		req.Descriptors = append(req.Descriptors, &ratelimitv3.RateLimitDescriptor{
			Entries: []*ratelimitv3.RateLimitDescriptor_Entry{{Key: fmt.Sprintf("key%d", i), Value: v}},
		})
	}
	return req
}

// checkEcho reports how resp differs from echo's answer to req.
func checkEcho(req *rlsv3.RateLimitRequest, resp *rlsv3.RateLimitResponse) error {
	if got := string(resp.GetRawBody()); got != req.GetDomain() {
		return fmt.Errorf("raw_body %q, want %q", got, req.GetDomain())
	}
	if got, want := len(resp.GetStatuses()), len(req.GetDescriptors()); got != want {
		return fmt.Errorf("%d statuses, want %d", got, want)
	}
	for i, st := range resp.GetStatuses() {
		if got, want := st.GetLimitRemaining(), uint32(len(req.Descriptors[i].Entries[0].Value)); got != want {
			return fmt.Errorf("status %d: limit_remaining %d, want %d", i, got, want)
		}
	}
	return nil
}

// testServer is an h2unary server on a loopback listener.
type testServer struct {
	*h2unary.Server
	addr   string
	served chan struct{} // closed when Serve returns
	err    error         // what Serve returned, once served is closed
}

// startServer serves fn as ShouldRateLimit (nil: no RLS) and whatever
// register adds, and stops the server when the test ends.
func startServer(t testing.TB, opts h2unary.Options, fn rlsFunc, register ...func(*h2unary.Server)) *testServer {
	t.Helper()
	srv := h2unary.NewServer(opts)
	if fn != nil {
		rlsv3.RegisterRateLimitServiceServer(srv, rls{fn: fn})
	}
	for _, r := range register {
		r(srv)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: srv, addr: lis.Addr().String(), served: make(chan struct{})}
	go func() {
		ts.err = srv.Serve(lis)
		close(ts.served)
	}()
	t.Cleanup(func() {
		srv.Stop()
		select {
		case <-ts.served:
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Stop")
			return
		}
		if !errors.Is(ts.err, h2unary.ErrServerStopped) {
			t.Errorf("Serve returned %v, want ErrServerStopped", ts.err)
		}
	})
	return ts
}

// dial returns a grpc-go client of ts, closed when the test ends.
func dial(t testing.TB, ts *testServer, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	cc, err := grpc.NewClient("passthrough:///"+ts.addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// dialCounter counts the connections a grpc-go client opens: a test that
// wants the server to keep a connection open checks it made one.
type dialCounter struct{ n atomic.Int32 }

func (d *dialCounter) option() grpc.DialOption {
	return grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		d.n.Add(1)
		var nd net.Dialer
		return nd.DialContext(ctx, "tcp", addr)
	})
}

// check fails the test unless exactly one connection was opened.
func (d *dialCounter) check(t testing.TB) {
	t.Helper()
	if n := d.n.Load(); n != 1 {
		t.Errorf("the client opened %d connections, want 1: the server closed one", n)
	}
}

// rawConn is a hand-driven HTTP/2 client connection.
type rawConn struct {
	t   testing.TB
	nc  net.Conn
	fr  *http2.Framer
	enc *hpack.Encoder
	hb  bytes.Buffer
}

// dialRaw connects to ts without sending anything.
func dialRaw(t testing.TB, addr string) *rawConn {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	rc := &rawConn{t: t, nc: nc}
	rc.fr = http2.NewFramer(nc, nc)
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	rc.fr.MaxHeaderListSize = 16 << 20
	rc.enc = hpack.NewEncoder(&rc.hb)
	return rc
}

// handshake sends the preface and an empty SETTINGS, and reads the
// server's SETTINGS, which it acknowledges.
func (rc *rawConn) handshake(settings ...http2.Setting) *http2.SettingsFrame {
	rc.t.Helper()
	rc.write([]byte(http2.ClientPreface))
	rc.check(rc.fr.WriteSettings(settings...))
	f := rc.read()
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		rc.t.Fatalf("server's first frame is %v, want SETTINGS", f)
	}
	rc.check(rc.fr.WriteSettingsAck())
	return sf
}

func (rc *rawConn) write(p []byte) {
	rc.t.Helper()
	if _, err := rc.nc.Write(p); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

func (rc *rawConn) check(err error) {
	rc.t.Helper()
	if err != nil {
		rc.t.Fatalf("write frame: %v", err)
	}
}

// readErr reads the next frame within a few seconds.
func (rc *rawConn) readErr() (http2.Frame, error) {
	rc.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	return rc.fr.ReadFrame()
}

// read reads the next frame; it fails the test on error.
func (rc *rawConn) read() http2.Frame {
	rc.t.Helper()
	f, err := rc.readErr()
	if err != nil {
		rc.t.Fatalf("read frame: %v", err)
	}
	return f
}

// boring reports whether f is connection housekeeping a test skips:
// SETTINGS (and ACKs), WINDOW_UPDATE and PING ACKs.
func boring(f http2.Frame) bool {
	switch f := f.(type) {
	case *http2.SettingsFrame, *http2.WindowUpdateFrame:
		return true
	case *http2.PingFrame:
		return f.IsAck()
	}
	return false
}

// next reads the next frame that is not housekeeping.
func (rc *rawConn) next() http2.Frame {
	rc.t.Helper()
	for {
		if f := rc.read(); !boring(f) {
			return f
		}
	}
}

// expectGoAway reads until a GOAWAY, checks its code, and checks that the
// server then closes the connection.
func (rc *rawConn) expectGoAway(code http2.ErrCode) *http2.GoAwayFrame {
	rc.t.Helper()
	var ga *http2.GoAwayFrame
	for ga == nil {
		f, err := rc.readErr()
		if err != nil {
			rc.t.Fatalf("connection ended (%v) without GOAWAY %v", err, code)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			ga = g
		}
	}
	if ga.ErrCode != code {
		rc.t.Fatalf("GOAWAY %v (debug %q), want %v", ga.ErrCode, ga.DebugData(), code)
	}
	ga = &http2.GoAwayFrame{FrameHeader: ga.FrameHeader, LastStreamID: ga.LastStreamID, ErrCode: ga.ErrCode}
	rc.expectClosed()
	return ga
}

// expectClosed reads until the server closes the connection.
func (rc *rawConn) expectClosed() {
	rc.t.Helper()
	for {
		_, err := rc.readErr()
		if err == nil {
			continue // frames queued before the close
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			rc.t.Fatalf("connection still open: %v", err)
		}
		return // EOF or reset
	}
}

// header is one request header field.
type header struct{ name, value string }

// grpcHeaders are the headers of a gRPC request for path.
func grpcHeaders(path string) []header {
	return []header{
		{":method", "POST"},
		{":scheme", "http"},
		{":path", path},
		{":authority", "test"},
		{"content-type", "application/grpc"},
		{"te", "trailers"},
	}
}

func hpackField(h header) hpack.HeaderField { return hpack.HeaderField{Name: h.name, Value: h.value} }

// writeHeaders sends a header block on stream id.
func (rc *rawConn) writeHeaders(id uint32, endStream bool, hs []header) {
	rc.t.Helper()
	rc.hb.Reset()
	for _, h := range hs {
		rc.enc.WriteField(hpackField(h))
	}
	rc.check(rc.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID: id, BlockFragment: rc.hb.Bytes(), EndStream: endStream, EndHeaders: true,
	}))
}

// frameMsg is a gRPC length-prefixed message: flag, length, body.
func frameMsg(flag byte, body []byte) []byte {
	b := binary.BigEndian.AppendUint32([]byte{flag}, uint32(len(body)))
	return append(b, body...)
}

// marshal is proto.Marshal that fails the test on error.
func marshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writeCall sends a complete unary request for path on stream id.
func (rc *rawConn) writeCall(id uint32, path string, msg []byte) {
	rc.t.Helper()
	rc.writeHeaders(id, false, grpcHeaders(path))
	rc.check(rc.fr.WriteData(id, true, frameMsg(0, msg)))
}

// response is what a raw client saw on one stream.
type response struct {
	headers  map[string]string // response headers (for trailers-only: all of them)
	trailers map[string]string
	data     []byte
	// trailersOnly: the first HEADERS ended the stream.
	trailersOnly bool
	reset        *http2.RSTStreamFrame
}

func fieldsMap(fs []hpack.HeaderField) map[string]string {
	m := map[string]string{}
	for _, f := range fs {
		m[f.Name] = f.Value
	}
	return m
}

// readResponse reads frames until stream id ends (END_STREAM or
// RST_STREAM); frames of other streams fail the test.
func (rc *rawConn) readResponse(id uint32) *response {
	rc.t.Helper()
	return rc.readResponses(id)[id]
}

// readResponses reads frames until the streams ids all end, in any order;
// frames of other streams fail the test, but for the RST_STREAM NO_ERROR
// that may follow an early answer on an earlier stream.
func (rc *rawConn) readResponses(ids ...uint32) map[uint32]*response {
	rc.t.Helper()
	rs := map[uint32]*response{}
	for _, id := range ids {
		rs[id] = nil
	}
	done := 0
	for done < len(ids) {
		f := rc.next()
		id := f.Header().StreamID
		r, ok := rs[id]
		if rst, isRST := f.(*http2.RSTStreamFrame); !ok && isRST && id < slices.Max(ids) && rst.ErrCode == http2.ErrCodeNo {
			continue // the end of a request answered early
		}
		if ga, isGA := f.(*http2.GoAwayFrame); isGA {
			rc.t.Fatalf("GOAWAY %v (%q) while reading streams %v", ga.ErrCode, ga.DebugData(), ids)
		}
		if !ok {
			rc.t.Fatalf("frame %v on another stream, reading streams %v", f, ids)
		}
		if r == nil {
			r = &response{}
			rs[id] = r
		} else if r.trailers != nil || r.reset != nil {
			rc.t.Fatalf("frame %v after the end of stream %d", f, id)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if r.headers == nil {
				r.headers = fieldsMap(f.Fields)
				if f.StreamEnded() {
					r.trailersOnly = true
					r.trailers = r.headers
					done++
				}
			} else {
				r.trailers = fieldsMap(f.Fields)
				if !f.StreamEnded() {
					rc.t.Fatalf("stream %d: trailers without END_STREAM", id)
				}
				done++
			}
		case *http2.DataFrame:
			if r.headers == nil {
				rc.t.Fatalf("stream %d: DATA before HEADERS", id)
			}
			r.data = append(r.data, f.Data()...)
			if f.StreamEnded() {
				rc.t.Fatalf("stream %d: DATA with END_STREAM: trailers missing", id)
			}
		case *http2.RSTStreamFrame:
			r.reset = f
			done++
		default:
			rc.t.Fatalf("unexpected frame %v", f)
		}
	}
	return rs
}

// status returns the grpc-status of r, failing the test if it is missing.
func (r *response) status(t testing.TB) string {
	t.Helper()
	if r.reset != nil {
		t.Fatalf("stream reset with %v, want a response", r.reset.ErrCode)
	}
	s, ok := r.trailers["grpc-status"]
	if !ok {
		t.Fatalf("no grpc-status in trailers %v", r.trailers)
	}
	return s
}

// isClosedErr reports whether err is how a read sees a closed connection.
func isClosedErr(err error) bool {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	return strings.Contains(err.Error(), "connection reset")
}
