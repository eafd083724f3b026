package auditsink

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshguard/meshguard/audittrail"
	"github.com/meshguard/meshguard/internal/clientaddr"
)

// CSP report bounds. A browser sends one small report per violation; the
// endpoint is public, so sizes are bounded here and rates by
// CSPReportsConfig.
const (
	maxCSPBody       = 64 << 10
	maxCSPReports    = 100 // per request (reports+json batches)
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
// NaN, infinities and values beyond int64 are refused: Go's conversion of
// those is implementation-defined, and the row would hold a number no
// browser sent.
type flexInt int64

func (f *flexInt) UnmarshalJSON(b []byte) error {
	b = bytes.Trim(b, `"`)
	if len(b) == 0 || string(b) == "null" {
		*f = 0
		return nil
	}
	n, err := strconv.ParseFloat(string(b), 64)
	if err != nil || math.IsNaN(n) || n < math.MinInt64 || n >= math.MaxInt64 {
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
		// One report at a time, so the bound is checked before the reports
		// are: 64 KiB of "{}," is 21,845 of them, which decoding the whole
		// array first would allocate (megabytes) before refusing it.
		dec := json.NewDecoder(bytes.NewReader(body))
		malformed := func(err error) error {
			if err == io.EOF { // the body ended inside the array
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("decoding reports+json: %w", err)
		}
		if t, err := dec.Token(); err != nil {
			return nil, 0, malformed(err)
		} else if t != json.Delim('[') {
			return nil, 0, errors.New("decoding reports+json: not a JSON array")
		}
		var r reportingAPIReport
		for i := 0; dec.More(); i++ {
			if i == maxCSPReports {
				return nil, 0, fmt.Errorf("decoding reports+json: more than %d reports", maxCSPReports)
			}
			r = reportingAPIReport{}
			if err := dec.Decode(&r); err != nil {
				return nil, 0, malformed(err)
			}
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
		if _, err := dec.Token(); err != nil { // the closing ']', or why not
			return nil, 0, malformed(err)
		}
		if _, err := dec.Token(); err != io.EOF {
			return nil, 0, errors.New("decoding reports+json: data after the array")
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
func (r *cspReport) record(now time.Time, req *http.Request, ip string) audittrail.Record {
	doc := redactURL(r.DocumentURI)
	origin, path := splitURL(doc)
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
		IPAddress:  ip,
		UserAgent:  clean(truncate(ua, maxUserAgentLen)),
		Method:     http.MethodPost,
		Path:       clean(truncate(path, maxPathLen)),
		RequestID:  clean(truncate(req.Header.Get("X-Request-Id"), maxIDLen)),
		Origin:     clean(truncate(origin, maxShortLen)),
	}
	m := make([]byte, 0, 512)
	m = append(m, '{')
	m = appendField(m, "document_uri", truncate(doc, maxPathLen))
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

// CSPReportHandler returns the handler for POST /v1/csp-reports. It
// answers 204 once the reports are enqueued, 405 for other methods, 415
// for other media types, 413 over 64 KiB, 400 for malformed reports, 429
// with Retry-After when the client's or the trail's report budget is spent
// (audit.csp_reports), and 503 when the writer refuses the rows. Budgets
// are spent only by well-formed reports. Error bodies are JSON
// {"error": "..."}.
func (s *Server) CSPReportHandler() http.Handler {
	return http.HandlerFunc(s.serveCSPReport)
}

// cspBodies recycles request body buffers: one read, parsed and released
// per request.
var cspBodies = sync.Pool{New: func() any { b := make([]byte, maxCSPBody+1); return &b }}

func (s *Server) serveCSPReport(w http.ResponseWriter, r *http.Request) {
	// Cheap validation first: nothing malformed spends a budget.
	if r.Method != http.MethodPost {
		s.m.cspMethod.Inc()
		w.Header().Set("Allow", http.MethodPost)
		cspError(w, http.StatusMethodNotAllowed, "method not allowed")
		return
	}
	mt := cspMediaType(r.Header.Get("Content-Type"))
	if mt == "" {
		s.m.cspMediaType.Inc()
		cspError(w, http.StatusUnsupportedMediaType, "content type must be application/csp-report or application/reports+json")
		return
	}
	if r.ContentLength > maxCSPBody {
		s.m.cspTooLarge.Inc()
		cspError(w, http.StatusRequestEntityTooLarge, "report body over 64 KiB")
		return
	}
	bp := cspBodies.Get().(*[]byte)
	defer cspBodies.Put(bp)
	n, err := io.ReadFull(http.MaxBytesReader(w, r.Body, maxCSPBody), *bp)
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
	case err == nil: // cannot happen: the reader stops one byte short
		err = &http.MaxBytesError{Limit: maxCSPBody}
		fallthrough
	default:
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			s.m.cspTooLarge.Inc()
			cspError(w, http.StatusRequestEntityTooLarge, "report body over 64 KiB")
			return
		}
		s.m.cspMalformed.Inc()
		cspError(w, http.StatusBadRequest, "reading report body failed")
		return
	}
	reps, ignored, err := parseCSPReports(mt, (*bp)[:n])
	if err != nil {
		s.m.cspMalformed.Inc()
		cspError(w, http.StatusBadRequest, err.Error())
		return
	}
	if ignored > 0 {
		s.m.cspIgnored.Add(float64(ignored))
	}
	if len(reps) == 0 {
		w.WriteHeader(http.StatusNoContent)
		return
	}

	// Then the budgets, in reports: the client's, then the trail's.
	addr := s.cspClient(r)
	key := keyOf(clientaddr.Prefix(addr, s.cspCfg.IPv6Prefix))
	now := s.now()
	if ok, wait := s.cspClients.take(key, now.UnixNano(), len(reps)); !ok {
		s.m.cspRateLimited.Inc()
		s.m.cspDroppedClient.Add(float64(len(reps)))
		cspTooMany(w, wait, "too many CSP reports from this client")
		return
	}
	if ok, wait := s.cspTrail.take(now.UnixNano(), len(reps)); !ok {
		s.cspClients.refund(key, len(reps))
		s.m.cspTrailCapped.Inc()
		s.m.cspDroppedTrail.Add(float64(len(reps)))
		cspTooMany(w, wait, "too many CSP reports")
		return
	}
	var ip string
	if addr.IsValid() {
		ip = addr.String()
	}
	recs := make([]audittrail.Record, len(reps))
	for i := range reps {
		recs[i] = reps[i].record(now, r, ip)
	}
	if err := s.sink.Enqueue(r.Context(), recs); err != nil {
		// Not stored: the budgets were not used.
		s.cspClients.refund(key, len(reps))
		s.cspTrail.refund(len(reps))
		s.m.cspSinkError.Inc()
		s.sinkFailed(len(recs), err)
		cspError(w, http.StatusServiceUnavailable, "audit trail unavailable")
		return
	}
	s.m.cspStored.Add(float64(len(reps)))
	w.WriteHeader(http.StatusNoContent)
}

// cspClient is the client's address: the one Envoy derived, from the
// configured header when it holds exactly one address, else the
// connection's peer (a direct caller, not via Envoy). The zero Addr when
// neither parses.
func (s *Server) cspClient(r *http.Request) netip.Addr {
	if h := s.cspCfg.ClientIPHeader; h != "" {
		if vs := r.Header[h]; len(vs) == 1 {
			if a, ok := clientaddr.Parse(vs[0]); ok {
				return a
			}
		}
	}
	a, _ := clientaddr.ParseHostPort(r.RemoteAddr)
	return a
}

// cspMediaType is the report format a Content-Type names, or "". Only the
// type matters (browsers add at most a charset), so no parameter is parsed
// or allocated.
func cspMediaType(ct string) string {
	t, _, _ := strings.Cut(ct, ";")
	switch t = strings.TrimSpace(t); {
	case strings.EqualFold(t, cspMediaLegacy):
		return cspMediaLegacy
	case strings.EqualFold(t, cspMediaReporter):
		return cspMediaReporter
	}
	return ""
}

func cspTooMany(w http.ResponseWriter, wait time.Duration, msg string) {
	w.Header().Set("Retry-After", strconv.FormatInt(retryAfter(wait), 10))
	cspError(w, http.StatusTooManyRequests, msg)
}

func cspError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	b := appendJSONString([]byte(`{"error":`), msg)
	w.Write(append(b, '}', '\n'))
}
