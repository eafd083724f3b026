package ratelimitsvc

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/trace"
)

// pipeline sends the script calls of concurrent decisions to Redis
// together: every call queued while a batch is in flight goes out in the
// next batch, one go-redis pipeline (Pipeline, Exec) for all of them. Under
// load a round trip and its system calls carry many decisions; a lone
// decision goes out at once. The wire protocol, connections, TLS,
// authentication, Sentinel discovery and, on a ClusterClient, routing each
// call to its slot's master and following MOVED and ASK, are go-redis'.
//
// One goroutine runs the batches, one at a time, while there are calls
// queued; callers only queue and wait, so a caller whose context ends
// stops waiting at once (its call is dropped if it has not been sent).
//
// Deadlines: a call may wait at most the timeout from the moment it is
// queued. A batch runs with the deadline of its oldest call, and calls
// already due are answered without being sent, so every caller has its
// answer within its timeout with no timer per call: the batch before it
// ended by an earlier deadline.
type pipeline struct {
	client  redisClient
	timeout time.Duration
	tracer  trace.Tracer    // nil: batches are not traced
	mode    string          // the store's mode, for spans
	ctx     context.Context // cancelled by close
	cancel  context.CancelFunc
	wake    chan struct{} // capacity 1: the queue has calls and no batch is running
	stopped chan struct{} // closed when run returns

	mu      sync.Mutex
	queue   []*pcall // waiting for a batch, oldest first
	spare   []*pcall // the last batch's slice, for the next queue
	running bool     // run is taking batches; it looks at the queue again before it stops
	closed  bool

	inflight                       atomic.Int64 // calls in the batch in flight
	batches, commands, batchErrors atomic.Uint64
}

// maxQueued bounds the calls waiting for a batch; beyond it calls fail at
// once (a hung Redis cannot make the process hold unbounded memory).
const maxQueued = 1 << 16

var (
	errPipelineClosed = errors.New("redis pipeline closed")
	errPipelineFull   = errors.New("redis pipeline: too many commands waiting")
	errCallTimeout    = errors.New("redis call timed out before it was sent")
)

func newPipeline(client redisClient, timeout time.Duration, tracer trace.Tracer, mode string) *pipeline {
	ctx, cancel := context.WithCancel(context.Background())
	p := &pipeline{client: client, timeout: timeout, tracer: tracer, mode: mode, ctx: ctx, cancel: cancel,
		wake: make(chan struct{}, 1), stopped: make(chan struct{})}
	go p.run()
	return p
}

// pcall is one script call and its reply. Until it is answered, the caller
// and the pipeline both hold it. A caller that gives up leaves it to the
// pipeline (and the garbage collector); otherwise the caller puts it back
// in callPool.
type pcall struct {
	keys     []string
	nums     []int64
	args     []any // "evalsha", sha, numkeys, &keys[i]..., &nums[i]...
	cmd      *redis.IntSliceCmd
	buf      []byte
	deadline time.Time
	trace    trace.SpanContext // the caller's span, when the store traces
	err      error             // written by the pipeline before it moves state to callDone
	state    atomic.Int32      // callWaiting, then callDone (answered) or callAbandoned (caller left)
	done     chan struct{}     // capacity 1: sent on when answered
}

const (
	callWaiting int32 = iota
	callDone
	callAbandoned
)

var callPool = sync.Pool{New: func() any {
	return &pcall{done: make(chan struct{}, 1), buf: make([]byte, 0, 256)}
}}

func getCall() *pcall { return callPool.Get().(*pcall) }

func putCall(c *pcall) {
	c.cmd, c.err, c.trace = nil, nil, trace.SpanContext{}
	callPool.Put(c)
}

// do queues c and waits for its answer: at most the timeout, or until ctx
// ends. owned is false when the caller gave up: c then belongs to the
// pipeline.
func (p *pipeline) do(ctx context.Context, c *pcall) (owned bool, err error) {
	if err := ctx.Err(); err != nil {
		return true, err
	}
	c.state.Store(callWaiting)
	p.mu.Lock()
	switch {
	case p.closed:
		p.mu.Unlock()
		return true, errPipelineClosed
	case len(p.queue) >= maxQueued:
		p.mu.Unlock()
		return true, errPipelineFull
	}
	c.deadline = time.Now().Add(p.timeout) // under mu: the queue is in deadline order
	p.queue = append(p.queue, c)
	wake := !p.running
	p.running = true
	p.mu.Unlock()
	if wake {
		p.wake <- struct{}{}
	}
	select {
	case <-c.done:
	case <-ctx.Done():
		if c.state.CompareAndSwap(callWaiting, callAbandoned) {
			return false, ctx.Err()
		}
		<-c.done // answered meanwhile
	}
	return true, c.err
}

// answer gives c its outcome unless its caller left.
func answer(c *pcall, err error) {
	c.err = err
	if c.state.CompareAndSwap(callWaiting, callDone) {
		c.done <- struct{}{}
	}
}

// run takes batches while calls are queued, until close.
func (p *pipeline) run() {
	defer close(p.stopped)
	for {
		select {
		case <-p.wake:
		case <-p.ctx.Done():
			p.mu.Lock()
			queued := p.queue
			p.queue = nil
			p.mu.Unlock()
			for _, c := range queued {
				answer(c, errPipelineClosed)
			}
			return
		}
		for {
			p.mu.Lock()
			if len(p.queue) == 0 {
				p.running = false
				p.mu.Unlock()
				break
			}
			batch := p.queue
			p.queue, p.spare = p.spare[:0], nil
			p.mu.Unlock()
			p.runBatch(batch)
			clear(batch)
			p.mu.Lock()
			if p.spare == nil {
				p.spare = batch[:0]
			}
			p.mu.Unlock()
		}
	}
}

// runBatch sends the live calls of batch as one pipeline and answers each.
func (p *pipeline) runBatch(batch []*pcall) {
	now := time.Now()
	var deadline time.Time
	live := batch[:0]
	for _, c := range batch {
		switch {
		case c.state.Load() == callAbandoned:
			continue // never sent
		case !now.Before(c.deadline):
			answer(c, errCallTimeout)
			continue
		}
		if deadline.IsZero() {
			deadline = c.deadline // the oldest: the queue is in deadline order
		}
		c.cmd = redis.NewIntSliceCmd(context.Background(), c.args...)
		c.cmd.SetFirstKeyPos(3)
		live = append(live, c)
	}
	if len(live) == 0 {
		return
	}
	p.inflight.Store(int64(len(live)))
	ctx, cancel := context.WithDeadline(p.ctx, deadline)
	var span trace.Span
	if p.tracer != nil {
		ctx, span = p.traceBatch(ctx, live)
	}
	p.exec(ctx, live)
	cancel()
	p.inflight.Store(0)
	if span != nil {
		// Ended before the callers are answered, so that it ends within
		// the decision that is its parent.
		endBatchSpan(span, live)
	}
	closed := p.ctx.Err() != nil
	for _, c := range live {
		err := c.cmd.Err()
		if err != nil && closed {
			err = errPipelineClosed
		}
		answer(c, err)
	}
}

// endBatchSpan ends a batch's span with the number of its calls that
// failed and the class of the first failure.
func endBatchSpan(span trace.Span, live []*pcall) {
	failed := 0
	var first error
	for _, c := range live {
		if err := c.cmd.Err(); err != nil {
			if failed++; first == nil {
				first = err
			}
		}
	}
	if failed > 0 {
		span.SetAttributes(attrFailedKey.Int(failed))
	}
	endSpan(span, first)
}

// traceBatch starts the span of one round trip when sampled decisions ride
// in it. A batch carries decisions of many traces: its span is the child of
// the oldest sampled decision's span and links the others, so every traced
// decision leads to the round trip that answered it, at the cost of one
// span per batch and a link per traced decision, none per untraced one.
// The span is nil when no decision in the batch is sampled.
func (p *pipeline) traceBatch(ctx context.Context, live []*pcall) (context.Context, trace.Span) {
	var parent trace.SpanContext
	var links []trace.Link
	for _, c := range live {
		switch {
		case !c.trace.IsSampled():
		case !parent.IsValid():
			parent = c.trace
		default:
			links = append(links, trace.Link{SpanContext: c.trace})
		}
	}
	if !parent.IsValid() {
		return ctx, nil
	}
	return p.tracer.Start(trace.ContextWithSpanContext(ctx, parent), "BATCH EVALSHA",
		trace.WithSpanKind(trace.SpanKindClient), trace.WithLinks(links...),
		trace.WithAttributes(attrRedis, attrEvalSHA, attrModeKey.String(p.mode),
			attrBatchSizeKey.Int(len(live)), attrTracedCallKey.Int(len(links)+1)))
}

// exec runs the calls' commands in one pipeline until ctx's deadline. Calls
// whose script Redis does not have (NOSCRIPT: its cache was flushed) run
// again with EVAL, which loads it.
func (p *pipeline) exec(ctx context.Context, calls []*pcall) {
	p.batches.Add(1)
	p.commands.Add(uint64(len(calls)))
	pipe := p.client.Pipeline()
	for _, c := range calls {
		pipe.Process(ctx, c.cmd)
	}
	_, err := pipe.Exec(ctx)
	if err == nil {
		return
	}
	var again bool
	for _, c := range calls {
		if isNoScript(c.cmd.Err()) {
			c.args[0], c.args[1] = "eval", evaluateScriptArg
			c.cmd = redis.NewIntSliceCmd(context.Background(), c.args...)
			c.cmd.SetFirstKeyPos(3)
			pipe.Process(ctx, c.cmd)
			again = true
		}
	}
	if again {
		_, err = pipe.Exec(ctx)
	}
	if err == nil {
		return
	}
	// Calls without a reply get the batch's error: go-redis leaves theirs
	// unset when the connection's handshake fails (AUTH, SELECT).
	failed := false
	for _, c := range calls {
		if c.cmd.Err() == nil && c.cmd.Val() == nil {
			c.cmd.SetErr(err)
			failed = true
		} else if err := c.cmd.Err(); err != nil && !isRedisError(err) {
			failed = true
		}
	}
	if failed {
		p.batchErrors.Add(1) // the connection failed, not one script
	}
}

// close refuses later calls, answers the queued ones with
// errPipelineClosed and stops run; the batch in flight ends when go-redis'
// connections are closed.
func (p *pipeline) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cancel()
}

// pipelineStatus is the pipeline's state for /readyz and the metrics.
type pipelineStatus struct {
	Queued, Inflight               int
	Batches, Commands, BatchErrors uint64
}

func (p *pipeline) status() pipelineStatus {
	p.mu.Lock()
	st := pipelineStatus{Queued: len(p.queue), Inflight: int(p.inflight.Load())}
	p.mu.Unlock()
	st.Batches, st.Commands, st.BatchErrors = p.batches.Load(), p.commands.Load(), p.batchErrors.Load()
	return st
}

func isNoScript(err error) bool { return err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT") }

// isRedisError reports an error reply from Redis (the connection is fine).
func isRedisError(err error) bool {
	var re redis.Error
	return errors.As(err, &re)
}
