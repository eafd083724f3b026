// Package redistest starts throwaway redis-server processes (standalone and a
// 3-master Redis Cluster) on free loopback ports for integration tests, and
// stops them by PID when the test ends.
package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"

	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/meshguard/meshguard/internal/servertest"
)

// Server is one redis-server process. Its methods are safe to call from the
// test goroutine; Pause and Resume simulate a hung server.
type Server struct {
	bin, dir string
	port     int
	cluster  bool
	proc     *servertest.Process
}

// Start runs a standalone redis-server with persistence off. It is stopped at
// the end of the test.
func Start(tb testing.TB) *Server {
	tb.Helper()
	return start(tb, false)
}

func start(tb testing.TB, cluster bool) *Server {
	tb.Helper()
	bin := servertest.LookPath(tb, "redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
	s := &Server{bin: bin, dir: tb.TempDir(), cluster: cluster}
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		s.port = servertest.FreePort(tb)
		if err = s.launch(); err == nil {
			break
		}
	}
	if err != nil {
		tb.Fatalf("redistest: %v", err)
	}
	tb.Cleanup(func() {
		if s.proc != nil && !s.proc.Exited() {
			s.proc.Kill()
		}
	})
	return s
}

func (s *Server) launch() error {
	args := []string{
		"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1", "--protected-mode", "no",
		"--save", "", "--appendonly", "no", "--dir", s.dir, "--daemonize", "no",
		"--loglevel", "warning",
	}
	if s.cluster {
		args = append(args, "--cluster-enabled", "yes",
			"--cluster-config-file", filepath.Join(s.dir, "nodes.conf"),
			"--cluster-node-timeout", "2000")
	}
	p, err := servertest.Start(s.bin, args, s.dir, nil)
	if err != nil {
		return err
	}
	if err := servertest.WaitTCP(s.Addr(), 10*time.Second); err != nil {
		p.Kill()
		return fmt.Errorf("redis-server on port %d: %w\n%s", s.port, err, p.Output())
	}
	s.proc = p
	return nil
}

// Addr is "127.0.0.1:port".
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// URL is "redis://127.0.0.1:port/0".
func (s *Server) URL() string { return "redis://" + s.Addr() + "/0" }

// Pid is the server's process id.
func (s *Server) Pid() int { return s.proc.Pid() }

// Kill stops the server with SIGKILL, as a crash would.
func (s *Server) Kill() { s.proc.Kill() }

// Pause stops the process with SIGSTOP: connections stay open, nothing answers.
func (s *Server) Pause() { s.proc.Signal(syscall.SIGSTOP) }

// Resume continues a paused server.
func (s *Server) Resume() { s.proc.Signal(syscall.SIGCONT) }

// Restart starts a killed server again on the same port and directory.
func (s *Server) Restart(tb testing.TB) {
	tb.Helper()
	if !s.proc.Exited() {
		s.proc.Kill()
	}
	var err error
	for attempt := 0; attempt < 50; attempt++ { // the port may linger briefly
		if err = s.launch(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	tb.Fatalf("redistest: restart: %v", err)
}

// Do sends one command and returns the reply as text (for harness set-up;
// tests use a real client).
func (s *Server) Do(args ...string) (string, error) { return Do(s.Addr(), args...) }

// Do sends one command to the server at addr (a sentinel, say) and returns
// the reply as text: arrays one element a line, nil as "".
func Do(addr string, args ...string) (string, error) {
	c := redis.NewClient(&redis.Options{Addr: addr, Protocol: 2, MaxRetries: -1, PoolSize: 1,
		DialTimeout: 2 * time.Second, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second, DisableIdentity: true})
	defer c.Close()
	a := make([]any, len(args))
	for i, s := range args {
		a[i] = s
	}
	v, err := c.Do(context.Background(), a...).Result()
	if errors.Is(err, redis.Nil) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return text(v), nil
}

func text(v any) string {
	if vs, ok := v.([]any); ok {
		parts := make([]string, len(vs))
		for i, e := range vs {
			parts[i] = text(e)
		}
		return strings.Join(parts, "\n")
	}
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}

// Cluster is a 3-master Redis Cluster with all 16384 slots assigned.
type Cluster struct {
	Nodes []*Server
}

// StartCluster starts three cluster-enabled servers, splits the slots
// between them, joins them and waits until every node reports state ok.
func StartCluster(tb testing.TB) *Cluster {
	tb.Helper()
	c := &Cluster{}
	for i := 0; i < 3; i++ {
		c.Nodes = append(c.Nodes, start(tb, true))
	}
	ranges := [][2]int{{0, 5460}, {5461, 10922}, {10923, 16383}}
	for i, n := range c.Nodes {
		if _, err := n.Do("CLUSTER", "ADDSLOTSRANGE", strconv.Itoa(ranges[i][0]), strconv.Itoa(ranges[i][1])); err != nil {
			tb.Fatalf("redistest: assigning slots: %v", err)
		}
	}
	for _, n := range c.Nodes[1:] {
		if _, err := c.Nodes[0].Do("CLUSTER", "MEET", "127.0.0.1", strconv.Itoa(n.port)); err != nil {
			tb.Fatalf("redistest: CLUSTER MEET: %v", err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, n := range c.Nodes {
		for {
			info, err := n.Do("CLUSTER", "INFO")
			if err == nil && strings.Contains(info, "cluster_state:ok") && strings.Contains(info, "cluster_known_nodes:3") {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("redistest: cluster not ok after 30s: %q %v", info, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return c
}

// Addrs lists the nodes' "127.0.0.1:port" addresses.
func (c *Cluster) Addrs() []string {
	out := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		out[i] = n.Addr()
	}
	return out
}
