package extauthz

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// tenantEnv is a tenant store on a real PostgreSQL database, wired into a
// Server behind a real gRPC listener.
type tenantEnv struct {
	pg     *pgtest.Server
	pool   *pgxpool.Pool
	store  *TenantStore
	client authv3.AuthorizationClient
}

func newTenantEnv(t *testing.T, reload time.Duration, listen bool) *tenantEnv {
	t.Helper()
	pg := pgtest.Start(t)
	dbURL := pg.NewDatabase(t)
	poolCfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	poolCfg.ConnConfig.ConnectTimeout = time.Second
	pool, err := pgxpool.NewWithConfig(t.Context(), poolCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	cfg := testConfig()
	storeCfg := cfg.CORS
	storeCfg.TenantsReload = reload // below the 1s that Validate asks of operators
	var connect func(context.Context) (*pgx.Conn, error)
	if listen {
		connect = func(ctx context.Context) (*pgx.Conn, error) {
			c := poolCfg.ConnConfig.Copy()
			return pgx.ConnectConfig(ctx, c)
		}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	store, err := NewTenantStore(log, prometheus.NewRegistry(), storeCfg, pool, connect)
	if err != nil {
		t.Fatal(err)
	}
	store.minBackoff, store.maxBackoff = 50*time.Millisecond, 200*time.Millisecond
	srv, _ := newTestServer(t, cfg, store)
	return &tenantEnv{pg: pg, pool: pool, store: store, client: startGRPC(t, srv)}
}

// run starts the watcher and stops it (checking it returns) at cleanup.
func (e *tenantEnv) run(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.store.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v after cancel, want nil", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return within 5s of cancel")
		}
	})
}

func (e *tenantEnv) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	if _, err := e.pool.Exec(t.Context(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// status asks Check about a cross-origin GET from origin for tenant and
// returns the HTTP answer: 200 when allowed with ACAO, else the denied status.
func (e *tenantEnv) status(t *testing.T, tenant, origin string) int {
	t.Helper()
	req := envoyReq{host: "api.example.net", headers: hdr("origin", origin, "x-tenant-id", tenant)}
	resp, err := e.client.Check(t.Context(), req.build(t, formHeaderMap))
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if d := resp.GetDeniedResponse(); d != nil {
		return int(d.GetStatus().GetCode())
	}
	for _, h := range resp.GetOkResponse().GetResponseHeadersToAdd() {
		if h.GetHeader().GetKey() == "Access-Control-Allow-Origin" && h.GetHeader().GetValue() == origin {
			return 200
		}
	}
	t.Fatalf("allowed without Access-Control-Allow-Origin: %v", resp)
	return 0
}

func waitListening(t *testing.T, s *TenantStore) {
	t.Helper()
	servertest.WaitUntil(t, 10*time.Second, "the watcher listens", func() bool { _, st := s.Status(); return st.Listening })
}

// TestTenantOriginsLive: rows inserted and deleted in PostgreSQL take effect
// without a restart, through LISTEN/NOTIFY alone (the periodic reload is set
// to an hour), and the last good copy survives a database crash.
func TestTenantOriginsLive(t *testing.T) {
	e := newTenantEnv(t, time.Hour, true)

	// Several replicas creating the schema at once must all succeed.
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() { errs <- e.store.EnsureSchema(t.Context()) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent EnsureSchema: %v", err)
		}
	}
	e.run(t)
	waitListening(t, e.store)

	const origin = "https://shop.tenant9.test"
	if got := e.status(t, "tenant9", origin); got != 403 {
		t.Fatalf("before insert: %d, want 403", got)
	}
	e.exec(t, `INSERT INTO tenant_origins (tenant, origin) VALUES ($1, $2)`, "tenant9", origin)
	servertest.WaitUntil(t, 10*time.Second, "the inserted origin is allowed", func() bool { return e.status(t, "tenant9", origin) == 200 })
	if got := e.status(t, "tenant8", origin); got != 403 {
		t.Errorf("other tenant: %d, want 403", got)
	}

	// Patterns work from the table too; bad rows are skipped, not fatal.
	e.exec(t, `INSERT INTO tenant_origins (tenant, origin) VALUES ('tenant9', 'https://*.tenant9.example'), ('tenant9', 'https://bad.example/'), ('tenant9', '*')`)
	servertest.WaitUntil(t, 10*time.Second, "the pattern is allowed", func() bool { return e.status(t, "tenant9", "https://a.tenant9.example") == 200 })
	if _, st := e.store.Status(); st.Invalid != 2 || st.Origins != 2 || st.Tenants != 1 {
		t.Errorf("status %+v, want 2 origins, 2 invalid rows, 1 tenant", st)
	}

	e.exec(t, `DELETE FROM tenant_origins WHERE origin = $1`, origin)
	servertest.WaitUntil(t, 10*time.Second, "the deleted origin is refused", func() bool { return e.status(t, "tenant9", origin) == 403 })

	// Crash: the last good copy keeps answering.
	e.exec(t, `INSERT INTO tenant_origins (tenant, origin) VALUES ('tenant7', 'https://seven.test')`)
	servertest.WaitUntil(t, 10*time.Second, "tenant7 is allowed", func() bool { return e.status(t, "tenant7", "https://seven.test") == 200 })
	e.pg.Kill()
	servertest.WaitUntil(t, 10*time.Second, "the store notices the outage", func() bool { ok, _ := e.store.Status(); return !ok })
	if got := e.status(t, "tenant7", "https://seven.test"); got != 200 {
		t.Fatalf("during the outage: %d, want 200 from the last good copy", got)
	}
	if _, st := e.store.Status(); st.LastError == "" || st.Listening {
		t.Errorf("status during the outage %+v: want an error and no listener", st)
	}

	// Recovery by itself: a change made after the restart arrives.
	e.pg.Restart(t)
	waitListening(t, e.store)
	e.exec(t, `INSERT INTO tenant_origins (tenant, origin) VALUES ('tenant7', 'https://seven-b.test')`)
	servertest.WaitUntil(t, 10*time.Second, "a row inserted after recovery is allowed", func() bool { return e.status(t, "tenant7", "https://seven-b.test") == 200 })
	if ok, st := e.store.Status(); !ok || st.LastError != "" {
		t.Errorf("status after recovery %+v, want healthy", st)
	}
}

// TestTenantOriginsPoll: without a listener (PgBouncer without a direct URL)
// the periodic reload alone picks up changes, and the tenant may come from
// the request's host.
func TestTenantOriginsPoll(t *testing.T) {
	e := newTenantEnv(t, 200*time.Millisecond, false)
	e.run(t)
	servertest.WaitUntil(t, 10*time.Second, "the first reload", func() bool { ok, _ := e.store.Status(); return ok })
	e.exec(t, `INSERT INTO tenant_origins (tenant, origin) VALUES ('shop.example.net', 'https://partner.example.org')`)
	req := envoyReq{host: "shop.example.net", headers: hdr("origin", "https://partner.example.org")}
	servertest.WaitUntil(t, 10*time.Second, "the host's tenant origin is allowed", func() bool {
		resp, err := e.client.Check(t.Context(), req.build(t, formHeaders))
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetOkResponse() != nil && resp.GetDynamicMetadata().GetFields()["tenant"].GetStringValue() == "shop.example.net"
	})
}
