package ratelimitsvc

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshguard/meshguard/internal/redistest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// TestSentinel: the store finds the master through Redis Sentinel.
func TestSentinel(t *testing.T) {
	skipShort(t)
	master := redistest.Start(t)
	bin := servertest.LookPath(t, "redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
	dir := t.TempDir()
	port := servertest.FreePort(t)
	_, mport, _ := net.SplitHostPort(master.Addr())
	conf := filepath.Join(dir, "sentinel.conf")
	body := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor mymaster 127.0.0.1 %s 1\n", port, dir, mport)
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := servertest.Start(bin, []string{conf, "--sentinel"}, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if err := servertest.WaitTCP(addr, 10*time.Second); err != nil {
		t.Fatalf("sentinel: %v\n%s", err, p.Output())
	}
	rs := newTestRedis(t, RedisConfig{Sentinel: SentinelConfig{Master: "mymaster", Addrs: []string{addr}}, Autopipeline: true})
	if rs.Mode() != "sentinel" {
		t.Fatalf("mode %s", rs.Mode())
	}
	h := startServer(t, testConfig(), rs, newFakeClock())
	for i := range 3 {
		resp, err := h.client.ShouldRateLimit(t.Context(), request("basic", kv("remote_address", "s")))
		if err != nil {
			t.Fatal(err)
		}
		if got := resp.Statuses[0].LimitRemaining; got != uint32(2-i) {
			t.Fatalf("request %d: remaining %d, want %d", i, got, 2-i)
		}
	}
	if keys, err := master.Do("DBSIZE"); err != nil || keys == "0" {
		t.Errorf("the master holds %q keys (%v), want the counters", keys, err)
	}
}

// TestSentinelFailover: when Sentinel promotes the replica, decisions
// follow the new master (go-redis' failover client learns it from the
// sentinel) and the counts the replica had copied go on.
func TestSentinelFailover(t *testing.T) {
	skipShort(t)
	master := redistest.Start(t)
	replica := redistest.Start(t)
	_, mport, _ := net.SplitHostPort(master.Addr())
	if _, err := replica.Do("REPLICAOF", "127.0.0.1", mport); err != nil {
		t.Fatal(err)
	}
	bin := servertest.LookPath(t, "redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
	dir := t.TempDir()
	port := servertest.FreePort(t)
	conf := filepath.Join(dir, "sentinel.conf")
	body := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor mymaster 127.0.0.1 %s 1\n"+
		"sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n", port, dir, mport)
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := servertest.Start(bin, []string{conf, "--sentinel"}, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if err := servertest.WaitTCP(addr, 10*time.Second); err != nil {
		t.Fatalf("sentinel: %v\n%s", err, p.Output())
	}
	sdo := func(args ...string) (string, error) { return redistest.Do(addr, args...) }
	// The sentinel knows the replica once it has asked the master.
	servertest.WaitFor(t, 30*time.Second, func() error {
		out, err := sdo("SENTINEL", "REPLICAS", "mymaster")
		if err != nil || !strings.Contains(out, replica.Addr()[strings.LastIndexByte(replica.Addr(), ':')+1:]) {
			return fmt.Errorf("sentinel replicas %q (%v): want the replica", out, err)
		}
		return nil
	})
	rs := newTestRedis(t, RedisConfig{Sentinel: SentinelConfig{Master: "mymaster", Addrs: []string{addr}}, Autopipeline: true})
	h := startServer(t, windowConfig(100, time.Minute), rs, newFakeClock())
	req := request("acc", kv("client", "failover"))
	for i := range 3 {
		resp, err := h.client.ShouldRateLimit(t.Context(), req)
		if err != nil || resp.Statuses[0].LimitRemaining != uint32(99-i) {
			t.Fatalf("before failover, request %d: %v %v", i, resp, err)
		}
	}
	// The replica has the counts before the master goes.
	servertest.WaitFor(t, 10*time.Second, func() error {
		if n, err := replica.Do("DBSIZE"); err != nil || n == "0" {
			return fmt.Errorf("replica DBSIZE %q (%v)", n, err)
		}
		return nil
	})
	if _, err := sdo("SENTINEL", "FAILOVER", "mymaster"); err != nil {
		t.Fatal(err)
	}
	servertest.WaitFor(t, 30*time.Second, func() error {
		role, err := replica.Do("ROLE")
		if err != nil || !strings.HasPrefix(role, "master") {
			return fmt.Errorf("replica role %q (%v): not promoted yet", role, err)
		}
		return nil
	})
	// Decisions reach the new master: counted on from 3, never READONLY.
	servertest.WaitFor(t, 30*time.Second, func() error {
		resp, err := h.client.ShouldRateLimit(t.Context(), req)
		if err != nil {
			return err
		}
		if resp.Statuses[0].DurationUntilReset == nil {
			return fmt.Errorf("decision not counted (failure_mode): %v", resp)
		}
		return nil
	})
	keys, err := replica.Do("DBSIZE")
	if err != nil || keys == "0" {
		t.Errorf("the new master holds %q keys (%v)", keys, err)
	}
	resp, err := h.client.ShouldRateLimit(t.Context(), req)
	if err != nil || resp.Statuses[0].LimitRemaining >= 96 {
		t.Errorf("after failover: %v %v, want the count to go on from the old master's", resp, err)
	}
}
