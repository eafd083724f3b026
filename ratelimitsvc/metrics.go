package ratelimitsvc

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	decisions       *prometheus.CounterVec // domain, code
	rules           *prometheus.CounterVec // domain, rule, code
	localCache      *prometheus.CounterVec // domain
	storeErrors     *prometheus.CounterVec // kind
	storeDuration   prometheus.Histogram   //
	failureMode     *prometheus.CounterVec // mode
	invalid         prometheus.Counter     //
	reloads         *prometheus.CounterVec // result
	configOK        prometheus.Gauge       //
	configTimestamp prometheus.Gauge       //
	domainNotFound  prometheus.Counter     //
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_ratelimitsvc_decisions_total",
			Help: "ShouldRateLimit answers by domain (configured domains only, else _unknown) and overall code.",
		}, []string{"domain", "code"}),
		rules: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_ratelimitsvc_rule_decisions_total",
			Help: "Descriptor verdicts by domain, rule path (values only with detailed_metric) and code (ok, over_limit, shadow_over_limit).",
		}, []string{"domain", "rule", "code"}),
		localCache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_ratelimitsvc_local_cache_over_limit_total",
			Help: "Requests answered OVER_LIMIT from the in-process over-limit cache, without the store.",
		}, []string{"domain"}),
		storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_ratelimitsvc_store_errors_total",
			Help: "Store operations that failed, by kind (timeout, pool_timeout, canceled, error).",
		}, []string{"kind"}),
		storeDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshguard_ratelimitsvc_store_duration_seconds",
			Help:    "Time of one store evaluation (one round trip per request).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25},
		}),
		failureMode: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_ratelimitsvc_failure_mode_decisions_total",
			Help: "Decisions taken by failure_mode because the store could not answer, by mode (allow, deny).",
		}, []string{"mode"}),
		invalid: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_ratelimitsvc_invalid_requests_total",
			Help: "Requests rejected with InvalidArgument.",
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_ratelimitsvc_config_reloads_total",
			Help: "Reloads of ratelimit.config_dir by result (success, error).",
		}, []string{"result"}),
		configOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshguard_ratelimitsvc_config_last_reload_successful",
			Help: "1 when the last load of ratelimit.config_dir succeeded, 0 when the old config stays in force.",
		}),
		configTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshguard_ratelimitsvc_config_last_reload_success_timestamp_seconds",
			Help: "Unix time of the last successful configuration load.",
		}),
		domainNotFound: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_ratelimitsvc_domain_not_found_total",
			Help: "Requests for a domain that is not configured (answered OK).",
		}),
	}
	for _, c := range []prometheus.Collector{m.decisions, m.rules, m.localCache, m.storeErrors, m.storeDuration,
		m.failureMode, m.invalid, m.reloads, m.configOK, m.configTimestamp, m.domainNotFound} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering ratelimitsvc metrics: %w", err)
		}
	}
	return m, nil
}
