package main

import (
	"context"

	"github.com/meshguard/meshguard/internal/pgpool"
)

// database is the shared PostgreSQL pool, when one is configured.
// Components use pool.Pool() for queries and COPY, and pool.ConnectDirect
// for LISTEN.
type database struct {
	pool *pgpool.Pool
}

// openDatabase opens the pool when the config names a database; it returns
// nil, nil when none is configured. It does not wait for the database: the
// pool connects in the background and /readyz reports it meanwhile.
func openDatabase(ctx context.Context, a *app) (*database, error) {
	if !a.cfg.Database.Enabled() {
		return nil, nil
	}
	p, err := pgpool.Open(ctx, a.log.With("component", "database"), a.reg, a.cfg.Database, a.cfg.Development())
	if err != nil {
		return nil, err
	}
	return &database{pool: p}, nil
}

func (d *database) close() { d.pool.Close() }

// check is the required "database" readiness check: a ping through the pool,
// with the live pool figures as details.
func (d *database) check() readinessCheck {
	return readinessCheck{name: "database", required: true, check: func(ctx context.Context) dependencyStatus {
		h := d.pool.Health(ctx)
		st := dependencyStatus{
			Healthy:   h.Err == nil,
			LatencyMS: float64(h.Latency.Microseconds()) / 1000,
			Details:   databaseDetails{Saturated: h.Saturated, Stats: d.pool.Stats()},
		}
		if h.Err != nil {
			st.Error = h.Err.Error()
		}
		return st
	}}
}

// databaseDetails is the database entry's details in /readyz.
type databaseDetails struct {
	// Saturated: every connection was busy, but statements are succeeding.
	Saturated bool         `json:"saturated,omitempty"`
	Stats     pgpool.Stats `json:"pool"`
}
