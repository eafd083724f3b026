package ratelimitsvc

import "sync"

// overLimitCache remembers counters known to be over their limit until the
// time one more hit would fit again, so a flood from one client costs no
// store round trips. Other replicas only ever add hits, so the remembered
// time is never too late. It is safe for concurrent use; a nil cache
// remembers nothing.
type overLimitCache struct {
	shards   [cacheShards]cacheShard
	perShard int
}

const cacheShards = 32

type cacheShard struct {
	mu      sync.RWMutex
	untilMs map[string]int64
}

func newOverLimitCache(size int) *overLimitCache {
	if size <= 0 {
		return nil
	}
	c := &overLimitCache{perShard: max(size/cacheShards, 1)}
	for i := range c.shards {
		c.shards[i].untilMs = make(map[string]int64)
	}
	return c
}

// lookup returns when id stops being over limit, if it is over at nowMs.
func (c *overLimitCache) lookup(id []byte, hash uint64, nowMs int64) (int64, bool) {
	if c == nil {
		return 0, false
	}
	sh := &c.shards[hash%cacheShards]
	sh.mu.RLock()
	until, ok := sh.untilMs[string(id)]
	sh.mu.RUnlock()
	return until, ok && until > nowMs
}

// add remembers id as over limit until untilMs. When the shard is full it
// first drops expired entries, and if still full forgets nothing new.
func (c *overLimitCache) add(id []byte, hash uint64, nowMs, untilMs int64) {
	if c == nil || untilMs <= nowMs {
		return
	}
	sh := &c.shards[hash%cacheShards]
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if len(sh.untilMs) >= c.perShard {
		for k, u := range sh.untilMs {
			if u <= nowMs {
				delete(sh.untilMs, k)
			}
		}
		if len(sh.untilMs) >= c.perShard {
			return
		}
	}
	sh.untilMs[string(id)] = untilMs
}
