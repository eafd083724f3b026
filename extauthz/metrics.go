package extauthz

import (
	"github.com/prometheus/client_golang/prometheus"
)

// decision is what Check answered; it is a label value.
type decision uint8

const (
	decisionAllow     decision = iota // OK, forwarded upstream
	decisionDeny                      // denied response with an error status
	decisionPreflight                 // preflight answered with 204
	numDecisions
)

var decisionNames = [numDecisions]string{"allow", "deny", "preflight"}

// reason says why; it is a label value and goes into dynamic metadata.
type reason uint8

const (
	reasonNotCORS           reason = iota // no Origin header
	reasonSameOrigin                      // Origin is the request's own origin
	reasonCORSSkipped                     // route sets cors: skip
	reasonOriginAllowed                   // cross-origin, allowed
	reasonOriginNotAllowed                // cross-origin, not in any list
	reasonOriginInvalid                   // Origin is not a serialised origin
	reasonPreflightOK                     // preflight answered
	reasonMethodNotAllowed                // preflight method not allowed
	reasonHeadersNotAllowed               // preflight header not allowed
	reasonAuthRequired                    // route requires a role; no identity
	reasonRoleRequired                    // route requires a role the caller lacks
	reasonBadRoutePolicy                  // context_extensions holds an unknown value
	reasonRequestTooLarge                 // more headers than any Envoy sends
	reasonTokenInvalid                    // a bearer token was presented and failed
	reasonAccountInvalid                  // a login body that names no account, or two
	reasonBodyTooLarge                    // a login body over MaxAccountBodyBytes
	reasonBodyUnsupported                 // a login body neither JSON nor a form
	numReasons

	reasonNone = numReasons // not a label: nothing refused
)

var reasonNames = [numReasons]string{
	"not_cors", "same_origin", "cors_skipped", "origin_allowed", "origin_not_allowed", "origin_invalid",
	"preflight_ok", "method_not_allowed", "headers_not_allowed", "authentication_required",
	"role_required", "bad_route_policy", "request_too_large", "token_invalid", "account_invalid",
	"body_too_large", "body_unsupported_media_type",
}

type metrics struct {
	decisions [numDecisions][numReasons]prometheus.Counter
	duration  prometheus.Histogram
	nonces    prometheus.Counter
	identity  [3]prometheus.Counter // by source: jwt, header, none
	invalidID prometheus.Counter
}

const (
	identityJWT = iota
	identityHeader
	identityNone
)

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{}
	dv := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshguard_extauthz_decisions_total",
		Help: "Check answers by decision (allow, deny, preflight) and reason.",
	}, []string{"decision", "reason"})
	for d := range numDecisions {
		for r := range numReasons {
			m.decisions[d][r] = dv.WithLabelValues(decisionNames[d], reasonNames[r])
		}
	}
	m.duration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "meshguard_extauthz_check_duration_seconds",
		Help:    "Time spent deciding one Check, excluding gRPC transport.",
		Buckets: []float64{5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2},
	})
	m.nonces = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "meshguard_extauthz_csp_nonces_total",
		Help: "CSP nonces issued.",
	})
	iv := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshguard_extauthz_identity_total",
		Help: "Checks by where the caller's identity came from (jwt, header, none).",
	}, []string{"source"})
	for i, s := range []string{"jwt", "header", "none"} {
		m.identity[i] = iv.WithLabelValues(s)
	}
	m.invalidID = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "meshguard_extauthz_identity_invalid_total",
		Help: "User ids or roles ignored because they were too long or not visible ASCII.",
	})
	reg.MustRegister(dv, m.duration, m.nonces, iv, m.invalidID)
	return m
}
