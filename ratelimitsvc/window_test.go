package ratelimitsvc

import (
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
)

func windowConfig(limit uint32, window time.Duration) Config {
	cfg := DefaultConfig()
	cfg.LocalCacheSize = 0 // every decision goes to the store
	cfg.Domains = []DomainConfig{{Domain: "acc", Descriptors: []DescriptorConfig{
		{Key: "client", RateLimit: &RateLimitConfig{Window: window, RequestsPerUnit: &limit}},
	}}}
	return cfg
}

// TestSlidingWindowBurst: a burst at the start of a window uses the limit;
// 1.5 windows later the previous window weighs half, so about half the limit
// is available again — and refused requests did not eat into it.
func TestSlidingWindowBurst(t *testing.T) {
	const limit, window = 100, time.Minute
	for _, kind := range storeKinds(t) {
		t.Run(kind.name, func(t *testing.T) {
			clock := newFakeClock()
			clock.ms.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli()) // a bucket boundary
			h := startServer(t, windowConfig(limit, window), kind.make(t), clock)
			req := request("acc", kv("client", "burst"))
			admitted := func(n int) int {
				got := 0
				for range n {
					resp, err := h.client.ShouldRateLimit(t.Context(), req)
					if err != nil {
						t.Fatal(err)
					}
					if resp.OverallCode == rlsv3.RateLimitResponse_OK {
						got++
					}
				}
				return got
			}
			if got := admitted(limit + 20); got != limit {
				t.Fatalf("burst admitted %d, want %d", got, limit)
			}
			clock.Advance(window * 3 / 2)
			peek := withDescHits(request("acc", kv("client", "burst")), 0, 0)
			resp, err := h.client.ShouldRateLimit(t.Context(), peek)
			if err != nil {
				t.Fatal(err)
			}
			if rem := resp.Statuses[0].LimitRemaining; rem != limit/2 {
				t.Errorf("remaining 1.5 windows after the burst = %d, want %d", rem, limit/2)
			}
			if got := admitted(limit); got != limit/2 {
				t.Errorf("admitted 1.5 windows after the burst = %d, want %d", got, limit/2)
			}
		})
	}
}

// TestSlidingWindowSteadyRate: at a steady rate 10x the limit, no interval
// of one window length admits more than 1.1x the limit, and over the run the
// admitted rate is close to the limit.
func TestSlidingWindowSteadyRate(t *testing.T) {
	const limit, window, step = 20, 10 * time.Second, 50 * time.Millisecond // 200 requests per window
	const duration = 6 * window
	for _, kind := range storeKinds(t) {
		t.Run(kind.name, func(t *testing.T) {
			clock := newFakeClock()
			h := startServer(t, windowConfig(limit, window), kind.make(t), clock)
			req := request("acc", kv("client", "steady"))
			var times []time.Duration
			for at := time.Duration(0); at < duration; at += step {
				resp, err := h.client.ShouldRateLimit(t.Context(), req)
				if err != nil {
					t.Fatal(err)
				}
				if resp.OverallCode == rlsv3.RateLimitResponse_OK {
					times = append(times, at)
				}
				clock.Advance(step)
			}
			worst := 0
			for i := range times {
				n := 0
				for j := i; j < len(times) && times[j]-times[i] < window; j++ {
					n++
				}
				worst = max(worst, n)
			}
			if worst > limit*11/10 {
				t.Errorf("a %s interval admitted %d, more than 1.1 x %d", window, worst, limit)
			}
			perWindow := float64(len(times)) / float64(duration/window)
			if perWindow < limit*0.9 {
				t.Errorf("admitted %.1f per window on average, want about %d", perWindow, limit)
			}
			t.Logf("worst window %d, mean %.1f per window (limit %d)", worst, perWindow, limit)
		})
	}
}

// TestRetryAfter checks the wait until one more hit fits.
func TestRetryAfter(t *testing.T) {
	w := int64(60_000)
	cases := []struct {
		name  string
		r     counterReq
		c     counterRes
		nowMs int64
		want  time.Duration
	}{
		{"fixed: until the bucket ends", counterReq{window: w, limit: 2, hits: 1, fixed: true}, counterRes{cur: 2}, 10_000, 50 * time.Second},
		{"sliding, current full: next bucket and part of it", counterReq{window: w, limit: 5, hits: 1}, counterRes{cur: 5}, 10_000, 50*time.Second + 12*time.Second},
		{"sliding, previous weighs: until its weight falls", counterReq{window: w, limit: 2, hits: 1}, counterRes{prev: 2}, 10_000, 20 * time.Second},
		{"limit 0: next reset", counterReq{window: w, limit: 0, hits: 1}, counterRes{}, 10_000, 50 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := retryAfter(&tc.r, tc.c, tc.nowMs); got != tc.want {
				t.Errorf("retryAfter = %s, want %s", got, tc.want)
			}
		})
	}
}
