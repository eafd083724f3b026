package ratelimitsvc

import (
	"context"
	"sync"
)

// MemoryStore keeps counters in process memory: the default when no Redis is
// configured. Each replica then has its own quotas. It is safe for
// concurrent use; the zero value is not usable, call NewMemoryStore.
type MemoryStore struct {
	mu       sync.Mutex
	counters map[string]*memCounter
	ops      int
}

type memCounter struct {
	bucket    int64
	cur, prev int64
	expireMs  int64
}

// NewMemoryStore returns an empty in-process store.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{counters: make(map[string]*memCounter)}
}

// sweepEvery is how many evaluations pass between sweeps of expired counters.
const sweepEvery = 4096

func (m *MemoryStore) evaluate(_ context.Context, nowMs int64, reqs []counterReq, res []counterRes) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ops++
	if m.ops%sweepEvery == 0 {
		for k, c := range m.counters {
			if c.expireMs <= nowMs {
				delete(m.counters, k)
			}
		}
	}
	for i := range reqs {
		r := &reqs[i]
		bucket, _ := bucketOf(r, nowMs)
		c := m.counters[string(r.id)]
		switch {
		case c == nil:
			res[i] = counterRes{}
		case c.bucket == bucket:
			res[i] = counterRes{cur: c.cur, prev: c.prev}
		case c.bucket == bucket-1:
			res[i] = counterRes{prev: c.cur}
		default:
			res[i] = counterRes{}
		}
		if r.fixed {
			res[i].prev = 0
		}
	}
	if !admit(reqs, res, nowMs) {
		return false, nil
	}
	for i := range reqs {
		r := &reqs[i]
		if r.hits == 0 {
			continue
		}
		bucket, _ := bucketOf(r, nowMs)
		c := m.counters[string(r.id)]
		switch {
		case c == nil:
			c = &memCounter{bucket: bucket, prev: res[i].prev}
			m.counters[string(r.id)] = c
		case c.bucket != bucket:
			c.bucket, c.prev, c.cur = bucket, res[i].prev, 0
		}
		// Add to the counter, not to what was read: a request may name
		// one counter twice, and then both hits count.
		c.cur = max(c.cur+r.hits, 0)
		c.expireMs = (bucket + 2) * r.window
	}
	return true, nil
}

// Len is the number of live counters (for tests and metrics).
func (m *MemoryStore) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.counters)
}
