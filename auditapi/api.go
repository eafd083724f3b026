package auditapi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"golang.org/x/time/rate"

	"github.com/meshguard/meshguard/audittrail"
	"github.com/meshguard/meshguard/internal/clientaddr"
)

// The admin API: GET /v1/audit/... queries and exports the audit trail.
//
// Who may call it (see authorize in api_auth.go): a bearer token equal to
// MESHGUARD_ADMIN_TOKEN (Config.AdminToken) or to the content of
// audit.admin_token_file (re-read when it changes), compared in constant
// time. Anything else gets 401 with a Bearer challenge. Client headers such
// as x-meshguard-role or x-meshguard-user admit nobody and name nobody:
// anyone reaching the listener directly could set them.
//
// With no token configured the API is disabled and answers 503; it is never
// open. Every read and export is itself recorded through the sink (READ /
// EXPORT, entity_type "audit_log", by the token's actor); when that record
// cannot be accepted the request fails with 503 rather than go unrecorded.
// Failed authentications are recorded too (LOGIN_FAILURE, entity_type
// "audit_api"), at most authFailBurst at once and authFailRate per second
// after that, so a flood of bad tokens cannot flood the trail: the first
// row after a quiet spell says how many were left out.

// Bounds on what an admin request may ask for.
const (
	apiDefaultLimit = 100
	apiMaxLimit     = 1000
	apiMaxActions   = 32
	apiMaxUserLen   = 256
	apiMaxTenantLen = 253
	apiMaxEntityLen = 128 // as ingest bounds entity ids
	apiMaxActionLen = 64  // as ingest bounds action names
	apiMaxRawQuery  = 8 << 10
	// apiMaxExports bounds exports running at once; more get 429.
	apiMaxExports = 2
)

// Audit actions and severities of the API's own records.
const (
	apiActionRead        = "READ"
	apiActionExport      = "EXPORT"
	apiEntityType        = "audit_log"
	apiReadSeverity      = audittrail.SeverityLow
	apiExportSeverity    = audittrail.SeverityMedium
	apiEnqueueTimeout    = 5 * time.Second
	apiExportWriteWindow = time.Minute
)

// securityActions are what GET /v1/audit/security-events returns.
var securityActions = []string{
	"LOGIN_FAILURE", "PERMISSION_DENIED", "RATE_LIMIT_EXCEEDED",
	"CORS_VIOLATION", "CSP_VIOLATION", "SUSPICIOUS_ACTIVITY",
}

// recordReader is what the API reads the trail through: either audittrail
// store.
type recordReader interface {
	// List returns up to limit rows matching f after cur, newest first, and
	// the cursor of the last row returned (zero when there are no more).
	List(ctx context.Context, f audittrail.Filter, cur audittrail.Cursor, limit int) ([]audittrail.Record, audittrail.Cursor, error)
	// Scan calls fn for every row matching f, oldest first, streaming.
	Scan(ctx context.Context, f audittrail.Filter, fn func(*audittrail.Record) error) error
}

// recordSink takes the API's own records (audittrail.Writer). nil from
// Enqueue means the record will reach the trail.
type recordSink interface {
	Enqueue(ctx context.Context, recs []audittrail.Record) error
}

// API serves the admin HTTP API over a recordReader and records every access
// through a recordSink. It is safe for concurrent use.
type API struct {
	log     *slog.Logger
	reader  recordReader
	sink    recordSink
	auth    *authorizer
	m       *apiMetrics
	now     func() time.Time
	exports chan struct{} // one token per running export

	fails      *rate.Limiter // admits failed authentications into the trail
	suppressed atomic.Int64
}

// Failed authentications recorded in the trail: a burst, then a trickle.
const (
	authFailRate  = 1 // per second
	authFailBurst = 20
)

// NewAPI returns the admin API. It reads audit.admin_token_file once now
// (an unreadable file is an error) and again whenever it changes.
func NewAPI(log *slog.Logger, reg prometheus.Registerer, cfg Config, reader recordReader, sink recordSink) (*API, error) {
	if reader == nil || sink == nil {
		return nil, errors.New("audit API: reader and sink are required")
	}
	if err := cfg.validateAdmin(); err != nil {
		return nil, err
	}
	m, err := newAPIMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("audit API: registering metrics: %w", err)
	}
	a := &API{log: log, reader: reader, sink: sink, m: m, now: time.Now, exports: make(chan struct{}, apiMaxExports),
		fails: rate.NewLimiter(authFailRate, authFailBurst)}
	a.auth, err = newAuthorizer(log, cfg, func() time.Time { return a.now() })
	if err != nil {
		return nil, err
	}
	if !a.auth.enabled() {
		log.Warn("audit admin API disabled: set MESHGUARD_ADMIN_TOKEN or audit.admin_token_file")
	}
	if t := cfg.AdminToken.Reveal(); t != "" && len(t) < 16 {
		log.Warn("MESHGUARD_ADMIN_TOKEN is shorter than 16 characters; use a long random token")
	}
	return a, nil
}

// Register adds the API's routes to mux.
func (a *API) Register(mux *http.ServeMux) {
	mux.Handle("GET /v1/audit/logs", a.handle("logs", a.serveLogs))
	mux.Handle("GET /v1/audit/entities/{type}/{id}", a.handle("entity", a.serveEntity))
	mux.Handle("GET /v1/audit/users/{id}/activity", a.handle("user_activity", a.serveUserActivity))
	mux.Handle("GET /v1/audit/security-events", a.handle("security_events", a.serveSecurityEvents))
	mux.Handle("GET /v1/audit/export", a.handle("export", a.serveExport))
}

// principal is who an authorized request comes from.
type principal struct {
	user  string // recorded as the audit row's user_id: which credential
	via   string // "token" (an mTLS peer would be "mtls")
	token string // the token's fingerprint, recorded in metadata
}

// apiError is a client error: the status, a message and the parameter at
// fault (empty when none).
type apiError struct {
	status int
	param  string
	msg    string
}

func (e *apiError) Error() string {
	if e.param != "" {
		return e.param + ": " + e.msg
	}
	return e.msg
}

func badParam(param, format string, args ...any) *apiError {
	return &apiError{status: http.StatusBadRequest, param: param, msg: fmt.Sprintf(format, args...)}
}

// handle wraps an endpoint with authorization, the common headers and the
// request metric. fn returns the status it answered, or an error that has
// not been answered yet.
func (a *API) handle(endpoint string, fn func(w http.ResponseWriter, r *http.Request, p principal) (int, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Cache-Control", "no-store")
		h.Set("X-Content-Type-Options", "nosniff")
		p, denied := a.auth.authorize(r)
		if denied != nil {
			a.m.authFailures.WithLabelValues(denied.reason).Inc()
			if denied.reason != "disabled" {
				a.recordAuthFailure(r, endpoint, denied.reason)
			}
			if denied.challenge != "" {
				h.Set("WWW-Authenticate", denied.challenge)
			}
			writeJSONError(w, &apiError{status: denied.status, msg: denied.msg})
			a.m.requests.WithLabelValues(endpoint, strconv.Itoa(denied.status)).Inc()
			return
		}
		code, err := fn(w, r, p)
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) {
				a.log.Error("audit API request failed", "endpoint", endpoint, "err", err)
				ae = &apiError{status: http.StatusServiceUnavailable, msg: "audit store unavailable"}
				if errors.Is(err, errNotRecorded) {
					ae.msg = "the access could not be recorded in the audit trail; try again"
				}
			}
			writeJSONError(w, ae)
			code = ae.status
		}
		a.m.requests.WithLabelValues(endpoint, strconv.Itoa(code)).Inc()
	})
}

func writeJSONError(w http.ResponseWriter, e *apiError) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.status)
	body := struct {
		Error     string `json:"error"`
		Parameter string `json:"parameter,omitempty"`
	}{e.Error(), e.param}
	json.NewEncoder(w).Encode(body)
}

// listResponse is the body of the list endpoints.
type listResponse struct {
	Items      []audittrail.Record `json:"items"`
	NextCursor string              `json:"next_cursor,omitempty"`
}

func (a *API) serveLogs(w http.ResponseWriter, r *http.Request, p principal) (int, error) {
	q, err := parseQuery(r, listParams...)
	if err != nil {
		return 0, err
	}
	return a.list(w, r, p, "logs", q)
}

func (a *API) serveEntity(w http.ResponseWriter, r *http.Request, p principal) (int, error) {
	q, err := parseQuery(r, "from", "to", "action", "severity", "user_id", "ip_address", "status", "tenant", "limit", "cursor")
	if err != nil {
		return 0, err
	}
	typ, id := r.PathValue("type"), r.PathValue("id")
	if err := checkText("type", typ, apiMaxEntityLen); err != nil {
		return 0, err
	}
	if err := checkText("id", id, apiMaxEntityLen); err != nil {
		return 0, err
	}
	q.filter.EntityType, q.filter.EntityID = typ, id
	return a.list(w, r, p, "entity", q)
}

func (a *API) serveUserActivity(w http.ResponseWriter, r *http.Request, p principal) (int, error) {
	q, err := parseQuery(r, "from", "to", "action", "severity", "entity_type", "entity_id", "ip_address", "status", "tenant", "limit", "cursor")
	if err != nil {
		return 0, err
	}
	id := r.PathValue("id")
	if err := checkText("id", id, apiMaxUserLen); err != nil {
		return 0, err
	}
	q.filter.UserID = id
	return a.list(w, r, p, "user_activity", q)
}

func (a *API) serveSecurityEvents(w http.ResponseWriter, r *http.Request, p principal) (int, error) {
	q, err := parseQuery(r, listParams...)
	if err != nil {
		return 0, err
	}
	if len(q.filter.Actions) == 0 {
		q.filter.Actions = slices.Clone(securityActions)
	}
	for _, act := range q.filter.Actions {
		if !slices.Contains(securityActions, act) {
			return 0, badParam("action", "must be a security event (%s), got %q", strings.Join(securityActions, ", "), act)
		}
	}
	return a.list(w, r, p, "security_events", q)
}

// list reads one page, records the read, then answers. The record goes in
// before any row leaves, so an unrecorded read is never served.
func (a *API) list(w http.ResponseWriter, r *http.Request, p principal, endpoint string, q apiQuery) (int, error) {
	recs, next, err := a.reader.List(r.Context(), q.filter, q.cursor, q.limit)
	if err != nil {
		return 0, fmt.Errorf("listing audit rows: %w", err)
	}
	if recs == nil {
		recs = []audittrail.Record{}
	}
	n := len(recs)
	meta := accessMeta{Endpoint: endpoint, Auth: p.via, Token: p.token, Filter: filterDoc(q.filter), Limit: q.limit, Returned: &n, Paged: q.cursor != (audittrail.Cursor{})}
	if err := a.record(r, p, apiActionRead, apiReadSeverity, meta); err != nil {
		return 0, err
	}
	resp := listResponse{Items: recs}
	if next != (audittrail.Cursor{}) {
		resp.NextCursor = encodeCursor(next)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	if err := json.NewEncoder(w).Encode(resp); err != nil {
		a.log.Debug("audit API response not delivered", "endpoint", endpoint, "err", err)
	}
	return http.StatusOK, nil
}

// errNotRecorded means the sink refused the record of an access.
var errNotRecorded = errors.New("recording the access failed")

// accessMeta is the metadata of the API's own audit rows.
type accessMeta struct {
	Endpoint string         `json:"endpoint"`
	Auth     string         `json:"auth"`
	Token    string         `json:"token,omitempty"` // fingerprint of the admitting token
	Filter   map[string]any `json:"filter,omitempty"`
	Limit    int            `json:"limit,omitempty"`
	Returned *int           `json:"returned,omitempty"` // rows answered (reads only)
	Paged    bool           `json:"paged,omitempty"`
	Format   string         `json:"format,omitempty"`
}

// recordAuthFailure records a refused request, rate-limited: a flood of
// bad credentials costs the trail at most authFailBurst rows and then
// authFailRate per second, and the next row recorded counts the ones left
// out. It never holds the answer long: the row is enqueued with a short
// timeout and a failure is counted, not retried.
func (a *API) recordAuthFailure(r *http.Request, endpoint, reason string) {
	if !a.fails.AllowN(a.now(), 1) {
		a.suppressed.Add(1)
		a.m.authFailuresUnrecorded.Inc()
		return
	}
	md, err := json.Marshal(struct {
		Endpoint    string `json:"endpoint"`
		Reason      string `json:"reason"`
		NotRecorded int64  `json:"failures_not_recorded_before,omitempty"`
	}{endpoint, reason, a.suppressed.Swap(0)})
	if err != nil {
		return
	}
	rec := audittrail.Record{
		CreatedAt:  a.now().UTC(),
		Action:     "LOGIN_FAILURE",
		Severity:   audittrail.SeverityMedium,
		EntityType: "audit_api",
		IPAddress:  remoteIP(r.RemoteAddr),
		UserAgent:  apiTruncate(r.UserAgent(), 512),
		Method:     r.Method,
		Path:       apiTruncate(r.URL.Path, 2048),
		Status:     http.StatusUnauthorized,
		RequestID:  apiTruncate(r.Header.Get("X-Request-Id"), 128),
		Metadata:   md,
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Second)
	defer cancel()
	if err := a.sink.Enqueue(ctx, []audittrail.Record{rec}); err != nil {
		a.m.authFailuresUnrecorded.Inc()
	}
}

// record enqueues the audit row of one access by the admin.
func (a *API) record(r *http.Request, p principal, action, severity string, meta accessMeta) error {
	md, err := json.Marshal(meta)
	if err != nil {
		return fmt.Errorf("encoding access metadata: %w", err)
	}
	ip := remoteIP(r.RemoteAddr)
	rec := audittrail.Record{
		CreatedAt:  a.now().UTC(),
		Action:     action,
		Severity:   severity,
		EntityType: apiEntityType,
		UserID:     p.user,
		IPAddress:  ip,
		UserAgent:  apiTruncate(r.UserAgent(), 512),
		Method:     r.Method,
		Path:       apiTruncate(r.URL.Path, 2048),
		Status:     http.StatusOK,
		RequestID:  apiTruncate(r.Header.Get("X-Request-Id"), 128),
		Metadata:   md,
	}
	ctx, cancel := context.WithTimeout(r.Context(), apiEnqueueTimeout)
	defer cancel()
	if err := a.sink.Enqueue(ctx, []audittrail.Record{rec}); err != nil {
		a.m.unrecorded.Inc()
		return fmt.Errorf("%w: %w", errNotRecorded, err)
	}
	return nil
}

// apiQuery is a parsed, validated admin request.
type apiQuery struct {
	filter audittrail.Filter
	limit  int
	cursor audittrail.Cursor
	format string
}

var listParams = []string{"from", "to", "action", "severity", "user_id", "entity_type", "entity_id", "ip_address", "status", "tenant", "limit", "cursor"}

// parseQuery validates r's query string: only the allowed parameters, each
// at most once (action may repeat), each well-formed.
func parseQuery(r *http.Request, allowed ...string) (apiQuery, error) {
	return parseRawQuery(r.URL.RawQuery, allowed...)
}

// parseRawQuery is parseQuery of a raw query string (the console parses
// its forms with it too).
func parseRawQuery(raw string, allowed ...string) (apiQuery, error) {
	q := apiQuery{limit: apiDefaultLimit}
	if len(raw) > apiMaxRawQuery {
		return q, &apiError{status: http.StatusRequestURITooLong, msg: fmt.Sprintf("query string longer than %d bytes", apiMaxRawQuery)}
	}
	vals, err := url.ParseQuery(raw)
	if err != nil {
		return q, badParam("", "malformed query string: %v", err)
	}
	keys := make([]string, 0, len(vals))
	for k := range vals {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		vs := vals[k]
		if !slices.Contains(allowed, k) {
			return q, badParam(k, "unknown parameter; allowed: %s", strings.Join(allowed, ", "))
		}
		if k != "action" && len(vs) > 1 {
			return q, badParam(k, "given %d times; give it once", len(vs))
		}
		v := vs[0]
		f := &q.filter
		switch k {
		case "from", "to":
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return q, badParam(k, "must be an RFC 3339 time like 2026-01-02T15:04:05Z, got %q", clip(v))
			}
			if k == "from" {
				f.From = t.UTC()
			} else {
				f.To = t.UTC()
			}
		case "action":
			if len(vs) > apiMaxActions {
				return q, badParam(k, "at most %d values, got %d", apiMaxActions, len(vs))
			}
			for _, act := range vs {
				for _, one := range strings.Split(act, ",") {
					if len(one) > apiMaxActionLen || !isActionName(one) {
						return q, badParam(k, "must be an action of A-Z 0-9 _ (at most %d characters), got %q", apiMaxActionLen, clip(one))
					}
					if !slices.Contains(f.Actions, one) {
						f.Actions = append(f.Actions, one)
					}
				}
			}
			if len(f.Actions) > apiMaxActions {
				return q, badParam(k, "at most %d values, got %d", apiMaxActions, len(f.Actions))
			}
		case "severity":
			switch v {
			case audittrail.SeverityLow, audittrail.SeverityMedium, audittrail.SeverityHigh, audittrail.SeverityCritical:
				f.Severity = v
			default:
				return q, badParam(k, "must be LOW, MEDIUM, HIGH or CRITICAL, got %q", clip(v))
			}
		case "user_id":
			if err := checkText(k, v, apiMaxUserLen); err != nil {
				return q, err
			}
			f.UserID = v
		case "entity_type", "entity_id":
			if err := checkText(k, v, apiMaxEntityLen); err != nil {
				return q, err
			}
			if k == "entity_type" {
				f.EntityType = v
			} else {
				f.EntityID = v
			}
		case "ip_address":
			ip, err := netip.ParseAddr(v)
			if err != nil || ip.Zone() != "" {
				return q, badParam(k, "must be an IPv4 or IPv6 address, got %q", clip(v))
			}
			f.IPAddress = ip.Unmap().String() // as ingest stores it: canonical, IPv4-mapped unmapped
		case "tenant":
			if err := checkText(k, v, apiMaxTenantLen); err != nil {
				return q, err
			}
			f.Tenant = v
		case "status":
			n, err := strconv.Atoi(v)
			if err != nil || n < 100 || n > 599 {
				return q, badParam(k, "must be an HTTP status code 100-599, got %q", clip(v))
			}
			f.Status = n
		case "limit":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > apiMaxLimit {
				return q, badParam(k, "must be an integer from 1 to %d, got %q", apiMaxLimit, clip(v))
			}
			q.limit = n
		case "cursor":
			c, err := decodeCursor(v)
			if err != nil {
				return q, badParam(k, "not a cursor this API returned (%v)", err)
			}
			q.cursor = c
		case "format":
			if v != "csv" && v != "jsonl" {
				return q, badParam(k, "must be csv or jsonl, got %q", clip(v))
			}
			q.format = v
		}
	}
	if !q.filter.From.IsZero() && !q.filter.To.IsZero() && !q.filter.From.Before(q.filter.To) {
		return q, badParam("to", "must be after from (%s), got %s", q.filter.From.Format(time.RFC3339Nano), q.filter.To.Format(time.RFC3339Nano))
	}
	return q, nil
}

// checkText bounds a free-text filter value.
func checkText(param, v string, max int) error {
	switch {
	case v == "":
		return badParam(param, "must not be empty")
	case len(v) > max:
		return badParam(param, "longer than %d bytes", max)
	case strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f || r == 0xfffd }):
		return badParam(param, "must be valid UTF-8 text without control characters, got %q", clip(v))
	}
	return nil
}

// clip bounds a client value quoted back in an error message.
func clip(s string) string { return apiTruncate(s, 64) }

// filterDoc is f as recorded in the metadata of the access row.
func filterDoc(f audittrail.Filter) map[string]any {
	m := map[string]any{}
	if !f.From.IsZero() {
		m["from"] = f.From.Format(time.RFC3339Nano)
	}
	if !f.To.IsZero() {
		m["to"] = f.To.Format(time.RFC3339Nano)
	}
	if len(f.Actions) > 0 {
		m["action"] = f.Actions
	}
	for k, v := range map[string]string{"severity": f.Severity, "user_id": f.UserID, "entity_type": f.EntityType,
		"entity_id": f.EntityID, "tenant": f.Tenant, "ip_address": f.IPAddress} {
		if v != "" {
			m[k] = v
		}
	}
	if f.Status != 0 {
		m["status"] = f.Status
	}
	if f.ID != 0 {
		m["id"] = f.ID
	}
	return m
}

// Cursors are opaque to clients: "v1.<unix nanoseconds>.<id>", base64url.
const cursorPrefix = "v1."

func encodeCursor(c audittrail.Cursor) string {
	raw := cursorPrefix + strconv.FormatInt(c.CreatedAt.UnixNano(), 10) + "." + strconv.FormatInt(c.ID, 10)
	return base64.RawURLEncoding.EncodeToString([]byte(raw))
}

func decodeCursor(s string) (audittrail.Cursor, error) {
	if len(s) > 128 {
		return audittrail.Cursor{}, errors.New("too long")
	}
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return audittrail.Cursor{}, errors.New("bad encoding")
	}
	rest, ok := strings.CutPrefix(string(raw), cursorPrefix)
	if !ok {
		return audittrail.Cursor{}, errors.New("unknown version")
	}
	ts, id, ok := strings.Cut(rest, ".")
	if !ok {
		return audittrail.Cursor{}, errors.New("malformed")
	}
	ns, err1 := strconv.ParseInt(ts, 10, 64)
	n, err2 := strconv.ParseInt(id, 10, 64)
	if err1 != nil || err2 != nil || n < 0 {
		return audittrail.Cursor{}, errors.New("malformed")
	}
	return audittrail.Cursor{CreatedAt: time.Unix(0, ns).UTC(), ID: n}, nil
}

// validateAdmin checks the admin API fields. The token itself is never
// quoted in a message.
func (c Config) validateAdmin() error {
	var errs []error
	if c.AdminRole != "" {
		errs = append(errs, errors.New("audit.admin_role: removed: any caller reaching the listener could forge the role header; use MESHGUARD_ADMIN_TOKEN or audit.admin_token_file"))
	}
	if strings.ContainsAny(c.AdminTokenFile, "\x00\n") {
		errs = append(errs, fmt.Errorf("audit.admin_token_file: not a file path, got %q", c.AdminTokenFile))
	}
	if t := c.AdminToken.Reveal(); t != "" {
		if err := checkToken(t); err != nil {
			errs = append(errs, fmt.Errorf("MESHGUARD_ADMIN_TOKEN: %w", err))
		}
	}
	return errors.Join(errs...)
}

// checkToken accepts what can travel in a bearer Authorization header.
func checkToken(t string) error {
	if len(t) > maxTokenLen {
		return fmt.Errorf("longer than %d bytes", maxTokenLen)
	}
	for i := 0; i < len(t); i++ {
		if t[i] <= ' ' || t[i] >= 0x7f {
			return errors.New("must be visible ASCII without spaces")
		}
	}
	return nil
}

const maxTokenLen = 4096

// apiMetrics are the admin API's metrics.
type apiMetrics struct {
	requests     *prometheus.CounterVec
	authFailures *prometheus.CounterVec
	exportRows   *prometheus.CounterVec
	unrecorded   prometheus.Counter

	authFailuresUnrecorded prometheus.Counter
}

func newAPIMetrics(reg prometheus.Registerer) (*apiMetrics, error) {
	m := &apiMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_api_requests_total",
			Help: "Admin audit API requests by endpoint and HTTP status code.",
		}, []string{"endpoint", "code"}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_api_auth_failures_total",
			Help: "Admin audit API requests refused, by reason (disabled, missing, invalid_token).",
		}, []string{"reason"}),
		exportRows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_auditsink_export_rows_total",
			Help: "Audit rows written by exports, by format.",
		}, []string{"format"}),
		unrecorded: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_api_unrecorded_total",
			Help: "Admin API reads and exports refused because their own audit record could not be enqueued.",
		}),
		authFailuresUnrecorded: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshguard_auditsink_api_auth_failures_unrecorded_total",
			Help: "Failed admin authentications not recorded in the trail (over the recording rate, or refused by the writer); the next recorded one counts them.",
		}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.authFailures, m.exportRows, m.unrecorded, m.authFailuresUnrecorded} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// apiTruncate cuts s to at most max bytes without splitting a UTF-8 sequence.
func apiTruncate(s string, max int) string {
	if len(s) <= max {
		return s
	}
	i := max
	for i > 0 && i < len(s) && s[i]&0xC0 == 0x80 {
		i--
	}
	return s[:i]
}

// isActionName: A-Z 0-9 _, as ingest names actions.
func isActionName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// remoteIP is the address of a peer's host:port as ingest stores client
// addresses (no zone, IPv4-mapped unmapped), "" when it is not an IP.
func remoteIP(addr string) string {
	if a, ok := clientaddr.ParseHostPort(addr); ok {
		return a.String()
	}
	return ""
}
