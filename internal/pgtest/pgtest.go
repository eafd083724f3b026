// Package pgtest starts throwaway PostgreSQL servers for integration tests:
// initdb into a temp dir, postgres on a free 127.0.0.1 port with trust
// authentication, stopped by PID when the test ends. PostgreSQL refuses to run
// as root, so when the tests run as root (as CI does) the server runs as the
// unprivileged `postgres` OS user.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/meshguard/meshguard/internal/servertest"
)

var binGlobs = []string{"/usr/lib/postgresql/*/bin/%s", "/usr/local/pgsql/bin/%s"}

// Server is one postgres process with its own data directory.
type Server struct {
	bin, dir, data string
	port           int
	cred           *syscall.Credential
	proc           *servertest.Process
	extra          []string
}

// Start initialises a data directory and starts postgres on a free port. It
// is stopped and removed at the end of the test.
func Start(tb testing.TB) *Server {
	tb.Helper()
	initdb := lookPath(tb, "initdb")
	postgres := lookPath(tb, "postgres")
	s, err := start(initdb, postgres)
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	tb.Cleanup(s.cleanup)
	return s
}

// StartMain is Start for TestMain: it returns the server and a function that
// stops it. When the binaries are missing it returns a nil server outside CI
// (tests should then skip) and exits the process under CI.
func StartMain() (*Server, func()) {
	initdb, err1 := findBin("initdb")
	postgres, err2 := findBin("postgres")
	if err := errors.Join(err1, err2); err != nil {
		if servertest.InCI() {
			fmt.Fprintln(os.Stderr, "pgtest:", err, "(.ci/run must install PostgreSQL)")
			os.Exit(1)
		}
		return nil, func() {}
	}
	s, err := start(initdb, postgres)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgtest:", err)
		os.Exit(1)
	}
	return s, s.cleanup
}

func lookPath(tb testing.TB, name string) string {
	globs := make([]string, len(binGlobs))
	for i, g := range binGlobs {
		globs[i] = fmt.Sprintf(g, name)
	}
	return servertest.LookPath(tb, name, globs...)
}

func findBin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, g := range binGlobs {
		m, _ := filepath.Glob(fmt.Sprintf(g, name))
		if len(m) > 0 {
			return m[len(m)-1], nil
		}
	}
	return "", fmt.Errorf("%s not found", name)
}

// template is an initdb'd data directory that later servers copy, so only the
// first server of a test binary pays for initdb.
var template struct {
	once sync.Once
	dir  string
	err  error
}

func start(initdb, postgres string) (*Server, error) {
	cred, uid, gid, err := serverUser()
	if err != nil {
		return nil, err
	}
	template.once.Do(func() {
		template.dir, template.err = makeTemplate(initdb, cred, uid, gid)
	})
	if template.err != nil {
		return nil, template.err
	}
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		return nil, err
	}
	s := &Server{bin: postgres, dir: dir, data: filepath.Join(dir, "data"), cred: cred}
	if out, err := exec.Command("cp", "-a", template.dir, s.data).CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("copying template data dir: %v: %s", err, out)
	}
	if cred != nil {
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	for attempt := 0; attempt < 5; attempt++ {
		s.port = freePort()
		if err = s.launch(); err == nil {
			return s, nil
		}
	}
	os.RemoveAll(dir)
	return nil, err
}

func freePort() int {
	// servertest.FreePort needs a TB; StartMain has none.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// serverUser returns the credential to run postgres with: none when the
// process is not root, else the `postgres` OS user.
func serverUser() (*syscall.Credential, int, int, error) {
	if os.Geteuid() != 0 {
		return nil, os.Getuid(), os.Getgid(), nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, 0, 0, fmt.Errorf("running as root needs the unprivileged OS user postgres (Debian's postgresql package creates it): %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, uid, gid, nil
}

// makeTemplate returns an initdb'd data directory shared by every test
// binary on this machine (a cache keyed by the initdb binary and the user):
// built once in a scratch directory and renamed into place atomically.
func makeTemplate(initdb string, cred *syscall.Credential, uid, gid int) (string, error) {
	st, err := os.Stat(initdb)
	if err != nil {
		return "", err
	}
	key := fmt.Sprintf("%s-%d-%d", filepath.Base(filepath.Dir(filepath.Dir(initdb))), st.ModTime().Unix(), uid)
	final := filepath.Join(os.TempDir(), "meshguard-pgtest-template-"+key)
	if _, err := os.Stat(filepath.Join(final, "data", "PG_VERSION")); err == nil {
		return filepath.Join(final, "data"), nil
	}
	dir, err := os.MkdirTemp("", "meshguard-pgtest-build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir) // gone after a successful rename
	if cred != nil {
		if err := os.Chown(dir, uid, gid); err != nil {
			return "", err
		}
	}
	cmd := exec.Command(initdb, "-D", filepath.Join(dir, "data"), "-U", "postgres", "--auth=trust",
		"--no-sync", "-E", "UTF8", "--locale=C")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("initdb: %v: %s", err, out)
	}
	if err := os.Rename(dir, final); err != nil {
		// Another test binary won the race; use its copy.
		if _, statErr := os.Stat(filepath.Join(final, "data", "PG_VERSION")); statErr != nil {
			return "", fmt.Errorf("installing template data dir: %w", err)
		}
	}
	return filepath.Join(final, "data"), nil
}

func (s *Server) launch() error {
	args := []string{
		"-D", s.data, "-p", strconv.Itoa(s.port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories=",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "max_connections=200", "-c", "shared_buffers=64MB",
		"-c", "log_min_messages=warning",
	}
	args = append(args, s.extra...)
	p, err := servertest.Start(s.bin, args, s.dir, s.cred)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := pgx.Connect(ctx, s.URL())
		cancel()
		if err == nil {
			conn.Close(context.Background())
			s.proc = p
			return nil
		}
		if p.Exited() || time.Now().After(deadline) {
			p.Kill()
			return fmt.Errorf("postgres on port %d did not start: %v\n%s", s.port, err, p.Output())
		}
		time.Sleep(30 * time.Millisecond)
	}
}

func (s *Server) cleanup() {
	if s.proc != nil && !s.proc.Exited() {
		s.proc.Stop(syscall.SIGQUIT, 5*time.Second) // immediate shutdown: nothing to keep
	}
	os.RemoveAll(s.dir)
}

// URL is the superuser URL of the default database:
// postgres://postgres@127.0.0.1:port/postgres?sslmode=disable.
func (s *Server) URL() string { return s.urlFor("postgres") }

func (s *Server) urlFor(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.port, db)
}

// Port is the server's TCP port.
func (s *Server) Port() int { return s.port }

// Pid is the postmaster's process id.
func (s *Server) Pid() int { return s.proc.Pid() }

// NewDatabase creates a fresh database and returns its URL; it is dropped
// when the test ends.
func (s *Server) NewDatabase(tb testing.TB) string {
	tb.Helper()
	var b [6]byte
	rand.Read(b[:])
	name := "t_" + hex.EncodeToString(b[:])
	if err := s.Exec(tb.Context(), "CREATE DATABASE "+name); err != nil {
		tb.Fatalf("pgtest: creating database: %v", err)
	}
	tb.Cleanup(func() {
		if !s.proc.Exited() {
			_ = s.Exec(context.Background(), "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
		}
	})
	return s.urlFor(name)
}

// Exec runs one statement as the superuser on the default database.
func (s *Server) Exec(ctx context.Context, sql string) error {
	conn, err := pgx.Connect(ctx, s.URL())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql)
	return err
}

// Kill sends SIGKILL to the postmaster and its backends, as a crash would.
func (s *Server) Kill() { s.proc.Kill() }

// Stop shuts the server down (fast shutdown) and waits for it.
func (s *Server) Stop() { s.proc.Stop(syscall.SIGINT, 10*time.Second) }

// Restart starts a stopped or killed server again on the same port and data
// directory. A running server is stopped first.
func (s *Server) Restart(tb testing.TB) {
	tb.Helper()
	if !s.proc.Exited() {
		s.Stop()
	}
	var err error
	for attempt := 0; attempt < 20; attempt++ {
		if err = s.launch(); err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	tb.Fatalf("pgtest: restart: %v", err)
}
