package auditsink

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshguard/meshguard/audittrail"
)

// CSP report limits. A browser sends one small report per violation; the
// endpoint is public, so size and rate are bounded (rate for the whole
// process, since behind Envoy the peer address is Envoy's).
const (
	maxCSPBody       = 64 << 10
	maxCSPReports    = 100 // per request (reports+json batches)
	cspRate          = 50  // requests per second, sustained
	cspBurst         = 200
	maxCSPPolicyLen  = 1024
	maxCSPDirective  = 64
	cspMediaLegacy   = "application/csp-report"
	cspMediaReporter = "application/reports+json"
)

// cspReport is one violation, from either format.
type cspReport struct {
	DocumentURI        string
	Referrer           string
	BlockedURI         string
	ViolatedDirective  string
	EffectiveDirective string
	OriginalPolicy     string
	Disposition        string
	SourceFile         string
	Sample             string
	UserAgent          string
	Line, Column       int64
	StatusCode         int64
	Age                int64
}

// flexInt accepts a JSON number or a numeric string (browsers differ).
type flexInt int64

func (f *flexInt) UnmarshalJSON(b []byte) error {
	b = bytes.Trim(b, `"`)
	if len(b) == 0 || string(b) == "null" {
		*f = 0
		return nil
	}
	n, err := strconv.ParseFloat(string(b), 64)
	if err != nil {
		return fmt.Errorf("not a number: %.20q", b)
	}
	*f = flexInt(n)
	return nil
}

// legacyReport is the report-uri body: {"csp-report": {...}}.
type legacyReport struct {
	Report *struct {
		DocumentURI        string  `json:"document-uri"`
		Referrer           string  `json:"referrer"`
		BlockedURI         string  `json:"blocked-uri"`
		ViolatedDirective  string  `json:"violated-directive"`
		EffectiveDirective string  `json:"effective-directive"`
		OriginalPolicy     string  `json:"original-policy"`
		Disposition        string  `json:"disposition"`
		SourceFile         string  `json:"source-file"`
		ScriptSample       string  `json:"script-sample"`
		LineNumber         flexInt `json:"line-number"`
		ColumnNumber       flexInt `json:"column-number"`
		StatusCode         flexInt `json:"status-code"`
	} `json:"csp-report"`
}

// reportingAPIReport is one element of a Reporting API body.
type reportingAPIReport struct {
	Type      string  `json:"type"`
	Age       flexInt `json:"age"`
	URL       string  `json:"url"`
	UserAgent string  `json:"user_agent"`
	Body      *struct {
		DocumentURL        string  `json:"documentURL"`
		Referrer           string  `json:"referrer"`
		BlockedURL         string  `json:"blockedURL"`
		EffectiveDirective string  `json:"effectiveDirective"`
		OriginalPolicy     string  `json:"originalPolicy"`
		SourceFile         string  `json:"sourceFile"`
		Sample             string  `json:"sample"`
		Disposition        string  `json:"disposition"`
		StatusCode         flexInt `json:"statusCode"`
		LineNumber         flexInt `json:"lineNumber"`
		ColumnNumber       flexInt `json:"columnNumber"`
	} `json:"body"`
}

var errNoReport = errors.New("no CSP violation in the body")

// parseCSPReports decodes a body of the given media type. It returns the
// CSP violations and how many other reports (Reporting API types other
// than csp-violation) it skipped. Any malformed JSON or a report without a
// directive is an error.
func parseCSPReports(mediaType string, body []byte) (reps []cspReport, ignored int, err error) {
	switch mediaType {
	case cspMediaLegacy:
		var l legacyReport
		if err := json.Unmarshal(body, &l); err != nil {
			return nil, 0, fmt.Errorf("decoding csp-report: %w", err)
		}
		if l.Report == nil {
			return nil, 0, errors.New(`decoding csp-report: no "csp-report" object`)
		}
		r := l.Report
		rep := cspReport{DocumentURI: r.DocumentURI, Referrer: r.Referrer, BlockedURI: r.BlockedURI,
			ViolatedDirective: r.ViolatedDirective, EffectiveDirective: r.EffectiveDirective,
			OriginalPolicy: r.OriginalPolicy, Disposition: r.Disposition, SourceFile: r.SourceFile,
			Sample: r.ScriptSample, Line: int64(r.LineNumber), Column: int64(r.ColumnNumber), StatusCode: int64(r.StatusCode)}
		if rep.directive() == "" {
			return nil, 0, errors.New("decoding csp-report: no violated-directive or effective-directive")
		}
		return []cspReport{rep}, 0, nil
	case cspMediaReporter:
		var list []reportingAPIReport
		if err := json.Unmarshal(body, &list); err != nil {
			return nil, 0, fmt.Errorf("decoding reports+json: %w", err)
		}
		if len(list) > maxCSPReports {
			return nil, 0, fmt.Errorf("decoding reports+json: more than %d reports", maxCSPReports)
		}
		for i, r := range list {
			if r.Type != "csp-violation" {
				ignored++
				continue
			}
			if r.Body == nil {
				return nil, 0, fmt.Errorf("decoding reports+json: report %d has no body", i)
			}
			b := r.Body
			rep := cspReport{DocumentURI: b.DocumentURL, Referrer: b.Referrer, BlockedURI: b.BlockedURL,
				EffectiveDirective: b.EffectiveDirective, OriginalPolicy: b.OriginalPolicy,
				Disposition: b.Disposition, SourceFile: b.SourceFile, Sample: b.Sample, UserAgent: r.UserAgent,
				Line: int64(b.LineNumber), Column: int64(b.ColumnNumber), StatusCode: int64(b.StatusCode), Age: int64(r.Age)}
			if rep.DocumentURI == "" {
				rep.DocumentURI = r.URL
			}
			if rep.directive() == "" {
				return nil, 0, fmt.Errorf("decoding reports+json: report %d has no effectiveDirective", i)
			}
			reps = append(reps, rep)
		}
		if len(reps) == 0 && ignored == 0 {
			return nil, 0, errNoReport
		}
		return reps, ignored, nil
	}
	return nil, 0, fmt.Errorf("unsupported media type %q", mediaType)
}

func (r *cspReport) directive() string {
	if r.EffectiveDirective != "" {
		return r.EffectiveDirective
	}
	return r.ViolatedDirective
}

// record turns a report into a CSP_VIOLATION row. Path and Origin are the
// violating document's; URLs lose credentials, fragments and query
// secrets; every field is bounded.
func (r *cspReport) record(now time.Time, req *http.Request) audittrail.Record {
	origin, path := splitURL(redactURL(r.DocumentURI))
	ua := r.UserAgent
	if ua == "" {
		ua = req.UserAgent()
	}
	sev := audittrail.SeverityMedium
	if r.Disposition == "report" {
		sev = audittrail.SeverityLow
	}
	rec := audittrail.Record{
		CreatedAt:  now.UTC(),
		Action:     "CSP_VIOLATION",
		Severity:   sev,
		EntityType: "csp_directive",
		EntityID:   clean(truncate(r.directive(), maxCSPDirective)),
		IPAddress:  remoteIP(req.RemoteAddr),
		UserAgent:  clean(truncate(ua, maxUserAgentLen)),
		Method:     http.MethodPost,
		Path:       clean(truncate(path, maxPathLen)),
		RequestID:  clean(truncate(req.Header.Get("X-Request-Id"), maxIDLen)),
		Origin:     clean(truncate(origin, maxShortLen)),
	}
	m := make([]byte, 0, 512)
	m = append(m, '{')
	m = appendField(m, "document_uri", truncate(redactURL(r.DocumentURI), maxPathLen))
	m = appendField(m, "referrer", truncate(redactURL(r.Referrer), maxPathLen))
	m = appendField(m, "blocked_uri", truncate(redactURL(r.BlockedURI), maxPathLen))
	m = appendField(m, "violated_directive", truncate(r.ViolatedDirective, maxShortLen))
	m = appendField(m, "effective_directive", truncate(r.EffectiveDirective, maxShortLen))
	m = appendField(m, "disposition", truncate(r.Disposition, 16))
	m = appendField(m, "source_file", truncate(redactURL(r.SourceFile), maxPathLen))
	m = appendField(m, "sample", truncate(r.Sample, maxShortLen))
	m = appendField(m, "original_policy", truncate(r.OriginalPolicy, maxCSPPolicyLen))
	for _, kv := range [...]struct {
		k string
		v int64
	}{{"line", r.Line}, {"column", r.Column}, {"status_code", r.StatusCode}, {"age_ms", r.Age}} {
		if kv.v != 0 {
			m = appendKey(m, kv.k)
			m = strconv.AppendInt(m, kv.v, 10)
		}
	}
	rec.Metadata = append(m, '}')
	return rec
}

// redactURL drops a URL's fragment and user info and redacts secrets in
// its query. Keywords such as "inline" or "eval" pass through.
func redactURL(u string) string {
	if i := strings.IndexByte(u, '#'); i >= 0 {
		u = u[:i]
	}
	if scheme, rest, ok := strings.Cut(u, "://"); ok {
		authEnd := strings.IndexAny(rest, "/?")
		if authEnd < 0 {
			authEnd = len(rest)
		}
		if at := strings.LastIndexByte(rest[:authEnd], '@'); at >= 0 {
			u = scheme + "://" + rest[at+1:]
		}
	}
	return redactQuery(u)
}

// splitURL splits an absolute URL into origin and path (with query).
func splitURL(u string) (origin, path string) {
	scheme, rest, ok := strings.Cut(u, "://")
	if !ok {
		return "", ""
	}
	i := strings.IndexAny(rest, "/?")
	if i < 0 {
		return scheme + "://" + rest, "/"
	}
	path = rest[i:]
	if path[0] == '?' {
		path = "/" + path
	}
	return scheme + "://" + rest[:i], path
}

func remoteIP(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if ip := net.ParseIP(host); ip != nil {
		return ip.String()
	}
	return ""
}

// CSPReportHandler returns the handler for POST /v1/csp-reports. It
// answers 204 once the reports are enqueued, 405 for other methods, 415
// for other media types, 413 over 64 KiB, 400 for malformed reports, 429
// when the endpoint is flooded and 503 when the writer refuses the rows.
// Error bodies are JSON {"error": "..."}.
func (s *Server) CSPReportHandler() http.Handler {
	return http.HandlerFunc(s.serveCSPReport)
}

func (s *Server) serveCSPReport(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		cspError(w, http.StatusMethodNotAllowed, "method not allowed")
		return
	}
	if !s.csp.allow(s.now()) {
		s.m.csp.WithLabelValues("rate_limited").Inc()
		w.Header().Set("Retry-After", "1")
		cspError(w, http.StatusTooManyRequests, "too many CSP reports")
		return
	}
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || (mt != cspMediaLegacy && mt != cspMediaReporter) {
		s.m.csp.WithLabelValues("unsupported_media_type").Inc()
		cspError(w, http.StatusUnsupportedMediaType, "content type must be application/csp-report or application/reports+json")
		return
	}
	if r.ContentLength > maxCSPBody {
		s.m.csp.WithLabelValues("too_large").Inc()
		cspError(w, http.StatusRequestEntityTooLarge, "report body over 64 KiB")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxCSPBody))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			s.m.csp.WithLabelValues("too_large").Inc()
			cspError(w, http.StatusRequestEntityTooLarge, "report body over 64 KiB")
			return
		}
		s.m.csp.WithLabelValues("malformed").Inc()
		cspError(w, http.StatusBadRequest, "reading report body failed")
		return
	}
	reps, ignored, err := parseCSPReports(mt, body)
	if err != nil {
		s.m.csp.WithLabelValues("malformed").Inc()
		cspError(w, http.StatusBadRequest, err.Error())
		return
	}
	if ignored > 0 {
		s.m.csp.WithLabelValues("ignored").Add(float64(ignored))
	}
	if len(reps) > 0 {
		now := s.now()
		recs := make([]audittrail.Record, len(reps))
		for i := range reps {
			recs[i] = reps[i].record(now, r)
		}
		if err := s.sink.Enqueue(r.Context(), recs); err != nil {
			s.m.csp.WithLabelValues("sink_error").Inc()
			s.sinkFailed(len(recs), err)
			cspError(w, http.StatusServiceUnavailable, "audit trail unavailable")
			return
		}
		s.m.csp.WithLabelValues("stored").Add(float64(len(reps)))
	}
	w.WriteHeader(http.StatusNoContent)
}

func cspError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	b := appendJSONString([]byte(`{"error":`), msg)
	w.Write(append(b, '}', '\n'))
}

// cspLimiter is a token bucket over the whole endpoint. Safe for
// concurrent use.
type cspLimiter struct {
	mu     sync.Mutex
	rate   float64 // tokens per second
	burst  float64
	tokens float64
	last   time.Time
}

func newCSPLimiter(rate, burst float64) *cspLimiter {
	return &cspLimiter{rate: rate, burst: burst, tokens: burst}
}

func (l *cspLimiter) allow(now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() {
		if d := now.Sub(l.last).Seconds(); d > 0 {
			l.tokens = min(l.burst, l.tokens+d*l.rate)
		}
	}
	l.last = now
	if l.tokens < 1 {
		return false
	}
	l.tokens--
	return true
}
