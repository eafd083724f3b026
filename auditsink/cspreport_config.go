package auditsink

import (
	"errors"
	"fmt"
	"math"

	"github.com/meshguard/meshguard/internal/clientaddr"
)

// CSPReportsConfig is audit.csp_reports: how many violation reports one
// client, and all clients together, may put into the trail. Limits count
// reports, not requests (a Reporting API batch of 100 spends 100), and are
// applied only to requests that passed validation, so garbage never spends
// anyone's budget. A client is the address Envoy derived for it
// (identity.client_ip_header), IPv6 by identity.ipv6_prefix, as ext_authz
// keys anonymous clients; without that header, the connection peer.
type CSPReportsConfig struct {
	// PerClientRate is the reports per second one client may store,
	// sustained, and PerClientBurst how many it may store at once; it must
	// hold the largest request (100 reports).
	PerClientRate  float64 `yaml:"per_client_rate"`
	PerClientBurst int     `yaml:"per_client_burst"`
	// MaxRowsPerSecond caps the CSP rows all clients together put into the
	// trail, and MaxRowsBurst how many at once; beyond them reports are
	// refused with 429 and counted, never stored unsampled or dropped after
	// a 204. The burst must hold at least one client's.
	MaxRowsPerSecond float64 `yaml:"max_rows_per_second"`
	MaxRowsBurst     int     `yaml:"max_rows_burst"`
	// MaxClients bounds the per-client table: beyond it the least recently
	// seen client is forgotten (its next report starts from a full burst),
	// so rotating addresses cannot grow memory.
	MaxClients int `yaml:"max_clients"`

	// ClientIPHeader and IPv6Prefix are identity.client_ip_header and
	// identity.ipv6_prefix, set by serve from the identity section (one
	// client is one client to ext_authz and here).
	ClientIPHeader string `yaml:"-"`
	IPv6Prefix     int    `yaml:"-"`
}

// DefaultCSPReportsConfig returns the CSP report defaults: 2 reports a
// second per client with a burst of one full batch (the rate of Envoy's
// csp_report preset, 120 a minute), and at most 100 CSP rows a second into
// the trail with a burst of 1,000, so ten seconds of any flood add at most
// 2,000 rows.
func DefaultCSPReportsConfig() CSPReportsConfig {
	return CSPReportsConfig{
		PerClientRate: 2, PerClientBurst: maxCSPReports,
		MaxRowsPerSecond: 100, MaxRowsBurst: 1000,
		MaxClients:     16384,
		ClientIPHeader: clientaddr.ShippedHeader, IPv6Prefix: 64,
	}
}

// Bounds on audit.csp_reports values.
const (
	minCSPClients = 16
	maxCSPClients = 1 << 20
	maxCSPRate    = 1e6
)

// Validate reports every invalid field by its YAML path.
func (c CSPReportsConfig) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	rate := func(path string, v float64) bool {
		if math.IsNaN(v) || v <= 0 || v > maxCSPRate {
			bad("%s: must be a number of reports per second above 0 and at most %g, got %g", path, float64(maxCSPRate), v)
			return false
		}
		return true
	}
	okClient := rate("audit.csp_reports.per_client_rate", c.PerClientRate)
	okRows := rate("audit.csp_reports.max_rows_per_second", c.MaxRowsPerSecond)
	if okClient && okRows && c.PerClientRate > c.MaxRowsPerSecond {
		bad("audit.csp_reports.per_client_rate: %g is above max_rows_per_second (%g): one client could fill the trail's share alone",
			c.PerClientRate, c.MaxRowsPerSecond)
	}
	if c.PerClientBurst < maxCSPReports || c.PerClientBurst > maxCSPRate {
		bad("audit.csp_reports.per_client_burst: must be at least %d (the reports one request may carry) and at most %d, got %d",
			maxCSPReports, int(maxCSPRate), c.PerClientBurst)
	} else if c.MaxRowsBurst < c.PerClientBurst || c.MaxRowsBurst > maxCSPRate {
		bad("audit.csp_reports.max_rows_burst: must be at least per_client_burst (%d) and at most %d, got %d",
			c.PerClientBurst, int(maxCSPRate), c.MaxRowsBurst)
	}
	if c.MaxClients < minCSPClients || c.MaxClients > maxCSPClients {
		bad("audit.csp_reports.max_clients: must be between %d and %d, got %d", minCSPClients, maxCSPClients, c.MaxClients)
	}
	if c.IPv6Prefix < clientaddr.MinIPv6Prefix || c.IPv6Prefix > 128 {
		bad("identity.ipv6_prefix: must be between %d and 128, got %d", clientaddr.MinIPv6Prefix, c.IPv6Prefix)
	}
	return errors.Join(errs...)
}
