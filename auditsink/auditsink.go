// Package auditsink is the audit trail's ingest: it serves Envoy's
// access-log service
// (envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs), turns the
// access-log entries that its classification rules keep into
// audittrail.Records, and accepts browsers' CSP violation reports on
// POST /v1/csp-reports. Both hand their records to the trail's Writer
// (package audittrail); the admin API is package auditapi.
//
// Ingest: each stream's identifier (node, log_name) arrives in its first
// message only and is kept per stream; every later message is a batch of
// HTTP (or TCP) entries. Only end-of-request entries are kept (start and
// periodic entries of newer Envoys are dropped and counted). Each entry is
// mapped to an audittrail.Record (path secrets redacted, every field
// bounded, identity from ext_authz dynamic metadata, never from client
// headers) and
// classified by ordered rules (see RuleConfig and DefaultRules). The
// records of one message go to the writer in one Enqueue call, which never
// waits on the database, so the receive loop keeps draining Envoy.
//
// Ingest metrics:
//
//	meshguard_auditsink_entries_received_total{type}      http | tcp
//	meshguard_auditsink_entries_kept_total{action}        configured action
//	meshguard_auditsink_entries_dropped_total{reason}     rule | unmatched | intermediate
//	meshguard_auditsink_rule_matches_total{rule}          rule name
//	meshguard_auditsink_streams_open
//	meshguard_auditsink_malformed_messages_total{reason}  no_identifier | empty_batch
//	meshguard_auditsink_enqueue_errors_total
//	meshguard_auditsink_enqueue_failed_records_total
//	meshguard_auditsink_csp_reports_total{outcome}        stored | ignored | too_large | malformed | unsupported_media_type | method_not_allowed | rate_limited | trail_capped | sink_error
//	meshguard_auditsink_csp_reports_dropped_total{reason} rate_limited | trail_capped (reports)
//	meshguard_auditsink_csp_clients
//	meshguard_auditsink_csp_clients_evicted_total
//
// The trail's writer and the admin API keep their meshguard_auditsink_*
// metric names (packages audittrail and auditapi list them), so dashboards
// and alerts written before the split still read them.
//
// Client addresses: ip_address is Envoy's downstream_remote_address. With
// use_remote_address and xff_num_trusted_hops set on the HTTP connection
// manager, Envoy has already resolved it past the trusted proxies, so it is
// the client, not the forgeable first X-Forwarded-For entry (which is kept
// in metadata.forwarded_for for forensics only).
package auditsink

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/meshguard/meshguard/audittrail"
)

// recordSink takes accepted records into the durable ingest path
// (audittrail.Writer: bounded queue → batched COPY, or the disk spool). Once
// Enqueue returns nil the records are never lost. It must not block on the
// database.
type recordSink interface {
	Enqueue(ctx context.Context, recs []audittrail.Record) error
}

// Server receives access-log streams and CSP reports and hands the
// resulting Records to its sink. It is safe for concurrent use; every
// stream has its own state.
type Server struct {
	alsv3.UnimplementedAccessLogServiceServer
	log    *slog.Logger
	cfg    Config
	sink   recordSink
	m      *ingestMetrics
	ingest mapper
	now    func() time.Time

	// CSP report budgets (audit.csp_reports).
	cspCfg     CSPReportsConfig
	cspClients *clientTable
	cspTrail   *globalBucket

	// lastSinkLog and lastProtoLog throttle the enqueue-error and
	// protocol-error log lines (unix nanos of the last line).
	lastSinkLog, lastProtoLog atomic.Int64
}

// New returns a Server that classifies with cfg.Rules (DefaultRules when
// empty) and enqueues what it keeps into sink. It registers the ingest
// metrics on reg and fails on an invalid rule or header list.
func New(log *slog.Logger, reg prometheus.Registerer, cfg Config, sink recordSink) (*Server, error) {
	if sink == nil {
		return nil, errors.New("auditsink: nil record sink")
	}
	rules, err := compileRules(cfg.Rules)
	if err != nil {
		return nil, fmt.Errorf("compiling audit rules: %w", err)
	}
	if err := errors.Join(validateHeaderNames("audit.request_headers", cfg.RequestHeaders),
		validateHeaderNames("audit.response_headers", cfg.ResponseHeaders)); err != nil {
		return nil, err
	}
	csp := cfg.CSPReports
	// Canonical once here, so each report reads r.Header[name] directly
	// (Header.Values would canonicalize, and allocate, per request).
	csp.ClientIPHeader = http.CanonicalHeaderKey(csp.ClientIPHeader)
	if err := csp.Validate(); err != nil {
		return nil, err
	}
	m, err := newIngestMetrics(reg)
	if err != nil {
		return nil, err
	}
	for _, r := range rules.rules {
		r.matches = m.ruleMatches.WithLabelValues(r.name)
		if !r.drop {
			r.kept = m.kept.WithLabelValues(r.actionLabel)
		}
	}
	s := &Server{log: log, cfg: cfg, sink: sink, m: m, now: time.Now}
	s.ingest = mapper{rules: rules, reqHeaders: lower(cfg.RequestHeaders), respHeaders: lower(cfg.ResponseHeaders), now: s.clock}
	s.cspCfg = csp
	s.cspClients = newClientTable(csp.MaxClients, csp.PerClientRate, csp.PerClientBurst)
	s.cspTrail = newGlobalBucket(csp.MaxRowsPerSecond, csp.MaxRowsBurst)
	if err := registerCSPTable(reg, s.cspClients); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) clock() time.Time { return s.now() }

func lower(ss []string) []string {
	out := make([]string, len(ss))
	for i, v := range ss {
		out[i] = strings.ToLower(v)
	}
	return out
}

// Register registers the AccessLogService on r.
func (s *Server) Register(r grpc.ServiceRegistrar) { alsv3.RegisterAccessLogServiceServer(r, s) }

// StreamAccessLogs reads one Envoy worker's stream until it ends. It never
// answers while the stream is open (the protocol has no acknowledgement)
// and never waits on the database: each message's kept records are handed
// to the sink at once. A first message without an identifier and empty
// batches are counted and tolerated, so nothing Envoy sent is refused. The
// stream ends with OK when Envoy closes it.
func (s *Server) StreamAccessLogs(stream alsv3.AccessLogService_StreamAccessLogsServer) error {
	s.m.streamsOpen.Inc()
	defer s.m.streamsOpen.Dec()
	// Records already received are enqueued even if Envoy goes away.
	ctx := context.WithoutCancel(stream.Context())
	var id streamIdentity
	for first := true; ; first = false {
		msg, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return stream.SendAndClose(&alsv3.StreamAccessLogsResponse{})
			}
			return err // the client went away; its status is the answer
		}
		if ident := msg.GetIdentifier(); ident != nil {
			id = newStreamIdentity(ident)
		} else if first {
			s.m.malformed.WithLabelValues("no_identifier").Inc()
			if s.throttle(&s.lastProtoLog) {
				s.log.Warn("access-log stream without identifier in its first message; entries kept without node", "reason", "no_identifier")
			}
		}
		s.enqueue(ctx, s.convert(&id, msg))
	}
}

// maxEnqueue is the most records handed to the sink in one call, so a
// message from an Envoy with a large buffer_size_bytes never exceeds the
// writer's queue in one piece.
const maxEnqueue = 512

func (s *Server) enqueue(ctx context.Context, recs []audittrail.Record) {
	for len(recs) > 0 {
		n := min(len(recs), maxEnqueue)
		if err := s.sink.Enqueue(ctx, recs[:n:n]); err != nil {
			s.sinkFailed(n, err)
		}
		recs = recs[n:]
	}
}

// convert maps and classifies one message's entries. The returned slice is
// owned by the caller (the sink keeps it).
func (s *Server) convert(id *streamIdentity, msg *alsv3.StreamAccessLogsMessage) []audittrail.Record {
	switch le := msg.GetLogEntries().(type) {
	case *alsv3.StreamAccessLogsMessage_HttpLogs:
		entries := le.HttpLogs.GetLogEntry()
		if len(entries) == 0 {
			s.m.malformed.WithLabelValues("empty_batch").Inc()
			return nil
		}
		s.m.receivedHTTP.Add(float64(len(entries)))
		var recs []audittrail.Record
		for _, e := range entries {
			var rec audittrail.Record
			r, out := s.ingest.mapHTTP(id, e, &rec)
			if s.count(r, out) {
				if recs == nil {
					recs = make([]audittrail.Record, 0, len(entries))
				}
				recs = append(recs, rec)
			}
		}
		return recs
	case *alsv3.StreamAccessLogsMessage_TcpLogs:
		entries := le.TcpLogs.GetLogEntry()
		if len(entries) == 0 {
			s.m.malformed.WithLabelValues("empty_batch").Inc()
			return nil
		}
		s.m.receivedTCP.Add(float64(len(entries)))
		var recs []audittrail.Record
		for _, e := range entries {
			var rec audittrail.Record
			r, out := s.ingest.mapTCP(id, e, &rec)
			if s.count(r, out) {
				recs = append(recs, rec)
			}
		}
		return recs
	default:
		if msg.GetIdentifier() == nil {
			s.m.malformed.WithLabelValues("empty_batch").Inc()
		}
		return nil
	}
}

// count records an entry's outcome and reports whether it is kept.
func (s *Server) count(r *rule, out outcome) bool {
	if r != nil && r.matches != nil {
		r.matches.Inc()
	}
	switch out {
	case outKept:
		if r.kept != nil {
			r.kept.Inc()
		}
		return true
	case outDropRule:
		s.m.droppedRule.Inc()
	case outUnmatched:
		s.m.droppedUnmatched.Inc()
	case outIntermediate:
		s.m.droppedIntermediate.Inc()
	}
	return false
}

// sinkFailed counts a refused batch and logs at most once every 10 s.
func (s *Server) sinkFailed(n int, err error) {
	s.m.enqueueErrors.Inc()
	s.m.enqueueLost.Add(float64(n))
	if s.throttle(&s.lastSinkLog) {
		s.log.Error("audit writer refused records; see meshguard_auditsink_enqueue_failed_records_total", "records", n, "err", err)
	}
}

// throttle reports whether a log line may be written now: at most one per
// 10 s for each last.
func (s *Server) throttle(last *atomic.Int64) bool {
	now := s.now().UnixNano()
	prev := last.Load()
	return now-prev >= int64(10*time.Second) && last.CompareAndSwap(prev, now)
}
