package auditsink

import (
	"errors"
	"fmt"
	"time"

	"github.com/meshguard/meshguard/internal/secret"
)

// Config is the `audit:` section. Ingest fields are validated in rules.go,
// store fields here, admin API fields in api.go.
type Config struct {
	// Retention is how long rows are kept; older whole partitions are dropped.
	Retention time.Duration `yaml:"retention"`
	// SpoolDir holds batches the database could not take yet.
	SpoolDir string `yaml:"spool_dir"`
	// SQLitePath is the embedded store used when no database is configured.
	SQLitePath string `yaml:"sqlite_path"`

	// Rules classify access-log entries; empty means DefaultRules().
	Rules []RuleConfig `yaml:"rules"`
	// RequestHeaders and ResponseHeaders are extra headers copied into metadata.
	RequestHeaders  []string `yaml:"request_headers"`
	ResponseHeaders []string `yaml:"response_headers"`

	// AdminTokenFile holds the admin API bearer token. Empty: only
	// MESHGUARD_ADMIN_TOKEN (AdminToken) is used.
	AdminTokenFile string `yaml:"admin_token_file"`
	// AdminToken comes from MESHGUARD_ADMIN_TOKEN, never from the file.
	AdminToken secret.String `yaml:"-"`
	// AdminRole, when set, admits requests whose ext_authz-verified role is this.
	AdminRole string `yaml:"admin_role"`
}

// DefaultConfig returns the defaults for the audit section.
func DefaultConfig() Config {
	return Config{Retention: 8760 * time.Hour, SpoolDir: "./meshguard-spool", SQLitePath: "./meshguard-audit.db"}
}

// Validate reports every invalid field, naming it by its YAML path.
func (c Config) Validate() error {
	return errors.Join(c.validateStore(), c.validateRules(), c.validateAdmin())
}

func (c Config) validateStore() error {
	if c.Retention <= 0 {
		return fmt.Errorf("audit.retention: must be positive, got %s", c.Retention)
	}
	return nil
}
