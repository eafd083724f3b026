package ratelimitsvc

import (
	"context"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/trace"
)

// evaluateScript runs one request's counters that live in one slot. KEYS are
// pairs (current bucket, previous bucket); ARGV[1] is "1" when quota
// counters may refuse here (every counter of the request is in this call),
// then five values per counter: limit, hits, weight of the previous bucket in
// parts per million (-1: fixed window), TTL in ms, flags (1 shadow, 2 quota).
// It returns the counts seen before the hits, pairwise, then 1 when the
// hits were added (admitted) or 0. The admission rule mirrors admit().
//
// All counts are read with one MGET and each counter is written with one
// SET ... PX (the count read plus the hits, carried over when a request
// names a counter twice) instead of GET, GET, INCRBY and PEXPIRE per
// counter: the script runs atomically, so nothing changes the count in
// between, and Redis does less work per counter (README, Performance).
const evaluateScript = `
local n = #KEYS / 2
local out = {}
local over = false
local quotas, quotasOver = 0, 0
local got = redis.call('MGET', unpack(KEYS))
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local limit = tonumber(ARGV[a])
  local hits = tonumber(ARGV[a + 1])
  local w = tonumber(ARGV[a + 2])
  local flags = tonumber(ARGV[a + 4])
  local cur = tonumber(got[2 * i - 1] or '0')
  local prev = 0
  if w >= 0 then prev = tonumber(got[2 * i] or '0') end
  out[2 * i - 1] = cur
  out[2 * i] = prev
  if hits >= 0 and flags % 2 == 0 then
    local need = hits
    if need == 0 then need = 1 end
    local est = cur
    if w >= 0 then est = prev * w / 1000000 + cur end
    local o = est + need > limit
    if flags >= 2 then
      quotas = quotas + 1
      if o then quotasOver = quotasOver + 1 end
    elseif o then
      over = true
    end
  end
end
if ARGV[1] == '1' and quotas > 0 and quotasOver == quotas then over = true end
if over then
  out[2 * n + 1] = 0
  return out
end
local now = {}
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local hits = tonumber(ARGV[a + 1])
  if hits ~= 0 then
    local k = KEYS[2 * i - 1]
    local v = (now[k] or out[2 * i - 1]) + hits
    if v < 0 then v = 0 end
    now[k] = v
    redis.call('SET', k, string.format('%d', v), 'PX', ARGV[a + 3])
  end
end
out[2 * n + 1] = 1
return out
`

var evaluateSHA = func() string {
	sum := sha1.Sum([]byte(evaluateScript))
	return hex.EncodeToString(sum[:])
}()

// evaluateSHAArg and evaluateScriptArg are the script's hash and text as
// go-redis arguments, boxed once rather than on every call.
var evaluateSHAArg, evaluateScriptArg any = evaluateSHA, evaluateScript

// redisClient is what RedisStore needs of go-redis: *redis.Client (standalone
// or Sentinel) and *redis.ClusterClient both provide it.
type redisClient interface {
	redis.Scripter
	Pipeline() redis.Pipeliner
	Ping(ctx context.Context) *redis.StatusCmd
	PoolStats() *redis.PoolStats
	Close() error
}

// RedisStore keeps counters in Redis (standalone, Sentinel or Cluster), so
// every replica shares them. One script call per request evaluates and
// updates all of its counters in one round trip; in Cluster mode counters
// in different slots are grouped by slot and the groups pipelined. With
// redis.autopipeline, a request whose counters share a slot joins the
// script calls of concurrent requests in one go-redis pipeline (see
// pipeline). It is safe for concurrent use.
type RedisStore struct {
	log     *slog.Logger
	client  redisClient
	pipe    *pipeline            // nil unless redis.autopipeline
	cluster *redis.ClusterClient // nil unless Cluster mode
	mode    string
	addrs   []string
	timeout time.Duration
	prefix  string
	tracer  trace.Tracer // nil: not traced (see WithTracerProvider)
}

// NewRedisStore connects lazily to the configured Redis and registers the
// pool metrics on reg. cfg must be valid and Enabled.
func NewRedisStore(log *slog.Logger, reg prometheus.Registerer, cfg RedisConfig, opts ...StoreOption) (*RedisStore, error) {
	s := &RedisStore{log: log, timeout: cfg.Timeout, prefix: cfg.KeyPrefix}
	for _, o := range opts {
		o(s)
	}
	pool := cfg.PoolSize
	if pool == 0 {
		pool = 10 * runtime.GOMAXPROCS(0)
	}
	var roots *x509.CertPool
	if cfg.TLSCAFile != "" {
		var err error
		if roots, err = loadCAs(cfg.TLSCAFile); err != nil {
			return nil, fmt.Errorf("reading redis.tls_ca_file: %w", err)
		}
	}
	var tlsCfg *tls.Config
	if cfg.TLS {
		tlsCfg = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
	}
	switch {
	case cfg.URL.IsSet():
		opt, err := redis.ParseURL(cfg.URL.Reveal())
		if err != nil {
			return nil, fmt.Errorf("parsing redis.url %s: %w", cfg.URL, err)
		}
		applyTimeouts(opt, cfg.Timeout, pool, cfg.MinIdleConns)
		if opt.TLSConfig != nil { // rediss://
			opt.TLSConfig.MinVersion = tls.VersionTLS12
			opt.TLSConfig.RootCAs = roots
		}
		s.client, s.mode, s.addrs = redis.NewClient(opt), "standalone", []string{opt.Addr}
	case len(cfg.Cluster) > 0:
		opt := &redis.ClusterOptions{
			Addrs: cfg.Cluster, Username: cfg.Username, Password: cfg.Password.Reveal(), TLSConfig: tlsCfg,
			DialTimeout: cfg.Timeout, ReadTimeout: cfg.Timeout, WriteTimeout: cfg.Timeout, PoolTimeout: cfg.Timeout,
			ContextTimeoutEnabled: true, MaxRetries: -1, MaxRedirects: 2, DialerRetries: 1,
			PoolSize: pool, MinIdleConns: cfg.MinIdleConns, DisableIdentity: true,
		}
		c := redis.NewClusterClient(opt)
		s.client, s.cluster, s.mode, s.addrs = c, c, "cluster", cfg.Cluster
	default:
		opt := &redis.FailoverOptions{
			MasterName: cfg.Sentinel.Master, SentinelAddrs: cfg.Sentinel.Addrs,
			SentinelPassword: cfg.Sentinel.Password.Reveal(),
			Username:         cfg.Username, Password: cfg.Password.Reveal(), TLSConfig: tlsCfg,
			DialTimeout: cfg.Timeout, ReadTimeout: cfg.Timeout, WriteTimeout: cfg.Timeout, PoolTimeout: cfg.Timeout,
			ContextTimeoutEnabled: true, MaxRetries: -1, DialerRetries: 1,
			PoolSize: pool, MinIdleConns: cfg.MinIdleConns, DisableIdentity: true,
		}
		s.client, s.mode, s.addrs = redis.NewFailoverClient(opt), "sentinel", cfg.Sentinel.Addrs
	}
	if cfg.Autopipeline {
		s.pipe = newPipeline(s.client, cfg.Timeout, s.tracer, s.mode)
	}
	if reg != nil {
		var err error
		if err = reg.Register(newPoolCollector(s.client.PoolStats)); err == nil && s.pipe != nil {
			err = reg.Register(newPipelineCollector(s.pipe.status))
		}
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("registering redis pool metrics: %w", err)
		}
	}
	return s, nil
}

func applyTimeouts(opt *redis.Options, timeout time.Duration, pool, minIdle int) {
	opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = timeout, timeout, timeout, timeout
	opt.ContextTimeoutEnabled = true
	opt.MaxRetries = -1 // one attempt: the deadline is the caller's, retries would overrun it
	opt.DialerRetries = 1
	opt.PoolSize = pool
	opt.MinIdleConns = minIdle
	opt.DisableIdentity = true
}

// Close closes every connection.
func (s *RedisStore) Close() error {
	if s.pipe != nil {
		s.pipe.close()
	}
	return s.client.Close()
}

// Mode is standalone, sentinel or cluster.
func (s *RedisStore) Mode() string { return s.mode }

// PoolStats returns the connection pool statistics.
func (s *RedisStore) PoolStats() *redis.PoolStats { return s.client.PoolStats() }

// Ping checks that Redis answers within the store timeout: in Cluster mode,
// every master.
func (s *RedisStore) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, max(s.timeout, time.Second))
	defer cancel()
	if s.cluster != nil {
		return s.cluster.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			return c.Ping(ctx).Err()
		})
	}
	return s.client.Ping(ctx).Err()
}

// Status describes the store for /readyz: mode, seed addresses (no
// credentials), go-redis pool statistics, and the decision pipelines' state
// when autopipelined.
func (s *RedisStore) Status() map[string]any {
	st := s.client.PoolStats()
	out := map[string]any{"mode": s.mode, "addrs": s.addrs, "autopipeline": s.pipe != nil, "pool": poolDetails((*redis.PoolStats)(st))}
	if s.pipe != nil {
		ps := s.pipe.status()
		out["pipeline"] = map[string]any{
			"queued": ps.Queued, "inflight": ps.Inflight,
			"batches": ps.Batches, "commands": ps.Commands, "batch_errors": ps.BatchErrors,
		}
	}
	return out
}

func poolDetails(st *redis.PoolStats) map[string]any {
	return map[string]any{
		"hits": st.Hits, "misses": st.Misses, "timeouts": st.Timeouts,
		"total_conns": st.TotalConns, "idle_conns": st.IdleConns, "stale_conns": st.StaleConns,
		"wait_count": st.WaitCount, "wait_duration_ms": float64(st.WaitDurationNs) / 1e6,
		"pending_requests": st.PendingRequests,
	}
}

// keys appends the current and previous bucket keys of r:
// <prefix>{<hash>}<id>:<bucket>. The hash tag keeps both in one Cluster slot.
func (s *RedisStore) appendKeys(keys []string, buf []byte, r *counterReq, bucket int64) ([]string, []byte) {
	start := len(buf)
	buf = s.appendKey(buf, r, bucket)
	cur := string(buf[start:])
	buf = s.appendKey(buf[:start], r, bucket-1)
	prev := string(buf[start:])
	return append(keys, cur, prev), buf[:start]
}

// appendKey appends the key of r's counter for bucket.
func (s *RedisStore) appendKey(b []byte, r *counterReq, bucket int64) []byte {
	b = append(b, s.prefix...)
	b = append(b, '{')
	b = appendHex16(b, r.hash)
	b = append(b, '}')
	b = append(b, r.id...)
	b = append(b, ':')
	return strconv.AppendInt(b, bucket, 10)
}

func appendHex16(b []byte, h uint64) []byte {
	const digits = "0123456789abcdef"
	for i := 60; i >= 0; i -= 4 {
		b = append(b, digits[(h>>uint(i))&0xf])
	}
	return b
}

// group is the counters of one request that share a Cluster slot.
type group struct {
	idx  []int // indexes into the request's counters
	keys []string
	args []any
	cmd  *redis.Cmd
}

func (s *RedisStore) buildGroup(g *group, reqs []counterReq, nowMs int64, quotaLocal bool, buf []byte) []byte {
	g.keys = g.keys[:0]
	g.args = g.args[:0]
	if quotaLocal {
		g.args = append(g.args, "1")
	} else {
		g.args = append(g.args, "0")
	}
	for _, i := range g.idx {
		r := &reqs[i]
		a := argsOf(r, nowMs)
		g.keys, buf = s.appendKeys(g.keys, buf, r, a.bucket)
		g.args = append(g.args, r.limit, r.hits, a.weight, a.ttl, a.flags)
	}
	return buf
}

// counterArgs are the script arguments of one counter (see evaluateScript).
type counterArgs struct {
	bucket, weight, ttl, flags int64
}

func argsOf(r *counterReq, nowMs int64) counterArgs {
	bucket, w := bucketOf(r, nowMs)
	a := counterArgs{bucket: bucket, weight: w, ttl: (bucket+2)*r.window - nowMs + 1000}
	if r.fixed {
		a.ttl = (bucket+1)*r.window - nowMs + 1000
	}
	if r.shadow {
		a.flags |= 1
	}
	if r.quota {
		a.flags |= 2
	}
	return a
}

// buildCall fills c with the script call for all of reqs (one slot): the
// keys and arguments buildGroup makes, held in c's reused slices and passed
// to go-redis by pointer, so that the call allocates only its keys' text.
func (s *RedisStore) buildCall(c *pcall, reqs []counterReq, nowMs int64) {
	n := len(reqs)
	c.buf = c.buf[:0]
	c.nums = c.nums[:0]
	c.keys = c.keys[:0]
	ends := make([]int, 0, 2*maxDescriptors)
	c.nums = append(c.nums, 1) // ARGV[1]: every counter of the request is here
	for i := range reqs {
		r := &reqs[i]
		a := argsOf(r, nowMs)
		c.buf = s.appendKey(c.buf, r, a.bucket)
		ends = append(ends, len(c.buf))
		c.buf = s.appendKey(c.buf, r, a.bucket-1)
		ends = append(ends, len(c.buf))
		c.nums = append(c.nums, int64(r.limit), r.hits, a.weight, a.ttl, a.flags)
	}
	all := string(c.buf)
	start := 0
	for _, end := range ends {
		c.keys = append(c.keys, all[start:end])
		start = end
	}
	c.args = append(c.args[:0], "evalsha", evaluateSHAArg, 2*n)
	for i := range c.keys {
		c.args = append(c.args, &c.keys[i])
	}
	for i := range c.nums {
		c.args = append(c.args, &c.nums[i])
	}
}

// parse copies a script reply into res and reports whether hits were added.
func parseReply(cmd *redis.Cmd, idx []int, res []counterRes) (bool, error) {
	v, err := cmd.Slice()
	if err != nil {
		return false, err
	}
	if len(v) != 2*len(idx)+1 {
		return false, fmt.Errorf("script returned %d values for %d counters", len(v), len(idx))
	}
	for j, i := range idx {
		cur, ok1 := v[2*j].(int64)
		prev, ok2 := v[2*j+1].(int64)
		if !ok1 || !ok2 {
			return false, fmt.Errorf("script returned %T, %T", v[2*j], v[2*j+1])
		}
		res[i] = counterRes{cur: cur, prev: prev}
	}
	flag, _ := v[len(v)-1].(int64)
	return flag == 1, nil
}

func (s *RedisStore) evaluate(ctx context.Context, nowMs int64, reqs []counterReq, res []counterRes) (bool, error) {
	if s.pipe == nil || s.cluster != nil && !oneSlot(reqs) {
		return s.evaluateDirect(ctx, nowMs, reqs, res)
	}
	c := getCall()
	s.buildCall(c, reqs, nowMs)
	if s.tracer != nil {
		// The batch that carries c makes the span (see pipeline.traceBatch).
		c.trace = trace.SpanContextFromContext(ctx)
	}
	owned, err := s.pipe.do(ctx, c)
	if !owned {
		return false, err
	}
	defer putCall(c)
	if err != nil {
		return false, err
	}
	v := c.cmd.Val()
	if len(v) != 2*len(reqs)+1 {
		return false, fmt.Errorf("script returned %d values for %d counters", len(v), len(reqs))
	}
	for i := range reqs {
		res[i] = counterRes{cur: v[2*i], prev: v[2*i+1]}
	}
	return v[len(v)-1] == 1, nil
}

// oneSlot reports whether reqs' keys all live in one Cluster slot.
func oneSlot(reqs []counterReq) bool {
	slot := keySlot(reqs[0].hash)
	for i := 1; i < len(reqs); i++ {
		if keySlot(reqs[i].hash) != slot {
			return false
		}
	}
	return true
}

// evaluateDirect evaluates through go-redis, one round trip (per slot in
// Cluster mode), within the store's timeout.
func (s *RedisStore) evaluateDirect(ctx context.Context, nowMs int64, reqs []counterReq, res []counterRes) (admitted bool, err error) {
	if s.tracer != nil && trace.SpanContextFromContext(ctx).IsSampled() {
		var span trace.Span
		ctx, span = s.tracer.Start(ctx, "EVALSHA", trace.WithSpanKind(trace.SpanKindClient),
			trace.WithAttributes(attrRedis, attrEvalSHA, attrModeKey.String(s.mode), attrCountersKey.Int(len(reqs))))
		defer func() { endSpan(span, err) }()
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	sc := scratchPool.Get()
	defer scratchPool.Put(sc)
	if s.cluster == nil || len(reqs) == 1 {
		g := &sc.groups[0]
		g.idx = g.idx[:0]
		for i := range reqs {
			g.idx = append(g.idx, i)
		}
		sc.buf = s.buildGroup(g, reqs, nowMs, true, sc.buf)
		cmd := s.client.EvalSha(ctx, evaluateSHA, g.keys, g.args...)
		if isNoScript(cmd.Err()) {
			cmd = s.client.Eval(ctx, evaluateScript, g.keys, g.args...)
		}
		return parseReply(cmd, g.idx, res)
	}
	return s.evaluateCluster(ctx, sc, nowMs, reqs, res)
}

// evaluateCluster runs one script per slot, pipelined (go-redis sends each
// node's share concurrently). Each group refuses on its own normal counters;
// the request's verdict is then computed over all counters, and groups that
// added hits to a refused request give them back.
func (s *RedisStore) evaluateCluster(ctx context.Context, sc *redisScratch, nowMs int64, reqs []counterReq, res []counterRes) (bool, error) {
	ng := 0
	slots := sc.slots[:0]
	for i := range reqs {
		slot := keySlot(reqs[i].hash)
		gi := -1
		for j, sl := range slots {
			if sl == slot {
				gi = j
				break
			}
		}
		if gi < 0 {
			gi = ng
			ng++
			slots = append(slots, slot)
			if len(sc.groups) < ng {
				sc.groups = append(sc.groups, group{})
			}
			sc.groups[gi].idx = sc.groups[gi].idx[:0]
		}
		sc.groups[gi].idx = append(sc.groups[gi].idx, i)
	}
	sc.slots = slots
	groups := sc.groups[:ng]
	for gi := range groups {
		sc.buf = s.buildGroup(&groups[gi], reqs, nowMs, ng == 1, sc.buf)
	}
	run := func(only func(*group) bool, sha bool) error {
		pipe := s.client.Pipeline()
		for gi := range groups {
			g := &groups[gi]
			if !only(g) {
				continue
			}
			if sha {
				g.cmd = pipe.EvalSha(ctx, evaluateSHA, g.keys, g.args...)
			} else {
				g.cmd = pipe.Eval(ctx, evaluateScript, g.keys, g.args...)
			}
		}
		_, err := pipe.Exec(ctx)
		return err
	}
	err := run(func(*group) bool { return true }, true)
	if err != nil {
		missing := false
		for gi := range groups {
			if isNoScript(groups[gi].cmd.Err()) {
				missing = true
			}
		}
		if missing {
			err = run(func(g *group) bool { return isNoScript(g.cmd.Err()) }, false)
		}
	}
	if err != nil {
		return false, err
	}
	committed := sc.committed[:0]
	for gi := range groups {
		ok, err := parseReply(groups[gi].cmd, groups[gi].idx, res)
		if err != nil {
			return false, err
		}
		committed = append(committed, ok)
	}
	sc.committed = committed
	if admit(reqs, res, nowMs) {
		allCommitted := true
		for _, c := range committed {
			allCommitted = allCommitted && c
		}
		if allCommitted {
			return true, nil
		}
		// A group refused on its own although the request as a whole is
		// admitted (cannot happen with the same rule; kept as a guard).
		return false, nil
	}
	// Refused: take back what other groups added.
	pipe := s.client.Pipeline()
	refunds := 0
	for gi := range groups {
		if !committed[gi] {
			continue
		}
		g := &groups[gi]
		for j, i := range g.idx {
			if h := reqs[i].hits; h > 0 {
				pipe.DecrBy(ctx, g.keys[2*j], h)
				refunds++
			}
		}
	}
	if refunds > 0 {
		if _, err := pipe.Exec(ctx); err != nil {
			s.log.Warn("giving back hits of a refused request failed", "err", err)
		}
	}
	return false, nil
}

type redisScratch struct {
	groups    []group
	slots     []uint16
	committed []bool
	buf       []byte
}

var scratchPool = syncPool(func() *redisScratch {
	return &redisScratch{groups: make([]group, 1), buf: make([]byte, 0, 512)}
})

// keySlot is the Redis Cluster slot of a key whose hash tag is the 16 hex
// digits of h: CRC16/XMODEM of the tag, mod 16384.
func keySlot(h uint64) uint16 {
	var tag [16]byte
	appendHex16(tag[:0], h)
	var crc uint16
	for _, b := range tag {
		crc ^= uint16(b) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc % 16384
}

// classifyStoreError names a store error for the errors metric.
func classifyStoreError(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, errCallTimeout), isTimeout(err):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, redis.ErrPoolTimeout), errors.Is(err, errPipelineFull):
		return "pool_timeout"
	}
	return "error"
}

func isTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

// poolCollector exports go-redis pool statistics at scrape time, labelled
// pool="main" (decisions use it when redis.autopipeline is off).
type poolCollector struct {
	stats                                     func() *redis.PoolStats
	hits, misses, timeouts, waits, waitSecs   *prometheus.Desc
	conns, idle, stale, pending, unusableDesc *prometheus.Desc
}

func newPoolCollector(stats func() *redis.PoolStats) *poolCollector {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("meshguard_ratelimitsvc_redis_pool_"+name, help, []string{"pool"}, nil)
	}
	return &poolCollector{
		stats:        stats,
		hits:         d("hits_total", "Times a free connection was found in the pool."),
		misses:       d("misses_total", "Times no free connection was in the pool."),
		timeouts:     d("timeouts_total", "Times waiting for a connection timed out."),
		waits:        d("waits_total", "Times a caller waited for a connection."),
		waitSecs:     d("wait_seconds_total", "Total time callers waited for a connection."),
		conns:        d("connections", "Open connections."),
		idle:         d("idle_connections", "Idle connections."),
		stale:        d("stale_connections_total", "Stale connections removed from the pool."),
		pending:      d("pending_requests", "Callers waiting for a connection now."),
		unusableDesc: d("unusable_connections_total", "Connections found unusable."),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.hits, c.misses, c.timeouts, c.waits, c.waitSecs, c.conns, c.idle, c.stale, c.pending, c.unusableDesc} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	c.collect(ch, "main", st)
}

func (c *poolCollector) collect(ch chan<- prometheus.Metric, pool string, st *redis.PoolStats) {
	counter := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, pool)
	}
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, pool)
	}
	counter(c.hits, float64(st.Hits))
	counter(c.misses, float64(st.Misses))
	counter(c.timeouts, float64(st.Timeouts))
	counter(c.waits, float64(st.WaitCount))
	counter(c.waitSecs, float64(st.WaitDurationNs)/1e9)
	gauge(c.conns, float64(st.TotalConns))
	gauge(c.idle, float64(st.IdleConns))
	counter(c.stale, float64(st.StaleConns))
	gauge(c.pending, float64(st.PendingRequests))
	counter(c.unusableDesc, float64(st.Unusable))
}

// pipelineCollector exports the state of the decision pipeline at scrape
// time.
type pipelineCollector struct {
	status                           func() pipelineStatus
	pending, batches, commands, errs *prometheus.Desc
}

func newPipelineCollector(status func() pipelineStatus) *pipelineCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("meshguard_ratelimitsvc_redis_pipeline_"+name, help, labels, nil)
	}
	return &pipelineCollector{
		status:   status,
		pending:  d("pending_commands", "Script calls waiting for a batch (queued) or in the batch in flight (inflight).", "state"),
		batches:  d("batches_total", "Pipelines sent to Redis, each carrying the decisions queued meanwhile."),
		commands: d("commands_total", "Script calls sent in pipelines (divided by batches: the mean batch)."),
		errs:     d("batch_errors_total", "Pipelines that failed as a whole (connection, timeout), not by one script's error reply."),
	}
}

func (c *pipelineCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.pending, c.batches, c.commands, c.errs} {
		ch <- d
	}
}

func (c *pipelineCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.status()
	ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(st.Queued), "queued")
	ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(st.Inflight), "inflight")
	ch <- prometheus.MustNewConstMetric(c.batches, prometheus.CounterValue, float64(st.Batches))
	ch <- prometheus.MustNewConstMetric(c.commands, prometheus.CounterValue, float64(st.Commands))
	ch <- prometheus.MustNewConstMetric(c.errs, prometheus.CounterValue, float64(st.BatchErrors))
}
