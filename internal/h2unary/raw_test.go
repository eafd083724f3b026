package h2unary_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/meshguard/meshguard/internal/h2unary"
)

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

// rawServer starts a server whose ShouldRateLimit is echo, except that the
// domain "error" gets a status with a message to encode.
func rawServer(t *testing.T, opts h2unary.Options) *testServer {
	return startServer(t, opts, func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		if req.Domain == "error" {
			return nil, status.Error(codes.PermissionDenied, "100% non, ça")
		}
		return echo(ctx, req)
	})
}

// okCall makes a call on stream id and checks its echoed answer.
func (rc *rawConn) okCall(id uint32) {
	rc.t.Helper()
	req := request(fmt.Sprintf("stream %d", id), "abc")
	rc.writeCall(id, rlsMethod, marshal(rc.t, req))
	r := rc.readResponse(id)
	if s := r.status(rc.t); s != "0" {
		rc.t.Fatalf("stream %d: grpc-status %s (%q), want 0", id, s, r.trailers["grpc-message"])
	}
	if r.trailersOnly || r.headers[":status"] != "200" || r.headers["content-type"] != "application/grpc" {
		rc.t.Fatalf("stream %d: response headers %v", id, r.headers)
	}
	if len(r.data) < 5 || r.data[0] != 0 || int(uint32(r.data[1])<<24|uint32(r.data[2])<<16|uint32(r.data[3])<<8|uint32(r.data[4])) != len(r.data)-5 {
		rc.t.Fatalf("stream %d: response body is not one message: % x", id, r.data)
	}
	var resp rlsv3.RateLimitResponse
	if err := proto.Unmarshal(r.data[5:], &resp); err != nil {
		rc.t.Fatal(err)
	}
	if err := checkEcho(req, &resp); err != nil {
		rc.t.Fatalf("stream %d: %v", id, err)
	}
}

// TestRawBadPreface shows that a connection that does not start with the
// HTTP/2 client preface is closed without an answer.
func TestRawBadPreface(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	for _, preface := range []string{
		"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
		strings.Replace(http2.ClientPreface, "2.0", "2.1", 1),
	} {
		rc := dialRaw(t, ts.addr)
		rc.write([]byte(preface))
		rc.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		var buf [1]byte
		n, err := rc.nc.Read(buf[:])
		if n != 0 || !isClosedErr(err) {
			t.Errorf("preface %q: read %d bytes, %v; want the connection closed", preface, n, err)
		}
	}
}

// TestRawConnectionTimeout shows that a client that does not complete its
// preface within ConnectionTimeout is disconnected.
func TestRawConnectionTimeout(t *testing.T) {
	ts := rawServer(t, h2unary.Options{ConnectionTimeout: 200 * time.Millisecond})

	rc := dialRaw(t, ts.addr) // sends nothing
	var buf [1]byte
	rc.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := rc.nc.Read(buf[:]); n != 0 || !isClosedErr(err) {
		t.Errorf("silent client: read %d bytes, %v; want the connection closed", n, err)
	}

	rc = dialRaw(t, ts.addr) // the preface, but not its SETTINGS
	rc.write([]byte(http2.ClientPreface))
	rc.expectClosed()
}

// TestRawFirstFrameNotSettings shows that a preface not followed by
// SETTINGS is a connection error PROTOCOL_ERROR.
func TestRawFirstFrameNotSettings(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	rc := dialRaw(t, ts.addr)
	rc.write([]byte(http2.ClientPreface))
	rc.check(rc.fr.WritePing(false, [8]byte{1}))
	rc.expectGoAway(http2.ErrCodeProtocol)
}

// TestRawSettingsAndPing shows that the server announces its limits, and
// acknowledges the client's SETTINGS and echoes its PING.
func TestRawSettingsAndPing(t *testing.T) {
	ts := rawServer(t, h2unary.Options{MaxConcurrentStreams: 7})
	rc := dialRaw(t, ts.addr)
	sf := rc.handshake(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	if v, ok := sf.Value(http2.SettingMaxConcurrentStreams); !ok || v != 7 {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS %d (%v), want 7", v, ok)
	}
	if v, ok := sf.Value(http2.SettingMaxFrameSize); ok && v < 16384 {
		t.Errorf("SETTINGS_MAX_FRAME_SIZE %d", v)
	}
	data := [8]byte{'m', 'e', 's', 'h', 0, 0xff, 7, 9}
	rc.check(rc.fr.WritePing(false, data))
	var gotAck, gotPing bool
	for !gotAck || !gotPing {
		switch f := rc.read().(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				t.Fatalf("second SETTINGS from the server")
			}
			gotAck = true
		case *http2.PingFrame:
			if !f.IsAck() || f.Data != data {
				t.Fatalf("PING ack %v data % x, want an ACK of % x", f.IsAck(), f.Data, data)
			}
			gotPing = true
		case *http2.WindowUpdateFrame:
		default:
			t.Fatalf("unexpected %v", f)
		}
	}
	rc.okCall(1) // the connection serves calls as well
}

// TestRawBadStreamIDs shows that HEADERS on an even stream ID, or on a
// stream ID lower than one already used, is a connection error
// PROTOCOL_ERROR whose GOAWAY names the last stream processed.
func TestRawBadStreamIDs(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	t.Run("even", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake()
		rc.okCall(1)
		rc.writeCall(2, rlsMethod, marshal(t, request("d")))
		if ga := rc.expectGoAway(http2.ErrCodeProtocol); ga.LastStreamID != 1 {
			t.Errorf("GOAWAY last stream %d, want 1", ga.LastStreamID)
		}
	})
	t.Run("decreasing", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake()
		rc.okCall(5)
		rc.writeCall(3, rlsMethod, marshal(t, request("d")))
		if ga := rc.expectGoAway(http2.ErrCodeProtocol); ga.LastStreamID != 5 {
			t.Errorf("GOAWAY last stream %d, want 5", ga.LastStreamID)
		}
	})
	t.Run("reused", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake()
		rc.okCall(1)
		rc.writeCall(1, rlsMethod, marshal(t, request("d")))
		rc.expectGoAway(http2.ErrCodeProtocol)
	})
}

// TestRawDataBeyondConnectionWindow shows that a DATA frame larger than
// the connection's receive window (1 MiB) ends the connection with
// FLOW_CONTROL_ERROR (or FRAME_SIZE_ERROR: it is also larger than the
// frames the server accepts).
func TestRawDataBeyondConnectionWindow(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	rc := dialRaw(t, ts.addr)
	rc.handshake()
	rc.writeHeaders(1, false, grpcHeaders(rlsMethod))
	var big bytes.Buffer
	http2.NewFramer(&big, nil).WriteData(1, false, make([]byte, 1<<20+1))
	rc.nc.Write(big.Bytes()) // the server may close before reading it all
	var ga *http2.GoAwayFrame
	for ga == nil {
		f, err := rc.readErr()
		if err != nil {
			t.Fatalf("connection ended (%v) without GOAWAY", err)
		}
		ga, _ = f.(*http2.GoAwayFrame)
	}
	if ga.ErrCode != http2.ErrCodeFlowControl && ga.ErrCode != http2.ErrCodeFrameSize {
		t.Errorf("GOAWAY %v, want FLOW_CONTROL_ERROR or FRAME_SIZE_ERROR", ga.ErrCode)
	}
	rc.expectClosed()
}

// TestRawFrameLargerThanAdvertised shows that a frame larger than the
// SETTINGS_MAX_FRAME_SIZE the server announced (16384 when it announces
// none, RFC 9113 §4.2) is a connection error FRAME_SIZE_ERROR, so that a
// client cannot make the server buffer frames of up to 16 MiB.
func TestRawFrameLargerThanAdvertised(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	rc := dialRaw(t, ts.addr)
	sf := rc.handshake()
	maxFrame, ok := sf.Value(http2.SettingMaxFrameSize)
	if !ok {
		maxFrame = 16384
	}
	rc.writeHeaders(1, false, grpcHeaders(rlsMethod))
	// Within the stream and connection windows (1 MiB), one byte over the
	// frame size.
	rc.check(rc.fr.WriteData(1, false, make([]byte, maxFrame+1)))
	rc.check(rc.fr.WritePing(false, [8]byte{'a', 'f', 't', 'e', 'r'}))
	for {
		f, err := rc.readErr()
		if err != nil {
			t.Fatalf("connection ended (%v) without GOAWAY", err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
			t.Fatalf("DATA frame of %d bytes accepted (PING after it answered); max frame size %d", maxFrame+1, maxFrame)
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			if ga.ErrCode != http2.ErrCodeFrameSize {
				t.Fatalf("GOAWAY %v, want FRAME_SIZE_ERROR", ga.ErrCode)
			}
			break
		}
	}
	rc.expectClosed()
}

// TestRawBadRequestHeaders shows that a request that is not gRPC gets an
// HTTP error status with a grpc-status, as a trailers-only response.
func TestRawBadRequestHeaders(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	rc := dialRaw(t, ts.addr)
	rc.handshake()
	with := func(name, value string) []header {
		hs := grpcHeaders(rlsMethod)
		for i := range hs {
			if hs[i].name == name {
				hs[i].value = value
			}
		}
		return hs
	}
	id := uint32(1)
	for _, c := range []struct {
		headers    []header
		httpStatus string
		grpcStatus codes.Code
	}{
		{with(":method", "GET"), "405", codes.Internal},
		{with(":method", "PUT"), "405", codes.Internal},
		{with("content-type", "text/plain"), "415", codes.Internal},
		{with("content-type", "application/grpcx"), "415", codes.Internal},
		{with("content-type", "application/grpc+json"), "200", codes.Internal},
		{with("content-type", "application/grpc+proto; charset=utf-8"), "200", codes.OK},
		{with("content-type", "application/grpc;x=y"), "200", codes.OK},
		{append(grpcHeaders(rlsMethod), header{"grpc-encoding", "snappy"}), "200", codes.Unimplemented},
		{append(grpcHeaders(rlsMethod), header{"grpc-encoding", "identity"}), "200", codes.OK},
		{append(grpcHeaders(rlsMethod), header{"grpc-timeout", "1x"}), "200", codes.Internal},
		{append(grpcHeaders(rlsMethod), header{"grpc-timeout", "123456789S"}), "200", codes.Internal},
		{append(grpcHeaders(rlsMethod), header{"grpc-timeout", "10S"}), "200", codes.OK},
	} {
		rc.writeHeaders(id, false, c.headers)
		rc.check(rc.fr.WriteData(id, true, frameMsg(0, marshal(t, request("d", "v")))))
		r := rc.readResponse(id)
		if s := r.status(t); s != fmt.Sprint(int(c.grpcStatus)) || r.headers[":status"] != c.httpStatus {
			t.Errorf("headers %v: :status %s grpc-status %s (%q), want %s and %d",
				c.headers, r.headers[":status"], s, r.trailers["grpc-message"], c.httpStatus, c.grpcStatus)
		}
		if c.grpcStatus != codes.OK && !r.trailersOnly {
			t.Errorf("headers %v: error response is not trailers-only", c.headers)
		}
		// The server may reset the rest of a request it answered early.
		id += 2
	}
	rc.okCall(id)
}

// TestRawTrailersOnly shows that errors are trailers-only responses (one
// HEADERS with END_STREAM) with a percent-encoded grpc-message, and that
// a successful response is headers, one message, trailers.
func TestRawTrailersOnly(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	rc := dialRaw(t, ts.addr)
	rc.handshake()

	rc.writeCall(1, "/no.Such/Method", marshal(t, request("d")))
	r := rc.readResponse(1)
	if !r.trailersOnly || r.status(t) != "12" || r.headers[":status"] != "200" || r.headers["content-type"] != "application/grpc" {
		t.Errorf("unknown method: trailers-only %v, headers %v", r.trailersOnly, r.headers)
	}

	rc.writeCall(3, rlsMethod, marshal(t, request("error")))
	r = rc.readResponse(3)
	if !r.trailersOnly || r.status(t) != "7" {
		t.Errorf("handler error: trailers-only %v, headers %v", r.trailersOnly, r.headers)
	}
	if got, want := r.trailers["grpc-message"], "100%25 non, %C3%A7a"; got != want {
		t.Errorf("grpc-message %q, want %q", got, want)
	}
	rc.okCall(5)
}

// TestRawBadMessages shows that a request body that is not exactly one
// uncompressed length-prefixed message gets INTERNAL, and that the
// connection goes on serving.
func TestRawBadMessages(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	rc := dialRaw(t, ts.addr)
	rc.handshake()
	msg := marshal(t, request("d", "v"))
	one := frameMsg(0, msg)
	id := uint32(1)
	for _, c := range []struct {
		name   string
		frames [][]byte // DATA frames; the last ends the stream
		want   string
	}{
		{"two messages in one frame", [][]byte{append(append([]byte{}, one...), one...)}, "13"},
		{"two messages in two frames", [][]byte{one, one}, "13"},
		{"a message and a byte", [][]byte{one, {0}}, "13"},
		{"compressed flag", [][]byte{frameMsg(1, msg)}, "13"},
		{"unknown flag", [][]byte{frameMsg(2, msg)}, "13"},
		{"short message", [][]byte{one[:len(one)-1]}, "13"},
		{"length prefix cut", [][]byte{one[:3]}, "13"},
		{"no message", [][]byte{{}}, "13"},
		{"not protobuf", [][]byte{frameMsg(0, []byte{0xff, 0xff, 0xff})}, "13"},
		{"one message in pieces", [][]byte{one[:2], one[2:7], one[7:]}, "0"},
		{"empty message", [][]byte{frameMsg(0, nil)}, "0"},
	} {
		rc.writeHeaders(id, false, grpcHeaders(rlsMethod))
		for i, p := range c.frames {
			rc.check(rc.fr.WriteData(id, i == len(c.frames)-1, p))
		}
		r := rc.readResponse(id)
		if s := r.status(t); s != c.want {
			t.Errorf("%s: grpc-status %s (%q), want %s", c.name, s, r.trailers["grpc-message"], c.want)
		}
		id += 2
	}
	// A request without DATA at all.
	rc.writeHeaders(id, true, grpcHeaders(rlsMethod))
	if s := rc.readResponse(id).status(t); s != "13" {
		t.Errorf("HEADERS with END_STREAM: grpc-status %s, want 13", s)
	}
	rc.okCall(id + 2)
}

// TestRawHeaderListTooLarge shows that a request whose header list
// decodes to more than the server's limit gets RESOURCE_EXHAUSTED and that
// the connection's HPACK state survives it; and that a header block too
// large to be worth decoding ends the connection.
func TestRawHeaderListTooLarge(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	rc := dialRaw(t, ts.addr)
	sf := rc.handshake()
	limit, ok := sf.Value(http2.SettingMaxHeaderListSize)
	if !ok || limit == 0 || limit > 1<<20 {
		t.Fatalf("SETTINGS_MAX_HEADER_LIST_SIZE %d (%v)", limit, ok)
	}
	// A field that enters the HPACK dynamic table, repeated by index: a
	// small block that decodes to more than the limit.
	big := header{"x-big", strings.Repeat("b", 3900)}
	hs := grpcHeaders(rlsMethod)
	for range int(limit)/3900 + 1 {
		hs = append(hs, big)
	}
	rc.writeHeaders(1, false, hs)
	rc.check(rc.fr.WriteData(1, true, frameMsg(0, marshal(t, request("d")))))
	if s := rc.readResponse(1).status(t); s != "8" {
		t.Errorf("grpc-status %s, want 8 (RESOURCE_EXHAUSTED)", s)
	}
	rc.okCall(3)
	rc.writeHeaders(5, false, append(grpcHeaders(rlsMethod), big)) // indexed
	rc.check(rc.fr.WriteData(5, true, frameMsg(0, marshal(t, request("stream 5", "abc")))))
	if s := rc.readResponse(5).status(t); s != "0" {
		t.Errorf("call with one big header: grpc-status %s", s)
	}

	// A literal larger than the limit, in HEADERS and CONTINUATIONs.
	rc.hb.Reset()
	for _, h := range append(grpcHeaders(rlsMethod), header{"x-huge", strings.Repeat("h", 2*int(limit))}) {
		rc.enc.WriteField(hpackField(h))
	}
	block := bytes.Clone(rc.hb.Bytes())
	var frames bytes.Buffer
	ffr := http2.NewFramer(&frames, nil)
	ffr.WriteHeaders(http2.HeadersFrameParam{StreamID: 7, BlockFragment: block[:16384]})
	for rest := block[16384:]; len(rest) > 0; {
		n := min(len(rest), 16384)
		ffr.WriteContinuation(7, n == len(rest), rest[:n])
		rest = rest[n:]
	}
	rc.nc.Write(frames.Bytes()) // the server may close before reading all
	var ga *http2.GoAwayFrame
	for ga == nil {
		f, err := rc.readErr()
		if err != nil {
			t.Fatalf("connection ended (%v) without GOAWAY", err)
		}
		ga, _ = f.(*http2.GoAwayFrame)
	}
	if ga.ErrCode != http2.ErrCodeProtocol && ga.ErrCode != http2.ErrCodeCompression {
		t.Errorf("GOAWAY %v, want PROTOCOL_ERROR or COMPRESSION_ERROR", ga.ErrCode)
	}
}

// TestRawPingFlood shows that PINGs closer together than KeepaliveMinTime
// with nothing sent by the server in between end the connection with
// GOAWAY ENHANCE_YOUR_CALM "too_many_pings", as grpc-go does, while PINGs
// between responses do not.
func TestRawPingFlood(t *testing.T) {
	ts := rawServer(t, h2unary.Options{KeepaliveMinTime: time.Minute})

	t.Run("between responses", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake()
		for i := range 10 {
			rc.check(rc.fr.WritePing(false, [8]byte{byte(i)}))
			rc.okCall(uint32(2*i + 1))
		}
		rc.check(rc.fr.WritePing(false, [8]byte{'l', 'a', 's', 't'}))
		for {
			if p, ok := rc.read().(*http2.PingFrame); ok && p.Data == [8]byte{'l', 'a', 's', 't'} {
				break
			}
		}
	})

	t.Run("flood", func(t *testing.T) {
		rc := dialRaw(t, ts.addr)
		rc.handshake()
		// One write: the server closes the connection before reading all.
		var pings bytes.Buffer
		pfr := http2.NewFramer(&pings, nil)
		for i := range 10 {
			pfr.WritePing(false, [8]byte{byte(i)})
		}
		rc.write(pings.Bytes())
		var ga *http2.GoAwayFrame
		for ga == nil {
			f, err := rc.readErr()
			if err != nil {
				t.Fatalf("connection ended (%v) without GOAWAY", err)
			}
			ga, _ = f.(*http2.GoAwayFrame)
		}
		if ga.ErrCode != http2.ErrCodeEnhanceYourCalm || string(ga.DebugData()) != "too_many_pings" {
			t.Errorf("GOAWAY %v %q, want ENHANCE_YOUR_CALM \"too_many_pings\"", ga.ErrCode, ga.DebugData())
		}
		rc.expectClosed()
	})
}

// TestRawResetRunningCall shows that the client's RST_STREAM cancels the
// context of the call's running handler, that nothing more is sent on the
// stream, and that the stream holds its MaxConcurrentStreams slot until
// the handler returns.
func TestRawResetRunningCall(t *testing.T) {
	started := make(chan string, 4)
	cancelled := make(chan error, 4)
	release := make(chan struct{})
	ts := startServer(t, h2unary.Options{MaxConcurrentStreams: 1}, func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		switch req.Domain {
		case "watch ctx": // returns when cancelled
			started <- req.Domain
			select {
			case <-ctx.Done():
				cancelled <- ctx.Err()
			case <-time.After(10 * time.Second):
				cancelled <- nil
			}
			return nil, status.Error(codes.Aborted, "answered after the reset")
		case "ignore ctx": // returns when the test says
			started <- req.Domain
			<-release
			return &rlsv3.RateLimitResponse{RawBody: []byte("answered after the reset")}, nil
		}
		return echo(ctx, req)
	})
	rc := dialRaw(t, ts.addr)
	rc.handshake()

	// The handler of stream 1 sees its context cancelled.
	rc.writeCall(1, rlsMethod, marshal(t, request("watch ctx")))
	<-started
	rc.check(rc.fr.WriteRSTStream(1, http2.ErrCodeCancel))
	select {
	case err := <-cancelled:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("handler's context ended with %v, want Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler's context not cancelled by RST_STREAM")
	}

	// Stream 3's handler ignores its context: after the reset, its slot
	// stays taken until it returns.
	id := rc.callWhenAdmitted(3, "ignore ctx")
	<-started
	rc.check(rc.fr.WriteRSTStream(id, http2.ErrCodeCancel))
	next := id + 2
	rc.writeCall(next, rlsMethod, marshal(t, request("d")))
	if r := rc.readResponse(next); r.reset == nil || r.reset.ErrCode != http2.ErrCodeRefusedStream {
		t.Errorf("stream %d, opened while a reset stream's handler runs with MaxConcurrentStreams 1: %+v, want REFUSED_STREAM", next, r)
	}
	close(release)

	// Once the handlers returned, a call is admitted and answered; nothing
	// came on the reset streams (readResponse fails on other streams'
	// frames, and the slot is free only after the handler's answer was
	// discarded).
	for id = next + 2; ; id += 2 {
		rc.writeCall(id, rlsMethod, marshal(t, request("ok")))
		r := rc.readResponse(id)
		if r.reset != nil && r.reset.ErrCode == http2.ErrCodeRefusedStream && id < next+200 {
			time.Sleep(10 * time.Millisecond) // the handler is returning
			continue
		}
		if s := r.status(t); s != "0" {
			t.Errorf("call after the resets: grpc-status %s", s)
		}
		break
	}
}

// callWhenAdmitted sends a call for domain on stream id, or on the next
// IDs while the server refuses them, and returns the stream admitted.
// The call's handler must block: nothing is read beyond its admission.
func (rc *rawConn) callWhenAdmitted(id uint32, domain string) uint32 {
	rc.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for ; time.Now().Before(deadline); id += 2 {
		rc.writeCall(id, rlsMethod, marshal(rc.t, request(domain)))
		// A PING after the call: its ACK comes after any refusal.
		rc.check(rc.fr.WritePing(false, [8]byte{byte(id)}))
		refused := false
		for {
			f := rc.read()
			if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == [8]byte{byte(id)} {
				break
			}
			if boring(f) {
				continue
			}
			if rst, ok := f.(*http2.RSTStreamFrame); ok && rst.StreamID == id && rst.ErrCode == http2.ErrCodeRefusedStream {
				refused = true
				continue
			}
			rc.t.Fatalf("unexpected %v while opening stream %d", f, id)
		}
		if !refused {
			return id
		}
		time.Sleep(10 * time.Millisecond)
	}
	rc.t.Fatalf("streams refused for 5s")
	return 0
}

// TestRawMaxConcurrentStreams shows that a stream beyond
// MaxConcurrentStreams is refused with REFUSED_STREAM.
func TestRawMaxConcurrentStreams(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 2)
	ts := startServer(t, h2unary.Options{MaxConcurrentStreams: 2}, func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		started <- struct{}{}
		<-release
		return echo(ctx, req)
	})
	rc := dialRaw(t, ts.addr)
	rc.handshake()
	rc.writeCall(1, rlsMethod, marshal(t, request("1")))
	rc.writeCall(3, rlsMethod, marshal(t, request("3")))
	<-started
	<-started
	rc.writeCall(5, rlsMethod, marshal(t, request("5")))
	if r := rc.readResponse(5); r.reset == nil || r.reset.ErrCode != http2.ErrCodeRefusedStream {
		t.Errorf("third stream: %+v, want REFUSED_STREAM", r)
	}
	close(release)
	for id, r := range rc.readResponses(1, 3) {
		if s := r.status(t); s != "0" {
			t.Errorf("stream %d: grpc-status %s", id, s)
		}
	}
}

// TestRawSendFlowControl shows that the server sends no more response
// DATA than the client's stream window allows, resumes on WINDOW_UPDATE
// and on a larger SETTINGS_INITIAL_WINDOW_SIZE, and never sends a DATA
// frame larger than the client's SETTINGS_MAX_FRAME_SIZE.
func TestRawSendFlowControl(t *testing.T) {
	// The test PINGs to learn that the server has sent all it would: any
	// PING rate is fine here.
	ts := startServer(t, h2unary.Options{KeepaliveMinTime: time.Nanosecond}, func(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		return &rlsv3.RateLimitResponse{RawBody: bytes.Repeat([]byte(req.Domain), 100<<10/len(req.Domain))}, nil
	})
	rc := dialRaw(t, ts.addr)
	rc.handshake(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 100})
	rc.check(rc.fr.WriteWindowUpdate(0, 1<<30))
	rc.writeCall(1, rlsMethod, marshal(t, request("abcd")))

	var data []byte
	// sync sends a PING and returns the frames that came before its ACK.
	pingID := byte(0)
	sync := func() (frames []http2.Frame) {
		pingID++
		rc.check(rc.fr.WritePing(false, [8]byte{pingID}))
		for {
			f := rc.read()
			if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == [8]byte{pingID} {
				return frames
			}
			if boring(f) {
				continue
			}
			if d, ok := f.(*http2.DataFrame); ok {
				if d.Length > 16384 {
					t.Fatalf("DATA frame of %d bytes, over the default SETTINGS_MAX_FRAME_SIZE", d.Length)
				}
				data = append(data, d.Data()...)
			}
			frames = append(frames, f)
		}
	}
	// Wait for the headers and the first 100 bytes.
	deadline := time.Now().Add(5 * time.Second)
	for len(data) < 100 && time.Now().Before(deadline) {
		sync()
	}
	if len(data) != 100 {
		t.Fatalf("%d bytes of DATA with a stream window of 100", len(data))
	}
	if fs := sync(); len(fs) != 0 {
		t.Fatalf("frames beyond the window: %v", fs)
	}

	rc.check(rc.fr.WriteWindowUpdate(1, 1000))
	for len(data) < 1100 && time.Now().Before(deadline) {
		sync()
	}
	if len(data) != 1100 {
		t.Fatalf("%d bytes of DATA after WINDOW_UPDATE 1000, want 1100", len(data))
	}

	// A larger initial window applies to open streams (RFC 9113 §6.9.2).
	rc.check(rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20}))
	var trailers *http2.MetaHeadersFrame
	for trailers == nil && time.Now().Before(deadline) {
		for _, f := range sync() {
			if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamEnded() {
				trailers = h
			}
		}
	}
	if trailers == nil {
		t.Fatalf("no trailers after the window opened; %d bytes of DATA", len(data))
	}
	var resp rlsv3.RateLimitResponse
	if len(data) < 5 || proto.Unmarshal(data[5:], &resp) != nil || len(resp.RawBody) != 100<<10 {
		t.Errorf("response of %d bytes does not decode to the 100 KiB raw_body", len(data))
	}
}

// TestRawMaxConnectionIdle shows that an idle connection gets GOAWAY
// NO_ERROR and is closed, and that a connection with a call running past
// MaxConnectionIdle gets its answer before the GOAWAY.
func TestRawMaxConnectionIdle(t *testing.T) {
	ts := startServer(t, h2unary.Options{MaxConnectionIdle: 200 * time.Millisecond}, func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		if req.Domain == "slow" {
			time.Sleep(700 * time.Millisecond)
		}
		return echo(ctx, req)
	})

	rc := dialRaw(t, ts.addr)
	rc.handshake()
	start := time.Now()
	rc.expectGoAway(http2.ErrCodeNo)
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("idle GOAWAY after %v, before MaxConnectionIdle", d)
	}

	rc = dialRaw(t, ts.addr)
	rc.handshake()
	rc.writeCall(1, rlsMethod, marshal(t, request("slow")))
	if s := rc.readResponse(1).status(t); s != "0" { // fails on a GOAWAY first
		t.Errorf("slow call: grpc-status %s", s)
	}
	if ga := rc.expectGoAway(http2.ErrCodeNo); ga.LastStreamID != 1 {
		t.Errorf("idle GOAWAY last stream %d, want 1", ga.LastStreamID)
	}
}

// TestRawGracefulStop shows that GracefulStop sends GOAWAY NO_ERROR naming
// the last stream, answers that stream, ignores streams opened after it,
// and then closes the connection.
func TestRawGracefulStop(t *testing.T) {
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	ts := startServer(t, h2unary.Options{}, func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		if req.Domain == "slow" {
			started <- struct{}{}
			<-release
		}
		return echo(ctx, req)
	})
	rc := dialRaw(t, ts.addr)
	rc.handshake()
	rc.okCall(1)
	rc.writeCall(3, rlsMethod, marshal(t, request("slow")))
	<-started
	stopped := make(chan struct{})
	go func() {
		ts.GracefulStop()
		close(stopped)
	}()
	ga, ok := rc.next().(*http2.GoAwayFrame)
	if !ok || ga.ErrCode != http2.ErrCodeNo || ga.LastStreamID != 3 {
		t.Fatalf("got %v, want GOAWAY NO_ERROR last stream 3", ga)
	}
	rc.writeCall(5, rlsMethod, marshal(t, request("too late")))
	close(release)
	if s := rc.readResponse(3).status(t); s != "0" { // fails on frames of stream 5
		t.Errorf("stream 3: grpc-status %s", s)
	}
	rc.expectClosed()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("GracefulStop did not return")
	}
}

// TestRawPingsBetweenDataFrames shows that DATA the server sends counts
// as "sent something" for PING enforcement, also when it is the rest of a
// response that waited for a WINDOW_UPDATE: a client pinging once per
// window of DATA received (as grpc-go's BDP estimator does) is not told
// too_many_pings. grpc-go's server resets its ping strikes on every DATA
// frame it writes.
func TestRawPingsBetweenDataFrames(t *testing.T) {
	ts := startServer(t, h2unary.Options{KeepaliveMinTime: time.Minute}, func(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		return &rlsv3.RateLimitResponse{RawBody: make([]byte, 10000)}, nil
	})
	rc := dialRaw(t, ts.addr)
	rc.handshake(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1000})
	rc.writeCall(1, rlsMethod, marshal(t, request("d")))
	received := 0
	// readData reads until n more bytes of DATA came on stream 1.
	readData := func(n int) {
		t.Helper()
		for want := received + n; received < want; {
			switch f := rc.next().(type) {
			case *http2.DataFrame:
				received += len(f.Data())
			case *http2.MetaHeadersFrame:
			case *http2.GoAwayFrame:
				t.Fatalf("GOAWAY %v %q after %d bytes of DATA", f.ErrCode, f.DebugData(), received)
			default:
				t.Fatalf("unexpected %v", f)
			}
		}
	}
	readData(1000)
	for i := range 6 {
		// A PING, its ACK, then the window for the next 1000 bytes.
		rc.check(rc.fr.WritePing(false, [8]byte{byte(i)}))
		for {
			f := rc.read()
			if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
				break
			}
			if ga, ok := f.(*http2.GoAwayFrame); ok {
				t.Fatalf("PING %d, each after DATA: GOAWAY %v %q", i+1, ga.ErrCode, ga.DebugData())
			}
			if !boring(f) {
				t.Fatalf("unexpected %v", f)
			}
		}
		rc.check(rc.fr.WriteWindowUpdate(1, 1000))
		readData(1000)
	}
}

// TestRawPingWhileResponseQueued shows that a PING arriving while the
// server has a large response queued (released at once by a WINDOW_UPDATE
// in the same packet) is answered: queued response DATA, which the
// client's windows allowed, is not taken for control frames the client
// fails to read.
func TestRawPingWhileResponseQueued(t *testing.T) {
	const size = 2 << 20
	ts := startServer(t, h2unary.Options{}, func(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		return &rlsv3.RateLimitResponse{RawBody: make([]byte, size)}, nil
	})
	rc := dialRaw(t, ts.addr)
	rc.handshake(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	rc.writeCall(1, rlsMethod, marshal(t, request("d")))
	if h, ok := rc.next().(*http2.MetaHeadersFrame); !ok || h.StreamEnded() {
		t.Fatalf("got %v, want the response headers", h)
	}
	// The whole response waits for the window. Open it and PING, in one
	// write so that the server reads them together.
	var burst bytes.Buffer
	bfr := http2.NewFramer(&burst, nil)
	bfr.WriteWindowUpdate(0, 1<<30)
	bfr.WriteWindowUpdate(1, 1<<30)
	bfr.WritePing(false, [8]byte{'q'})
	rc.write(burst.Bytes())
	var gotPing, gotTrailers bool
	received := 0
	for !gotPing || !gotTrailers {
		switch f := rc.read().(type) {
		case *http2.PingFrame:
			gotPing = gotPing || f.IsAck() && f.Data == [8]byte{'q'}
		case *http2.DataFrame:
			received += len(f.Data())
		case *http2.MetaHeadersFrame:
			gotTrailers = f.StreamEnded()
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v %q after %d bytes of the response", f.ErrCode, f.DebugData(), received)
		case *http2.SettingsFrame, *http2.WindowUpdateFrame:
		default:
			t.Fatalf("unexpected %v", f)
		}
	}
	if received < size {
		t.Errorf("%d bytes of DATA, want more than %d", received, size)
	}
}

// TestRawServerDeadline shows that the server itself ends a call at its
// grpc-timeout: the handler's context expires with DeadlineExceeded and
// the client gets DEADLINE_EXCEEDED without resetting the stream.
func TestRawServerDeadline(t *testing.T) {
	ended := make(chan error, 1)
	ts := startServer(t, h2unary.Options{}, func(ctx context.Context, _ *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Second):
		}
		ended <- ctx.Err()
		return nil, ctx.Err()
	})
	rc := dialRaw(t, ts.addr)
	rc.handshake()
	rc.writeHeaders(1, false, append(grpcHeaders(rlsMethod), header{"grpc-timeout", "100m"}))
	rc.check(rc.fr.WriteData(1, true, frameMsg(0, marshal(t, request("d")))))
	r := rc.readResponse(1)
	if s := r.status(t); s != "4" || !r.trailersOnly {
		t.Errorf("grpc-status %s (trailers-only %v), want 4 (DEADLINE_EXCEEDED)", s, r.trailersOnly)
	}
	if err := <-ended; !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("handler's context ended with %v, want DeadlineExceeded", err)
	}
}

// TestRawHeaderTableSizeZero shows that the server honours a client's
// SETTINGS_HEADER_TABLE_SIZE of 0: its responses decode without an HPACK
// dynamic table.
func TestRawHeaderTableSizeZero(t *testing.T) {
	ts := rawServer(t, h2unary.Options{})
	rc := dialRaw(t, ts.addr)
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(0, nil)
	rc.handshake(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
	for id := uint32(1); id < 8; id += 2 { // the same headers again: indexed if a table were kept
		rc.okCall(id)
	}
	rc.writeCall(9, rlsMethod, marshal(t, request("error")))
	if s := rc.readResponse(9).status(t); s != "7" {
		t.Errorf("grpc-status %s, want 7", s)
	}
}

// TestRawGoAwayWhileResponseWrites shows that a connection error's GOAWAY
// is sent even while another goroutine is writing a response: the server
// does not close the connection under that writer before the GOAWAY is
// out.
func TestRawGoAwayWhileResponseWrites(t *testing.T) {
	const size = 32 << 20 // more than the loopback socket buffers hold
	ts := startServer(t, h2unary.Options{}, func(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		return &rlsv3.RateLimitResponse{RawBody: make([]byte, size)}, nil
	})
	rc := dialRaw(t, ts.addr)
	rc.handshake(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	rc.check(rc.fr.WriteWindowUpdate(0, 1<<31-1-65535))
	rc.writeCall(1, rlsMethod, marshal(t, request("d")))
	// Not reading, the client makes the write of the response block; then
	// it commits a connection error (HEADERS on an even stream).
	time.Sleep(200 * time.Millisecond)
	rc.writeHeaders(2, true, grpcHeaders(rlsMethod))
	received := 0
	for {
		f, err := rc.readErr()
		if err != nil {
			t.Fatalf("connection ended (%v) after %d bytes of the response, without GOAWAY", err, received)
		}
		if d, ok := f.(*http2.DataFrame); ok {
			received += len(d.Data())
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			if ga.ErrCode != http2.ErrCodeProtocol {
				t.Errorf("GOAWAY %v, want PROTOCOL_ERROR", ga.ErrCode)
			}
			return
		}
	}
}
