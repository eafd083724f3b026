package auditsink

import "errors"

// Config is the ingest part of the `audit:` section: the classification
// rules and the extra headers kept in metadata. (The trail's fields are
// audittrail.Config, the admin API's auditapi.Config; the three share the
// YAML section.)
type Config struct {
	// Rules classify access-log entries; empty means DefaultRules().
	Rules []RuleConfig `yaml:"rules"`
	// RequestHeaders and ResponseHeaders are extra headers copied into metadata.
	RequestHeaders  []string `yaml:"request_headers"`
	ResponseHeaders []string `yaml:"response_headers"`
	// CSPReports bounds what POST /v1/csp-reports puts into the trail.
	CSPReports CSPReportsConfig `yaml:"csp_reports"`
}

// DefaultConfig returns the ingest defaults: the default rules, no extra
// headers, DefaultCSPReportsConfig.
func DefaultConfig() Config { return Config{CSPReports: DefaultCSPReportsConfig()} }

// Validate reports every invalid field, naming it by its YAML path.
func (c Config) Validate() error {
	return errors.Join(c.validateRules(), c.CSPReports.Validate())
}
