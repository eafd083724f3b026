// Package ratelimitsvc serves Envoy's Rate Limit Service
// (envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit).
//
// Limits are configured in envoyproxy/ratelimit's YAML format (domains,
// nested descriptors, wildcards, unlimited, shadow_mode, replaces), inline
// and from a hot-reloaded directory, with meshguard's extensions: any window
// length, named presets and a sliding or fixed window. Counters live in a
// store: in process (MemoryStore) or in Redis (RedisStore: standalone,
// Sentinel or Cluster, through go-redis), one script call per request;
// the script calls of concurrent requests share go-redis pipelines (see
// pipeline). A refused request does not consume quota. Counters known to
// be over limit are answered from process memory until they reset. When
// the store cannot answer within its timeout, the decision follows
// failure_mode and is never a gRPC error.
//
// Algorithm: the approximated sliding window. Time is cut into buckets of
// the window's length aligned to the Unix epoch; the estimate is the previous
// bucket's count weighted by how much of it the window still covers, plus the
// current bucket's count. fixed_window uses the current bucket only. Time
// comes from meshguard's clock (passed to the Redis script), so replicas
// need synchronised clocks (NTP), as with any epoch-aligned limiter.
//
// Redis keys: <redis.key_prefix>{<16 hex digits of FNV-1a(identity)>}<identity>:<bucket>,
// where identity is the domain, the descriptor's keys and values
// (length-prefixed) and the window. The hash tag keeps one descriptor's two
// buckets in one Cluster slot; keys expire two windows after their bucket.
//
// Metrics: meshguard_ratelimitsvc_decisions_total{domain,code},
// _rule_decisions_total{domain,rule,code}, _local_cache_over_limit_total{domain},
// _store_errors_total{kind}, _store_duration_seconds,
// _failure_mode_decisions_total{mode}, _invalid_requests_total,
// _domain_not_found_total, _config_reloads_total{result},
// _config_last_reload_successful, _config_last_reload_success_timestamp_seconds,
// and with Redis _redis_pool_* (go-redis' pool: hits, misses, timeouts, waits,
// connections) and _redis_pipeline_* (pending_commands{state}, batches_total,
// commands_total, batch_errors_total).
package ratelimitsvc

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Bounds on what one request may ask for; beyond them it is InvalidArgument.
const (
	maxDomainBytes = 255
	maxDescriptors = 32
	maxEntries     = 16
	maxKeyBytes    = 256
	maxValueBytes  = 1024
	maxHits        = math.MaxUint32

	maxPooledIDBytes = 64 << 10
)

// Server answers ShouldRateLimit. It is safe for concurrent use.
type Server struct {
	rlsv3.UnimplementedRateLimitServiceServer
	log     *slog.Logger
	cfg     Config
	store   store
	m       *metrics
	now     func() time.Time
	current atomic.Pointer[installed]

	// config_dir reload state, owned by Run.
	reloadMu  sync.Mutex
	reloadErr error
	loadedFP  [32]byte     // config_dir as New loaded it
	looks     atomic.Int64 // Run's looks at config_dir, for tests to wait on
	lastLog   atomic.Int64 // unix nanos of the last store-failure log line
}

// installed is one configuration in force with what the hot path needs.
type installed struct {
	limits  *limits
	cache   *overLimitCache
	unknown [2]prometheus.Counter // decisions of unknown domains: ok, over_limit
}

// New returns a Server using st for counters. It compiles cfg (inline
// domains, presets and the files in cfg.ConfigDir) and fails if any of it is
// invalid.
func New(log *slog.Logger, reg prometheus.Registerer, cfg Config, st store) (*Server, error) {
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	var fp [32]byte
	if cfg.ConfigDir != "" {
		fp = dirFingerprint(cfg.ConfigDir)
	}
	l, err := cfg.compile()
	if err != nil {
		return nil, fmt.Errorf("loading rate limit configuration: %w", err)
	}
	s := &Server{log: log, cfg: cfg, store: st, m: m, now: time.Now, loadedFP: fp}
	s.install(l)
	m.configOK.Set(1)
	m.reloads.WithLabelValues("success")
	m.reloads.WithLabelValues("error")
	return s, nil
}

// install attaches metrics and response templates to a compiled config and
// puts it in force. The over-limit cache starts empty, since limits may have
// changed.
func (s *Server) install(l *limits) {
	if prev := s.current.Load(); prev != nil {
		// Forget the series of domains that are gone, so reloads do not
		// accumulate labels.
		for name := range prev.limits.domains {
			if _, kept := l.domains[name]; !kept {
				for _, v := range []*prometheus.CounterVec{s.m.decisions, s.m.rules, s.m.localCache} {
					v.DeletePartialMatch(prometheus.Labels{"domain": name})
				}
			}
		}
	}
	for _, d := range l.domains {
		d.decisions = [2]prometheus.Counter{
			s.m.decisions.WithLabelValues(d.name, "ok"), s.m.decisions.WithLabelValues(d.name, "over_limit"),
		}
		d.localCache = s.m.localCache.WithLabelValues(d.name)
		walk(d.root, func(r *rule) {
			s.prepareRule(r)
		})
	}
	s.current.Store(&installed{
		limits: l,
		cache:  newOverLimitCache(s.cfg.LocalCacheSize),
		unknown: [2]prometheus.Counter{
			s.m.decisions.WithLabelValues("_unknown", "ok"), s.m.decisions.WithLabelValues("_unknown", "over_limit"),
		},
	})
	s.m.configTimestamp.SetToCurrentTime()
}

func (s *Server) prepareRule(r *rule) {
	if r.unlimited {
		return
	}
	for i, code := range []string{"ok", "over_limit", "shadow_over_limit"} {
		r.counters[i] = s.m.rules.WithLabelValues(r.domain, r.metricPath, code)
	}
	name := r.name
	if name == "" {
		name = r.presetName
	}
	r.current = &rlsv3.RateLimitResponse_RateLimit{Name: name, RequestsPerUnit: clampU32(r.limit), Unit: r.unit}
	if r.multiplier > 1 {
		r.current.UnitMultiplier = wrapperspb.UInt32(r.multiplier)
	}
}

func walk(n *node, f func(*rule)) {
	if n.rule != nil {
		f(n.rule)
	}
	for _, m := range n.exact {
		for _, c := range m {
			walk(c, f)
		}
	}
	for _, cs := range n.wildcards {
		for _, c := range cs {
			walk(c, f)
		}
	}
	for _, c := range n.defaults {
		walk(c, f)
	}
}

// Register registers the RateLimitService on r.
func (s *Server) Register(r grpc.ServiceRegistrar) {
	rlsv3.RegisterRateLimitServiceServer(r, s)
}

// plan is what the decision knows about one request descriptor.
type plan struct {
	rule    *rule
	counter int // index into counters; -1 when nothing is counted
}

// decision is the state of one ShouldRateLimit call: the configuration it
// was decided under, the request, the answer being built, and the counters
// handed to the store. Decisions are pooled with their buffers.
type decision struct {
	s     *Server
	inst  *installed
	dom   *domain
	req   *rlsv3.RateLimitRequest
	resp  *rlsv3.RateLimitResponse
	durs  []durationpb.Duration
	nowMs int64

	plans    []plan
	reqs     []counterReq
	res      []counterRes
	ids      []byte
	offs     []int
	shareBuf []string
}

var decisions = syncPool(func() *decision { return &decision{ids: make([]byte, 0, 256)} })

func syncPool[T any](newT func() *T) *typedPool[T] {
	return &typedPool[T]{p: sync.Pool{New: func() any { return newT() }}}
}

type typedPool[T any] struct{ p sync.Pool }

func (p *typedPool[T]) Get() *T  { return p.p.Get().(*T) }
func (p *typedPool[T]) Put(x *T) { p.p.Put(x) }

// release forgets the request and puts d back, unless a huge request grew
// its buffers.
func (d *decision) release() {
	d.s, d.inst, d.dom, d.req, d.resp, d.durs = nil, nil, nil, nil, nil, nil
	if cap(d.ids) <= maxPooledIDBytes {
		decisions.Put(d)
	}
}

// ShouldRateLimit decides one request. Malformed requests get
// InvalidArgument; everything else, store failures included, is an answer.
// It blocks while the store evaluates, at most redis.timeout.
func (s *Server) ShouldRateLimit(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	if err := validateRequest(req); err != nil {
		s.m.invalid.Inc()
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	inst := s.current.Load()
	dom := inst.limits.domains[req.Domain]
	resp, durs := newResponse(len(req.Descriptors))
	if dom == nil {
		s.m.domainNotFound.Inc()
		inst.unknown[0].Inc()
		return resp, nil
	}

	d := decisions.Get()
	defer d.release()
	d.s, d.inst, d.dom, d.req, d.resp, d.durs, d.nowMs = s, inst, dom, req, resp, durs, s.now().UnixMilli()
	d.plan()

	// Answer from the over-limit cache when one normal counter is known over.
	for i := range d.reqs {
		r := &d.reqs[i]
		if r.shadow || r.quota || r.hits < 0 {
			continue
		}
		if until, ok := inst.cache.lookup(r.id, r.hash, d.nowMs); ok {
			dom.localCache.Inc()
			return d.cachedOver(i, until-d.nowMs), nil
		}
	}
	if len(d.reqs) == 0 {
		return d.finish(true), nil
	}
	start := time.Now()
	admitted, err := s.store.evaluate(ctx, d.nowMs, d.reqs, d.res)
	s.m.storeDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		return d.failed(err), nil
	}
	return d.finish(admitted), nil
}

// finish fills in each descriptor's status from the counts the store saw
// and the verdict.
func (d *decision) finish(admitted bool) *rlsv3.RateLimitResponse {
	resp, nowMs := d.resp, d.nowMs
	var worst *counterReq // the over-limit counter with the longest wait
	var worstWait time.Duration
	for i, p := range d.plans {
		st := resp.Statuses[i]
		switch {
		case p.rule == nil:
			continue
		case p.rule.unlimited:
			st.LimitRemaining = math.MaxUint32
			continue
		case p.counter < 0: // replaced by another rule
			continue
		}
		r, c := &d.reqs[p.counter], d.res[p.counter]
		st.CurrentLimit = p.rule.current
		over := isOver(r, c, nowMs)
		st.LimitRemaining = clampU32(remaining(r, c, admitted, nowMs))
		var wait time.Duration
		if over {
			wait = retryAfter(r, c, nowMs)
		} else {
			wait = untilReset(r, nowMs)
		}
		st.DurationUntilReset = setDuration(&d.durs[i], wait)
		code := 0
		switch {
		case over && r.shadow:
			code = 2
		case over && (!admitted || !r.quota):
			code = 1
			st.Code = rlsv3.RateLimitResponse_OVER_LIMIT
			if !r.quota && (r.hits == 1 || r.hits == 0) {
				d.inst.cache.add(r.id, r.hash, nowMs, nowMs+wait.Milliseconds())
			}
			if worst == nil || wait > worstWait {
				worst, worstWait = r, wait
			}
		}
		d.s.countRule(p.rule, code, d.req.Descriptors[i].Entries)
	}
	if !admitted {
		resp.OverallCode = rlsv3.RateLimitResponse_OVER_LIMIT
		if worst == nil { // refused through quota counters only
			worstWait = time.Second
		}
		var limit uint64
		if worst != nil {
			limit = worst.limit
		}
		d.s.overLimitReply(resp, limit, worstWait)
		d.dom.decisions[1].Inc()
	} else {
		d.dom.decisions[0].Inc()
	}
	return resp
}

// inlineStatuses is how many descriptor statuses newResponse allocates in
// one block with the response (most requests carry one or two descriptors).
const inlineStatuses = 2

type responseBlock struct {
	resp rlsv3.RateLimitResponse
	ptrs [inlineStatuses]*rlsv3.RateLimitResponse_DescriptorStatus
	sts  [inlineStatuses]rlsv3.RateLimitResponse_DescriptorStatus
	durs [inlineStatuses]durationpb.Duration
}

// newResponse returns an OK response with n OK statuses, and room for their
// durations: one allocation up to inlineStatuses descriptors.
func newResponse(n int) (*rlsv3.RateLimitResponse, []durationpb.Duration) {
	var resp *rlsv3.RateLimitResponse
	var sts []rlsv3.RateLimitResponse_DescriptorStatus
	var durs []durationpb.Duration
	if n <= inlineStatuses {
		b := new(responseBlock)
		resp, sts, durs = &b.resp, b.sts[:n], b.durs[:n]
		resp.Statuses = b.ptrs[:n:n]
	} else {
		resp = &rlsv3.RateLimitResponse{Statuses: make([]*rlsv3.RateLimitResponse_DescriptorStatus, n)}
		sts, durs = make([]rlsv3.RateLimitResponse_DescriptorStatus, n), make([]durationpb.Duration, n)
	}
	resp.OverallCode = rlsv3.RateLimitResponse_OK
	for i := range sts {
		sts[i].Code = rlsv3.RateLimitResponse_OK
		resp.Statuses[i] = &sts[i]
	}
	return resp, durs
}

// setDuration sets d to wait, as durationpb.New does, and returns it.
func setDuration(d *durationpb.Duration, wait time.Duration) *durationpb.Duration {
	d.Seconds = int64(wait / time.Second)
	d.Nanos = int32(wait % time.Second)
	return d
}

// plan matches every descriptor to its rule (or the request's override),
// applies replaces, and fills d.reqs with the counters to evaluate.
func (d *decision) plan() {
	dom, req := d.dom, d.req
	n := len(req.Descriptors)
	d.plans = grow(d.plans, n)
	d.reqs = d.reqs[:0]
	d.ids = d.ids[:0]
	d.offs = d.offs[:0]
	for i, desc := range req.Descriptors {
		var r *rule
		var share []string
		if desc.Limit != nil {
			r = d.s.overrideRule(dom, desc.Limit)
		} else {
			r, share = dom.match(desc.Entries, d.shareBuf)
			d.shareBuf = share[:0]
		}
		d.plans[i] = plan{rule: r, counter: -1}
		if r == nil || r.unlimited {
			continue
		}
		hits := int64(1)
		if req.HitsAddend != 0 {
			hits = int64(req.HitsAddend)
		}
		if desc.HitsAddend != nil {
			hits = int64(desc.HitsAddend.Value)
		}
		if desc.IsNegativeHits {
			hits = -hits
		}
		start := len(d.ids)
		d.ids = appendID(d.ids, dom.name, desc.Entries, share, r.window)
		d.offs = append(d.offs, start, len(d.ids))
		d.plans[i].counter = len(d.reqs)
		d.reqs = append(d.reqs, counterReq{
			window: r.window.Milliseconds(), limit: r.limit, hits: hits,
			fixed: r.fixed, shadow: r.shadow, quota: r.quota,
		})
	}
	// replaces: a matched rule drops the rules it names.
	for i := range d.plans {
		r := d.plans[i].rule
		if r == nil || len(r.replaces) == 0 {
			continue
		}
		for j := range d.plans {
			if o := d.plans[j].rule; j != i && o != nil && o.name != "" && d.plans[j].counter >= 0 && contains(r.replaces, o.name) {
				d.plans[j].counter = -2 // marked; compacted below
			}
		}
	}
	// compact counters of replaced descriptors away.
	k := 0
	for i := range d.plans {
		c := d.plans[i].counter
		if c == -2 {
			d.plans[i].counter = -1
			continue
		}
		if c < 0 {
			continue
		}
		d.reqs[k] = d.reqs[c]
		d.offs[2*k], d.offs[2*k+1] = d.offs[2*c], d.offs[2*c+1]
		d.plans[i].counter = k
		k++
	}
	d.reqs = d.reqs[:k]
	for i := range d.reqs {
		id := d.ids[d.offs[2*i]:d.offs[2*i+1]]
		d.reqs[i].id = id
		d.reqs[i].hash = fnv64(id)
	}
	d.res = grow(d.res, k)
}

func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	return s[:n]
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// overrideRule turns Envoy's per-descriptor limit override into a rule. It is
// cached per (unit, multiplier, limit) on the domain.
func (s *Server) overrideRule(dom *domain, o *rlv3.RateLimitDescriptor_RateLimitOverride) *rule {
	unit := rlsv3.RateLimitResponse_RateLimit_Unit(o.Unit) // same numbering as envoy.type.v3.RateLimitUnit
	mult := uint32(1)
	if o.UnitMultiplier != nil && o.UnitMultiplier.Value > 0 {
		mult = o.UnitMultiplier.Value
	}
	key := overrideKey{unit: unit, mult: mult, limit: o.RequestsPerUnit}
	if r, ok := dom.overrides.Load(key); ok {
		return r.(*rule)
	}
	w := windowOfUnit(unit) * time.Duration(mult)
	r := &rule{domain: dom.name, metricPath: "_override", limit: uint64(o.RequestsPerUnit), window: w}
	r.unit, r.multiplier = unit, mult
	s.prepareRule(r)
	if dom.overrideCount.Add(1) <= maxOverrideRules {
		dom.overrides.Store(key, r)
	}
	return r
}

// maxOverrideRules bounds the override rules remembered per domain.
const maxOverrideRules = 1024

type overrideKey struct {
	unit  rlsv3.RateLimitResponse_RateLimit_Unit
	mult  uint32
	limit uint32
}

// appendID appends a counter's identity: the domain, each entry's key and
// value (or the shared wildcard pattern), length-prefixed so no two
// descriptors collide, and the window.
func appendID(b []byte, domain string, entries []*rlv3.RateLimitDescriptor_Entry, share []string, w time.Duration) []byte {
	b = appendLP(b, domain)
	for i, e := range entries {
		b = appendLP(b, e.Key)
		if i < len(share) && share[i] != "" {
			b = append(b, '*')
			b = appendLP(b, share[i])
		} else {
			b = appendLP(b, e.Value)
		}
	}
	b = append(b, 'w')
	return strconv.AppendInt(b, w.Milliseconds(), 10)
}

func appendLP(b []byte, s string) []byte {
	b = strconv.AppendInt(b, int64(len(s)), 10)
	b = append(b, ':')
	return append(b, s...)
}

func fnv64(b []byte) uint64 {
	h := uint64(14695981039346656037)
	for _, c := range b {
		h ^= uint64(c)
		h *= 1099511628211
	}
	return h
}

func clampU32(v uint64) uint32 {
	if v > math.MaxUint32 {
		return math.MaxUint32
	}
	return uint32(v)
}

func (s *Server) countRule(r *rule, code int, entries []*rlv3.RateLimitDescriptor_Entry) {
	if r.detailed {
		var b strings.Builder
		for i, e := range entries {
			if i > 0 {
				b.WriteByte('.')
			}
			b.WriteString(e.Key)
			b.WriteByte('=')
			b.WriteString(e.Value)
		}
		s.m.rules.WithLabelValues(r.domain, b.String(), [...]string{"ok", "over_limit", "shadow_over_limit"}[code]).Inc()
		return
	}
	if r.counters[code] != nil {
		r.counters[code].Inc()
	}
}

// cachedOver answers OVER_LIMIT because counter ci is in the over-limit cache.
func (d *decision) cachedOver(ci int, waitMs int64) *rlsv3.RateLimitResponse {
	resp := d.resp
	wait := time.Duration(waitMs) * time.Millisecond
	for i, p := range d.plans {
		st := resp.Statuses[i]
		if p.rule != nil && p.rule.unlimited {
			st.LimitRemaining = math.MaxUint32
		}
		if p.counter == ci {
			st.Code = rlsv3.RateLimitResponse_OVER_LIMIT
			st.CurrentLimit = p.rule.current
			st.DurationUntilReset = setDuration(&d.durs[i], wait)
			d.s.countRule(p.rule, 1, d.req.Descriptors[i].Entries)
		}
	}
	resp.OverallCode = rlsv3.RateLimitResponse_OVER_LIMIT
	d.s.overLimitReply(resp, d.reqs[ci].limit, wait)
	d.dom.decisions[1].Inc()
	return resp
}

// failed answers by failure_mode when the store could not decide.
func (d *decision) failed(err error) *rlsv3.RateLimitResponse {
	s, resp := d.s, d.resp
	kind := classifyStoreError(err)
	s.m.storeErrors.WithLabelValues(kind).Inc()
	s.m.failureMode.WithLabelValues(s.cfg.FailureMode).Inc()
	if now := time.Now().UnixNano(); now-s.lastLog.Load() > int64(time.Second) {
		s.lastLog.Store(now)
		s.log.Warn("rate limit store failed; following failure_mode", "kind", kind, "failure_mode", s.cfg.FailureMode, "err", err)
	}
	deny := s.cfg.FailureMode == "deny"
	for i, p := range d.plans {
		st := resp.Statuses[i]
		if p.rule != nil && p.rule.unlimited {
			st.LimitRemaining = math.MaxUint32
		}
		if deny && p.counter >= 0 && !d.reqs[p.counter].shadow {
			st.Code = rlsv3.RateLimitResponse_OVER_LIMIT
			st.CurrentLimit = p.rule.current
		}
	}
	if deny {
		resp.OverallCode = rlsv3.RateLimitResponse_OVER_LIMIT
		var limit uint64
		if len(d.reqs) > 0 {
			limit = d.reqs[0].limit
		}
		s.overLimitReply(resp, limit, time.Second)
		d.dom.decisions[1].Inc()
	} else {
		d.dom.decisions[0].Inc()
	}
	return resp
}

// overLimitReply adds the JSON body and, when configured, Retry-After and
// X-RateLimit-* headers to an OVER_LIMIT answer.
func (s *Server) overLimitReply(resp *rlsv3.RateLimitResponse, limit uint64, wait time.Duration) {
	secs := int64(math.Ceil(wait.Seconds()))
	if secs < 1 {
		secs = 1
	}
	n := strconv.FormatInt(secs, 10)
	resp.RawBody = append(append([]byte(overLimitBodyPrefix), n...), '}')
	headers := []*corev3.HeaderValue{{Key: "content-type", Value: "application/json"}}
	if s.cfg.ResponseHeaders {
		headers = append(headers,
			&corev3.HeaderValue{Key: "retry-after", Value: n},
			&corev3.HeaderValue{Key: "x-ratelimit-limit", Value: strconv.FormatUint(limit, 10)},
			&corev3.HeaderValue{Key: "x-ratelimit-remaining", Value: "0"},
			&corev3.HeaderValue{Key: "x-ratelimit-reset", Value: n},
		)
	}
	resp.ResponseHeadersToAdd = headers
}

const overLimitBodyPrefix = `{"error":"Too many requests","message":"You have exceeded the rate limit. Please try again later.","retryAfter":`

// validateRequest bounds what a client can make one decision cost.
func validateRequest(req *rlsv3.RateLimitRequest) error {
	switch {
	case req.Domain == "":
		return fmt.Errorf("domain: must not be empty")
	case len(req.Domain) > maxDomainBytes:
		return fmt.Errorf("domain: %d bytes, limit %d", len(req.Domain), maxDomainBytes)
	case len(req.Descriptors) == 0:
		return fmt.Errorf("descriptors: at least one is required")
	case len(req.Descriptors) > maxDescriptors:
		return fmt.Errorf("descriptors: %d, limit %d", len(req.Descriptors), maxDescriptors)
	}
	for i, d := range req.Descriptors {
		if d == nil || len(d.Entries) == 0 {
			return fmt.Errorf("descriptors[%d].entries: at least one is required", i)
		}
		if len(d.Entries) > maxEntries {
			return fmt.Errorf("descriptors[%d].entries: %d, limit %d", i, len(d.Entries), maxEntries)
		}
		for j, e := range d.Entries {
			switch {
			case e == nil || e.Key == "":
				return fmt.Errorf("descriptors[%d].entries[%d].key: must not be empty", i, j)
			case len(e.Key) > maxKeyBytes:
				return fmt.Errorf("descriptors[%d].entries[%d].key: %d bytes, limit %d", i, j, len(e.Key), maxKeyBytes)
			case len(e.Value) > maxValueBytes:
				return fmt.Errorf("descriptors[%d].entries[%d].value: %d bytes, limit %d", i, j, len(e.Value), maxValueBytes)
			}
		}
		if d.HitsAddend != nil && d.HitsAddend.Value > maxHits {
			return fmt.Errorf("descriptors[%d].hits_addend: %d, limit %d", i, d.HitsAddend.Value, uint64(maxHits))
		}
		if l := d.Limit; l != nil {
			if windowOfUnit(rlsv3.RateLimitResponse_RateLimit_Unit(l.Unit)) == 0 {
				return fmt.Errorf("descriptors[%d].limit.unit: must be SECOND to YEAR, got %s", i, l.Unit)
			}
			if m := l.UnitMultiplier; m != nil && m.Value > 1000 {
				return fmt.Errorf("descriptors[%d].limit.unit_multiplier: %d, limit 1000", i, m.Value)
			}
		}
	}
	return nil
}
