package auditapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/meshguard/meshguard/audittrail"
)

// The audit console: server-rendered pages under /console/ for the people
// who read the trail. It lives in this package because it is the admin
// API's second front end: the same token admits its users (exchanged for a
// session at sign-in), the same query validation reads its filters, the
// same recorder writes every page view and export into the trail, and the
// same export code streams its downloads.
//
// Pages are html/template with embedded templates and assets, no script
// needed (one small nonce'd script shows times in the viewer's zone).
// Every response carries a strict CSP with a fresh nonce, the security
// header set and Cache-Control: no-store. Forms that change state (sign-in,
// sign-out, verify, export) are POSTs carrying the session's CSRF token;
// cookies are SameSite=Strict and HttpOnly, Secure when the listener is TLS.

//go:embed console
var consoleFiles embed.FS

// ConsoleOptions is what the console needs beyond the API.
type ConsoleOptions struct {
	// Secure: the HTTP listener is TLS, so cookies are Secure (and named
	// with the __Host- prefix) and responses carry HSTS.
	Secure bool
	// Keys check a row's MAC on its page and run "verify now"; WitnessDir
	// holds the signed checkpoints (audit.witness_dir).
	Keys       *audittrail.Keyring
	WitnessDir string
	// CSPReportURI receives the console's own CSP violation reports
	// (meshguard's /v1/csp-reports); empty: none.
	CSPReportURI string
	// VerifyMaxRows bounds one "verify now" (0: consoleVerifyMaxRows).
	VerifyMaxRows int64
}

// consoleReader is what the console reads: the API's reader and per-hour
// counts (both stores).
type consoleReader interface {
	recordReader
	HourlyCounts(ctx context.Context, f audittrail.Filter, by string) ([]audittrail.HourCount, error)
}

const (
	consoleVerifyMaxRows = 2_000_000
	consoleVerifyTimeout = 2 * time.Minute
	consoleMaxForm       = 16 << 10
	consolePageSize      = 50
	consoleChartMaxRange = 7 * 24 * time.Hour
)

// Console serves /console/. It is safe for concurrent use.
type Console struct {
	api       *API
	reader    consoleReader
	opts      ConsoleOptions
	sessions  *sessionStore
	signins   *signinLimiter
	verifying chan struct{} // one "verify now" at a time
	pages     map[string]*template.Template
	static    http.Handler
	cookie    string // session cookie name
	preCookie string // sign-in form's CSRF cookie name
	path      string // cookie path
}

// NewConsole returns the console over reader (the same store as the API's).
func (a *API) NewConsole(reader consoleReader, opts ConsoleOptions) (*Console, error) {
	if reader == nil || opts.Keys == nil {
		return nil, errors.New("audit console: reader and keys are required")
	}
	if opts.VerifyMaxRows <= 0 {
		opts.VerifyMaxRows = consoleVerifyMaxRows
	}
	c := &Console{api: a, reader: reader, opts: opts, sessions: newSessionStore(), signins: newSigninLimiter(),
		verifying: make(chan struct{}, 1), pages: map[string]*template.Template{},
		cookie: "meshguard_console", preCookie: "meshguard_console_signin", path: "/console/"}
	if opts.Secure {
		// __Host-: the browser only accepts it Secure, for this host, on path /.
		c.cookie, c.preCookie, c.path = "__Host-meshguard_console", "__Host-meshguard_console_signin", "/"
	}
	funcs := template.FuncMap{
		"utc":       func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 UTC") },
		"rfc3339":   func(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) },
		"hex":       func(b []byte) string { return fmt.Sprintf("%x", b) },
		"pathq":     url.PathEscape,
		"queryq":    url.QueryEscape,
		"formValue": formTime,
		"sevclass":  func(s string) string { return "sev-" + strings.ToLower(s) },
		"join":      func(vs []string) string { return strings.Join(vs, ",") },
	}
	layout, err := template.New("layout.html").Funcs(funcs).ParseFS(consoleFiles, "console/templates/layout.html")
	if err != nil {
		return nil, fmt.Errorf("audit console templates: %w", err)
	}
	entries, err := fs.Glob(consoleFiles, "console/templates/*.html")
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		name := strings.TrimSuffix(strings.TrimPrefix(e, "console/templates/"), ".html")
		if name == "layout" {
			continue
		}
		t, err := template.Must(layout.Clone()).ParseFS(consoleFiles, e)
		if err != nil {
			return nil, fmt.Errorf("audit console template %s: %w", name, err)
		}
		c.pages[name] = t
	}
	sub, err := fs.Sub(consoleFiles, "console/static")
	if err != nil {
		return nil, err
	}
	c.static = http.StripPrefix("/console/static/", http.FileServerFS(sub))
	return c, nil
}

// Register adds the console's routes to mux.
func (c *Console) Register(mux *http.ServeMux) {
	mux.Handle("GET /console/static/", c.plain(c.serveStatic))
	mux.Handle("GET /console/{$}", c.plain(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/console/events", http.StatusSeeOther)
	}))
	mux.Handle("GET /console", c.plain(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/console/events", http.StatusSeeOther)
	}))
	mux.Handle("GET /console/signin", c.plain(c.serveSigninForm))
	mux.Handle("POST /console/signin", c.plain(c.serveSignin))
	mux.Handle("POST /console/signout", c.authed("console_signout", true, c.serveSignout))
	mux.Handle("GET /console/events", c.authed("console_events", false, c.serveEvents))
	mux.Handle("GET /console/events/{id}", c.authed("console_event", false, c.serveEvent))
	mux.Handle("GET /console/security", c.authed("console_security", false, c.serveSecurity))
	mux.Handle("GET /console/users/{id}", c.authed("console_user", false, c.serveUser))
	mux.Handle("GET /console/integrity", c.authed("console_integrity", false, c.serveIntegrity))
	mux.Handle("POST /console/integrity/verify", c.authed("console_verify", true, c.serveVerify))
	mux.Handle("POST /console/export", c.authed("console_export", true, c.serveExport))
	// Anything else under /console/ gets the console's own 404 page.
	mux.Handle("/console/", c.plain(func(w http.ResponseWriter, r *http.Request) {
		c.fail(w, r, nil, http.StatusNotFound, "Not found", "There is no console page at this address.")
	}))
}

// view is what every page template gets.
type view struct {
	Title   string
	Nonce   string
	CSRF    string // empty when signed out
	User    string
	Nav     string // the current section
	Page    any
	Status  int
	Message string // error pages: the reason
	Signin  *signinView
}

type signinView struct {
	CSRF      string
	Failed    string
	SignedOut bool
	Next      string
}

// headers sets the security header set and returns the response's nonce.
func (c *Console) headers(w http.ResponseWriter) string {
	nonce := randomToken(18)
	h := w.Header()
	csp := "default-src 'none'; script-src 'nonce-" + nonce + "'; style-src 'self'; img-src 'self'; " +
		"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
	if c.opts.CSPReportURI != "" {
		csp += "; report-uri " + c.opts.CSPReportURI
	}
	h.Set("Content-Security-Policy", csp)
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	h.Set("Cross-Origin-Embedder-Policy", "require-corp")
	h.Set("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=(), usb=()")
	h.Set("X-Permitted-Cross-Domain-Policies", "none")
	if c.opts.Secure {
		h.Set("Strict-Transport-Security", "max-age=63072000; includeSubDomains")
	}
	return nonce
}

// plain wraps a handler that needs no session: headers, the off switch
// and the request metric.
func (c *Console) plain(fn http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !c.api.auth.enabled() {
			c.headers(w)
			c.fail(w, r, nil, http.StatusServiceUnavailable, "Console off",
				"The audit console is off because the admin API is disabled: configure MESHGUARD_ADMIN_TOKEN or audit.admin_token_file.")
			return
		}
		fn(w, r)
	})
}

// consoleHandler is a page that has a session; it returns the status it
// answered or an error not answered yet (an *apiError is the client's
// fault and shown with its reason; anything else is logged and shown as
// "unavailable").
type consoleHandler func(w http.ResponseWriter, r *http.Request, s *session) (int, error)

// authed wraps a page that needs a live session (and on POST, its CSRF
// token).
func (c *Console) authed(endpoint string, post bool, fn consoleHandler) http.Handler {
	return c.plain(func(rw http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: rw, status: http.StatusOK}
		var w http.ResponseWriter = sw
		c.headers(w)
		s, ok := c.session(w, r, endpoint)
		if !ok {
			return
		}
		if post {
			r.Body = http.MaxBytesReader(w, r.Body, consoleMaxForm)
			if err := r.ParseForm(); err != nil {
				c.fail(w, r, s, http.StatusBadRequest, "Bad form", "The form could not be read: it is malformed or larger than 16 KiB.")
				return
			}
			if !sameOrigin(r) || subtle.ConstantTimeCompare([]byte(r.PostForm.Get("csrf")), []byte(s.csrf)) != 1 {
				c.api.m.authFailures.WithLabelValues("csrf").Inc()
				c.fail(w, r, s, http.StatusForbidden, "Form refused",
					"This form did not carry this session's CSRF token (or came from another site), so nothing was done. Reload the page and try again.")
				c.api.m.requests.WithLabelValues(endpoint, "403").Inc()
				return
			}
		}
		code, err := fn(w, r, s)
		if err != nil {
			var ae *apiError
			switch {
			case errors.As(err, &ae):
				title := "Bad request"
				if ae.status == http.StatusNotFound {
					title = "Not found"
				}
				c.fail(w, r, s, ae.status, title, ae.Error())
			case errors.Is(err, errNotRecorded):
				c.fail(w, r, s, http.StatusServiceUnavailable, "Not recorded",
					"This access could not be recorded in the audit trail, so it was not served. Try again in a moment.")
			default:
				c.api.log.Error("audit console request failed", "endpoint", endpoint, "err", err)
				c.fail(w, r, s, http.StatusServiceUnavailable, "Audit store unavailable",
					"The audit store could not answer. Try again in a moment; the server log has the details.")
			}
		}
		if err != nil || code == 0 {
			code = sw.status
		}
		c.api.m.requests.WithLabelValues(endpoint, strconv.Itoa(code)).Inc()
	})
}

// session returns the request's live session, or answers: no cookie at
// all sends a GET to the sign-in page; an unknown (forged, signed-out) or
// expired cookie gets a 401 page saying which, and is cleared.
func (c *Console) session(w http.ResponseWriter, r *http.Request, endpoint string) (*session, bool) {
	now := c.api.now()
	ck, err := r.Cookie(c.cookie)
	if err != nil || ck.Value == "" {
		if r.Method == http.MethodGet {
			http.Redirect(w, r, "/console/signin?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
			return nil, false
		}
		c.fail(w, r, nil, http.StatusUnauthorized, "Not signed in", "Sign in to use the audit console.")
		return nil, false
	}
	s, st := c.sessions.lookup(ck.Value, now)
	if st == sessionOK {
		if _, ok := c.api.auth.hashPrincipal(s.tokenHash); ok {
			return s, true
		}
		c.sessions.remove(ck.Value)
		c.clearCookie(w)
		c.fail(w, r, nil, http.StatusUnauthorized, "Session ended",
			"The admin token this session was opened with is no longer accepted (it was rotated), so the session ended. Sign in with the current token.")
		return nil, false
	}
	c.clearCookie(w)
	var msg string
	switch st {
	case sessionIdleExpired:
		msg = fmt.Sprintf("Your session expired after %s without activity. Sign in again.", sessionIdle)
	case sessionLifetimeExpired:
		msg = fmt.Sprintf("Your session reached its maximum lifetime of %s. Sign in again.", sessionLifetime)
	default:
		msg = "Your session cookie is not one this server issued, or the session was signed out or ended by a restart. Sign in again."
		c.api.m.authFailures.WithLabelValues("invalid_session").Inc()
		c.api.recordAuthFailure(r, endpoint, "invalid_session")
	}
	c.fail(w, r, nil, http.StatusUnauthorized, "Session expired or invalid", msg)
	return nil, false
}

// sameOrigin refuses a state-changing request a browser says came from
// another site. The CSRF token is the defence; this is a second one.
func sameOrigin(r *http.Request) bool {
	switch r.Header.Get("Sec-Fetch-Site") {
	case "", "same-origin", "none":
	default:
		return false
	}
	if o := r.Header.Get("Origin"); o != "" && o != "null" {
		u, err := url.Parse(o)
		if err != nil || u.Host != r.Host {
			return false
		}
	}
	return true
}

func (c *Console) setCookie(w http.ResponseWriter, name, value string, maxAge int) {
	http.SetCookie(w, &http.Cookie{Name: name, Value: value, Path: c.path, MaxAge: maxAge,
		HttpOnly: true, Secure: c.opts.Secure, SameSite: http.SameSiteStrictMode})
}

func (c *Console) clearCookie(w http.ResponseWriter) { c.setCookie(w, c.cookie, "", -1) }

// render executes page into a buffer first, so a template error becomes a
// clean 500 page rather than half a page.
func (c *Console) render(w http.ResponseWriter, r *http.Request, status int, page string, v view) {
	v.Nonce = w.Header().Get("Content-Security-Policy")
	if i := strings.Index(v.Nonce, "'nonce-"); i >= 0 {
		v.Nonce = v.Nonce[i+len("'nonce-"):]
		v.Nonce = v.Nonce[:strings.IndexByte(v.Nonce, '\'')]
	}
	v.Status = status
	var buf bytes.Buffer
	t := c.pages[page]
	if t == nil {
		c.api.log.Error("audit console: no template", "page", page)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	if err := t.ExecuteTemplate(&buf, "layout", v); err != nil {
		c.api.log.Error("audit console: rendering failed", "page", page, "err", err)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusInternalServerError)
		fmt.Fprintln(w, "The page could not be rendered; the server log has the details.")
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// fail answers with the console's error page: a title, the reason, the
// status. s may be nil (signed out).
func (c *Console) fail(w http.ResponseWriter, r *http.Request, s *session, status int, title, reason string) {
	if w.Header().Get("Content-Security-Policy") == "" {
		c.headers(w)
	}
	v := view{Title: title, Message: reason}
	if s != nil {
		v.CSRF, v.User = s.csrf, s.p.user
	}
	c.render(w, r, status, "error", v)
}

// statusWriter remembers the status a console page answered.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (c *Console) serveStatic(w http.ResponseWriter, r *http.Request) {
	c.headers(w)
	if strings.HasSuffix(r.URL.Path, "/") { // files only, no listings
		c.fail(w, r, nil, http.StatusNotFound, "Not found", "There is no console page at this address.")
		return
	}
	c.static.ServeHTTP(w, r)
}

// serveSigninForm shows the sign-in form with a fresh pre-session CSRF
// token, double-submitted as a SameSite=Strict cookie (no session exists
// yet to hold it: this stops another site signing a browser in).
func (c *Console) serveSigninForm(w http.ResponseWriter, r *http.Request) {
	c.headers(w)
	tok := randomToken(32)
	c.setCookie(w, c.preCookie, tok, 600)
	c.render(w, r, http.StatusOK, "signin", view{Title: "Sign in", Signin: &signinView{CSRF: tok,
		SignedOut: r.URL.Query().Get("signed_out") == "1", Next: safeNext(r.URL.Query().Get("next"))}})
}

// formTime is t as an HTML datetime-local value in UTC ("" when zero).
func formTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format("2006-01-02T15:04:05")
}

// safeNext keeps a post-sign-in redirect inside the console.
func safeNext(next string) string {
	if len(next) > 2048 || !strings.HasPrefix(next, "/console/") || strings.HasPrefix(next, "//") ||
		strings.ContainsAny(next, "\\\r\n") || strings.HasPrefix(next, "/console/static/") {
		return "/console/events"
	}
	return next
}

// serveSignin exchanges the admin token for a session. Attempts are
// rate-limited; failures are recorded in the trail as the API's failed
// authentications are (LOGIN_FAILURE, rate-limited too).
func (c *Console) serveSignin(w http.ResponseWriter, r *http.Request) {
	c.headers(w)
	const endpoint = "console_signin"
	count := func(code int) { c.api.m.requests.WithLabelValues(endpoint, strconv.Itoa(code)).Inc() }
	now := c.api.now()
	if !c.signins.allow(r.RemoteAddr, now) {
		w.Header().Set("Retry-After", strconv.Itoa(int(signinPerIPEvery/time.Second)))
		c.fail(w, r, nil, http.StatusTooManyRequests, "Too many sign-in attempts",
			"Too many sign-in attempts from this address or in total. Wait a few seconds and try again.")
		count(http.StatusTooManyRequests)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, consoleMaxForm)
	if err := r.ParseForm(); err != nil {
		c.fail(w, r, nil, http.StatusBadRequest, "Bad form", "The form could not be read: it is malformed or larger than 16 KiB.")
		count(http.StatusBadRequest)
		return
	}
	pre, err := r.Cookie(c.preCookie)
	if err != nil || !sameOrigin(r) || pre.Value == "" ||
		subtle.ConstantTimeCompare([]byte(pre.Value), []byte(r.PostForm.Get("csrf"))) != 1 {
		c.api.m.authFailures.WithLabelValues("csrf").Inc()
		c.fail(w, r, nil, http.StatusForbidden, "Form refused",
			"The sign-in form did not carry a valid CSRF token (it expired after 10 minutes, or came from another site). Open the sign-in page again.")
		count(http.StatusForbidden)
		return
	}
	next := safeNext(r.PostForm.Get("next"))
	tok := strings.TrimSpace(r.PostForm.Get("token"))
	var p principal
	ok := tok != "" && len(tok) <= maxTokenLen
	if ok {
		p, ok = c.api.auth.tokenPrincipal(tok)
	}
	if !ok {
		reason := "invalid_token"
		if tok == "" {
			reason = "missing"
		}
		c.api.m.authFailures.WithLabelValues(reason).Inc()
		c.api.recordAuthFailure(r, endpoint, reason)
		fresh := randomToken(32)
		c.setCookie(w, c.preCookie, fresh, 600)
		c.render(w, r, http.StatusUnauthorized, "signin", view{Title: "Sign in", Signin: &signinView{CSRF: fresh, Next: next,
			Failed: "That token was not accepted. The attempt has been recorded in the audit trail."}})
		count(http.StatusUnauthorized)
		return
	}
	p.via = "console"
	if err := c.api.record(r, p, "LOGIN_SUCCESS", audittrail.SeverityLow, accessMeta{Endpoint: endpoint, Auth: p.via, Token: p.token}); err != nil {
		c.fail(w, r, nil, http.StatusServiceUnavailable, "Not recorded",
			"The sign-in could not be recorded in the audit trail, so no session was opened. Try again in a moment.")
		count(http.StatusServiceUnavailable)
		return
	}
	id, _ := c.sessions.create(p, sha256.Sum256([]byte(tok)), now)
	c.setCookie(w, c.cookie, id, int(sessionLifetime/time.Second))
	c.setCookie(w, c.preCookie, "", -1)
	http.Redirect(w, r, next, http.StatusSeeOther)
	count(http.StatusSeeOther)
}

// serveSignout ends the session on the server, clears the browser's
// cookies for the console and records the sign-out.
func (c *Console) serveSignout(w http.ResponseWriter, r *http.Request, s *session) (int, error) {
	if ck, err := r.Cookie(c.cookie); err == nil {
		c.sessions.remove(ck.Value)
	}
	c.clearCookie(w)
	w.Header().Set("Clear-Site-Data", `"cache", "cookies", "storage"`)
	if err := c.api.record(r, s.p, "LOGOUT", audittrail.SeverityLow, accessMeta{Endpoint: "console_signout", Auth: s.p.via, Token: s.p.token}); err != nil {
		// The session is over either way; the missing row is counted.
		c.api.log.Warn("audit console sign-out not recorded", "err", err)
	}
	http.Redirect(w, r, "/console/signin?signed_out=1", http.StatusSeeOther)
	return http.StatusSeeOther, nil
}
