package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/redis/go-redis/v9"

	"github.com/meshguard/meshguard/ratelimitsvc"
)

// redisLogger sends go-redis's own messages (sentinel failovers, pool
// trouble) to the process logger instead of bare stderr.
type redisLogger struct{ log *slog.Logger }

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.WarnContext(ctx, fmt.Sprintf(format, v...))
}

// setupRatelimit builds the Rate Limit Service and its store: Redis when
// configured, else in process. /readyz reports Redis (required when
// configured, with pool statistics) and the state of config_dir reloads
// (reported, not required: the previous configuration stays in force).
func setupRatelimit(ctx context.Context, a *app) (*component, error) {
	log := a.log.With("component", "ratelimit")
	c := &component{name: "ratelimit"}
	var srv *ratelimitsvc.Server
	var err error
	if a.cfg.Redis.Enabled() {
		redis.SetLogger(redisLogger{log.With("client", "go-redis")}) // go-redis has only a global logger
		rs, err := ratelimitsvc.NewRedisStore(log, a.reg, a.cfg.Redis, ratelimitsvc.WithTracerProvider(a.tracerProvider()))
		if err != nil {
			return nil, fmt.Errorf("ratelimit: %w", err)
		}
		srv, err = ratelimitsvc.New(log, a.reg, a.cfg.Ratelimit, rs)
		if err != nil {
			rs.Close()
			return nil, fmt.Errorf("ratelimit: %w", err)
		}
		if err := rs.Ping(ctx); err != nil {
			// Not fatal: decisions follow failure_mode until Redis answers.
			log.Warn("redis not reachable at start", "mode", rs.Mode(), "err", err)
		}
		c.checks = append(c.checks, readinessCheck{name: "redis", required: true, check: func(ctx context.Context) dependencyStatus {
			st := dependencyStatus{Healthy: true, Details: rs.Status()}
			if err := rs.Ping(ctx); err != nil {
				st.Healthy, st.Error = false, err.Error()
			}
			return st
		}})
		c.shutdown = func(context.Context) error { return rs.Close() }
	} else {
		srv, err = ratelimitsvc.New(log, a.reg, a.cfg.Ratelimit, ratelimitsvc.NewMemoryStore())
		if err != nil {
			return nil, fmt.Errorf("ratelimit: %w", err)
		}
	}
	c.grpc = srv.Register
	c.run = srv.Run
	if a.cfg.Ratelimit.ConfigDir != "" {
		c.checks = append(c.checks, readinessCheck{name: "ratelimit_config", check: func(context.Context) dependencyStatus {
			st := dependencyStatus{Healthy: true, Details: map[string]string{"config_dir": a.cfg.Ratelimit.ConfigDir}}
			if err := srv.ConfigError(); err != nil {
				st.Healthy, st.Error = false, err.Error()
			}
			return st
		}})
	}
	return c, nil
}
