package pgpool

import (
	"errors"
	"fmt"
	"time"

	"github.com/meshguard/meshguard/internal/secret"
)

// Config is the `database:` section. The database is configured when URL is
// set; with no URL meshguard uses its embedded store instead.
type Config struct {
	// URL is the PostgreSQL connection URL (postgres://...). Empty: no database.
	URL secret.URL `yaml:"url"`
	// DirectURL, when set, is used for LISTEN/NOTIFY (which PgBouncer's
	// transaction mode cannot carry). Empty: URL is used.
	DirectURL secret.URL `yaml:"direct_url"`
	// Pool tunes the connection pool.
	Pool PoolConfig `yaml:"pool"`
	// PgBouncer turns off server-side prepared statements and session state.
	PgBouncer bool `yaml:"pgbouncer"`
}

// PoolConfig tunes pgxpool. A zero duration or count means the default from
// DefaultConfig.
type PoolConfig struct {
	MinConns         int32         `yaml:"min_conns"`
	MaxConns         int32         `yaml:"max_conns"`
	AcquireTimeout   time.Duration `yaml:"acquire_timeout"`
	IdleTimeout      time.Duration `yaml:"idle_timeout"`
	StatementTimeout time.Duration `yaml:"statement_timeout"`
}

// DefaultConfig returns the defaults for the database section.
func DefaultConfig() Config {
	return Config{Pool: PoolConfig{
		MinConns:         2,
		MaxConns:         10,
		AcquireTimeout:   60 * time.Second,
		IdleTimeout:      60 * time.Second,
		StatementTimeout: 60 * time.Second,
	}}
}

// Enabled reports whether a database is configured.
func (c Config) Enabled() bool { return c.URL.IsSet() }

// Validate reports every invalid field, naming it by its YAML path.
func (c Config) Validate() error {
	var errs []error
	if c.Pool.MinConns < 0 {
		errs = append(errs, fmt.Errorf("database.pool.min_conns: must be >= 0, got %d", c.Pool.MinConns))
	}
	if c.Pool.MaxConns < 1 {
		errs = append(errs, fmt.Errorf("database.pool.max_conns: must be >= 1, got %d", c.Pool.MaxConns))
	}
	if c.Pool.MinConns > c.Pool.MaxConns {
		errs = append(errs, fmt.Errorf("database.pool.min_conns: %d is more than max_conns %d", c.Pool.MinConns, c.Pool.MaxConns))
	}
	return errors.Join(errs...)
}
