package redistest

import (
	"strings"
	"testing"
	"time"
)

func TestStandaloneLifecycle(t *testing.T) {
	s := Start(t)
	if got, err := s.Do("PING"); err != nil || got != "PONG" {
		t.Fatalf("PING = %q, %v", got, err)
	}
	if _, err := s.Do("SET", "k", "v"); err != nil {
		t.Fatal(err)
	}
	s.Pause()
	done := make(chan error, 1)
	go func() { _, err := s.Do("PING"); done <- err }()
	select {
	case <-done:
		t.Fatal("a paused server answered")
	case <-time.After(300 * time.Millisecond):
	}
	s.Resume()
	if err := <-done; err != nil {
		t.Fatalf("PING after resume: %v", err)
	}
	s.Kill()
	if _, err := s.Do("PING"); err == nil {
		t.Fatal("a killed server answered")
	}
	s.Restart(t)
	if got, err := s.Do("PING"); err != nil || got != "PONG" {
		t.Fatalf("PING after restart = %q, %v", got, err)
	}
}

func TestCluster(t *testing.T) {
	c := StartCluster(t)
	if len(c.Addrs()) != 3 {
		t.Fatalf("Addrs = %v", c.Addrs())
	}
	for _, n := range c.Nodes {
		info, err := n.Do("CLUSTER", "INFO")
		if err != nil || !strings.Contains(info, "cluster_slots_assigned:16384") {
			t.Fatalf("CLUSTER INFO on %s = %q, %v", n.Addr(), info, err)
		}
	}
	// A key lands on exactly one node; the others redirect.
	var owners int
	for _, n := range c.Nodes {
		if _, err := n.Do("SET", "{user:1}quota", "1"); err == nil {
			owners++
		} else if !strings.Contains(err.Error(), "MOVED") {
			t.Fatalf("SET on %s: %v", n.Addr(), err)
		}
	}
	if owners != 1 {
		t.Fatalf("key owned by %d nodes, want 1", owners)
	}
}
