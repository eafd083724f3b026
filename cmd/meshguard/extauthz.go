package main

import (
	"context"

	"github.com/meshguard/meshguard/extauthz"
)

// setupExtauthz builds the Authorization service.
func setupExtauthz(ctx context.Context, a *app) (*component, error) {
	srv, err := extauthz.New(a.log.With("component", "extauthz"), a.reg, a.cfg.extauthzConfig())
	if err != nil {
		return nil, err
	}
	return &component{name: "extauthz", grpc: srv.Register}, nil
}
