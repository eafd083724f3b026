package ratelimitsvc

import "testing"

// TestOverLimitCacheBounded: entries expire at their time, a full shard
// first drops expired entries and otherwise remembers nothing new, and a
// zero size turns the cache off.
func TestOverLimitCacheBounded(t *testing.T) {
	c := newOverLimitCache(cacheShards) // one entry per shard
	a, b := []byte("a"), []byte("b")
	c.add(a, 0, 1000, 2000)
	if until, ok := c.lookup(a, 0, 1500); !ok || until != 2000 {
		t.Fatalf("lookup a = %d %v", until, ok)
	}
	if _, ok := c.lookup(a, 0, 2000); ok {
		t.Fatal("a still over at its reset time")
	}
	c.add(b, 0, 1500, 3000) // same shard, full, a not yet expired
	if _, ok := c.lookup(b, 0, 1600); ok {
		t.Fatal("a full shard took a new entry")
	}
	c.add(b, 0, 2500, 3000) // a has expired: dropped, b fits
	if _, ok := c.lookup(b, 0, 2600); !ok {
		t.Fatal("b not remembered after a expired")
	}
	if _, ok := c.lookup(a, 0, 0); ok {
		t.Fatal("expired a was not dropped")
	}
	var off *overLimitCache = newOverLimitCache(0)
	off.add(a, 0, 0, 10)
	if _, ok := off.lookup(a, 0, 1); ok || off != nil {
		t.Fatal("a zero-size cache remembers")
	}
}
