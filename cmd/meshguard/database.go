package main

import (
	"context"
)

// database is the shared PostgreSQL pool, when one is configured.
type database struct{}

// openDatabase opens the pool when the config names a database; it returns
// nil, nil when none is configured.
func openDatabase(ctx context.Context, a *app) (*database, error) {
	if !a.cfg.Database.Enabled() {
		return nil, nil
	}
	return &database{}, nil
}

func (d *database) close() {}

func (d *database) check() readinessCheck {
	return readinessCheck{name: "database", required: true, check: func(ctx context.Context) dependencyStatus {
		return dependencyStatus{Healthy: false, Error: "database pool not implemented"}
	}}
}
