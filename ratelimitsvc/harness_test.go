package ratelimitsvc

import (
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/internal/grpcserver/grpcservertest"
	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/secret"
)

// fakeClock is an injected clock that only moves when told.
type fakeClock struct{ ms atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	// 10 s into a minute (and into a 15-minute window), so windows do not
	// roll during a test step.
	c.ms.Store(time.Date(2026, 1, 1, 0, 0, 10, 0, time.UTC).UnixMilli())
	return c
}

func (c *fakeClock) Now() time.Time          { return time.UnixMilli(c.ms.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ms.Add(d.Milliseconds()) }

// harness is one Server behind a real gRPC server on 127.0.0.1:0, built
// as cmd/meshguard builds its listeners, and a go-control-plane client, as
// Envoy calls it.
type harness struct {
	srv    *Server
	client rlsv3.RateLimitServiceClient
	clock  *fakeClock
	reg    *prometheus.Registry
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func startServer(tb testing.TB, cfg Config, st store, clock *fakeClock) *harness {
	tb.Helper()
	reg := prometheus.NewRegistry()
	srv, err := New(discardLogger(), reg, cfg, st)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	if clock != nil {
		srv.now = clock.Now
	}
	lim := grpcserver.DefaultLimits()
	gm := grpcserver.NewMetrics(reg)
	gs := grpcserver.New(lim, gm)
	srv.Register(grpcserver.NewGuard("test", lim, gm, benchBounds).Wrap(gs))
	conn := grpcservertest.Serve(tb, gs)
	return &harness{srv: srv, client: rlsv3.NewRateLimitServiceClient(conn), clock: clock, reg: reg}
}

// storeKind makes fresh, empty stores of one kind for a test.
type storeKind struct {
	name string
	make func(tb testing.TB) store
}

// storeKinds returns the in-process store, and unless -short a standalone
// Redis (autopipelined, and one round trip per decision) and a 3-master
// Redis Cluster (started once per call and flushed for
// every store made).
func storeKinds(t *testing.T) []storeKind {
	kinds := []storeKind{{"memory", func(testing.TB) store { return NewMemoryStore() }}}
	if testing.Short() {
		return kinds
	}
	var single *redistest.Server
	var cluster *redistest.Cluster
	kinds = append(kinds,
		storeKind{"redis", func(tb testing.TB) store {
			if single == nil {
				single = redistest.Start(t)
			}
			if _, err := single.Do("FLUSHALL"); err != nil {
				tb.Fatal(err)
			}
			return newTestRedis(tb, RedisConfig{URL: secret.URL(single.URL()), Autopipeline: true})
		}},
		storeKind{"redis-direct", func(tb testing.TB) store {
			if single == nil {
				single = redistest.Start(t)
			}
			if _, err := single.Do("FLUSHALL"); err != nil {
				tb.Fatal(err)
			}
			return newTestRedis(tb, RedisConfig{URL: secret.URL(single.URL())})
		}},
		storeKind{"cluster", func(tb testing.TB) store {
			if cluster == nil {
				cluster = redistest.StartCluster(t)
			}
			for _, n := range cluster.Nodes {
				if _, err := n.Do("FLUSHALL"); err != nil {
					tb.Fatal(err)
				}
			}
			return newTestRedis(tb, RedisConfig{Cluster: cluster.Addrs(), Autopipeline: true})
		}},
	)
	return kinds
}

func newTestRedis(tb testing.TB, cfg RedisConfig) *RedisStore {
	tb.Helper()
	def := DefaultRedisConfig()
	if cfg.Timeout == 0 {
		cfg.Timeout = time.Second // generous: the race detector and a busy machine
	}
	if cfg.KeyPrefix == "" {
		cfg.KeyPrefix = def.KeyPrefix
	}
	if err := cfg.Validate(); err != nil {
		tb.Fatal(err)
	}
	rs, err := NewRedisStore(discardLogger(), prometheus.NewRegistry(), cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { rs.Close() })
	return rs
}

// testConfig is the default config with the conformance files as config_dir.
func testConfig() Config {
	cfg := DefaultConfig()
	cfg.ConfigDir = "testdata/conformance"
	return cfg
}

// request builds a RateLimitRequest: each descriptor is a list of key,
// value pairs.
func request(domain string, descs ...[]string) *rlsv3.RateLimitRequest {
	req := &rlsv3.RateLimitRequest{Domain: domain}
	for _, d := range descs {
		rd := &rlv3.RateLimitDescriptor{}
		for i := 0; i+1 < len(d); i += 2 {
			rd.Entries = append(rd.Entries, &rlv3.RateLimitDescriptor_Entry{Key: d[i], Value: d[i+1]})
		}
		req.Descriptors = append(req.Descriptors, rd)
	}
	return req
}

func kv(pairs ...string) []string { return pairs }
