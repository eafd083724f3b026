package main

import (
	"context"

	"github.com/meshguard/meshguard/ratelimitsvc"
)

// setupRatelimit builds the Rate Limit Service and its store.
func setupRatelimit(ctx context.Context, a *app) (*component, error) {
	srv, err := ratelimitsvc.New(a.log.With("component", "ratelimit"), a.reg, a.cfg.Ratelimit)
	if err != nil {
		return nil, err
	}
	return &component{name: "ratelimit", grpc: srv.Register}, nil
}
