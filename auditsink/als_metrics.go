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

	// Pre-resolved children for the per-entry path.
	receivedHTTP, receivedTCP                          prometheus.Counter
	droppedRule, droppedUnmatched, droppedIntermediate prometheus.Counter
}

// Outcomes of a CSP report request.
var cspOutcomes = []string{"stored", "too_large", "malformed", "unsupported_media_type", "rate_limited", "sink_error", "ignored"}

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
			Help: "CSP report requests by outcome; stored counts reports, the others requests.",
		}, []string{"outcome"}),
	}
	for _, c := range []prometheus.Collector{m.received, m.kept, m.dropped, m.ruleMatches, m.streamsOpen, m.malformed, m.enqueueErrors, m.enqueueLost, m.csp} {
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
	for _, o := range cspOutcomes {
		m.csp.WithLabelValues(o)
	}
	return m, nil
}
