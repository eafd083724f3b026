package main

import (
	"context"

	"github.com/meshguard/meshguard/auditsink"
)

// setupAuditsink builds the access-log sink, its store and the audit HTTP API.
func setupAuditsink(ctx context.Context, a *app) (*component, error) {
	srv, err := auditsink.New(a.log.With("component", "auditsink"), a.reg, a.cfg.Audit)
	if err != nil {
		return nil, err
	}
	return &component{name: "auditsink", grpc: srv.Register}, nil
}
