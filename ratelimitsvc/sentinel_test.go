package ratelimitsvc

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
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
