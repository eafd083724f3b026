package ratelimitsvc

import (
	"errors"
	"fmt"
	"time"

	"github.com/meshguard/meshguard/internal/secret"
)

// RedisConfig is the `redis:` section. Redis is configured when URL or Cluster
// is set; otherwise quotas live in process memory.
type RedisConfig struct {
	// URL is a redis:// or rediss:// URL of a standalone server.
	URL secret.URL `yaml:"url"`
	// Cluster lists host:port seeds of a Redis Cluster.
	Cluster []string `yaml:"cluster"`
	// Timeout bounds every store operation on the decision path.
	Timeout time.Duration `yaml:"timeout"`
}

// Enabled reports whether a Redis store is configured.
func (c RedisConfig) Enabled() bool { return c.URL.IsSet() || len(c.Cluster) > 0 }

// Config is the `ratelimit:` section.
type Config struct {
	// FailureMode is what a decision does when the store cannot answer: allow or deny.
	FailureMode string `yaml:"failure_mode"`
	// ResponseHeaders adds X-RateLimit-* and Retry-After headers.
	ResponseHeaders bool `yaml:"response_headers"`
	// ConfigDir is a directory of envoyproxy/ratelimit-format files. Empty: none.
	ConfigDir string `yaml:"config_dir"`
}

// DefaultRedisConfig returns the defaults for the redis section.
func DefaultRedisConfig() RedisConfig { return RedisConfig{Timeout: 50 * time.Millisecond} }

// DefaultConfig returns the defaults for the ratelimit section.
func DefaultConfig() Config { return Config{FailureMode: "allow", ResponseHeaders: true} }

// Validate reports every invalid field, naming it by its YAML path.
func (c RedisConfig) Validate() error {
	var errs []error
	if c.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("redis.timeout: must be positive, got %s", c.Timeout))
	}
	if c.URL.IsSet() && len(c.Cluster) > 0 {
		errs = append(errs, errors.New("redis: set url or cluster, not both"))
	}
	return errors.Join(errs...)
}

// Validate reports every invalid field, naming it by its YAML path.
func (c Config) Validate() error {
	if c.FailureMode != "allow" && c.FailureMode != "deny" {
		return fmt.Errorf("ratelimit.failure_mode: must be allow or deny, got %q", c.FailureMode)
	}
	return nil
}
