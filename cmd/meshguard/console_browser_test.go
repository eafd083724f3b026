package main

import (
	"context"
	"encoding/csv"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/browser"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/meshguard/meshguard/audittrail"
	"github.com/meshguard/meshguard/internal/pgtest"
	"github.com/meshguard/meshguard/internal/servertest"
)

// screenshotDir is where TestConsoleInBrowser writes a PNG of each page:
// $MESHGUARD_SCREENSHOTS, or .screenshots/console at the repository root
// (ignored by git).
func screenshotDir(t *testing.T) string {
	dir := os.Getenv("MESHGUARD_SCREENSHOTS")
	if dir == "" {
		dir = filepath.Join("..", "..", ".screenshots", "console")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(dir)
	return abs
}

// consoleSeed is a few hundred events over the last ten hours: varied
// actions, severities, users and addresses.
func consoleSeed(n int, now time.Time) []audittrail.Record {
	actions := []string{"LOGIN_SUCCESS", "READ", "UPDATE", "LOGIN_FAILURE", "PERMISSION_DENIED", "RATE_LIMIT_EXCEEDED", "CREATE", "CORS_VIOLATION"}
	sev := []string{audittrail.SeverityLow, audittrail.SeverityMedium, audittrail.SeverityHigh, audittrail.SeverityLow, audittrail.SeverityCritical}
	start := now.Add(-10 * time.Hour)
	recs := make([]audittrail.Record, n)
	for i := range recs {
		recs[i] = audittrail.Record{
			CreatedAt: start.Add(time.Duration(i) * 10 * time.Hour / time.Duration(n)), Action: actions[i%len(actions)],
			Severity: sev[i%len(sev)], EntityType: []string{"patient", "invoice", "user"}[i%3], EntityID: fmt.Sprint(1000 + i%17),
			UserID: fmt.Sprintf("dr.%c", 'a'+i%6), IPAddress: fmt.Sprintf("198.51.100.%d", 1+i%9), UserAgent: "Mozilla/5.0 (test)",
			Method: []string{"GET", "POST", "PUT"}[i%3], Path: fmt.Sprintf("/api/patients/%d", 1000+i%17),
			Status: []int{200, 201, 403, 429, 401}[i%5], RequestID: fmt.Sprintf("req-%04d", i),
			Metadata: []byte(fmt.Sprintf(`{"route":"patients","i":%d}`, i)),
		}
	}
	return recs
}

// TestConsoleInBrowser drives the console in headless Chromium against a
// real `meshguard serve` on PostgreSQL with a few hundred events: sign-in,
// filter, paging, event detail, keyboard focus, export download, verify on
// the intact and then the tampered trail, phone width, sign-out. The
// browser must report no CSP violation (collected from its console, and
// checked to be collectable at the end) and no script error. Screenshots
// of each page go to screenshotDir.
func TestConsoleInBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL and Chromium")
	}
	chromium := servertest.LookPath(t, "chromium", "/usr/bin/chromium", "/usr/lib/chromium/chromium")
	pg := pgtest.Start(t)
	dbURL := pg.NewDatabase(t)
	const token = "browser-test-admin-token-0123456789"
	getenv := func(k string) string {
		switch k {
		case "DATABASE_URL":
			return dbURL
		case "MESHGUARD_ADMIN_TOKEN":
			return token
		}
		return ""
	}
	cfgPath := testConfig(t, "  batch_interval: 20ms\n")
	now := time.Now().UTC()
	seeded := consoleSeed(400, now)
	seedTrail(t, cfgPath, getenv, seeded)
	high := 0
	for _, r := range seeded {
		if r.Severity == audittrail.SeverityHigh {
			high++
		}
	}

	ctx, stop := context.WithCancel(t.Context())
	line, errc, logs := startRun(t, ctx, cfgPath, getenv)
	t.Cleanup(func() {
		stop()
		waitRun(t, errc, logs)
	})
	base := "http://" + line["http_addr"].(string)
	shots := screenshotDir(t)
	downloads := t.TempDir()

	actx, cancelAlloc := chromedp.NewExecAllocator(t.Context(),
		chromedp.ExecPath(chromium), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck, chromedp.Flag("disable-quic", true), chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		// CI containers often mount a 64 MiB /dev/shm, too small for
		// Chromium's shared memory: use the temporary directory instead.
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1280, 800))
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	bctx, cancelTimeout := context.WithTimeout(bctx, 3*time.Minute)
	defer cancelTimeout()

	// Every console message of the pages; CSP violations and script errors
	// among them fail the test.
	var mu sync.Mutex
	var cspViolations, scriptErrors []string
	messages := chromedp.Console(bctx)
	go func() {
		for m, err := range messages {
			if err != nil {
				return
			}
			text := m.String()
			mu.Lock()
			switch {
			case strings.Contains(text, "Content Security Policy"):
				cspViolations = append(cspViolations, text)
			case m.IsException():
				scriptErrors = append(scriptErrors, text)
			}
			mu.Unlock()
		}
	}()

	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		must(what, chromedp.Do(bctx, steps...))
	}
	// navigate runs trigger and waits for the page it loads.
	navigate := func(what string, trigger chromedp.Action[chromedp.Void]) {
		t.Helper()
		_, err := chromedp.Run(bctx, chromedp.WaitEvent(page.LoadEventFired, nil, trigger))
		must(what, err)
	}
	location := func() string {
		t.Helper()
		loc, err := chromedp.Run(bctx, chromedp.Location())
		must("location", err)
		return loc
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(sel)))
		must("text of "+sel, err)
		return s
	}
	eval := func(js string) bool {
		t.Helper()
		ok, err := chromedp.Run(bctx, chromedp.Evaluate[bool](js))
		must(js, err)
		return ok
	}
	shot := func(name string) {
		t.Helper()
		png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
		must("screenshot "+name, err)
		must("writing screenshot", os.WriteFile(filepath.Join(shots, name+".png"), png, 0o644))
	}
	rowCount := func() int {
		t.Helper()
		n, err := chromedp.Run(bctx, chromedp.Evaluate[int](`document.querySelectorAll("table.events tbody tr").length`))
		must("counting rows", err)
		return n
	}

	// Sign in.
	navigate("open the console", chromedp.Navigate(base+"/console/"))
	if loc := location(); !strings.HasPrefix(loc, base+"/console/signin") {
		t.Fatalf("signed out, the console opened %s", loc)
	}
	shot("01-signin")
	do("type the token", chromedp.SendKeys(chromedp.ID("token"), token))
	navigate("sign in", chromedp.Click(chromedp.CSS(`.signin button[type=submit]`)))
	if loc := location(); loc != base+"/console/events" || text("h1") != "Events" {
		t.Fatalf("after sign-in: %s, %q", loc, text("h1"))
	}
	if n := rowCount(); n != 50 {
		t.Fatalf("first page: %d rows, want 50", n)
	}
	if !eval(`document.querySelectorAll("time.local").length > 0 && document.querySelector("time.local").title.startsWith("UTC: ")`) {
		t.Error("times were not shown in the viewer's zone with UTC on hover")
	}
	if !eval(`document.querySelectorAll(".chart svg rect").length > 0`) {
		t.Error("the chart has no bars")
	}
	shot("02-events")

	// Keyboard: the first Tab reaches the skip link, Enter follows it.
	do("tab", chromedp.KeyEvent("\t"))
	if !eval(`document.activeElement.classList.contains("skip")`) {
		t.Error("the first Tab did not focus the skip link")
	}

	// Filter: severity HIGH.
	do("choose HIGH", chromedp.SetValue(chromedp.CSS(`select[name=severity]`), "HIGH"))
	navigate("apply the filter", chromedp.Click(chromedp.CSS(`form.filters button[type=submit]`)))
	if loc := location(); !strings.Contains(loc, "severity=HIGH") {
		t.Fatalf("filter not in the URL (no permalink): %s", loc)
	}
	if !eval(`[...document.querySelectorAll("table.events tbody .badge")].every(b => b.textContent === "HIGH")`) || rowCount() != 50 {
		t.Fatalf("filtered page: %d rows, not all HIGH", rowCount())
	}
	shot("03-events-filtered")

	// Paging: the next page continues where the first ended.
	firstPage, err := chromedp.Run(bctx, chromedp.Evaluate[[]string](`[...document.querySelectorAll("table.events tbody tr td:first-child a")].map(a => a.href)`))
	must("first page links", err)
	navigate("next page", chromedp.Click(chromedp.CSS(`a[rel=next]`)))
	if loc := location(); !strings.Contains(loc, "cursor=") || !strings.Contains(loc, "severity=HIGH") {
		t.Fatalf("next page URL %s", loc)
	}
	second, err := chromedp.Run(bctx, chromedp.Evaluate[[]string](`[...document.querySelectorAll("table.events tbody tr td:first-child a")].map(a => a.href)`))
	must("second page links", err)
	if len(firstPage)+len(second) != high {
		t.Fatalf("pages hold %d + %d HIGH events, want %d", len(firstPage), len(second), high)
	}
	for _, l := range second {
		for _, f := range firstPage {
			if l == f {
				t.Fatalf("event %s on both pages", l)
			}
		}
	}
	shot("04-events-page2")

	// Event detail.
	navigate("open an event", chromedp.Click(chromedp.CSS(`table.events tbody tr:first-child td:first-child a`)))
	if h := text("h1"); !strings.HasPrefix(h, "Event ") {
		t.Fatalf("event page heading %q", h)
	}
	detail := text("main")
	for _, want := range []string{"Place in the chain", "Position (seq)", "Hash (HMAC)", "MAC verifies with key", "HIGH", `"route": "patients"`} {
		if !strings.Contains(detail, want) {
			t.Errorf("event page lacks %q", want)
		}
	}
	shot("05-event")

	// A user's activity, from the event's user link.
	navigate("open the user", chromedp.Click(chromedp.CSS(`dl.fields a[href^="/console/users/"]`)))
	if h := text("h1"); !strings.HasPrefix(h, "Activity of dr.") {
		t.Fatalf("user page heading %q", h)
	}
	shot("06-user")

	// Security events with counts per hour.
	navigate("security page", chromedp.Navigate(base+"/console/security"))
	if !eval(`document.querySelectorAll("table.hourly tbody tr").length >= 9`) {
		t.Error("the security page has fewer than 9 hours of counts for 10 hours of events")
	}
	shot("07-security")

	// Export the HIGH filter as CSV: a real download.
	must("allow downloads", func() error {
		_, err := chromedp.CallBrowser(bctx, browser.SetDownloadBehavior, browser.SetDownloadBehaviorParams{
			Behavior: browser.SetDownloadBehaviorBehaviorAllowAndName, DownloadPath: downloads, EventsEnabled: new(true)})
		return err
	}())
	navigate("filtered events", chromedp.Navigate(base+"/console/events?severity=HIGH"))
	progress := chromedp.BrowserEvents(bctx, browser.DownloadProgress)
	do("download", chromedp.Click(chromedp.CSS(`form.export button[type=submit]`)))
	var file string
	for ev, err := range progress {
		must("download progress", err)
		if ev.State == browser.DownloadProgressStateCanceled {
			t.Fatal("the export download was cancelled (the stream was cut)")
		}
		if ev.State == browser.DownloadProgressStateCompleted {
			file = filepath.Join(downloads, ev.GUID)
			break
		}
	}
	f, err := os.Open(file)
	must("open the download", err)
	rows, err := csv.NewReader(f).ReadAll()
	f.Close()
	must("read the CSV", err)
	if len(rows) != high+1 || rows[0][0] != "id" {
		t.Fatalf("exported %d CSV rows, want a header and %d", len(rows), high)
	}

	// Integrity: verify the intact trail, then tamper and verify again.
	navigate("integrity page", chromedp.Navigate(base+"/console/integrity"))
	shot("08-integrity")
	navigate("verify now", chromedp.Click(chromedp.CSS(`form[action="/console/integrity/verify"] button[type=submit]`)))
	if res := text("#verify-result"); !strings.Contains(res, "Intact:") {
		t.Fatalf("verify on the intact trail: %s", res)
	}
	shot("09-verify-intact")
	pool, err := pgxpool.New(t.Context(), dbURL)
	must("connect", err)
	defer pool.Close()
	var tamperedID int64
	must("tamper", pool.QueryRow(t.Context(),
		`UPDATE audit_logs SET user_id = 'mallory' WHERE chain_id LIKE 'seed/%' AND seq = 17 RETURNING id`).Scan(&tamperedID))
	navigate("verify again", chromedp.Click(chromedp.CSS(`form[action="/console/integrity/verify"] button[type=submit]`)))
	res := text("#verify-result")
	if !strings.Contains(res, "TAMPERED") || !strings.Contains(res, "MAC does not verify") ||
		!strings.Contains(text("#verify-result dl"), "17") || !eval(fmt.Sprintf(`!!document.querySelector('#verify-result a[href="/console/events/%d"]')`, tamperedID)) {
		t.Fatalf("verify on the tampered trail does not show the break at seq 17 (id %d): %s", tamperedID, res)
	}
	shot("10-verify-tampered")

	// Phone width: nothing wider than the screen.
	do("phone", chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile))
	navigate("events on a phone", chromedp.Navigate(base+"/console/events"))
	if !eval(`document.documentElement.scrollWidth <= window.innerWidth + 1`) {
		t.Error("the events page is wider than a 390 px phone screen")
	}
	shot("11-events-phone")
	do("desktop", chromedp.EmulateViewport(1280, 800))

	// Sign out: the session ends, the console asks to sign in again.
	navigate("events", chromedp.Navigate(base+"/console/events"))
	navigate("sign out", chromedp.Click(chromedp.CSS(`form.signout button[type=submit]`)))
	if loc := location(); !strings.HasSuffix(loc, "/console/signin?signed_out=1") || !strings.Contains(text("main"), "You are signed out") {
		t.Fatalf("after sign-out: %s", loc)
	}
	shot("12-signed-out")
	navigate("events after sign-out", chromedp.Navigate(base+"/console/events"))
	if loc := location(); !strings.HasPrefix(loc, base+"/console/signin") {
		t.Fatalf("after sign-out the events page opened: %s", loc)
	}

	// Every page view was recorded in the trail by the token's actor.
	var views int
	must("count page views", pool.QueryRow(t.Context(),
		`SELECT count(*) FROM audit_logs WHERE user_id = 'admin:env-token' AND metadata->>'endpoint' LIKE 'console_%'`).Scan(&views))
	if views < 12 {
		t.Errorf("%d console accesses recorded, want at least the 12 made", views)
	}

	mu.Lock()
	if len(cspViolations) != 0 || len(scriptErrors) != 0 {
		t.Errorf("the browser reported %d CSP violations %q and %d script errors %q", len(cspViolations), cspViolations, len(scriptErrors), scriptErrors)
	}
	mu.Unlock()

	// The collector works: a blocked image is seen in the browser's console
	// and reported to /v1/csp-reports, so zero above means zero.
	navigate("sign-in page", chromedp.Navigate(base+"/console/signin"))
	do("violate the CSP", chromedp.Evaluate[chromedp.Void](`document.body.appendChild(Object.assign(document.createElement("img"), {src: "http://127.0.0.1:9/x.png"}))`))
	servertest.WaitFor(t, 20*time.Second, func() error {
		mu.Lock()
		n := len(cspViolations)
		mu.Unlock()
		var reported int
		must("count CSP reports", pool.QueryRow(t.Context(), `SELECT count(*) FROM audit_logs WHERE action = 'CSP_VIOLATION'`).Scan(&reported))
		if n != 1 || reported != 1 {
			return fmt.Errorf("a deliberate CSP violation: %d seen in the console, %d reported to /v1/csp-reports; want 1 and 1", n, reported)
		}
		return nil
	})
	t.Logf("screenshots in %s", shots)
}
