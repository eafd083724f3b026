package pgtest

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/meshguard/meshguard/internal/servertest"
)

// PgBouncer is a throwaway PgBouncer in transaction mode in front of a
// Server, with one server connection per database, so every client of a
// database shares one server session (what breaks server-side prepared
// statements and session state).
type PgBouncer struct {
	port int
}

// StartPgBouncer runs PgBouncer in front of s on a free port, as the
// postgres OS user when the tests run as root (PgBouncer refuses root). It is
// stopped at the end of the test. Missing binary: skip locally, fail under CI.
func StartPgBouncer(tb testing.TB, s *Server) *PgBouncer {
	tb.Helper()
	bin := servertest.LookPath(tb, "pgbouncer", "/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer")
	cred, uid, gid, err := serverUser()
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	dir, err := os.MkdirTemp("", "pgbouncer-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if cred != nil {
		if err := os.Chown(dir, uid, gid); err != nil {
			tb.Fatal(err)
		}
	}
	b := &PgBouncer{port: servertest.FreePort(tb)}
	files := map[string]string{
		"pgbouncer.ini": fmt.Sprintf(`[databases]
* = host=127.0.0.1 port=%d
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = transaction
default_pool_size = 1
max_client_conn = 100
server_check_delay = 0
`, s.Port(), b.port, filepath.Join(dir, "users.txt")),
		"users.txt": `"postgres" ""` + "\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	proc, err := servertest.Start(bin, []string{filepath.Join(dir, "pgbouncer.ini")}, dir, cred)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { proc.Stop(syscall.SIGINT, 5*time.Second) })
	if err := servertest.WaitTCP(fmt.Sprintf("127.0.0.1:%d", b.port), 10*time.Second); err != nil {
		tb.Fatalf("pgtest: pgbouncer: %v\n%s", err, proc.Output())
	}
	return b
}

// Port is PgBouncer's TCP port.
func (b *PgBouncer) Port() int { return b.port }

// URL rewrites a database URL of the server behind PgBouncer so that it
// connects through PgBouncer.
func (b *PgBouncer) URL(tb testing.TB, direct string) string {
	tb.Helper()
	u, err := url.Parse(direct)
	if err != nil {
		tb.Fatal(err)
	}
	u.Host = fmt.Sprintf("127.0.0.1:%d", b.port)
	return u.String()
}
