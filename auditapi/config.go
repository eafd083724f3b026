package auditapi

import "github.com/meshguard/meshguard/internal/secret"

// Config is the admin API's part of the `audit:` section. (The trail's
// fields are audittrail.Config, ingest's auditsink.Config; the three share
// the YAML section.) The zero value has no token: the API is disabled.
type Config struct {
	// AdminTokenFile holds the admin API bearer token. Empty: only
	// MESHGUARD_ADMIN_TOKEN (AdminToken) is used.
	AdminTokenFile string `yaml:"admin_token_file"`
	// AdminToken comes from MESHGUARD_ADMIN_TOKEN, never from the file.
	AdminToken secret.String `yaml:"-"`
	// AdminRole is removed (any direct caller could forge the role header);
	// a config that still sets it is refused with a message that says so.
	AdminRole string `yaml:"admin_role"`
}

// DefaultConfig returns the defaults: no token, the API disabled.
func DefaultConfig() Config { return Config{} }

// Validate reports every invalid field, naming it by its YAML path. The
// token itself is never quoted.
func (c Config) Validate() error { return c.validateAdmin() }
