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
// server over one connection. Callers queue an encoded command and wait; a
// writer goroutine writes all queued commands with one system call; a
// reader goroutine takes the replies in order and hands each to its caller.
// One batch is in flight at a time: the next accumulates while Redis
// answers the last, so under load a write and a read carry many decisions,
// and a lone decision goes out at once.
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
// batch dials again. A command whose caller has given up before it was
// written is not written.
type pipeline struct {
	dial       func(ctx context.Context) (net.Conn, error) // connected and authenticated
	timeout    time.Duration                               // per call, and per dial
	staleAfter time.Duration

	mu      sync.Mutex
	queue   []*pcall // waiting for the writer
	conn    *pconn   // nil: dial with the next batch
	retryAt time.Time
	closed  bool

	wake chan struct{} // capacity 1: the writer has work
	quit chan struct{} // closed by close
	done chan struct{} // closed when the writer has stopped

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
		wake:       make(chan struct{}, 1),
		quit:       make(chan struct{}),
		done:       make(chan struct{}),
	}
	go p.writeLoop()
	return p
}

// pcall is one command and its reply. Whoever finishes last with it puts it
// back in callPool: the caller after reading the reply, or the pipeline
// when the caller gave up first.
type pcall struct {
	cmd    []byte  // RESP-encoded command
	vals   []int64 // the reply: an array of integers
	err    error
	sentAt time.Time
	state  atomic.Int32  // callWaiting, callDone or callAbandoned
	done   chan struct{} // capacity 1
	timer  *time.Timer
}

const (
	callWaiting int32 = iota
	callDone
	callAbandoned
)

var callPool = sync.Pool{New: func() any {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return &pcall{done: make(chan struct{}, 1), timer: t, cmd: make([]byte, 0, 512)}
}}

func getCall() *pcall {
	c := callPool.Get().(*pcall)
	c.state.Store(callWaiting)
	c.cmd, c.vals, c.err = c.cmd[:0], c.vals[:0], nil
	return c
}

func putCall(c *pcall) { callPool.Put(c) }

// finish hands the result to the caller, or recycles the call if the caller
// has given up.
func finish(c *pcall, err error) {
	c.err = err
	if c.state.CompareAndSwap(callWaiting, callDone) {
		c.done <- struct{}{}
		return
	}
	putCall(c)
}

// do sends c.cmd and waits for the reply within the timeout or ctx. On
// success or a Redis error reply the caller owns c again (and puts it back);
// on a timeout it does not.
func (p *pipeline) do(ctx context.Context, c *pcall) (owned bool, err error) {
	p.mu.Lock()
	switch {
	case p.closed:
		p.mu.Unlock()
		return true, errPipelineClosed
	case len(p.queue) >= maxQueued:
		p.mu.Unlock()
		return true, errPipelineFull
	}
	p.queue = append(p.queue, c)
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	c.timer.Reset(p.timeout)
	select {
	case <-c.done:
		c.timer.Stop()
		return true, c.err
	case <-c.timer.C:
		err = errCallTimeout
	case <-ctx.Done():
		c.timer.Stop()
		err = ctx.Err()
	}
	if c.state.CompareAndSwap(callWaiting, callAbandoned) {
		return false, err
	}
	<-c.done // answered meanwhile
	return true, c.err
}

// close fails queued and unanswered calls and stops the goroutines.
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

func (p *pipeline) writeLoop() {
	defer close(p.done)
	tick := time.NewTicker(p.staleAfter / 4)
	defer tick.Stop()
	var batch []*pcall
	for {
		select {
		case <-p.wake:
		case <-tick.C:
			p.checkStale()
			continue
		case <-p.quit:
			p.shutdown()
			return
		}
		// A small batch waits for the goroutines that are runnable now
		// (decisions about to queue): one yield, free when none are.
		p.mu.Lock()
		small := len(p.queue) < yieldBelow
		p.mu.Unlock()
		if small {
			runtime.Gosched()
		}
		p.mu.Lock()
		batch, p.queue = p.queue, batch[:0]
		p.mu.Unlock()
		pc := p.write(batch)
		clear(batch)
		if pc == nil {
			continue
		}
		// Until Redis has answered the batch, callers queue behind it.
	wait:
		for {
			select {
			case <-pc.idle:
				break wait
			case <-tick.C:
				p.checkStale()
			case <-p.quit:
				p.shutdown()
				return
			}
		}
	}
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

// write sends one batch: the calls whose callers still wait, in one write.
// It returns the connection the batch went out on, or nil if nothing was
// sent.
func (p *pipeline) write(batch []*pcall) *pconn {
	live := batch[:0]
	for _, c := range batch {
		if c.state.Load() == callAbandoned {
			putCall(c)
			continue
		}
		live = append(live, c)
	}
	if len(live) == 0 {
		return nil
	}
	pc, err := p.connection()
	if err != nil {
		for _, c := range live {
			finish(c, err)
		}
		return nil
	}
	now := time.Now()
	pc.mu.Lock()
	if pc.err != nil {
		err := pc.err
		pc.mu.Unlock()
		for _, c := range live {
			finish(c, err)
		}
		return nil
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
	}
	return pc
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
	pc = &pconn{c: c, br: bufio.NewReaderSize(c, 16<<10), bw: bufio.NewWriterSize(c, 16<<10), idle: make(chan struct{}, 1)}
	go pc.readLoop()
	p.mu.Lock()
	p.conn = pc
	p.mu.Unlock()
	return pc, nil
}

// checkStale closes the connection if its oldest unanswered command has
// waited longer than staleAfter (Redis hung, or the network black-holed).
func (p *pipeline) checkStale() {
	p.mu.Lock()
	pc := p.conn
	p.mu.Unlock()
	if pc == nil {
		return
	}
	pc.mu.Lock()
	stale := pc.head < len(pc.inflight) && time.Since(pc.inflight[pc.head].sentAt) > p.staleAfter
	pc.mu.Unlock()
	if stale {
		p.stale.Add(1)
		pc.fail(errStale)
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

// pconn is one connection: the writer appends to inflight and writes, the
// reader answers inflight in order.
type pconn struct {
	c  net.Conn
	br *bufio.Reader
	bw *bufio.Writer // the writer goroutine's

	mu       sync.Mutex
	inflight []*pcall // written, unanswered from head on
	head     int
	err      error         // set once: the connection is closed
	idle     chan struct{} // capacity 1: all answered; closed by fail
}

func (pc *pconn) failed() bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.err != nil
}

// fail closes the connection and fails every unanswered call with err.
func (pc *pconn) fail(err error) {
	pc.mu.Lock()
	if pc.err != nil {
		pc.mu.Unlock()
		return
	}
	pc.err = err
	calls := pc.inflight[pc.head:]
	pc.inflight, pc.head = nil, 0
	close(pc.idle)
	pc.mu.Unlock()
	pc.c.Close()
	for _, c := range calls {
		finish(c, err)
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
		if pc.head == len(pc.inflight) {
			pc.inflight, pc.head = pc.inflight[:0], 0
			if pc.err == nil {
				select {
				case pc.idle <- struct{}{}:
				default:
				}
			}
		}
		pc.mu.Unlock()
		vals, replyErr, err := readIntArray(pc.br, c.vals[:0])
		if err != nil {
			finish(c, err)
			pc.fail(err)
			return
		}
		c.vals = vals
		finish(c, replyErr)
		if re, ok := replyErr.(redisError); ok && len(re) >= 8 && re[:8] == "READONLY" {
			// A replica now (Sentinel failover): dial the new master.
			pc.fail(replyErr)
			return
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
