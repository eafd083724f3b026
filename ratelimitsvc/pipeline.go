package ratelimitsvc

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// pipeline sends the decisions of every concurrent request to one Redis
// server over one connection. Callers queue an encoded command and wait;
// all queued commands go out with one system call; a reader goroutine
// takes the replies in order and hands each to its caller. One batch is in
// flight at a time: the next accumulates while Redis answers the last, so
// under load a write and a read carry many decisions, and a lone decision
// goes out at once.
//
// No goroutine exists just to write: a caller that finds no batch in
// flight writes the queue itself, and the reader, when a batch's last reply
// is in, writes the next. Under load that is the reader, which is awake
// anyway, so a batch costs no goroutine wake-up beyond the reader's own.
// Callers wait on their call and their context; one expiry goroutine
// answers calls that reach the timeout, oldest first, instead of a timer
// per call. Against a writer goroutine and a timer per call, interleaved
// (BenchmarkShouldRateLimitVariants with bin=, 10 rounds): median server
// CPU per decision 43.1 → 40.3 µs for one descriptor, 46.7 → 43.0 µs for
// two; medians of the per-round ratios 0.93x and 0.95x; throughput 1.04x
// and 1.07x.
//
// Redis runs commands one at a time, so one connection carries all a server
// can take, and a decision costs a share of two system calls instead of two
// of its own. go-redis' autopipeliner batched too, but spent 14.5 µs of CPU
// per decision in BenchmarkDecideRedis against 8.8–10.7 µs here (a context
// and timer per call, boxed arguments, a pool checkout per batch), and in
// the gRPC benchmark, interleaved, this made decisions 0.89x (one
// descriptor) and 0.83x (two) as costly.
//
// Faults: a caller never waits longer than the store timeout; a connection
// whose oldest unanswered command is older than staleAfter, or that fails a
// read or write, is closed and its callers get the error at once; the next
// batch dials again, from a goroutine of its own so that no caller waits on
// a dial. A command whose caller has been answered (timed out) before it
// was written is not written.
type pipeline struct {
	dial       func(ctx context.Context) (net.Conn, error) // connected and authenticated
	timeout    time.Duration                               // per call, and per dial
	staleAfter time.Duration

	mu       sync.Mutex
	queue    []*pcall // waiting to be written, oldest first
	spare    []*pcall // the last batch's slice, for the next queue
	qExpired int      // queue[:qExpired] have been answered by expiry
	// writing: someone is responsible for writing the queue: a goroutine
	// in writeNext, or the connection whose batch is in flight (its reader
	// calls writeNext when the batch is answered). Whoever holds it and
	// finds the queue empty clears it.
	writing bool
	conn    *pconn // nil: dial with the next batch
	retryAt time.Time
	closed  bool

	quit chan struct{} // closed by close
	done chan struct{} // closed when the expiry goroutine has stopped

	dials, dialErrors, stale atomic.Uint64
}

// yieldBelow is the batch size under which the writer yields once before
// writing. Interleaved against no yield (BenchmarkShouldRateLimitVariants,
// medians of 5 rounds): 0.98x server CPU per decision for one descriptor,
// 0.94x for two, 1.04x and 1.06x throughput; batches grew from about 6
// decisions.
const yieldBelow = 16

// maxQueued bounds the calls waiting to be written; beyond it calls fail at
// once (a hung Redis cannot make the process hold unbounded memory).
const maxQueued = 1 << 16

var (
	errPipelineClosed = errors.New("redis pipeline closed")
	errPipelineFull   = errors.New("redis pipeline: too many commands waiting")
	errStale          = errors.New("redis did not answer in time; connection closed")
	errCallTimeout    = errors.New("redis call timed out")
)

// redisError is an error reply (e.g. NOSCRIPT, READONLY); the connection is
// fine.
type redisError string

func (e redisError) Error() string { return string(e) }

func newPipeline(dial func(ctx context.Context) (net.Conn, error), timeout time.Duration) *pipeline {
	p := &pipeline{
		dial:       dial,
		timeout:    timeout,
		staleAfter: max(4*timeout, 500*time.Millisecond),
		quit:       make(chan struct{}),
		done:       make(chan struct{}),
	}
	go p.expireLoop()
	return p
}

// pcall is one command and its reply. Until it is answered, the caller and
// the pipeline (queue or connection) both hold it; whoever lets go last
// puts it back in callPool (see release).
type pcall struct {
	cmd      []byte  // RESP-encoded command
	vals     []int64 // the reply: an array of integers
	err      error   // written by whoever answers, before the send on done
	queuedAt time.Time
	sentAt   time.Time
	state    atomic.Int32  // callWaiting, callDone, callExpired or callReleased
	done     chan struct{} // capacity 1; exactly one send per use
}

const (
	callWaiting  int32 = iota
	callDone           // answered by the pipeline: the caller owns the call
	callExpired        // answered by expiry: caller and pipeline both hold it
	callReleased       // expired, and one of the two has let go
)

var callPool = sync.Pool{New: func() any {
	return &pcall{done: make(chan struct{}, 1), cmd: make([]byte, 0, 512)}
}}

func getCall() *pcall {
	c := callPool.Get().(*pcall)
	c.state.Store(callWaiting)
	c.cmd, c.vals, c.err = c.cmd[:0], c.vals[:0], nil
	return c
}

func putCall(c *pcall) { callPool.Put(c) }

// finish answers the caller with err (the reply is in c.vals), or, if
// expiry answered it first, lets go of it.
func finish(c *pcall, err error) {
	if c.state.CompareAndSwap(callWaiting, callDone) {
		c.err = err
		c.done <- struct{}{}
		return
	}
	c.release()
}

// expire answers the caller with a timeout if nobody has answered yet.
func (c *pcall) expire() {
	if c.state.CompareAndSwap(callWaiting, callExpired) {
		c.err = errCallTimeout
		c.done <- struct{}{}
	}
}

// release lets go of an expired call; the second of caller and pipeline to
// let go puts it back.
func (c *pcall) release() {
	if !c.state.CompareAndSwap(callExpired, callReleased) {
		putCall(c)
	}
}

// do sends c.cmd and waits for the reply, at most the timeout or until ctx
// ends. On success or a Redis error reply the caller owns c again (and puts
// it back); on a timeout it does not.
func (p *pipeline) do(ctx context.Context, c *pcall) (owned bool, err error) {
	if err := ctx.Err(); err != nil {
		return true, err
	}
	if err := p.enqueue(c); err != nil {
		return true, err
	}
	select {
	case <-c.done:
	case <-ctx.Done():
		if c.state.CompareAndSwap(callWaiting, callExpired) {
			c.release() // the pipeline puts it back
			return false, ctx.Err()
		}
		<-c.done // answered meanwhile
	}
	if c.state.Load() == callDone {
		return true, c.err
	}
	err = c.err // expired
	c.release()
	return false, err
}

// enqueue queues c, and writes the queue when no batch is being written.
func (p *pipeline) enqueue(c *pcall) error {
	p.mu.Lock()
	switch {
	case p.closed:
		p.mu.Unlock()
		return errPipelineClosed
	case len(p.queue) >= maxQueued:
		p.mu.Unlock()
		return errPipelineFull
	}
	c.queuedAt = time.Now() // under mu: the queue is in deadline order
	p.queue = append(p.queue, c)
	write := !p.writing
	p.writing = true
	p.mu.Unlock()
	if write {
		p.writeNext(false)
	}
	return nil
}

// close fails queued and unanswered calls and stops the expiry goroutine.
func (p *pipeline) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	close(p.quit)
	<-p.done
}

// writeNext writes the queue, batch after batch, until a batch is in flight
// (its connection's reader continues from there) or the queue is empty. The
// caller holds p.writing. A dial happens only when mayDial; otherwise it is
// handed to a new goroutine.
func (p *pipeline) writeNext(mayDial bool) {
	for {
		// A small batch waits for the goroutines that are runnable now
		// (decisions about to queue): one yield, free when none are.
		p.mu.Lock()
		n := len(p.queue)
		p.mu.Unlock()
		if n > 0 && n < yieldBelow {
			runtime.Gosched()
		}
		p.mu.Lock()
		if p.closed {
			p.writing = false // the expiry goroutine fails what is queued
			p.mu.Unlock()
			return
		}
		if len(p.queue) == 0 {
			p.writing = false
			p.mu.Unlock()
			return
		}
		pc := p.conn
		if pc != nil && pc.failed() {
			pc, p.conn = nil, nil
		}
		if pc == nil && !mayDial {
			// A goroutine of its own dials and writes the queue.
			p.mu.Unlock()
			go p.writeNext(true)
			return
		}
		batch := p.queue
		p.queue, p.spare, p.qExpired = p.spare[:0], nil, 0
		p.mu.Unlock()
		sent := p.write(pc, batch)
		clear(batch)
		p.mu.Lock()
		if p.spare == nil {
			p.spare = batch[:0]
		}
		p.mu.Unlock()
		if sent {
			return
		}
	}
}

// write sends one batch on pc (nil: dial one): the calls whose callers
// still wait, in one write. It reports whether a batch is now in flight,
// its connection holding p.writing. If pc fails meanwhile, the batch's
// callers get its error.
func (p *pipeline) write(pc *pconn, batch []*pcall) bool {
	live := batch[:0]
	for _, c := range batch {
		if c.state.Load() != callWaiting {
			c.release() // expired in the queue: never sent
			continue
		}
		live = append(live, c)
	}
	if len(live) == 0 {
		return false
	}
	if pc == nil {
		var err error
		if pc, err = p.connection(); err != nil {
			for _, c := range live {
				finish(c, err)
			}
			return false
		}
	}
	now := time.Now()
	pc.mu.Lock()
	if pc.err != nil {
		err := pc.err
		pc.mu.Unlock()
		for _, c := range live {
			finish(c, err)
		}
		return false
	}
	for _, c := range live {
		c.sentAt = now
	}
	pc.inflight = append(pc.inflight, live...)
	pc.mu.Unlock()
	for _, c := range live {
		pc.bw.Write(c.cmd) // bufio keeps the first error for Flush
	}
	pc.c.SetWriteDeadline(now.Add(p.timeout))
	if err := pc.bw.Flush(); err != nil {
		pc.fail(fmt.Errorf("writing to redis: %w", err))
		return false
	}
	// The batch is in flight: its reader writes the next when the last
	// reply is in, or fail hands the queue on if the connection dies.
	pc.mu.Lock()
	if pc.err != nil || pc.head == len(pc.inflight) {
		// Failed, or answered already: the writing is still ours.
		pc.mu.Unlock()
		return false
	}
	pc.writer = true
	pc.mu.Unlock()
	return true
}

// connection returns the open connection, or dials one. After a failed dial
// the next is tried no sooner than 100 ms later (or the timeout, if
// shorter): calls in between fail at once.
func (p *pipeline) connection() (*pconn, error) {
	p.mu.Lock()
	pc := p.conn
	if pc != nil && !pc.failed() {
		p.mu.Unlock()
		return pc, nil
	}
	p.conn = nil
	if p.closed {
		p.mu.Unlock()
		return nil, errPipelineClosed
	}
	if time.Now().Before(p.retryAt) {
		p.mu.Unlock()
		return nil, errors.New("redis unreachable; retrying shortly")
	}
	p.mu.Unlock()

	p.dials.Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), p.timeout)
	c, err := p.dial(ctx)
	cancel()
	if err != nil {
		p.dialErrors.Add(1)
		p.mu.Lock()
		p.retryAt = time.Now().Add(min(p.timeout, 100*time.Millisecond))
		p.mu.Unlock()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	pc = &pconn{p: p, c: c, br: bufio.NewReaderSize(c, 16<<10), bw: bufio.NewWriterSize(c, 16<<10)}
	p.mu.Lock()
	if p.closed { // closed while dialling
		p.mu.Unlock()
		c.Close()
		return nil, errPipelineClosed
	}
	p.conn = pc
	p.mu.Unlock()
	go pc.readLoop()
	return pc, nil
}

// expireLoop answers calls that have waited the timeout, oldest first, and
// closes the connection when its oldest unanswered command has waited
// staleAfter (Redis hung, or the network black-holed). It sleeps until the
// oldest waiting call is due, and at most the timeout.
func (p *pipeline) expireLoop() {
	defer close(p.done)
	t := time.NewTimer(p.timeout)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-p.quit:
			p.shutdown()
			return
		}
		t.Reset(p.expire(time.Now()))
	}
}

// expire answers the calls queued before now-timeout and returns how long
// until the next is due (at most the timeout).
func (p *pipeline) expire(now time.Time) time.Duration {
	due := now.Add(-p.timeout)
	next := p.timeout
	p.mu.Lock()
	pc := p.conn
	p.mu.Unlock()
	if pc != nil {
		pc.mu.Lock()
		pc.expired, next = expireDue(pc.inflight, max(pc.expired, pc.head), due, next)
		stale := pc.head < len(pc.inflight) && now.Sub(pc.inflight[pc.head].sentAt) > p.staleAfter
		pc.mu.Unlock()
		if stale {
			p.stale.Add(1)
			pc.fail(errStale)
		}
	}
	p.mu.Lock()
	p.qExpired, next = expireDue(p.queue, p.qExpired, due, next)
	p.mu.Unlock()
	return max(next, time.Millisecond)
}

// expireDue answers calls[from:] queued before due, in order, up to the
// first that is not due yet. It returns where it stopped and the shorter of
// next and the time until that call is due.
func expireDue(calls []*pcall, from int, due time.Time, next time.Duration) (int, time.Duration) {
	for i := from; i < len(calls); i++ {
		c := calls[i]
		if c.queuedAt.After(due) {
			return i, min(next, c.queuedAt.Sub(due))
		}
		c.expire()
	}
	return len(calls), next
}

// shutdown fails what is queued and closes the connection (failing what
// is in flight).
func (p *pipeline) shutdown() {
	p.mu.Lock()
	queued := p.queue
	p.queue = nil
	pc := p.conn
	p.mu.Unlock()
	for _, c := range queued {
		finish(c, errPipelineClosed)
	}
	if pc != nil {
		pc.fail(errPipelineClosed)
	}
}

// status is the pipeline's state for /readyz and the metrics.
type pipelineStatus struct {
	Connections              int
	Queued, Inflight         int
	Dials, DialErrors, Stale uint64
}

func (p *pipeline) status() pipelineStatus {
	p.mu.Lock()
	st := pipelineStatus{Queued: len(p.queue)}
	pc := p.conn
	p.mu.Unlock()
	if pc != nil {
		pc.mu.Lock()
		if pc.err == nil {
			st.Connections = 1
		}
		st.Inflight = len(pc.inflight) - pc.head
		pc.mu.Unlock()
	}
	st.Dials, st.DialErrors, st.Stale = p.dials.Load(), p.dialErrors.Load(), p.stale.Load()
	return st
}

// pconn is one connection: write appends a batch to inflight and writes
// it, the reader answers inflight in order.
type pconn struct {
	p  *pipeline
	c  net.Conn
	br *bufio.Reader
	bw *bufio.Writer // written by whoever holds p.writing

	mu       sync.Mutex
	inflight []*pcall // written, unanswered from head on
	head     int
	expired  int   // inflight[head:expired] have been answered by expiry
	writer   bool  // the batch in flight holds p.writing
	err      error // set once: the connection is closed
}

func (pc *pconn) failed() bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.err != nil
}

// fail closes the connection and fails every unanswered call with err. If
// the batch in flight held p.writing, a new goroutine takes it on (and
// dials).
func (pc *pconn) fail(err error) {
	pc.mu.Lock()
	if pc.err != nil {
		pc.mu.Unlock()
		return
	}
	pc.err = err
	calls := pc.inflight[pc.head:]
	pc.inflight, pc.head, pc.expired = nil, 0, 0
	writer := pc.writer
	pc.writer = false
	pc.mu.Unlock()
	pc.c.Close()
	for _, c := range calls {
		finish(c, err)
	}
	if writer {
		go pc.p.writeNext(true)
	}
}

func (pc *pconn) readLoop() {
	for {
		// Wait for the first byte outside the lock, then take the call the
		// reply belongs to.
		if _, err := pc.br.Peek(1); err != nil {
			pc.fail(fmt.Errorf("reading from redis: %w", err))
			return
		}
		pc.mu.Lock()
		if pc.head == len(pc.inflight) {
			err := pc.err
			pc.mu.Unlock()
			if err == nil {
				pc.fail(errors.New("redis sent a reply nobody asked for"))
			}
			return
		}
		c := pc.inflight[pc.head]
		pc.inflight[pc.head] = nil
		pc.head++
		next := false
		if pc.head == len(pc.inflight) {
			pc.inflight, pc.head, pc.expired = pc.inflight[:0], 0, 0
			next, pc.writer = pc.writer, false
		}
		pc.mu.Unlock()
		vals, replyErr, err := readIntArray(pc.br, c.vals[:0])
		if err != nil {
			finish(c, err)
			pc.fail(err)
			if next {
				go pc.p.writeNext(true)
			}
			return
		}
		c.vals = vals
		finish(c, replyErr)
		if re, ok := replyErr.(redisError); ok && len(re) >= 8 && re[:8] == "READONLY" {
			// A replica now (Sentinel failover): dial the new master.
			pc.fail(replyErr)
			if next {
				go pc.p.writeNext(true)
			}
			return
		}
		if next {
			// The batch is answered: send the next one from here.
			pc.p.writeNext(false)
		}
	}
}

// readIntArray reads one reply: an array of integers is appended to vals;
// an error reply is returned as a redisError; anything else is read whole
// and reported as an unexpected reply. err is a connection-level error.
func readIntArray(br *bufio.Reader, vals []int64) (_ []int64, replyErr, err error) {
	line, err := readLine(br)
	if err != nil {
		return vals, nil, err
	}
	switch line[0] {
	case '-':
		return vals, redisError(line[1:]), nil
	case '*':
		n, err := strconv.ParseInt(string(line[1:]), 10, 64)
		if err != nil || n < -1 || n > 1<<20 {
			return vals, nil, fmt.Errorf("redis protocol: bad array header %q", line)
		}
		var bad error
		for range n {
			line, err := readLine(br)
			if err != nil {
				return vals, nil, err
			}
			if line[0] != ':' {
				if err := skipRest(br, line); err != nil {
					return vals, nil, err
				}
				bad = fmt.Errorf("redis replied with a %q element, want integers", line[0])
				continue
			}
			v, err := strconv.ParseInt(string(line[1:]), 10, 64)
			if err != nil {
				return vals, nil, fmt.Errorf("redis protocol: bad integer %q", line)
			}
			vals = append(vals, v)
		}
		return vals, bad, nil
	}
	if err := skipRest(br, line); err != nil {
		return vals, nil, err
	}
	return vals, fmt.Errorf("redis replied with type %q, want an array", line[0]), nil
}

// readLine returns one CRLF-terminated line without the CRLF. It is valid
// until the next read.
func readLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, errors.New("redis protocol: line too long")
		}
		return nil, err
	}
	if len(line) < 3 || line[len(line)-2] != '\r' {
		return nil, fmt.Errorf("redis protocol: bad line %q", line)
	}
	return line[:len(line)-2], nil
}

// skipRest reads the rest of a reply whose first line is line.
func skipRest(br *bufio.Reader, line []byte) error {
	switch line[0] {
	case '+', '-', ':':
		return nil
	case '$':
		n, err := strconv.ParseInt(string(line[1:]), 10, 64)
		if err != nil || n > 512<<20 {
			return fmt.Errorf("redis protocol: bad bulk header %q", line)
		}
		if n < 0 {
			return nil
		}
		_, err = br.Discard(int(n) + 2)
		return err
	case '*':
		n, err := strconv.ParseInt(string(line[1:]), 10, 64)
		if err != nil || n > 1<<20 {
			return fmt.Errorf("redis protocol: bad array header %q", line)
		}
		for range n {
			l, err := readLine(br)
			if err != nil {
				return err
			}
			if err := skipRest(br, l); err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("redis protocol: unknown reply type %q", line[0])
}

// appendArrayHeader, appendBulk and appendBulkInt encode RESP.
func appendArrayHeader(b []byte, n int) []byte {
	b = append(b, '*')
	b = strconv.AppendInt(b, int64(n), 10)
	return append(b, '\r', '\n')
}

func appendBulk(b []byte, s string) []byte {
	b = append(b, '$')
	b = strconv.AppendInt(b, int64(len(s)), 10)
	b = append(b, '\r', '\n')
	b = append(b, s...)
	return append(b, '\r', '\n')
}

func appendBulkInt(b []byte, v int64) []byte {
	var tmp [20]byte
	d := strconv.AppendInt(tmp[:0], v, 10)
	b = append(b, '$')
	b = strconv.AppendInt(b, int64(len(d)), 10)
	b = append(b, '\r', '\n')
	b = append(b, d...)
	return append(b, '\r', '\n')
}

// dialRedis connects to addr (TLS when tlsCfg is set), authenticates and
// selects db, all within ctx.
func dialRedis(ctx context.Context, addr string, tlsCfg *tls.Config, username, password string, db int) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if tlsCfg != nil {
		cfg := tlsCfg.Clone()
		if cfg.ServerName == "" {
			host, _, _ := net.SplitHostPort(addr)
			cfg.ServerName = host
		}
		tc := tls.Client(c, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, fmt.Errorf("redis TLS handshake with %s: %w", addr, err)
		}
		c = tc
	}
	var cmd []byte
	n := 0
	if password != "" {
		if username != "" {
			cmd = appendArrayHeader(cmd, 3)
			cmd = appendBulk(cmd, "AUTH")
			cmd = appendBulk(cmd, username)
		} else {
			cmd = appendArrayHeader(cmd, 2)
			cmd = appendBulk(cmd, "AUTH")
		}
		cmd = appendBulk(cmd, password)
		n++
	}
	if db != 0 {
		cmd = appendArrayHeader(cmd, 2)
		cmd = appendBulk(cmd, "SELECT")
		cmd = appendBulkInt(cmd, int64(db))
		n++
	}
	if n == 0 {
		return c, nil
	}
	if _, err := c.Write(cmd); err != nil {
		c.Close()
		return nil, err
	}
	br := bufio.NewReaderSize(c, 512)
	for range n {
		line, err := readLine(br)
		if err == nil && line[0] == '-' {
			err = redisError(line[1:]) // never echoes the password: Redis does not
		} else if err == nil && line[0] != '+' {
			err = fmt.Errorf("redis handshake: unexpected reply %q", line[0])
		}
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("redis handshake with %s: %w", addr, err)
		}
	}
	if br.Buffered() > 0 {
		c.Close()
		return nil, io.ErrUnexpectedEOF
	}
	return c, nil
}
