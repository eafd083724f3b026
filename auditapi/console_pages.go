package auditapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshguard/meshguard/audittrail"
)

// consoleForm is a parsed console filter: the validated query, and the
// normalized values it came from (the permalink and the export form).
type consoleForm struct {
	q      apiQuery
	values url.Values // without cursor and csrf
}

// Form field formats for times: the API's RFC 3339, or what an HTML
// datetime-local input sends (no zone: the console labels them UTC).
var localTimeLayouts = []string{"2006-01-02T15:04", "2006-01-02T15:04:05"}

// parseConsoleForm validates a console filter (a GET query or a POSTed
// form) with the API's rules: empty fields are dropped (a form sends every
// field), datetime-local times are read as UTC, and everything else must
// be what the API accepts.
func parseConsoleForm(raw string, allowed ...string) (consoleForm, error) {
	if len(raw) > apiMaxRawQuery {
		return consoleForm{}, &apiError{status: http.StatusRequestURITooLong, msg: fmt.Sprintf("the filter is longer than %d bytes", apiMaxRawQuery)}
	}
	vals, err := url.ParseQuery(raw)
	if err != nil {
		return consoleForm{}, badParam("", "malformed query string: %v", err)
	}
	delete(vals, "csrf")
	clean := url.Values{}
	for k, vs := range vals {
		for _, v := range vs {
			v = strings.TrimSpace(v)
			if v == "" {
				continue
			}
			if (k == "from" || k == "to") && len(v) <= 19 {
				for _, l := range localTimeLayouts {
					if t, err := time.Parse(l, v); err == nil {
						v = t.UTC().Format(time.RFC3339)
						break
					}
				}
			}
			clean.Add(k, v)
		}
	}
	q, err := parseRawQuery(clean.Encode(), allowed...)
	if err != nil {
		return consoleForm{}, err
	}
	clean.Del("cursor")
	clean.Del("format")
	return consoleForm{q: q, values: clean}, nil
}

// consoleList is the model of a list of events.
type consoleList struct {
	Action     string // the form's target
	Heading    string
	Intro      string
	Form       url.Values
	Filter     audittrail.Filter
	Items      []audittrail.Record
	Next       string // URL of the next page, empty on the last
	First      string // URL of the first page when this is a later one
	Permalink  string
	Chart      *chart
	Counts     []actionCount // per action over the chart's window (user page)
	From, To   time.Time     // the window Counts cover
	Clamped    bool          // the window is the last consoleChartMaxRange of the filter's range
	Hourly     *hourTable    // security page
	ExportForm url.Values    // hidden fields of the export form
	Severities []string
	Fields     bool // the full filter form (events page)
}

type actionCount struct {
	Action string
	Count  int64
}

var consoleSeverities = []string{audittrail.SeverityLow, audittrail.SeverityMedium, audittrail.SeverityHigh, audittrail.SeverityCritical}

// consoleListParams are the event list's filters (the API's, same names).
var consoleListParams = []string{"from", "to", "action", "severity", "user_id", "entity_type", "entity_id", "ip_address", "status", "cursor"}

func (c *Console) serveEvents(w http.ResponseWriter, r *http.Request, s *session) (int, error) {
	form, err := parseConsoleForm(r.URL.RawQuery, consoleListParams...)
	if err != nil {
		return 0, err
	}
	l := &consoleList{Action: "/console/events", Heading: "Events", Fields: true}
	return c.list(w, r, s, "console_events", "events", form, l, "severity")
}

func (c *Console) serveSecurity(w http.ResponseWriter, r *http.Request, s *session) (int, error) {
	form, err := parseConsoleForm(r.URL.RawQuery, "from", "to", "cursor")
	if err != nil {
		return 0, err
	}
	form.q.filter.Actions = slices.Clone(securityActions)
	l := &consoleList{Action: "/console/security", Heading: "Security events",
		Intro: "Failed logins, permission denials, rate-limit, CORS and CSP denials, and suspicious activity, with counts per hour."}
	return c.list(w, r, s, "console_security", "security", form, l, "action")
}

func (c *Console) serveUser(w http.ResponseWriter, r *http.Request, s *session) (int, error) {
	id := r.PathValue("id")
	if err := checkText("user", id, apiMaxUserLen); err != nil {
		return 0, err
	}
	form, err := parseConsoleForm(r.URL.RawQuery, "from", "to", "cursor")
	if err != nil {
		return 0, err
	}
	form.q.filter.UserID = id
	l := &consoleList{Action: "/console/users/" + url.PathEscape(id), Heading: "Activity of " + id}
	return c.list(w, r, s, "console_user", "user", form, l, "action")
}

// list reads one page of the form's filter and the counts for its chart,
// records the view, then renders the page.
func (c *Console) list(w http.ResponseWriter, r *http.Request, s *session, endpoint, page string, form consoleForm, l *consoleList, by string) (int, error) {
	ctx := r.Context()
	f := form.q.filter
	recs, next, err := c.reader.List(ctx, f, form.q.cursor, consolePageSize)
	if err != nil {
		return 0, err
	}
	from, to, clamped := chartWindow(f, c.api.now())
	cf := f
	cf.From, cf.To = from, to
	counts, err := c.reader.HourlyCounts(ctx, cf, by)
	if err != nil {
		return 0, err
	}
	n := len(recs)
	meta := accessMeta{Endpoint: endpoint, Auth: s.p.via, Token: s.p.token, Filter: filterDoc(f), Limit: consolePageSize,
		Returned: &n, Paged: form.q.cursor != (audittrail.Cursor{})}
	if err := c.api.record(r, s.p, apiActionRead, apiReadSeverity, meta); err != nil {
		return 0, err
	}
	l.Form, l.Filter, l.Items, l.Severities = form.values, f, recs, consoleSeverities
	l.Permalink = l.Action
	if len(form.values) > 0 {
		l.Permalink += "?" + form.values.Encode()
	}
	if next != (audittrail.Cursor{}) {
		nv := cloneValues(form.values)
		nv.Set("cursor", encodeCursor(next))
		l.Next = l.Action + "?" + nv.Encode()
	}
	if form.q.cursor != (audittrail.Cursor{}) {
		l.First = l.Permalink
	}
	l.ExportForm = cloneValues(form.values)
	if page == "security" {
		for _, a := range securityActions {
			l.ExportForm.Add("action", a)
		}
	}
	if page == "user" {
		l.ExportForm.Set("user_id", f.UserID)
	}
	switch by {
	case "severity":
		l.Chart = severityChart(counts, from, to, clamped)
	case "action":
		if page == "security" {
			l.Hourly = newHourTable(counts, securityActions, from, to, clamped)
		} else {
			l.Counts, l.From, l.To, l.Clamped = totalsByGroup(counts), from, to, clamped
		}
	}
	c.render(w, r, http.StatusOK, page, view{Title: l.Heading, CSRF: s.csrf, User: s.p.user, Nav: page, Page: l})
	return http.StatusOK, nil
}

func cloneValues(v url.Values) url.Values {
	out := url.Values{}
	for k, vs := range v {
		out[k] = slices.Clone(vs)
	}
	return out
}

// chartWindow is the hours a chart covers: the filter's range, ending now
// when open, starting a day before its end when open, and at most
// consoleChartMaxRange long (the latest part; clamped says so).
func chartWindow(f audittrail.Filter, now time.Time) (from, to time.Time, clamped bool) {
	to = f.To
	if to.IsZero() || to.After(now) {
		to = now
	}
	to = to.Truncate(time.Hour).Add(time.Hour)
	from = f.From
	if from.IsZero() {
		from = to.Add(-24 * time.Hour)
	}
	from = from.Truncate(time.Hour)
	if to.Sub(from) > consoleChartMaxRange {
		from, clamped = to.Add(-consoleChartMaxRange), true
	}
	if !from.Before(to) {
		from = to.Add(-time.Hour)
	}
	return from, to, clamped
}

func totalsByGroup(counts []audittrail.HourCount) []actionCount {
	m := map[string]int64{}
	for _, hc := range counts {
		m[hc.Group] += hc.Count
	}
	out := make([]actionCount, 0, len(m))
	for a, n := range m {
		out = append(out, actionCount{a, n})
	}
	slices.SortFunc(out, func(a, b actionCount) int {
		if a.Count != b.Count {
			return int(b.Count - a.Count)
		}
		return strings.Compare(a.Action, b.Action)
	})
	return out
}

// hourTable is the security page's counts: one row per hour with events.
type hourTable struct {
	Actions []string
	Rows    []hourRow
	Clamped bool
	From    time.Time
	To      time.Time
	Total   int64
}

type hourRow struct {
	Hour   time.Time
	Counts []int64
	Total  int64
}

func newHourTable(counts []audittrail.HourCount, actions []string, from, to time.Time, clamped bool) *hourTable {
	t := &hourTable{Actions: actions, Clamped: clamped, From: from, To: to}
	idx := map[time.Time]int{}
	for _, hc := range counts {
		i, ok := idx[hc.Hour]
		if !ok {
			i = len(t.Rows)
			idx[hc.Hour] = i
			t.Rows = append(t.Rows, hourRow{Hour: hc.Hour, Counts: make([]int64, len(actions))})
		}
		if j := slices.Index(actions, hc.Group); j >= 0 {
			t.Rows[i].Counts[j] += hc.Count
		}
		t.Rows[i].Total += hc.Count
		t.Total += hc.Count
	}
	slices.Reverse(t.Rows) // newest hour first, as the list
	return t
}

// eventPage is one event in full.
type eventPage struct {
	R        audittrail.Record
	Metadata string
	Old, New string
	MAC      string // the row's MAC check, "" without a private key
	MACOK    bool
}

func (c *Console) serveEvent(w http.ResponseWriter, r *http.Request, s *session) (int, error) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil || id <= 0 {
		return 0, badParam("id", "an event id is a positive integer, got %q", clip(r.PathValue("id")))
	}
	if r.URL.RawQuery != "" {
		return 0, badParam("", "this page takes no query parameters")
	}
	f := audittrail.Filter{ID: id}
	recs, _, err := c.reader.List(r.Context(), f, audittrail.Cursor{}, 1)
	if err != nil {
		return 0, err
	}
	n := len(recs)
	meta := accessMeta{Endpoint: "console_event", Auth: s.p.via, Token: s.p.token, Filter: filterDoc(f), Returned: &n}
	if err := c.api.record(r, s.p, apiActionRead, apiReadSeverity, meta); err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, &apiError{status: http.StatusNotFound, msg: fmt.Sprintf("there is no event with id %d (it may have been removed by retention)", id)}
	}
	p := &eventPage{R: recs[0], Metadata: prettyJSON(recs[0].Metadata), Old: prettyJSON(recs[0].OldValues), New: prettyJSON(recs[0].NewValues)}
	if c.opts.Keys.HasPrivate() {
		if err := c.opts.Keys.CheckRow(&recs[0]); err != nil {
			p.MAC = "The row does not check out on its own: " + err.Error()
		} else {
			p.MAC, p.MACOK = "The row's MAC verifies with key "+recs[0].KeyID+": its content is as written", true
		}
	}
	c.render(w, r, http.StatusOK, "event", view{Title: fmt.Sprintf("Event %d", id), CSRF: s.csrf, User: s.p.user, Nav: "events", Page: p})
	return http.StatusOK, nil
}

func prettyJSON(raw json.RawMessage) string {
	if len(raw) == 0 {
		return ""
	}
	var b bytes.Buffer
	if err := json.Indent(&b, raw, "", "  "); err != nil {
		return string(raw)
	}
	return b.String()
}

// integrityPage is the trail's integrity: checkpoints, key, verify.
type integrityPage struct {
	KeyID       string
	PublicKey   string
	Checkpoints []audittrail.Checkpoint
	More        int
	WitnessErr  string
	From, To    time.Time
	Result      *verifyResult
	MaxRows     int64
}

type verifyResult struct {
	Report  audittrail.VerifyReport
	Refused string // the range was refused, and why
	Took    time.Duration
}

const consoleMaxCheckpoints = 20

func (c *Console) integrity(s *session) *integrityPage {
	p := &integrityPage{MaxRows: c.opts.VerifyMaxRows}
	if k := c.opts.Keys.Current; k != nil {
		p.KeyID, p.PublicKey = k.ID(), k.VerifierKey()
	}
	cps, err := audittrail.ReadWitness(c.opts.WitnessDir, c.opts.Keys.Verifiers())
	if err != nil {
		p.WitnessErr = err.Error()
	}
	slices.SortFunc(cps, func(a, b audittrail.Checkpoint) int { return b.Time.Compare(a.Time) })
	if len(cps) > consoleMaxCheckpoints {
		p.More = len(cps) - consoleMaxCheckpoints
		cps = cps[:consoleMaxCheckpoints]
	}
	p.Checkpoints = cps
	return p
}

func (c *Console) serveIntegrity(w http.ResponseWriter, r *http.Request, s *session) (int, error) {
	if r.URL.RawQuery != "" {
		return 0, badParam("", "this page takes no query parameters")
	}
	p := c.integrity(s)
	meta := accessMeta{Endpoint: "console_integrity", Auth: s.p.via, Token: s.p.token}
	if err := c.api.record(r, s.p, apiActionRead, apiReadSeverity, meta); err != nil {
		return 0, err
	}
	c.render(w, r, http.StatusOK, "integrity", view{Title: "Integrity", CSRF: s.csrf, User: s.p.user, Nav: "integrity", Page: p})
	return http.StatusOK, nil
}

// serveVerify runs the verification `meshguard audit verify` runs over
// the chosen range, bounded in rows and time, one at a time.
func (c *Console) serveVerify(w http.ResponseWriter, r *http.Request, s *session) (int, error) {
	form, err := parseConsoleForm(r.PostForm.Encode(), "from", "to")
	if err != nil {
		return 0, err
	}
	select {
	case c.verifying <- struct{}{}:
		defer func() { <-c.verifying }()
	default:
		w.Header().Set("Retry-After", "10")
		return 0, &apiError{status: http.StatusTooManyRequests, msg: "a verification is already running; try again when it has finished"}
	}
	f := form.q.filter
	meta := accessMeta{Endpoint: "console_verify", Auth: s.p.via, Token: s.p.token, Filter: filterDoc(f)}
	if err := c.api.record(r, s.p, apiActionRead, apiReadSeverity, meta); err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(r.Context(), consoleVerifyTimeout)
	defer cancel()
	start := time.Now()
	rep, err := audittrail.VerifyWitnessed(ctx, c.reader, c.opts.WitnessDir,
		audittrail.VerifyOptions{From: f.From, To: f.To, Keys: c.opts.Keys, MaxRows: c.opts.VerifyMaxRows})
	res := &verifyResult{Report: rep, Took: time.Since(start).Round(time.Millisecond)}
	status := http.StatusOK
	var tooMany *audittrail.TooManyRowsError
	switch {
	case errors.As(err, &tooMany):
		res.Refused, status = tooMany.Error(), http.StatusUnprocessableEntity
	case errors.Is(err, context.DeadlineExceeded) && r.Context().Err() == nil:
		res.Refused, status = fmt.Sprintf("the verification did not finish within %s; narrow the range or run `meshguard audit verify`", consoleVerifyTimeout), http.StatusUnprocessableEntity
	case err != nil:
		return 0, err
	}
	p := c.integrity(s)
	p.From, p.To, p.Result = f.From, f.To, res
	c.render(w, r, status, "integrity", view{Title: "Integrity", CSRF: s.csrf, User: s.p.user, Nav: "integrity", Page: p})
	return status, nil
}

// serveExport streams the posted filter as CSV or JSON Lines through the
// API's export code. An open end is closed at now, so the file is a
// snapshot; a failure after the first byte cuts the download.
func (c *Console) serveExport(w http.ResponseWriter, r *http.Request, s *session) (int, error) {
	allowed := append(slices.Clone(consoleListParams[:len(consoleListParams)-1]), "format")
	form, err := parseConsoleForm(r.PostForm.Encode(), allowed...)
	if err != nil {
		return 0, err
	}
	q := form.q
	if q.format == "" {
		return 0, badParam("format", "choose csv or jsonl")
	}
	if q.filter.To.IsZero() {
		q.filter.To = c.api.now().UTC()
	}
	meta := accessMeta{Endpoint: "console_export", Auth: s.p.via, Token: s.p.token, Filter: filterDoc(q.filter), Format: q.format}
	return c.api.streamExport(w, r, s.p, q, meta)
}
