package auditsink

import (
	"hash/maphash"
	"math"
	"net/netip"
	"sync"
	"time"
)

// bucket is a token bucket counted in reports; a new one is full.
type bucket struct {
	tokens float64
	last   int64 // unix nanos of the last refill
}

// take refills b at rate up to burst and spends n if it holds n. If not,
// it spends nothing and says how long until n would be there.
func (b *bucket) take(now int64, n, rate, burst float64) (bool, time.Duration) {
	if d := now - b.last; d > 0 {
		b.tokens = min(burst, b.tokens+float64(d)*1e-9*rate)
		b.last = now
	}
	if b.tokens >= n {
		b.tokens -= n
		return true, 0
	}
	return false, time.Duration((n - b.tokens) / rate * 1e9)
}

// refund gives back n taken for reports that were not stored after all.
func (b *bucket) refund(n, burst float64) { b.tokens = min(burst, b.tokens+n) }

// globalBucket caps the CSP rows all clients put into the trail.
type globalBucket struct {
	mu          sync.Mutex
	rate, burst float64
	b           bucket
}

func newGlobalBucket(rate float64, burst int) *globalBucket {
	return &globalBucket{rate: rate, burst: float64(burst), b: bucket{tokens: float64(burst)}}
}

func (g *globalBucket) take(now int64, n int) (bool, time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.b.take(now, float64(n), g.rate, g.burst)
}

func (g *globalBucket) refund(n int) {
	g.mu.Lock()
	g.b.refund(float64(n), g.burst)
	g.mu.Unlock()
}

// clientKey is a client as clientaddr.Prefix keys it, without pointers (so
// the table costs the garbage collector nothing to scan): the masked
// address in 16 bytes and its family (0: no address, 4, 6).
type clientKey [17]byte

func keyOf(p netip.Prefix) clientKey {
	var k clientKey
	if !p.IsValid() {
		return k
	}
	a := p.Masked().Addr().As16()
	copy(k[:16], a[:])
	k[16] = 6
	if p.Addr().Is4() {
		k[16] = 4
	}
	return k
}

// clientShards splits the table so concurrent reports from different
// clients rarely wait on one lock.
const clientShards = 16

// clientTable holds one token bucket per client in a fixed number of slots:
// 16 shards, each a least-recently-used list over a slice allocated once,
// indexed by a map that never holds more than the shard's slots. When a
// shard is full its least recently seen client is evicted. Eviction only
// ever forgets a debt: the evicted client's next report starts from a full
// bucket, which an attacker with that many addresses had anyway, and the
// global cap still bounds the rows. Safe for concurrent use.
type clientTable struct {
	seed        maphash.Seed
	rate, burst float64
	shards      [clientShards]clientShard
}

type clientShard struct {
	mu         sync.Mutex
	idx        map[clientKey]int32
	ent        []clientEntry // len grows to cap(ent), never beyond
	head, tail int32         // most and least recently used; -1: empty
	evicted    uint64
}

type clientEntry struct {
	key        clientKey
	b          bucket
	prev, next int32
}

func newClientTable(maxClients int, rate float64, burst int) *clientTable {
	t := &clientTable{seed: maphash.MakeSeed(), rate: rate, burst: float64(burst)}
	per := (maxClients + clientShards - 1) / clientShards
	for i := range t.shards {
		s := &t.shards[i]
		s.idx = make(map[clientKey]int32, per)
		s.ent = make([]clientEntry, 0, per)
		s.head, s.tail = -1, -1
	}
	return t
}

func (t *clientTable) shard(k *clientKey) *clientShard {
	return &t.shards[maphash.Bytes(t.seed, k[:])%clientShards]
}

// take spends n reports of k's bucket, creating it (full) if k is new.
func (t *clientTable) take(k clientKey, now int64, n int) (bool, time.Duration) {
	s := t.shard(&k)
	s.mu.Lock()
	defer s.mu.Unlock()
	i, ok := s.idx[k]
	if !ok {
		i = s.insert(k, bucket{tokens: t.burst, last: now})
	} else {
		s.touch(i)
	}
	return s.ent[i].b.take(now, float64(n), t.rate, t.burst)
}

// refund gives n reports back to k, if it is still in the table.
func (t *clientTable) refund(k clientKey, n int) {
	s := t.shard(&k)
	s.mu.Lock()
	if i, ok := s.idx[k]; ok {
		s.ent[i].b.refund(float64(n), t.burst)
	}
	s.mu.Unlock()
}

// stats returns the clients held and evicted so far.
func (t *clientTable) stats() (held int, evicted uint64) {
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		held += len(s.idx)
		evicted += s.evicted
		s.mu.Unlock()
	}
	return held, evicted
}

// insert puts k at the front, in a new slot or the least recently used one.
func (s *clientShard) insert(k clientKey, b bucket) int32 {
	var i int32
	if len(s.ent) < cap(s.ent) {
		i = int32(len(s.ent))
		s.ent = append(s.ent, clientEntry{})
	} else {
		i = s.tail
		s.unlink(i)
		delete(s.idx, s.ent[i].key)
		s.evicted++
	}
	s.ent[i] = clientEntry{key: k, b: b, prev: -1, next: s.head}
	if s.head >= 0 {
		s.ent[s.head].prev = i
	}
	s.head = i
	if s.tail < 0 {
		s.tail = i
	}
	s.idx[k] = i
	return i
}

func (s *clientShard) touch(i int32) {
	if s.head == i {
		return
	}
	s.unlink(i)
	s.ent[i].prev, s.ent[i].next = -1, s.head
	if s.head >= 0 {
		s.ent[s.head].prev = i
	}
	s.head = i
	if s.tail < 0 {
		s.tail = i
	}
}

func (s *clientShard) unlink(i int32) {
	e := &s.ent[i]
	if e.prev >= 0 {
		s.ent[e.prev].next = e.next
	} else {
		s.head = e.next
	}
	if e.next >= 0 {
		s.ent[e.next].prev = e.prev
	} else {
		s.tail = e.prev
	}
	e.prev, e.next = -1, -1
}

// retryAfter is the Retry-After value for a wait: whole seconds, at least
// one.
func retryAfter(d time.Duration) int64 {
	s := int64(math.Ceil(d.Seconds()))
	return max(1, min(s, 3600))
}
