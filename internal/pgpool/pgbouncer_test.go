package pgpool

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/meshguard/meshguard/internal/servertest"
)

// startPgBouncer runs a real PgBouncer in transaction mode in front of pg,
// with one server connection per database, so every client of a database
// shares one server session. It returns the port. Missing binary: skip
// locally, fail under CI=true.
func startPgBouncer(t *testing.T) int {
	t.Helper()
	bin := servertest.LookPath(t, "pgbouncer", "/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer")
	pgURL, err := url.Parse(pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	// PgBouncer refuses to run as root; run it as postgres, like pgtest does.
	var cred *syscall.Credential
	uid, gid := -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running pgbouncer as root needs the OS user postgres: %v", err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	dir, err := os.MkdirTemp("", "pgbouncer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if cred != nil {
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	port := servertest.FreePort(t)
	ini := fmt.Sprintf(`[databases]
* = host=127.0.0.1 port=%s
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
`, pgURL.Port(), port, filepath.Join(dir, "users.txt"))
	files := map[string]string{"pgbouncer.ini": ini, "users.txt": `"postgres" ""` + "\n"}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	proc, err := servertest.Start(bin, []string{filepath.Join(dir, "pgbouncer.ini")}, dir, cred)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Stop(syscall.SIGINT, 5*time.Second) })
	if err := servertest.WaitTCP(fmt.Sprintf("127.0.0.1:%d", port), 10*time.Second); err != nil {
		t.Fatalf("%v\n%s", err, proc.Output())
	}
	return port
}

// bouncerURL is a fresh database on pg, reached through PgBouncer.
func bouncerURL(t *testing.T, port int) string {
	t.Helper()
	u, err := url.Parse(pg.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	u.Host = fmt.Sprintf("127.0.0.1:%d", port)
	return u.String()
}

// TestRealPgBouncer: through a real PgBouncer in transaction mode, pgx's
// default statement cache collides (42P05) and a statement_timeout startup
// parameter is refused; PgBouncer mode runs concurrent queries with
// arguments, transactions and the audit sink's COPY cleanly and leaves no
// prepared statement on the shared server session.
func TestRealPgBouncer(t *testing.T) {
	needPG(t)
	port := startPgBouncer(t)

	t.Run("normal mode collides", func(t *testing.T) {
		cfg := testConfig(bouncerURL(t, port))
		cfg.Pool.StatementTimeout = 0
		cfg.Pool.MaxConns = 2
		p, _ := open(t, cfg, nil)
		<-p.done
		c1, err := p.Pool().Acquire(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		defer c1.Release()
		c2, err := p.Pool().Acquire(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Release()
		if _, err := c1.Exec(t.Context(), "SELECT $1::int", 1); err != nil {
			t.Fatal(err)
		}
		_, err = c2.Exec(t.Context(), "SELECT $1::int", 2)
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42P05" {
			t.Fatalf("second client's cached statement: err = %v, want 42P05 (already exists)", err)
		}
	})

	t.Run("statement_timeout refused", func(t *testing.T) {
		cfg := testConfig(bouncerURL(t, port))
		cfg.Startup.Attempts = 0
		p, _ := open(t, cfg, nil)
		h := p.Health(t.Context())
		if h.Err == nil || !strings.Contains(h.Err.Error(), "statement_timeout") {
			t.Fatalf("Health = %+v, want PgBouncer to refuse statement_timeout", h)
		}
		if !strings.Contains(h.Err.Error(), "unsupported startup parameter") {
			t.Errorf("Health error = %v", h.Err)
		}
	})

	t.Run("pgbouncer mode", func(t *testing.T) {
		cfg := testConfig(bouncerURL(t, port))
		cfg.PgBouncer = true
		cfg.Pool.MaxConns = 4
		p, _ := open(t, cfg, nil)
		if h := p.Health(t.Context()); h.Err != nil {
			t.Fatal(h.Err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for w := range 8 {
			wg.Go(func() {
				for i := range 8 {
					var n int
					if err := p.Pool().QueryRow(t.Context(), "SELECT $1::int * $2::int", w, i).Scan(&n); err != nil || n != w*i {
						errs <- fmt.Errorf("worker %d: %d, %v", w, n, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if n := preparedStatements(t, p); n != 0 {
			t.Errorf("%d prepared statements on the server session behind PgBouncer", n)
		}
	})
}
