package auditsink

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// ingestMetrics are the ALS and CSP report counters. Labels are bounded:
// entry types, rule names and action templates from the config, fixed
// reasons and outcomes.
type ingestMetrics struct {
	received      *prometheus.CounterVec // type: http|tcp
	kept          *prometheus.CounterVec // action (as configured)
	dropped       *prometheus.CounterVec // reason: rule|unmatched|intermediate
	ruleMatches   *prometheus.CounterVec // rule name
	streamsOpen   prometheus.Gauge
	malformed     *prometheus.CounterVec // reason: no_identifier|empty_batch
	enqueueErrors prometheus.Counter
	enqueueLost   prometheus.Counter
	csp           *prometheus.CounterVec // outcome
	cspDropped    *prometheus.CounterVec // reason: rate_limited|trail_capped

	// Pre-resolved children for the per-entry path.
	receivedHTTP, receivedTCP                                                 prometheus.Counter
	droppedRule, droppedUnmatched, droppedIntermediate                        prometheus.Counter
	cspStored, cspIgnored, cspTooLarge, cspMalformed, cspMediaType, cspMethod prometheus.Counter
	cspRateLimited, cspTrailCapped, cspSinkError                              prometheus.Counter
	cspDroppedClient, cspDroppedTrail                                         prometheus.Counter
}

func newIngestMetrics(reg prometheus.Registerer) (*ingestMetrics, error) {
	m := &ingestMetrics{
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_entries_received_total",
			Help: "Access-log entries received, by entry type.",
		}, []string{"type"}),
		kept: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_entries_kept_total",
			Help: "Entries a rule kept as audit rows, by configured action.",
		}, []string{"action"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_entries_dropped_total",
			Help: "Entries not stored: rule (a drop rule matched), unmatched (no rule matched), intermediate (start/periodic entries).",
		}, []string{"reason"}),
		ruleMatches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_rule_matches_total",
			Help: "Entries decided by each classification rule.",
		}, []string{"rule"}),
		streamsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshguard_auditsink_streams_open",
			Help: "Access-log streams currently open.",
		}),
		malformed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_malformed_messages_total",
			Help: "Stream messages that broke the protocol but were processed: no_identifier (first message without one), empty_batch.",
		}, []string{"reason"}),
		enqueueErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_enqueue_errors_total",
			Help: "Batches of accepted records the writer refused (full spool with the drop policy, or a shut-down writer).",
		}),
		enqueueLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_enqueue_failed_records_total",
			Help: "Records in batches the writer refused.",
		}),
		csp: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_csp_reports_total",
			Help: "CSP report requests by outcome; stored and ignored (Reporting API reports of other types) count reports, the others requests.",
		}, []string{"outcome"}),
		cspDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_csp_reports_dropped_total",
			Help: "Well-formed CSP violation reports refused with 429: rate_limited (the client's budget), trail_capped (audit.csp_reports.max_rows_per_second).",
		}, []string{"reason"}),
	}
	for _, c := range []prometheus.Collector{m.received, m.kept, m.dropped, m.ruleMatches, m.streamsOpen, m.malformed, m.enqueueErrors, m.enqueueLost, m.csp, m.cspDropped} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering auditsink ingest metrics: %w", err)
		}
	}
	m.receivedHTTP = m.received.WithLabelValues("http")
	m.receivedTCP = m.received.WithLabelValues("tcp")
	m.droppedRule = m.dropped.WithLabelValues("rule")
	m.droppedUnmatched = m.dropped.WithLabelValues("unmatched")
	m.droppedIntermediate = m.dropped.WithLabelValues("intermediate")
	m.malformed.WithLabelValues("no_identifier")
	m.malformed.WithLabelValues("empty_batch")
	// Every CSP outcome, resolved (and so exported at 0) up front; stored
	// and ignored count reports, the others requests.
	c := m.csp.WithLabelValues
	m.cspStored, m.cspIgnored, m.cspTooLarge, m.cspMalformed = c("stored"), c("ignored"), c("too_large"), c("malformed")
	m.cspMediaType, m.cspMethod = c("unsupported_media_type"), c("method_not_allowed")
	m.cspRateLimited, m.cspTrailCapped, m.cspSinkError = c("rate_limited"), c("trail_capped"), c("sink_error")
	m.cspDroppedClient, m.cspDroppedTrail = m.cspDropped.WithLabelValues("rate_limited"), m.cspDropped.WithLabelValues("trail_capped")
	return m, nil
}

// registerCSPTable exports the per-client table's size and evictions.
func registerCSPTable(reg prometheus.Registerer, t *clientTable) error {
	held := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshguard_auditsink_csp_clients",
		Help: "Clients the CSP report limiter holds a budget for (at most audit.csp_reports.max_clients).",
	}, func() float64 { n, _ := t.stats(); return float64(n) })
	evicted := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "meshguard_auditsink_csp_clients_evicted_total",
		Help: "Clients the CSP report limiter forgot to make room (least recently seen first); steady growth means more clients than max_clients.",
	}, func() float64 { _, n := t.stats(); return float64(n) })
	for _, c := range []prometheus.Collector{held, evicted} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("registering auditsink CSP metrics: %w", err)
		}
	}
	return nil
}
