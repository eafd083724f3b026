package ratelimitsvc

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
)

// limits is one compiled configuration: every domain's matching tree. It is
// immutable once built, so decisions read it without locks.
type limits struct {
	domains map[string]*domain
}

type domain struct {
	name string
	root *node

	// Filled by Server.install.
	decisions     [2]prometheus.Counter // ok, over_limit
	localCache    prometheus.Counter
	overrides     sync.Map // overrideKey -> *rule
	overrideCount atomic.Int64
}

// node is one level of a descriptor tree. Children are found by exact
// key/value, then by wildcard value (in file order), then by key alone.
type node struct {
	key, value string
	share      bool // share_threshold: all wildcard matches count together
	rule       *rule
	exact      map[string]map[string]*node // key -> value -> child
	wildcards  map[string][]*node          // key -> children with * in value
	defaults   map[string]*node            // key -> child without value
}

func newNode() *node {
	return &node{exact: map[string]map[string]*node{}, wildcards: map[string][]*node{}, defaults: map[string]*node{}}
}

// rule is one compiled rate_limit.
type rule struct {
	domain     string
	name       string
	presetName string
	metricPath string // "preset=auth.client": bounded by the config
	limit      uint64
	window     time.Duration
	unit       rlsv3.RateLimitResponse_RateLimit_Unit
	multiplier uint32
	fixed      bool
	unlimited  bool
	shadow     bool
	quota      bool
	detailed   bool
	replaces   []string

	// Filled by Server.prepareRule.
	counters [3]prometheus.Counter // ok, over_limit, shadow_over_limit
	current  *rlsv3.RateLimitResponse_RateLimit
}

// match finds the rule for one request descriptor: level by level, exact
// key/value first, then wildcards, then the key alone. A rule applies only at
// the depth of the descriptor. share reports, per level, whether the counter
// uses the wildcard pattern instead of the value (filled into shareBuf).
func (d *domain) match(entries []*rlv3.RateLimitDescriptor_Entry, shareBuf []string) (*rule, []string) {
	n := d.root
	shareBuf = shareBuf[:0]
	anyShare := false
	for _, e := range entries {
		next := n.exact[e.Key][e.Value]
		if next == nil {
			for _, w := range n.wildcards[e.Key] {
				if globMatch(w.value, e.Value) {
					next = w
					break
				}
			}
		}
		if next == nil {
			next = n.defaults[e.Key]
		}
		if next == nil {
			return nil, nil
		}
		if next.share {
			shareBuf = append(shareBuf, next.value)
			anyShare = true
		} else {
			shareBuf = append(shareBuf, "")
		}
		n = next
	}
	if !anyShare {
		shareBuf = shareBuf[:0]
	}
	return n.rule, shareBuf
}

// globMatch reports whether s matches pattern, where * matches any run of
// bytes (including none), anywhere and any number of times.
func globMatch(pattern, s string) bool {
	px, sx := 0, 0
	starP, starS := -1, 0
	for sx < len(s) {
		switch {
		case px < len(pattern) && pattern[px] == '*':
			starP, starS = px, sx
			px++
		case px < len(pattern) && pattern[px] == s[sx]:
			px++
			sx++
		case starP >= 0:
			px = starP + 1
			starS++
			sx = starS
		default:
			return false
		}
	}
	for px < len(pattern) && pattern[px] == '*' {
		px++
	}
	return px == len(pattern)
}

// unitOf expresses a window as Envoy's unit and multiplier: the largest
// unit that divides it. A window that is not whole seconds is UNKNOWN.
func unitOf(w time.Duration) (rlsv3.RateLimitResponse_RateLimit_Unit, uint32) {
	for _, u := range []rlsv3.RateLimitResponse_RateLimit_Unit{
		rlsv3.RateLimitResponse_RateLimit_YEAR, rlsv3.RateLimitResponse_RateLimit_MONTH,
		rlsv3.RateLimitResponse_RateLimit_WEEK, rlsv3.RateLimitResponse_RateLimit_DAY,
		rlsv3.RateLimitResponse_RateLimit_HOUR, rlsv3.RateLimitResponse_RateLimit_MINUTE,
		rlsv3.RateLimitResponse_RateLimit_SECOND,
	} {
		uw := windowOfUnit(u)
		if w >= uw && w%uw == 0 {
			return u, uint32(w / uw)
		}
	}
	return rlsv3.RateLimitResponse_RateLimit_UNKNOWN, 0
}

// windowOfUnit is the window of an Envoy unit (0 for UNKNOWN).
func windowOfUnit(u rlsv3.RateLimitResponse_RateLimit_Unit) time.Duration {
	switch u {
	case rlsv3.RateLimitResponse_RateLimit_SECOND:
		return time.Second
	case rlsv3.RateLimitResponse_RateLimit_MINUTE:
		return time.Minute
	case rlsv3.RateLimitResponse_RateLimit_HOUR:
		return time.Hour
	case rlsv3.RateLimitResponse_RateLimit_DAY:
		return 24 * time.Hour
	case rlsv3.RateLimitResponse_RateLimit_WEEK:
		return 7 * 24 * time.Hour
	case rlsv3.RateLimitResponse_RateLimit_MONTH:
		return 30 * 24 * time.Hour
	case rlsv3.RateLimitResponse_RateLimit_YEAR:
		return 365 * 24 * time.Hour
	}
	return 0
}
