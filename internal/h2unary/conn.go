package h2unary

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

const (
	// recvWindow is the connection's receive window: the request bytes a
	// client may have in flight on one connection before it waits for a
	// WINDOW_UPDATE. Each stream gets streamWindow.
	recvWindow   = 1 << 20
	streamWindow = 1 << 20
	// maxHeaderList bounds a request's header list (MAX_HEADER_LIST_SIZE).
	maxHeaderList = 64 << 10
	// maxControlBacklog bounds the bytes queued for a client that sends
	// frames that need an answer (PING, SETTINGS) but does not read them.
	maxControlBacklog = 1 << 20
	// minBatch: a write of less yields once to let more responses join it.
	minBatch = 1024
	// writeTimeout bounds one write to the client.
	writeTimeout = time.Minute
	// maxPingStrikes is how many PINGs closer together than
	// KeepaliveMinTime a client may send, with nothing sent by the server
	// in between, before the connection is closed (grpc-go's policy).
	maxPingStrikes = 2
)

// conn is one client connection. Its reader goroutine (serve) owns the
// frames coming in; responses are written by workers into wbuf under wmu
// and sent by the writer goroutine.
type conn struct {
	s      *Server
	nc     net.Conn
	ctx    context.Context // cancelled when the connection closes
	cancel context.CancelCauseFunc

	// Reader-only state.
	br          *bufio.Reader
	fr          *http2.Framer
	connUnacked uint32 // bytes received and not yet returned by WINDOW_UPDATE
	recvLeft    int64  // connection receive window left
	pingStrikes int
	lastPing    time.Time

	// buffered counts request bytes held: arriving, and complete but not
	// yet handled. Past budget the connection is closed.
	buffered atomic.Int64
	budget   int64

	// sentSince is set when the server sends HEADERS or DATA: PINGs after
	// that do not count against the client.
	sentSince atomic.Bool

	wmu         sync.Mutex
	streams     map[uint32]*stream // open streams
	active      int                // streams counted against MaxConcurrentStreams
	lastID      uint32             // highest client stream ID seen
	wbuf        []byte             // frames to send
	spare       []byte
	wfr         *http2.Framer // writes into wbuf
	henc        *hpack.Encoder
	hbuf        bytes.Buffer
	scratch     []byte
	sendWindow  int64  // connection send window
	peerWindow  int64  // the client's SETTINGS_INITIAL_WINDOW_SIZE
	peerFrame   uint32 // the client's SETTINGS_MAX_FRAME_SIZE
	pending     []*stream
	goingAway   bool   // GOAWAY sent: no new streams
	goAwayID    uint32 // the last stream ID it admits
	closed      bool
	idleSince   time.Time // when active last became 0
	writing     bool      // a goroutine is in flush's write loop
	ctrlQueued  int       // bytes of answers to the client's frames in wbuf
	flushQueued bool      // flushSoon started a goroutine that has not begun
	started     bool      // the server's SETTINGS are queued: other frames may follow
	closeErr    error     // set: close once the queue is sent
}

// wbufWriter lets the write framer append to c.wbuf.
type wbufWriter conn

func (w *wbufWriter) Write(p []byte) (int, error) {
	w.wbuf = append(w.wbuf, p...)
	return len(p), nil
}

// stream is one call. Fields below wmu's comment are guarded by c.wmu.
type stream struct {
	c  *conn
	id uint32
	m  *method // nil: answered before a handler was found

	ctx    context.Context
	cancel context.CancelFunc

	// Reader-only while the request arrives.
	data      []byte    // the request body so far
	buf       *[]byte   // data's pooled buffer
	unacked   uint32    // stream bytes not yet returned by WINDOW_UPDATE
	start     time.Time // when an asynchronous call began, for its Tracker
	recvLeft  int64     // stream receive window left
	reqEnded  bool      // END_STREAM received
	answering bool      // handed to a handler or answered

	// Guarded by c.wmu.
	sendWindow int64
	out        []byte // DATA waiting for a window: length prefix and message
	done       bool   // nothing more is sent: answered, reset, or connection closed
	running    bool   // a handler has it
	counted    bool   // counted in c.active
}

func newConn(s *Server, nc net.Conn) *conn {
	ctx, cancel := context.WithCancelCause(context.Background())
	c := &conn{
		s:          s,
		nc:         nc,
		ctx:        ctx,
		cancel:     cancel,
		br:         bufio.NewReaderSize(nc, 16<<10),
		recvLeft:   recvWindow,
		budget:     max(4*int64(s.opts.MaxRecvMsgSize), 16<<20),
		streams:    map[uint32]*stream{},
		sendWindow: 65535,
		peerWindow: 65535,
		peerFrame:  16384,
		idleSince:  time.Now(),
	}
	c.fr = http2.NewFramer(io.Discard, c.br)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = maxHeaderList
	c.fr.SetReuseFrames()
	// The SETTINGS sent leave SETTINGS_MAX_FRAME_SIZE at its default.
	c.fr.SetMaxReadFrameSize(16384)
	c.wfr = http2.NewFramer((*wbufWriter)(c), nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// serve reads the connection until it fails or closes.
func (c *conn) serve() {
	defer c.shutdown()
	c.nc.SetReadDeadline(time.Now().Add(c.s.opts.ConnectionTimeout))
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c.br, preface); err != nil || string(preface) != http2.ClientPreface {
		return
	}
	c.wmu.Lock()
	c.wfr.WriteSettings(
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.s.opts.MaxConcurrentStreams},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: streamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList},
	)
	c.wfr.WriteWindowUpdate(0, recvWindow-65535)
	c.started = true
	c.wmu.Unlock()
	if c.s.opts.MaxConnectionIdle > 0 {
		go c.idleLoop(c.s.opts.MaxConnectionIdle)
	}

	first := true
	for {
		if c.br.Buffered() == 0 {
			// About to wait for the client: send what its frames asked
			// for (acknowledgements, window updates, early answers).
			c.flushSoon()
		}
		f, err := c.fr.ReadFrame()
		if err != nil {
			if !c.readError(err) {
				return
			}
			continue
		}
		if first {
			// The client's preface ends with a SETTINGS frame (RFC 9113 §3.4).
			c.nc.SetReadDeadline(time.Time{})
			if _, ok := f.(*http2.SettingsFrame); !ok {
				c.connError(http2.ErrCodeProtocol, "first frame is not SETTINGS", nil)
				return
			}
			first = false
		}
		var cerr *connErr
		switch f := f.(type) {
		case *http2.SettingsFrame:
			cerr = c.onSettings(f)
		case *http2.PingFrame:
			cerr = c.onPing(f)
		case *http2.MetaHeadersFrame:
			cerr = c.onHeaders(f)
		case *http2.DataFrame:
			cerr = c.onData(f)
		case *http2.RSTStreamFrame:
			c.onReset(f.StreamID)
		case *http2.WindowUpdateFrame:
			cerr = c.onWindowUpdate(f)
		case *http2.PushPromiseFrame:
			cerr = &connErr{code: http2.ErrCodeProtocol, msg: "PUSH_PROMISE from a client"}
		case *http2.GoAwayFrame:
			// The client opens no more streams; those open are answered.
		default:
			// PRIORITY and unknown frame types are ignored (RFC 9113 §5.5).
		}
		if cerr != nil {
			c.connError(cerr.code, cerr.msg, cerr.debug)
			return
		}
	}
}

// connErr is a connection error: GOAWAY with code, then close.
type connErr struct {
	code  http2.ErrCode
	msg   string
	debug []byte // GOAWAY's debug data
}

// readError handles an error from ReadFrame: a stream error resets that
// stream and reading goes on (true); anything else ends the connection.
func (c *conn) readError(err error) bool {
	var se http2.StreamError
	if errors.As(err, &se) {
		c.wmu.Lock()
		if se.StreamID > c.lastID {
			c.lastID = se.StreamID
		}
		c.wmu.Unlock()
		c.resetStream(se.StreamID, se.Code)
		return true
	}
	var ce http2.ConnectionError
	if errors.As(err, &ce) {
		c.connError(http2.ErrCode(ce), c.fr.ErrorDetail(), nil)
		return false
	}
	if errors.Is(err, http2.ErrFrameTooLarge) {
		c.connError(http2.ErrCodeFrameSize, err, nil)
		return false
	}
	c.close(err)
	return false
}

// connError queues GOAWAY with code; the reader then stops, and shutdown
// sends it and closes the connection.
func (c *conn) connError(code http2.ErrCode, detail any, debug []byte) {
	c.wmu.Lock()
	if !c.closed {
		c.wfr.WriteGoAway(c.lastID, code, debug)
		c.goingAway = true
	}
	if c.closeErr == nil {
		c.closeErr = fmt.Errorf("h2unary: connection error %v: %v", code, detail)
	}
	c.wmu.Unlock()
}

// shutdown ends the connection once its reader stops. After a connection
// error it lets the GOAWAY out first: it sends the queue (waiting up to a
// second for a goroutine still writing), then half-closes and reads what
// the client still sends for up to a second, so that the client reads the
// GOAWAY instead of a TCP reset.
func (c *conn) shutdown() {
	c.wmu.Lock()
	err := c.closeErr
	c.wmu.Unlock()
	if err == nil {
		c.close(errors.New("connection done"))
		return
	}
	deadline := time.Now().Add(time.Second)
	for {
		c.flush()
		c.wmu.Lock()
		sent := c.closed || !c.writing && len(c.wbuf) == 0
		c.wmu.Unlock()
		if sent || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if hc, ok := c.nc.(interface{ CloseWrite() error }); ok && hc.CloseWrite() == nil {
		c.nc.SetReadDeadline(time.Now().Add(time.Second))
		io.Copy(io.Discard, io.LimitReader(c.nc, 1<<20))
	}
	c.close(err)
}

// close closes the connection at once and cancels every call's context.
func (c *conn) close(err error) {
	c.wmu.Lock()
	if c.closed {
		c.wmu.Unlock()
		return
	}
	c.closed = true
	for _, st := range c.streams {
		st.done = true
	}
	c.wmu.Unlock()
	c.cancel(err)
	c.nc.Close()
}

// flush sends what is queued unless another goroutine is sending it
// already. There is no writer goroutine: the first worker to find the
// connection idle writes its response, and keeps writing while others
// queue more, so that one write carries what a burst of responses
// produced. (The reader hands its own frames to flushSoon.)
func (c *conn) flush() {
	c.wmu.Lock()
	c.flushQueued = false
	if c.writing || c.closed || len(c.wbuf) == 0 && !c.drainedLocked() {
		c.wmu.Unlock()
		return
	}
	c.writing = true
	if len(c.wbuf) < minBatch {
		// Responses come in bursts (one Redis batch's replies wake many
		// handlers at once): let the others queue theirs first.
		c.wmu.Unlock()
		runtime.Gosched()
		c.wmu.Lock()
	}
	for len(c.wbuf) > 0 && !c.closed {
		buf := c.wbuf
		c.wbuf = c.spare[:0]
		c.spare = nil
		c.ctrlQueued = 0
		c.wmu.Unlock()
		c.nc.SetWriteDeadline(time.Now().Add(writeTimeout))
		if _, err := c.nc.Write(buf); err != nil {
			c.close(err)
			return
		}
		c.wmu.Lock()
		if cap(buf) <= 64<<10 {
			c.spare = buf[:0]
		}
	}
	c.writing = false
	drained := c.drainedLocked() && !c.closed
	c.wmu.Unlock()
	if drained {
		c.close(errors.New("drained after GOAWAY"))
	}
}

// flushSoon has a goroutine of its own send what the reader queued, so
// that the reader goes on reading while a slow client takes its time.
func (c *conn) flushSoon() {
	c.wmu.Lock()
	need := !c.writing && !c.flushQueued && !c.closed && (len(c.wbuf) > 0 || c.drainedLocked())
	if need {
		c.flushQueued = true
	}
	c.wmu.Unlock()
	if need {
		go c.flush()
	}
}

// drainedLocked reports whether a graceful GOAWAY has no calls left to
// answer: the connection closes once its queue is sent. (After a
// connection error shutdown closes it.)
func (c *conn) drainedLocked() bool {
	return c.goingAway && c.active == 0 && c.closeErr == nil
}

// idleLoop sends GOAWAY once the connection has had no calls for idle.
func (c *conn) idleLoop(idle time.Duration) {
	t := time.NewTimer(idle)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		c.wmu.Lock()
		wait := idle
		if c.active == 0 {
			wait = idle - time.Since(c.idleSince)
		}
		c.wmu.Unlock()
		if wait <= 0 {
			c.goAway()
			return
		}
		t.Reset(wait)
	}
}

// goAway sends GOAWAY: calls already started are answered, then the
// connection closes.
func (c *conn) goAway() {
	c.wmu.Lock()
	if c.closed || c.goingAway {
		c.wmu.Unlock()
		return
	}
	if !c.started {
		// No preface yet: a server's first frame must be SETTINGS, and
		// there is nothing to drain.
		c.wmu.Unlock()
		c.close(errors.New("server stopping before the client's preface"))
		return
	}
	c.goingAway = true
	c.goAwayID = c.lastID
	c.wfr.WriteGoAway(c.lastID, http2.ErrCodeNo, nil)
	c.wmu.Unlock()
	go c.flush() // GracefulStop goes on to the next connection
}

// controlBacklogLocked reports whether so many answers to the client's
// frames (SETTINGS and PING acknowledgements, RST_STREAM) wait unsent that
// the client is asking for them without reading them.
func (c *conn) controlBacklogLocked() bool {
	return c.ctrlQueued > maxControlBacklog
}

func (c *conn) onSettings(f *http2.SettingsFrame) *connErr {
	if f.IsAck() {
		return nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.controlBacklogLocked() {
		return &connErr{code: http2.ErrCodeEnhanceYourCalm, msg: "SETTINGS not acknowledged by a client that does not read"}
	}
	var cerr *connErr
	f.ForeachSetting(func(s http2.Setting) error {
		switch s.ID {
		case http2.SettingInitialWindowSize:
			// The framer has refused values above 2^31-1.
			delta := int64(s.Val) - c.peerWindow
			c.peerWindow = int64(s.Val)
			for _, st := range c.streams {
				st.sendWindow += delta
				if st.sendWindow > 1<<31-1 {
					cerr = &connErr{code: http2.ErrCodeFlowControl, msg: "stream send window above 2^31-1"}
				}
			}
		case http2.SettingMaxFrameSize:
			c.peerFrame = s.Val // the framer has checked the range
		case http2.SettingHeaderTableSize:
			c.henc.SetMaxDynamicTableSizeLimit(s.Val)
		}
		return nil
	})
	if cerr != nil {
		return cerr
	}
	c.wfr.WriteSettingsAck()
	c.ctrlQueued += 9
	c.sendPendingLocked()
	return nil
}

func (c *conn) onPing(f *http2.PingFrame) *connErr {
	if f.IsAck() {
		return nil
	}
	now := time.Now()
	if c.sentSince.Swap(false) {
		c.pingStrikes = 0
	} else if now.Sub(c.lastPing) < c.s.opts.KeepaliveMinTime {
		c.pingStrikes++
		if c.pingStrikes > maxPingStrikes {
			return &connErr{code: http2.ErrCodeEnhanceYourCalm, msg: "too many pings", debug: []byte("too_many_pings")}
		}
	}
	c.lastPing = now
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.controlBacklogLocked() {
		return &connErr{code: http2.ErrCodeEnhanceYourCalm, msg: "PINGs not acknowledged by a client that does not read"}
	}
	c.wfr.WritePing(true, f.Data)
	c.ctrlQueued += 17
	return nil
}

func (c *conn) onHeaders(f *http2.MetaHeadersFrame) *connErr {
	id := f.StreamID
	c.wmu.Lock()
	if st := c.streams[id]; st != nil {
		c.wmu.Unlock()
		// Trailers from the client end its request; gRPC clients send none.
		if st.reqEnded || !f.StreamEnded() {
			c.resetStream(id, http2.ErrCodeProtocol)
			return nil
		}
		c.endRequest(st)
		return nil
	}
	if id%2 == 0 || id <= c.lastID {
		c.wmu.Unlock()
		return &connErr{code: http2.ErrCodeProtocol, msg: fmt.Sprintf("HEADERS on stream %d after %d", id, c.lastID)}
	}
	c.lastID = id
	if c.goingAway {
		// Past the GOAWAY: not processed; the client retries elsewhere.
		c.wmu.Unlock()
		return nil
	}
	if c.active >= int(c.s.opts.MaxConcurrentStreams) {
		c.wmu.Unlock()
		c.resetStream(id, http2.ErrCodeRefusedStream)
		return nil
	}
	st := &stream{c: c, id: id, recvLeft: streamWindow, sendWindow: c.peerWindow, counted: true, reqEnded: f.StreamEnded()}
	c.streams[id] = st
	c.active++
	c.wmu.Unlock()

	if f.Truncated {
		c.answerEarly(st, 200, codes.ResourceExhausted, fmt.Sprintf("header list larger than %d bytes", maxHeaderList))
		return nil
	}
	var path, method, ct, enc, timeout string
	for _, hf := range f.Fields {
		switch hf.Name {
		case ":path":
			path = hf.Value
		case ":method":
			method = hf.Value
		case "content-type":
			ct = hf.Value
		case "grpc-encoding":
			enc = hf.Value
		case "grpc-timeout":
			timeout = hf.Value
		}
	}
	switch {
	case method != "POST":
		c.answerEarly(st, 405, codes.Internal, fmt.Sprintf("invalid :method %q", clip(method)))
		return nil
	case !grpcContentType(ct):
		c.answerEarly(st, 415, codes.Internal, fmt.Sprintf("invalid content-type %q", clip(ct)))
		return nil
	case !contentSubtypeOK(ct):
		c.answerEarly(st, 200, codes.Internal, fmt.Sprintf("no codec for content-type %q", clip(ct)))
		return nil
	case enc != "" && enc != "identity":
		c.answerEarly(st, 200, codes.Unimplemented, fmt.Sprintf("grpc: Decompressor is not installed for grpc-encoding %q", clip(enc)))
		return nil
	}
	st.m = c.s.methods[path]
	if st.m == nil {
		c.answerEarly(st, 200, codes.Unimplemented, fmt.Sprintf("unknown method %s", clip(path)))
		return nil
	}
	if timeout != "" {
		d, ok := parseTimeout(timeout)
		if !ok {
			c.answerEarly(st, 200, codes.Internal, fmt.Sprintf("malformed grpc-timeout %q", clip(timeout)))
			return nil
		}
		st.ctx, st.cancel = context.WithTimeout(c.ctx, d)
	} else {
		st.ctx, st.cancel = context.WithCancel(c.ctx)
	}
	if st.reqEnded {
		c.endRequest(st)
	}
	return nil
}

// answerEarly answers a call with an error status before its handler runs,
// and stops the client from sending the rest of its request.
func (c *conn) answerEarly(st *stream, httpStatus int, code codes.Code, msg string) {
	st.answering = true
	c.release(st)
	c.wmu.Lock()
	c.writeStatusLocked(st, httpStatus, code, msg, true)
	c.finishLocked(st)
	if !st.reqEnded && !c.closed {
		c.wfr.WriteRSTStream(st.id, http2.ErrCodeNo)
	}
	c.wmu.Unlock()
}

// release forgets the request bytes st holds.
func (c *conn) release(st *stream) {
	if n := len(st.data); n > 0 {
		c.buffered.Add(-int64(n))
	}
	if st.buf != nil && cap(st.data) <= maxPooledBuf {
		*st.buf = st.data[:0]
		bufPool.Put(st.buf)
	}
	st.buf, st.data = nil, nil
}

func (c *conn) onData(f *http2.DataFrame) *connErr {
	id := f.StreamID
	n := f.Length // padding counts against flow control
	if int64(n) > c.recvLeft {
		return &connErr{code: http2.ErrCodeFlowControl, msg: "DATA beyond the connection window"}
	}
	c.recvLeft -= int64(n)
	c.connUnacked += n
	c.wmu.Lock()
	st := c.streams[id]
	idle := id > c.lastID
	c.wmu.Unlock()
	var cerr *connErr
	switch {
	case idle:
		cerr = &connErr{code: http2.ErrCodeProtocol, msg: fmt.Sprintf("DATA on idle stream %d", id)}
	case st == nil || st.answering:
		// A stream already answered or reset: the bytes count against the
		// connection window only.
	case st.reqEnded:
		c.resetStream(id, http2.ErrCodeStreamClosed)
	case int64(n) > st.recvLeft:
		c.resetStream(id, http2.ErrCodeFlowControl)
	default:
		st.recvLeft -= int64(n)
		st.unacked += n
		cerr = c.appendData(st, f.Data())
		if cerr == nil && f.StreamEnded() {
			c.endRequest(st)
		} else if cerr == nil && !st.answering && st.unacked >= streamWindow/2 {
			c.wmu.Lock()
			c.wfr.WriteWindowUpdate(id, st.unacked)
			c.wmu.Unlock()
			st.recvLeft += int64(st.unacked)
			st.unacked = 0
		}
	}
	if cerr != nil {
		return cerr
	}
	if c.connUnacked >= recvWindow/4 {
		c.wmu.Lock()
		c.wfr.WriteWindowUpdate(0, c.connUnacked)
		c.wmu.Unlock()
		c.recvLeft += int64(c.connUnacked)
		c.connUnacked = 0
	}
	return nil
}

// appendData adds request bytes to st, answering RESOURCE_EXHAUSTED for a
// message over the limit.
func (c *conn) appendData(st *stream, p []byte) *connErr {
	if len(p) == 0 {
		return nil
	}
	if c.buffered.Add(int64(len(p))) > c.budget {
		c.buffered.Add(-int64(len(p)))
		return &connErr{code: http2.ErrCodeEnhanceYourCalm, msg: "too many request bytes buffered"}
	}
	if st.buf == nil {
		st.buf = bufPool.Get().(*[]byte)
		st.data = (*st.buf)[:0]
	}
	st.data = append(st.data, p...)
	if len(st.data) >= 5 {
		size := int64(binary.BigEndian.Uint32(st.data[1:5]))
		switch {
		case size > int64(c.s.opts.MaxRecvMsgSize):
			c.answerEarly(st, 200, codes.ResourceExhausted,
				fmt.Sprintf("grpc: received message larger than max (%d vs. %d)", size, c.s.opts.MaxRecvMsgSize))
		case int64(len(st.data)) > 5+size:
			c.answerEarly(st, 200, codes.Internal, "grpc: request is not exactly one message")
		}
	}
	return nil
}

// endRequest checks the complete request and hands it to a worker.
func (c *conn) endRequest(st *stream) {
	st.reqEnded = true
	if st.answering {
		return
	}
	b := st.data
	switch {
	case len(b) < 5:
		c.answerEarly(st, 200, codes.Internal, "grpc: request has no message")
		return
	case b[0] == 1:
		c.answerEarly(st, 200, codes.Internal, "grpc: compressed flag set with identity or empty encoding")
		return
	case b[0] != 0:
		c.answerEarly(st, 200, codes.Internal, fmt.Sprintf("grpc: invalid message flag %d", b[0]))
		return
	case int(binary.BigEndian.Uint32(b[1:5])) != len(b)-5:
		c.answerEarly(st, 200, codes.Internal, "grpc: request is not exactly one message")
		return
	}
	st.answering = true
	c.wmu.Lock()
	if st.done { // the connection closed
		c.wmu.Unlock()
		c.release(st)
		st.cancel()
		return
	}
	st.running = true
	c.wmu.Unlock()
	if st.m.async != nil {
		st.runAsync()
		return
	}
	c.s.dispatch(st)
}

// runAsync calls an asynchronous handler on the reader goroutine.
func (st *stream) runAsync() {
	m := st.m
	if m.track != nil {
		m.track.Begin()
		st.start = time.Now()
	}
	msg := st.data[5:]
	codec := st.c.s.opts.Codec
	m.async(st.ctx, func(v any) error {
		if err := codec.Unmarshal(mem.BufferSlice{mem.SliceBuffer(msg)}, v); err != nil {
			return status.Errorf(codes.Internal, "grpc: error unmarshalling request: %v", err)
		}
		return nil
	}, st.reply)
	// The request is decoded (reply may even have run): its bytes can go.
	st.c.release(st)
}

// reply answers an asynchronous call; it may run on any goroutine, and
// hands the write to flushSoon so that it never waits for the client.
func (st *stream) reply(resp any, err error) {
	c := st.c
	if st.m.track != nil {
		st.m.track.End(st.start, err)
	}
	st.cancel()
	c.answer(st, resp, err)
	c.flushSoon()
}

// run calls the handler and answers.
func (st *stream) run() {
	c := st.c
	s := c.s
	msg := st.data[5:]
	dec := func(v any) error {
		if err := s.opts.Codec.Unmarshal(mem.BufferSlice{mem.SliceBuffer(msg)}, v); err != nil {
			return status.Errorf(codes.Internal, "grpc: error unmarshalling request: %v", err)
		}
		return nil
	}
	resp, err := st.m.handler(st.m.impl, st.ctx, dec, s.opts.Interceptor)
	st.cancel()
	c.release(st)
	c.answer(st, resp, err)
	c.flush()
}

// answer queues the response to st: resp, or err's status.
func (c *conn) answer(st *stream, resp any, err error) {
	var out mem.BufferSlice
	if err == nil {
		if out, err = c.s.opts.Codec.Marshal(resp); err != nil {
			err = status.Errorf(codes.Internal, "grpc: error while marshaling: %v", err)
		}
	}
	c.wmu.Lock()
	st.running = false
	switch {
	case st.done:
		c.finishLocked(st)
	case err != nil:
		sts, ok := status.FromError(err)
		if !ok {
			sts = status.FromContextError(err)
		}
		c.writeStatusLocked(st, 200, sts.Code(), sts.Message(), true)
		c.finishLocked(st)
	default:
		if c.writeResponseLocked(st, out) {
			c.finishLocked(st)
		}
	}
	c.wmu.Unlock()
	out.Free()
}

// writeStatusLocked writes a trailers-only response (headersOnly) or the
// trailers after a message.
func (c *conn) writeStatusLocked(st *stream, httpStatus int, code codes.Code, msg string, headersOnly bool) {
	if st.done || c.closed {
		return
	}
	c.hbuf.Reset()
	if headersOnly {
		c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: httpStatusText(httpStatus)})
		c.henc.WriteField(hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
	}
	c.henc.WriteField(hpack.HeaderField{Name: "grpc-status", Value: codeText(code)})
	if msg != "" {
		c.henc.WriteField(hpack.HeaderField{Name: "grpc-message", Value: encodeGRPCMessage(msg), Sensitive: true})
	}
	c.writeHeaderBlockLocked(st.id, c.hbuf.Bytes(), true)
	c.sentSince.Store(true)
}

// writeHeaderBlockLocked writes a header block as HEADERS and, past the
// client's frame size, CONTINUATION frames.
func (c *conn) writeHeaderBlockLocked(id uint32, block []byte, endStream bool) {
	limit := int(c.peerFrame)
	first := block
	if len(first) > limit {
		first = block[:limit]
	}
	rest := block[len(first):]
	c.wfr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndStream: endStream, EndHeaders: len(rest) == 0})
	for len(rest) > 0 {
		chunk := rest
		if len(chunk) > limit {
			chunk = rest[:limit]
		}
		rest = rest[len(chunk):]
		c.wfr.WriteContinuation(id, len(rest) == 0, chunk)
	}
}

// writeResponseLocked writes the response headers and as much of the
// message as the flow-control windows allow; the rest waits in st.out for
// a WINDOW_UPDATE. It reports whether the response is complete.
func (c *conn) writeResponseLocked(st *stream, out mem.BufferSlice) bool {
	if c.closed {
		return true
	}
	c.hbuf.Reset()
	c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
	c.henc.WriteField(hpack.HeaderField{Name: "content-type", Value: "application/grpc"})
	c.writeHeaderBlockLocked(st.id, c.hbuf.Bytes(), false)
	c.sentSince.Store(true)
	buf := binary.BigEndian.AppendUint32(append(c.scratch[:0], 0), uint32(out.Len()))
	for _, b := range out {
		buf = append(buf, b.ReadOnlyData()...)
	}
	st.out = buf
	if c.sendDataLocked(st) {
		if cap(buf) <= 64<<10 {
			c.scratch = buf[:0]
		}
		return true
	}
	// st.out must outlive the next response, which reuses scratch.
	st.out = bytes.Clone(st.out)
	c.pending = append(c.pending, st)
	return false
}

// sendDataLocked sends st.out within the windows and, once all is sent,
// the trailers. It reports whether the response is complete.
func (c *conn) sendDataLocked(st *stream) bool {
	for len(st.out) > 0 {
		n := min(int64(len(st.out)), c.sendWindow, st.sendWindow, int64(c.peerFrame))
		if n <= 0 {
			return false
		}
		c.wfr.WriteData(st.id, false, st.out[:n])
		c.sentSince.Store(true) // as grpc-go: every DATA frame sent forgives PINGs
		st.out = st.out[n:]
		c.sendWindow -= n
		st.sendWindow -= n
	}
	st.out = nil
	c.writeStatusLocked(st, 200, codes.OK, "", false)
	return true
}

// sendPendingLocked sends what the responses waiting for a window can.
func (c *conn) sendPendingLocked() {
	kept := c.pending[:0]
	for _, st := range c.pending {
		if st.done {
			continue // reset meanwhile: finished then
		}
		if c.sendDataLocked(st) {
			c.finishLocked(st)
			continue
		}
		kept = append(kept, st)
	}
	clear(c.pending[len(kept):])
	c.pending = kept
}

// finishLocked closes st for good: nothing more is sent on it, it leaves
// the stream table, and, once no handler has it, the count of active
// streams.
func (c *conn) finishLocked(st *stream) {
	st.done = true
	st.out = nil
	if c.streams[st.id] == st {
		delete(c.streams, st.id)
	}
	if st.counted && !st.running {
		st.counted = false
		c.active--
		if c.active == 0 {
			c.idleSince = time.Now()
		}
	}
}

// onReset handles the client's RST_STREAM.
func (c *conn) onReset(id uint32) {
	c.wmu.Lock()
	st := c.streams[id]
	if st == nil {
		c.wmu.Unlock()
		return
	}
	running := st.running
	c.finishLocked(st)
	c.wmu.Unlock()
	if st.cancel != nil {
		st.cancel()
	}
	if !running && !st.answering {
		c.release(st) // the request was still arriving
	}
	st.answering = true
}

// resetStream sends RST_STREAM with code and forgets the stream.
func (c *conn) resetStream(id uint32, code http2.ErrCode) {
	c.wmu.Lock()
	if !c.closed {
		c.wfr.WriteRSTStream(id, code)
		c.ctrlQueued += 13
	}
	c.wmu.Unlock()
	c.onReset(id)
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) *connErr {
	inc := int64(f.Increment)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if f.StreamID == 0 {
		c.sendWindow += inc
		if c.sendWindow > 1<<31-1 {
			return &connErr{code: http2.ErrCodeFlowControl, msg: "connection send window above 2^31-1"}
		}
	} else if st := c.streams[f.StreamID]; st != nil {
		st.sendWindow += inc
		if st.sendWindow > 1<<31-1 {
			c.wmu.Unlock()
			c.resetStream(st.id, http2.ErrCodeFlowControl)
			c.wmu.Lock()
		}
	}
	if len(c.pending) > 0 {
		c.sendPendingLocked()
	}
	return nil
}
