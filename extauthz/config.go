package extauthz

import (
	"fmt"
	"time"
)

// CORSConfig is the `cors:` section.
type CORSConfig struct {
	Mode             string              `yaml:"mode"`
	PublicOrigin     string              `yaml:"public_origin"`
	AllowedOrigins   []string            `yaml:"allowed_origins"`
	AllowedMethods   []string            `yaml:"allowed_methods"`
	AllowedHeaders   []string            `yaml:"allowed_headers"`
	ExposedHeaders   []string            `yaml:"exposed_headers"`
	AllowCredentials bool                `yaml:"allow_credentials"`
	MaxAge           time.Duration       `yaml:"max_age"`
	TenantHeader     string              `yaml:"tenant_header"`
	Tenants          map[string][]string `yaml:"tenants"`
}

// IdentityConfig is the `identity:` section.
type IdentityConfig struct {
	JWTMetadata       JWTMetadataConfig `yaml:"jwt_metadata"`
	TrustedUserHeader string            `yaml:"trusted_user_header"`
}

// JWTMetadataConfig says where Envoy's jwt_authn filter leaves the payload.
type JWTMetadataConfig struct {
	Namespace string `yaml:"namespace"`
	Key       string `yaml:"key"`
	UserClaim string `yaml:"user_claim"`
	RoleClaim string `yaml:"role_claim"`
}

// CSPConfig is the `csp:` section.
type CSPConfig struct {
	Nonce      bool                `yaml:"nonce"`
	Directives map[string][]string `yaml:"directives"`
	ReportURI  string              `yaml:"report_uri"`
}

// Config gathers the sections extauthz serves.
type Config struct {
	Development bool
	CORS        CORSConfig
	Identity    IdentityConfig
	CSP         CSPConfig
}

// DefaultCORSConfig returns the defaults for the cors section.
func DefaultCORSConfig() CORSConfig {
	return CORSConfig{
		Mode:             "enforce",
		AllowedMethods:   []string{"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"},
		AllowedHeaders:   []string{"Content-Type", "Authorization", "X-Requested-With", "X-CSRF-Token", "X-Session-ID"},
		ExposedHeaders:   []string{"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"},
		AllowCredentials: true,
		MaxAge:           24 * time.Hour,
		TenantHeader:     "x-tenant-id",
	}
}

// DefaultIdentityConfig returns the defaults for the identity section.
func DefaultIdentityConfig() IdentityConfig {
	return IdentityConfig{JWTMetadata: JWTMetadataConfig{
		Namespace: "envoy.filters.http.jwt_authn", Key: "jwt_payload", UserClaim: "sub", RoleClaim: "role",
	}}
}

// DefaultCSPConfig returns the defaults for the csp section.
func DefaultCSPConfig() CSPConfig {
	return CSPConfig{
		Nonce: true,
		Directives: map[string][]string{
			"default-src": {"'self'"},
			"script-src":  {"'self'", "'strict-dynamic'"},
			"object-src":  {"'none'"},
			"base-uri":    {"'self'"},
		},
		ReportURI: "/v1/csp-reports",
	}
}

// Validate reports every invalid field, naming it by its YAML path.
func (c Config) Validate() error {
	if c.CORS.Mode != "enforce" && c.CORS.Mode != "report" {
		return fmt.Errorf("cors.mode: must be enforce or report, got %q", c.CORS.Mode)
	}
	return nil
}
