package audittrail

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// Writer is the durable ingest path (recordSink): a bounded in-memory queue
// drained by one goroutine that links records into this process's hash
// chain and writes them in batches (COPY for PostgreSQL). When a write fails
// or times out the batch goes to the disk spool, and every later batch
// follows it there until a replayer has written the spool back in order, so
// the database always receives a chain in seq order. Enqueue never waits for
// the database. Writer is safe for concurrent use.
//
// Lifecycle: NewWriter, Run (until ctx is done), Close (drains what is
// queued to the database or the spool within its context's deadline). Close
// must be called even if Run was not.
type Writer struct {
	log   *slog.Logger
	cfg   Config
	store BatchStore
	spool *spool
	m     *writerMetrics
	now   func() time.Time
	// tracer makes a span per batch write; nil: not traced.
	tracer trace.Tracer

	qmu    sync.Mutex
	q      []Record
	closed bool
	space  chan struct{} // closed when queue space frees (then replaced)
	notify chan struct{} // a full batch is waiting

	spoolFreed chan struct{} // closed when the replayer frees spool space (then replaced)
	replayKick chan struct{}

	wmu      sync.Mutex // held while a batch is linked and written: one chain writer
	chain    *chain
	head     atomic.Pointer[ChainHead] // durable head (database or spool)
	lastErr  atomic.Pointer[string]
	pub      *publisher
	dropLogs atomic.Int64

	running   atomic.Bool
	stop      chan struct{}
	stopOnce  sync.Once
	loopDone  chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// Errors Enqueue returns; records are then not accepted.
var (
	ErrWriterClosed = errors.New("audit writer closed")
	ErrQueueFull    = errors.New("audit queue full")
	ErrSpoolFull    = errors.New("audit spool full")
)

// NewWriter opens the spool in cfg.SpoolDir (replaying what a previous run
// left there once Run starts) and the witness in cfg.WitnessDir, and returns
// a Writer over store whose chain keys.Current MACs and signs.
func NewWriter(log *slog.Logger, reg prometheus.Registerer, cfg Config, store BatchStore, keys *Keyring, opts ...WriterOption) (*Writer, error) {
	if err := cfg.validateStore(); err != nil {
		return nil, err
	}
	if keys == nil || keys.Current == nil {
		return nil, errors.New("audit writer: no signing key")
	}
	sp, err := openSpool(cfg.SpoolDir)
	if err != nil {
		return nil, err
	}
	id := chainIDFor(cfg.ChainID, time.Now())
	w := &Writer{
		log: log, cfg: cfg, store: store, spool: sp, now: time.Now,
		space: make(chan struct{}), notify: make(chan struct{}, 1),
		spoolFreed: make(chan struct{}), replayKick: make(chan struct{}, 1),
		chain: newChain(id, keys.Current), stop: make(chan struct{}), loopDone: make(chan struct{}),
	}
	for _, o := range opts {
		o(w)
	}
	if w.pub, err = newPublisher(log, cfg.WitnessDirectory(), keys, func() time.Time { return w.now() }); err != nil {
		sp.close()
		return nil, err
	}
	w.m, err = newWriterMetrics(reg, w)
	if err != nil {
		sp.close()
		return nil, err
	}
	if b, n := sp.size(); n > 0 {
		log.Warn("audit spool holds batches from an earlier run; replaying them", "segments", n, "bytes", b)
	}
	return w, nil
}

// ChainID is the id of the chain this writer appends to.
func (w *Writer) ChainID() string {
	w.wmu.Lock() // link replaces the chain when it is full
	defer w.wmu.Unlock()
	return w.chain.id
}

// Enqueue implements recordSink. It copies recs into the queue and returns
// at once. When the queue is full it waits for space (policy block, until
// ctx is done) or drops recs and returns ErrQueueFull (policy drop). With
// policy drop it also refuses records (ErrSpoolFull) while the spool is
// full. Refused records are counted in
// meshguard_auditsink_writer_dropped_records_total. nil means accepted: the
// records reach the database or the spool (which may then exceed
// audit.spool_max_bytes by at most what the queue held).
func (w *Writer) Enqueue(ctx context.Context, recs []Record) error {
	if len(recs) == 0 {
		return nil
	}
	if w.cfg.SpoolFullPolicy == SpoolFullDrop && w.spoolFull() {
		w.drop("spool_full", len(recs))
		return ErrSpoolFull
	}
	if len(recs) > w.cfg.QueueSize {
		return fmt.Errorf("enqueueing %d audit records: more than audit.queue_size %d", len(recs), w.cfg.QueueSize)
	}
	// Normalise here, on the callers' goroutines, so the single chain
	// writer only hashes.
	norm := make([]Record, len(recs))
	copy(norm, recs)
	for i := range norm {
		normalize(&norm[i])
	}
	recs = norm
	for {
		w.qmu.Lock()
		if w.closed {
			w.qmu.Unlock()
			return ErrWriterClosed
		}
		if len(w.q)+len(recs) <= w.cfg.QueueSize {
			w.q = append(w.q, recs...)
			n := len(w.q)
			w.qmu.Unlock()
			if n >= w.cfg.BatchSize {
				select {
				case w.notify <- struct{}{}:
				default:
				}
			}
			return nil
		}
		if w.cfg.SpoolFullPolicy == SpoolFullDrop {
			w.qmu.Unlock()
			w.drop("queue_full", len(recs))
			return ErrQueueFull
		}
		space := w.space
		w.qmu.Unlock()
		select {
		case <-space:
		case <-ctx.Done():
			return fmt.Errorf("enqueueing audit records: queue full: %w", ctx.Err())
		}
	}
}

// take removes up to BatchSize records from the queue; with fullOnly it
// takes nothing unless a whole batch is waiting.
func (w *Writer) take(fullOnly bool) []Record {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	n := min(len(w.q), w.cfg.BatchSize)
	if n == 0 || (fullOnly && n < w.cfg.BatchSize) {
		return nil
	}
	// The batch keeps the front of the queue's array; the queue moves on
	// past it (append reallocates when it runs out), so taking costs no
	// copy of what stays queued.
	batch := w.q[:n:n]
	w.q = w.q[n:]
	if len(w.q) == 0 {
		w.q = nil
	}
	close(w.space)
	w.space = make(chan struct{})
	return batch
}

func (w *Writer) queueLen() int {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	return len(w.q)
}

// Run writes batches until ctx is done or Close is called, replays the
// spool in the background, and publishes the chain head every
// audit.chain_head_interval. What is still queued when it returns is
// drained by Close.
func (w *Writer) Run(ctx context.Context) error {
	if !w.running.CompareAndSwap(false, true) {
		return errors.New("audit writer: Run called twice")
	}
	defer close(w.loopDone)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); w.replay(ctx) }()
	defer wg.Wait()

	// Linking (in this loop) overlaps with the previous batch's write (in
	// the committer): one linked batch waits while one is in flight.
	pending := make(chan linkedBatch, 1)
	committed := make(chan struct{})
	go func() {
		defer close(committed)
		for lb := range pending {
			w.persist(ctx, lb, true)
		}
	}()
	defer func() { close(pending); <-committed }()

	tick := time.NewTicker(w.cfg.BatchInterval)
	defer tick.Stop()
	heads := time.NewTicker(w.cfg.CheckpointInterval)
	defer heads.Stop()
	for {
		fullOnly := true
		select {
		case <-ctx.Done():
			return nil
		case <-w.stop:
			return nil
		case <-heads.C:
			w.pub.publish()
			continue
		case <-w.notify:
		case <-tick.C:
			fullOnly = false
		}
		for {
			if !w.waitSpoolSpace(ctx) {
				return nil
			}
			batch := w.take(fullOnly)
			if batch == nil {
				break
			}
			pending <- w.link(batch)
		}
	}
}

// waitSpoolSpace blocks (policy block) while batches must go to a full
// spool. It returns false when the writer is stopping.
func (w *Writer) waitSpoolSpace(ctx context.Context) bool {
	for w.cfg.SpoolFullPolicy == SpoolFullBlock && w.spoolFull() {
		w.spoolFullWarn()
		w.qmu.Lock()
		freed := w.spoolFreed
		w.qmu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return false
		case <-w.stop:
			return false
		case <-time.After(time.Second):
		}
	}
	return true
}

// spoolFull: the spool holds batches and has reached audit.spool_max_bytes.
func (w *Writer) spoolFull() bool {
	b, n := w.spool.size()
	return n > 0 && b >= w.cfg.SpoolMaxBytes
}

func (w *Writer) spoolFullWarn() {
	b, n := w.spool.size()
	if w.dropLogs.Add(1)%100 == 1 {
		w.log.Error("audit spool full: the database is not taking writes and the spool reached audit.spool_max_bytes",
			"spool_bytes", b, "spool_segments", n, "max_bytes", w.cfg.SpoolMaxBytes, "policy", w.cfg.SpoolFullPolicy)
	}
}

// process links batch into the chain and persists it (Close's drain).
func (w *Writer) process(ctx context.Context, batch []Record, direct bool) {
	w.persist(ctx, w.link(batch), direct)
}

// linkedBatch is a batch with the chain head it leaves.
type linkedBatch struct {
	recs []Record
	head ChainHead
}

// link assigns the chain columns; one chain, one linker at a time. A chain
// that would pass maxChainSeq (the seq bits of row ids) is closed and a new
// one begun.
func (w *Writer) link(batch []Record) linkedBatch {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	if w.chain.seq+int64(len(batch)) > maxChainSeq {
		w.chain = newChain(chainIDFor(w.cfg.ChainID, w.now()), w.chain.key)
		w.log.Info("audit chain full; a new chain begins", "chain_id", w.chain.id)
	}
	w.chain.linkNormalized(batch)
	return linkedBatch{recs: batch, head: w.chain.head()}
}

// persist makes a linked batch durable, in link order (one persister at a
// time: the committer, then Close's drain): straight to the database when
// the spool is empty (and direct is allowed), else — or when the write
// fails — to the spool, behind the batches already there. It never drops:
// policy drop refuses records at Enqueue instead, so an accepted record
// always lands and the chain has no gap.
//
// Once the batch is durable it is the chain's head; a chain's first durable
// batch is published to the witness at once, so a chain killed before its
// first audit.checkpoint_interval is known all the same.
func (w *Writer) persist(ctx context.Context, lb linkedBatch, direct bool) {
	batch := lb.recs
	stored := false
	if _, segs := w.spool.size(); segs == 0 && direct {
		stored = w.write(ctx, batch, "direct") == nil
	}
	if !stored {
		w.toSpool(batch)
	}
	w.setHead(lb.head)
	first := w.pub.update(lb.head)
	if stored && batch[0].ID != 0 {
		w.pub.setChainNo(batch[0].ChainID, batch[0].ID>>idSeqBits)
	}
	if first {
		w.pub.publish()
	}
}

// write stores one batch within audit.write_timeout.
func (w *Writer) write(ctx context.Context, batch []Record, path string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.cfg.WriteTimeout)
	defer cancel()
	var span trace.Span
	if w.tracer != nil {
		ctx, span = w.tracer.Start(ctx, "audit batch write", trace.WithSpanKind(trace.SpanKindClient),
			trace.WithAttributes(attribute.Int("meshguard.audit.records", len(batch)), attribute.String("meshguard.audit.path", path)))
	}
	start := time.Now()
	dup, err := w.store.writeBatch(ctx, batch)
	w.m.batchSeconds.Observe(time.Since(start).Seconds())
	if span != nil {
		endWriteSpan(span, dup, err)
	}
	if err != nil {
		w.m.writeErrors.Inc()
		msg := err.Error()
		w.lastErr.Store(&msg)
		w.log.Warn("audit batch write failed; the batch waits in the spool", "records", len(batch), "path", path, "err", err)
		return err
	}
	w.lastErr.Store(nil)
	if batch[0].ID != 0 {
		w.pub.setChainNo(batch[0].ChainID, batch[0].ID>>idSeqBits)
	}
	if dup {
		w.m.duplicates.Inc()
		w.log.Info("audit batch already stored (replay after an unacknowledged commit); skipped", "records", len(batch))
		return nil
	}
	w.m.stored.WithLabelValues(path).Add(float64(len(batch)))
	return nil
}

// toSpool appends a linked batch to the spool, retrying until it is
// durable: a linked batch must reach the database or the disk.
func (w *Writer) toSpool(batch []Record) {
	backoff := 50 * time.Millisecond
	for {
		if _, err := w.spool.append(batch); err == nil {
			break
		} else {
			w.log.Error("audit spool write failed; retrying", "records", len(batch), "err", err)
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, 5*time.Second)
	}
	w.m.spooled.Add(float64(len(batch)))
	select {
	case w.replayKick <- struct{}{}:
	default:
	}
}

// replay writes spool segments to the database, oldest first, until ctx is
// done, backing off while the database refuses.
func (w *Writer) replay(ctx context.Context) {
	backoff := 100 * time.Millisecond
	rejects := 0
	for {
		seg, ok := w.spool.oldest()
		if !ok {
			select {
			case <-ctx.Done():
				return
			case <-w.stop:
				return
			case <-w.replayKick:
				continue
			}
		}
		recs, err := w.spool.read(seg)
		if errors.Is(err, errSpoolCorrupt) {
			w.m.corrupt.Inc()
			w.log.Error("audit spool segment corrupt; moved aside for inspection", "err", err)
			if qerr := w.spool.setAside(seg, ".corrupt"); qerr != nil {
				w.log.Error("moving corrupt spool segment aside failed", "err", qerr)
			}
			w.freed()
			continue
		}
		if err == nil {
			err = w.write(ctx, recs, "replay")
		}
		if err == nil {
			rejects = 0
			if err = w.spool.remove(seg); err == nil {
				backoff = 100 * time.Millisecond
				w.freed()
				if _, n := w.spool.size(); n == 0 {
					w.log.Info("audit spool drained: the database is taking writes again")
				}
				continue
			}
			w.log.Error("audit spool cleanup failed", "err", err)
		} else if permanentWriteError(err) {
			// The database refuses this batch's data itself (not an outage).
			// Retrying forever would hold every later batch in the spool, so
			// after a few tries the segment is set aside, whole, for an
			// operator: loud (log, metric), not lost. Verify will show the
			// seq gap its rows leave.
			if rejects++; rejects >= maxRejects {
				rejects = 0
				w.m.rejected.Inc()
				w.log.Error("audit spool segment refused by the database; set aside as *.rejected for an operator",
					"records", len(recs), "first_seq", recs[0].Seq, "chain_id", recs[0].ChainID, "err", err)
				if qerr := w.spool.setAside(seg, ".rejected"); qerr != nil {
					w.log.Error("setting a refused spool segment aside failed", "err", qerr)
				}
				w.freed()
				continue
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-w.stop:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// maxRejects is how many times a batch the database refuses as data is
// retried before its segment is set aside.
const maxRejects = 3

// permanentWriteError reports whether the database refused the data itself:
// SQLSTATE classes 22 (data exception), 23 (integrity; a unique violation
// is a duplicate and never gets here), 54 (program limit, e.g. an index
// row too large), and a chain conflict (see errChainConflict). Connection loss, timeouts, missing tables (migration not
// applied yet) and the like are outages, retried without limit.
func permanentWriteError(err error) bool {
	if errors.Is(err, errChainConflict) {
		return true
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || len(pgErr.Code) != 5 {
		return false
	}
	switch pgErr.Code[:2] {
	case "22", "23", "54":
		return true
	}
	return false
}

// freed wakes a writer waiting for spool space.
func (w *Writer) freed() {
	w.qmu.Lock()
	close(w.spoolFreed)
	w.spoolFreed = make(chan struct{})
	w.qmu.Unlock()
}

func (w *Writer) drop(reason string, n int) {
	w.m.dropped.WithLabelValues(reason).Add(float64(n))
	if w.dropLogs.Add(1)%100 == 1 {
		w.log.Error("audit records dropped", "reason", reason, "records", n, "policy", w.cfg.SpoolFullPolicy)
	}
}

func (w *Writer) setHead(h ChainHead) {
	h.At = w.now().UTC()
	w.head.Store(&h)
	w.m.headSeq.Set(float64(h.Seq))
}

// Head returns the durable chain head (zero before the first batch).
func (w *Writer) Head() ChainHead {
	if h := w.head.Load(); h != nil {
		return *h
	}
	return ChainHead{ChainID: w.ChainID()}
}

// Close stops accepting records, stops Run, and drains the queue: batches
// go to the database while ctx allows and the spool is empty, otherwise to
// the spool, so nothing accepted is lost. While the deadline allows it then
// replays the spool too. Finally it publishes the chain head and releases
// the spool.
func (w *Writer) Close(ctx context.Context) error {
	w.closeOnce.Do(func() { w.closeErr = w.close(ctx) })
	return w.closeErr
}

func (w *Writer) close(ctx context.Context) error {
	w.qmu.Lock()
	w.closed = true
	close(w.space)
	w.space = make(chan struct{})
	w.qmu.Unlock()
	w.stopOnce.Do(func() { close(w.stop) })
	if w.running.Load() {
		<-w.loopDone // Run returns promptly once stop is closed: a write is bounded by write_timeout
	}
	n := 0
	for {
		batch := w.take(false)
		if batch == nil {
			break
		}
		n += len(batch)
		// Once the deadline is near, go straight to disk.
		direct := ctx.Err() == nil
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < w.cfg.WriteTimeout {
			direct = false
		}
		w.process(ctx, batch, direct)
	}
	w.drainSpool(ctx)
	w.pub.publish()
	b, segs := w.spool.size()
	w.log.Info("audit writer closed", "drained_records", n, "spool_segments", segs, "spool_bytes", b,
		"chain_id", w.chain.id, "head_seq", w.Head().Seq)
	w.spool.close()
	return nil
}

// drainSpool replays spool segments at Close while the deadline leaves
// room for a write and the database takes them; the rest waits for the
// next start.
func (w *Writer) drainSpool(ctx context.Context) {
	for ctx.Err() == nil {
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < w.cfg.WriteTimeout {
			return
		}
		seg, ok := w.spool.oldest()
		if !ok {
			return
		}
		recs, err := w.spool.read(seg)
		if err != nil {
			return // the replayer of the next start sets it aside
		}
		if err := w.write(ctx, recs, "replay"); err != nil {
			return
		}
		if err := w.spool.remove(seg); err != nil {
			return
		}
	}
}

// WriterStatus is the writer's health for /readyz and metrics.
type WriterStatus struct {
	QueueRecords  int       `json:"queue_records"`
	QueueCapacity int       `json:"queue_capacity"`
	SpoolBytes    int64     `json:"spool_bytes"`
	SpoolSegments int       `json:"spool_segments"`
	SpoolMaxBytes int64     `json:"spool_max_bytes"`
	SpoolFull     bool      `json:"spool_full"`
	LastError     string    `json:"last_error,omitempty"` // last failed database write, cleared by a success
	Head          ChainHead `json:"head"`
	// Checkpoints counts checkpoints written to the witness;
	// CheckpointError is the last publication's failure, cleared by a success.
	Checkpoints     int64  `json:"checkpoints_published"`
	CheckpointError string `json:"checkpoint_error,omitempty"`
}

// Status reports queue depth, spool size and state, and the chain head.
func (w *Writer) Status() WriterStatus {
	b, n := w.spool.size()
	st := WriterStatus{
		QueueRecords: w.queueLen(), QueueCapacity: w.cfg.QueueSize,
		SpoolBytes: b, SpoolSegments: n, SpoolMaxBytes: w.cfg.SpoolMaxBytes, SpoolFull: w.spoolFull(),
		Head: w.Head(),
	}
	if e := w.lastErr.Load(); e != nil {
		st.LastError = *e
	}
	st.Checkpoints, st.CheckpointError = w.pub.status()
	return st
}

// Ready returns an error while the spool is full (records are then being
// blocked or dropped); a spool that is filling but not full is healthy
// degradation, visible in Status.
func (w *Writer) Ready() error {
	st := w.Status()
	if st.SpoolFull {
		return fmt.Errorf("audit spool full (%d bytes in %d segments, max %d; policy %s)",
			st.SpoolBytes, st.SpoolSegments, st.SpoolMaxBytes, w.cfg.SpoolFullPolicy)
	}
	return nil
}

// writerMetrics are the writer's and spool's metrics.
type writerMetrics struct {
	stored       *prometheus.CounterVec
	spooled      prometheus.Counter
	dropped      *prometheus.CounterVec
	duplicates   prometheus.Counter
	writeErrors  prometheus.Counter
	corrupt      prometheus.Counter
	rejected     prometheus.Counter
	batchSeconds prometheus.Histogram
	headSeq      prometheus.Gauge
}

func newWriterMetrics(reg prometheus.Registerer, w *Writer) (*writerMetrics, error) {
	m := &writerMetrics{
		stored: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_writer_stored_records_total",
			Help: "Audit records committed to the store, by path (direct or replay from the spool).",
		}, []string{"path"}),
		spooled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_spool_records_total",
			Help: "Audit records written to the disk spool.",
		}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_writer_dropped_records_total",
			Help: "Audit records dropped by audit.spool_full_policy=drop, by reason (queue_full, spool_full).",
		}, []string{"reason"}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_writer_duplicate_batches_total",
			Help: "Replayed batches found already stored (commit acknowledged late) and skipped.",
		}),
		writeErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_writer_write_errors_total",
			Help: "Batch writes to the store that failed (the batch was spooled or will be retried).",
		}),
		corrupt: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_spool_corrupt_segments_total",
			Help: "Spool segments that failed their checksum and were moved aside.",
		}),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_spool_rejected_segments_total",
			Help: "Spool segments the database refused as data (not an outage) and that were set aside as *.rejected.",
		}),
		batchSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshguard_auditsink_writer_batch_duration_seconds",
			Help:    "Time to write one batch to the store.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 10),
		}),
		headSeq: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshguard_auditsink_chain_head_seq",
			Help: "Rows in this process's audit chain that are durable in the store or the spool (its head's seq).",
		}),
	}
	cs := []prometheus.Collector{m.stored, m.spooled, m.dropped, m.duplicates, m.writeErrors, m.corrupt, m.rejected, m.batchSeconds, m.headSeq,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshguard_auditsink_writer_queue_records",
			Help: "Audit records waiting in the in-memory queue.",
		}, func() float64 { return float64(w.queueLen()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshguard_auditsink_spool_bytes",
			Help: "Bytes of batches waiting in the disk spool.",
		}, func() float64 { b, _ := w.spool.size(); return float64(b) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshguard_auditsink_spool_segments",
			Help: "Batches waiting in the disk spool.",
		}, func() float64 { _, n := w.spool.size(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshguard_auditsink_spool_full",
			Help: "1 while the spool has reached audit.spool_max_bytes.",
		}, func() float64 {
			if w.spoolFull() {
				return 1
			}
			return 0
		}),
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering audit writer metrics: %w", err)
		}
	}
	for _, r := range []string{"queue_full", "spool_full"} {
		m.dropped.WithLabelValues(r)
	}
	for _, p := range []string{"direct", "replay"} {
		m.stored.WithLabelValues(p)
	}
	return m, nil
}
