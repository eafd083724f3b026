package ratelimitsvc

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/servertest"
)

func skipShort(t *testing.T) {
	if testing.Short() {
		t.Skip("needs redis-server")
	}
}

// TestSharedQuota: two meshguard instances on one Redis (and on one Redis
// Cluster) share a quota.
func TestSharedQuota(t *testing.T) {
	skipShort(t)
	for _, kind := range storeKinds(t)[1:] {
		t.Run(kind.name, func(t *testing.T) {
			clock := newFakeClock()
			cfg := windowConfig(10, time.Minute)
			st := kind.make(t) // flushes
			a := startServer(t, cfg, st, clock)
			// A second client with its own pool, as another replica has.
			rs := st.(*RedisStore)
			other := RedisConfig{Cluster: rs.addrs, Autopipeline: true}
			if rs.cluster == nil {
				other = RedisConfig{URL: secret.URL("redis://" + rs.addrs[0] + "/0"), Autopipeline: true}
			}
			b := startServer(t, cfg, newTestRedis(t, other), clock)
			req := request("acc", kv("client", "shared"))
			admitted := 0
			for i := range 30 {
				h := a
				if i%2 == 1 {
					h = b
				}
				resp, err := h.client.ShouldRateLimit(t.Context(), req)
				if err != nil {
					t.Fatal(err)
				}
				if resp.OverallCode == rlsv3.RateLimitResponse_OK {
					admitted++
				}
			}
			if admitted != 10 {
				// A store error is answered by failure_mode (allow) without
				// counting: say so rather than leave a bare count.
				t.Errorf("two instances admitted %d together, want 10 (store error series: %d, %d)",
					admitted, testutil.CollectAndCount(a.srv.m.storeErrors), testutil.CollectAndCount(b.srv.m.storeErrors))
			}
		})
	}
}

// TestScriptFlushed: after SCRIPT FLUSH the EVALSHA misses and EVAL runs it.
func TestScriptFlushed(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	for _, ap := range []bool{true, false} {
		t.Run(map[bool]string{true: "autopipeline", false: "direct"}[ap], func(t *testing.T) {
			srv.Do("FLUSHALL")
			h := startServer(t, testConfig(), newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Autopipeline: ap}), newFakeClock())
			for i := range 3 {
				if _, err := srv.Do("SCRIPT", "FLUSH"); err != nil {
					t.Fatal(err)
				}
				resp, err := h.client.ShouldRateLimit(t.Context(), request("basic", kv("remote_address", "a")))
				if err != nil {
					t.Fatal(err)
				}
				if got := resp.Statuses[0].LimitRemaining; got != uint32(2-i) {
					t.Fatalf("request %d: remaining %d, want %d", i, got, 2-i)
				}
			}
			if n := testutil.CollectAndCount(h.srv.m.storeErrors); n != 0 {
				t.Errorf("store error series = %v, want none", n)
			}
		})
	}
}

// TestKeysExpire: counters carry a TTL of about two windows.
func TestKeysExpire(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	h := startServer(t, windowConfig(5, time.Minute), newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL())}), nil)
	if _, err := h.client.ShouldRateLimit(t.Context(), request("acc", kv("client", "ttl"))); err != nil {
		t.Fatal(err)
	}
	keys, err := srv.Do("KEYS", "mg:rl:*")
	if err != nil || keys == "" {
		t.Fatalf("KEYS: %q %v", keys, err)
	}
	ttl, err := srv.Do("PTTL", keys)
	if err != nil {
		t.Fatal(err)
	}
	if ms, err := strconv.Atoi(ttl); err != nil || ms <= 0 || ms > 121_000 {
		t.Errorf("PTTL %s ms, want between 0 and 121000", ttl)
	}
}

// TestStoreFaults: with Redis killed or hung (SIGSTOP), every decision
// returns within redis.timeout following failure_mode, never as a gRPC
// error; once Redis is back, enforcement resumes by itself.
func TestStoreFaults(t *testing.T) {
	skipShort(t)
	const timeout = 150 * time.Millisecond
	// Generous bound over the timeout for a shared machine and -race.
	const bound = timeout + 350*time.Millisecond
	type fault struct {
		name         string
		break_, heal func(t *testing.T, s *redistest.Server)
	}
	faults := []fault{
		{"killed", func(t *testing.T, s *redistest.Server) { s.Kill() }, func(t *testing.T, s *redistest.Server) { s.Restart(t) }},
		{"hung", func(t *testing.T, s *redistest.Server) { s.Pause() }, func(t *testing.T, s *redistest.Server) { s.Resume() }},
	}
	for _, mode := range []string{"allow", "deny"} {
		for _, f := range faults {
			for _, ap := range []bool{true, false} {
				t.Run(mode+"/"+f.name+map[bool]string{true: "/autopipeline", false: "/direct"}[ap], func(t *testing.T) {
					srv := redistest.Start(t)
					t.Cleanup(srv.Resume)
					cfg := windowConfig(3, time.Minute)
					cfg.FailureMode = mode
					rs := newTestRedis(t, RedisConfig{URL: secret.URL(srv.URL()), Timeout: timeout, Autopipeline: ap})
					h := startServer(t, cfg, rs, nil)
					req := request("acc", kv("client", "fault"))
					// Healthy: counted.
					resp, err := h.client.ShouldRateLimit(t.Context(), req)
					if err != nil || resp.Statuses[0].DurationUntilReset == nil {
						t.Fatalf("healthy answer: %v %v", resp, err)
					}
					if err := rs.Ping(t.Context()); err != nil {
						t.Fatalf("ping: %v", err)
					}

					f.break_(t, srv)
					var wg sync.WaitGroup
					errs := make(chan string, 40)
					for range 20 {
						wg.Add(1)
						go func() {
							defer wg.Done()
							start := time.Now()
							resp, err := h.client.ShouldRateLimit(t.Context(), req)
							took := time.Since(start)
							switch {
							case err != nil:
								errs <- "gRPC error: " + err.Error()
							case took > bound:
								errs <- "took " + took.String()
							case mode == "allow" && resp.OverallCode != rlsv3.RateLimitResponse_OK:
								errs <- "allow mode answered " + resp.OverallCode.String()
							case mode == "deny" && resp.OverallCode != rlsv3.RateLimitResponse_OVER_LIMIT:
								errs <- "deny mode answered " + resp.OverallCode.String()
							}
						}()
					}
					wg.Wait()
					close(errs)
					for e := range errs {
						t.Error(e)
					}
					if n := testutil.ToFloat64(h.srv.m.failureMode.WithLabelValues(mode)); n < 20 {
						t.Errorf("failure_mode decisions = %v, want >= 20", n)
					}
					ctx, cancel := context.WithTimeout(t.Context(), time.Second)
					if err := rs.Ping(ctx); err == nil {
						t.Error("ping succeeded against a broken Redis")
					}
					cancel()
					if rs.Status()["mode"] != "standalone" {
						t.Errorf("status %v", rs.Status())
					}

					f.heal(t, srv)
					servertest.WaitUntil(t, 10*time.Second, "enforcement to resume", func() bool {
						resp, err := h.client.ShouldRateLimit(t.Context(), req)
						if err != nil {
							t.Fatal(err)
						}
						return resp.Statuses[0].DurationUntilReset != nil // a counted answer
					})
					// Enforced again: the limit of 3 is reached.
					var last rlsv3.RateLimitResponse_Code
					for range 4 {
						resp, _ := h.client.ShouldRateLimit(t.Context(), req)
						last = resp.OverallCode
					}
					if last != rlsv3.RateLimitResponse_OVER_LIMIT {
						t.Errorf("after recovery the limit is not enforced: last answer %v", last)
					}
				})
			}
		}
	}
}

// TestClusterNodeHung: with one Cluster master hung, decisions whose
// counters live there follow failure_mode within the timeout, the others are
// still counted, and all recover when the node does.
func TestClusterNodeHung(t *testing.T) {
	skipShort(t)
	const timeout = 150 * time.Millisecond
	cl := redistest.StartCluster(t)
	cfg := windowConfig(1000, time.Minute)
	cfg.FailureMode = "deny"
	rs := newTestRedis(t, RedisConfig{Cluster: cl.Addrs(), Timeout: timeout, Autopipeline: true})
	h := startServer(t, cfg, rs, nil)
	clients := make([]*rlsv3.RateLimitRequest, 30)
	for i := range clients {
		clients[i] = request("acc", kv("client", "c"+strconv.Itoa(i)))
		if _, err := h.client.ShouldRateLimit(t.Context(), clients[i]); err != nil {
			t.Fatal(err)
		}
	}
	cl.Nodes[1].Pause()
	t.Cleanup(cl.Nodes[1].Resume)
	counted, failed := 0, 0
	for _, req := range clients {
		start := time.Now()
		resp, err := h.client.ShouldRateLimit(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took > timeout+350*time.Millisecond {
			t.Errorf("decision took %s with one node hung", took)
		}
		if resp.Statuses[0].DurationUntilReset != nil {
			counted++
		} else if resp.OverallCode == rlsv3.RateLimitResponse_OVER_LIMIT {
			failed++
		}
	}
	if counted == 0 || failed == 0 {
		t.Errorf("with one of three masters hung: %d counted, %d denied by failure_mode; want some of each", counted, failed)
	}
	cl.Nodes[1].Resume()
	recovered := make([]bool, len(clients))
	servertest.WaitUntil(t, 10*time.Second, "every client's counter to recover", func() bool {
		all := true
		for i, req := range clients {
			if recovered[i] {
				continue
			}
			resp, err := h.client.ShouldRateLimit(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			recovered[i] = resp.Statuses[0].DurationUntilReset != nil
			all = all && recovered[i]
		}
		return all
	})
}

// TestRedisPoolReporting: /readyz details and the pool metrics show the
// connections decisions use (the decision pipeline when autopipelined).
func TestRedisPoolReporting(t *testing.T) {
	skipShort(t)
	srv := redistest.Start(t)
	reg := prometheus.NewRegistry()
	cfg := DefaultRedisConfig()
	cfg.URL = secret.URL(srv.URL())
	rs, err := NewRedisStore(discardLogger(), reg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close() })
	h := startServer(t, testConfig(), rs, newFakeClock())
	for range 5 {
		if _, err := h.client.ShouldRateLimit(t.Context(), request("basic", kv("path", "/x"))); err != nil {
			t.Fatal(err)
		}
	}
	st := rs.Status()
	pp, ok := st["pipeline"].(map[string]any)
	if !ok || pp["commands"] != uint64(5) || pp["queued"] != 0 || st["autopipeline"] != true {
		t.Errorf("status %v: want autopipeline and the 5 decisions' script calls sent", st)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP meshguard_ratelimitsvc_redis_pipeline_commands_total Script calls sent in pipelines (divided by batches: the mean batch).
# TYPE meshguard_ratelimitsvc_redis_pipeline_commands_total counter
meshguard_ratelimitsvc_redis_pipeline_commands_total 5
`), "meshguard_ratelimitsvc_redis_pipeline_commands_total"); err != nil {
		t.Error(err)
	}
}

// TestRepeatedDescriptorCountsTwice: a request that names one counter twice
// adds its hits twice, in every store (the Redis script writes each counter
// from the count it read, so it must carry the first write to the second).
func TestRepeatedDescriptorCountsTwice(t *testing.T) {
	for _, kind := range storeKinds(t) {
		t.Run(kind.name, func(t *testing.T) {
			h := startServer(t, windowConfig(10, time.Minute), kind.make(t), newFakeClock())
			req := request("acc", kv("client", "twice"), kv("client", "twice"))
			admitted := 0
			for range 10 {
				resp, err := h.client.ShouldRateLimit(t.Context(), req)
				if err != nil {
					t.Fatal(err)
				}
				if resp.OverallCode == rlsv3.RateLimitResponse_OK {
					admitted++
				}
			}
			if admitted != 5 {
				t.Errorf("admitted %d requests of 2 hits each under a limit of 10, want 5", admitted)
			}
		})
	}
}
