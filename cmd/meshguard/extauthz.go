package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/meshguard/meshguard/extauthz"
)

// setupExtauthz builds the Authorization service and, when a database is
// configured, the tenant origin watcher that keeps per-tenant origins current.
func setupExtauthz(ctx context.Context, a *app) (*component, error) {
	log := a.log.With("component", "extauthz")
	cfg := a.cfg.extauthzConfig()
	c := &component{name: "extauthz"}
	var tenants *extauthz.TenantStore
	if a.db != nil {
		connect := a.db.pool.ConnectDirect
		if a.cfg.Database.PgBouncer && !a.cfg.Database.DirectURL.IsSet() {
			// LISTEN through PgBouncer's transaction mode hears nothing.
			log.Warn("database.direct_url is not set in PgBouncer mode: tenant origins are reloaded every cors.tenants_reload, without LISTEN/NOTIFY",
				"tenants_reload", cfg.CORS.TenantsReload)
			connect = nil
		}
		ts, err := extauthz.NewTenantStore(log, a.reg, cfg.CORS, a.db.pool.Pool(), connect)
		if err != nil {
			return nil, err
		}
		tenants = ts
		startTenants(ctx, log, ts, c)
	}
	srv, err := extauthz.New(log, a.reg, cfg, tenants)
	if err != nil {
		return nil, err
	}
	for _, w := range configWarnings(a.cfg) {
		log.Warn(w)
	}
	c.grpc = srv.Register
	return c, nil
}

// startTenants makes a first attempt to create and load the tenant origin
// table, so the first requests already see the database's tenants, then hands
// the watcher to serve's background work. A database that is down at start
// is not fatal: config tenants apply and the watcher keeps retrying.
func startTenants(ctx context.Context, log *slog.Logger, ts *extauthz.TenantStore, c *component) {
	ictx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := ts.EnsureSchema(ictx); err != nil {
		log.Warn("tenant origin table not ready at start; retrying in the background", "err", err)
	} else if err := ts.Load(ictx); err != nil {
		log.Warn("tenant origins not loaded at start; retrying in the background", "err", err)
	}
	c.run = ts.Run
	c.checks = append(c.checks, readinessCheck{name: "tenant_origins", required: false,
		check: func(context.Context) dependencyStatus {
			ok, st := ts.Status()
			return dependencyStatus{Healthy: ok, Error: st.LastError, Details: st}
		}})
}

// configWarnings lists what a valid configuration relies on Envoy for or
// gives up (trusted identity headers, the client address header, the
// account key): check-config prints them, serve logs them at start.
func configWarnings(c Config) []string {
	return c.extauthzConfig().Warnings()
}
