package auditsink

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshguard/meshguard/internal/clientaddr"
)

const oneReport = `{"csp-report":{"effective-directive":"img-src","document-uri":"https://app.example.com/p"}}`

// batch is a Reporting API body of n CSP violations.
func batch(n int) string {
	var b strings.Builder
	b.WriteByte('[')
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"type":"csp-violation","url":"https://app.example.com/%d","body":{"effectiveDirective":"script-src","blockedURL":"inline"}}`, i)
	}
	b.WriteByte(']')
	return b.String()
}

type cspPost struct {
	status     int
	retryAfter string
}

// postCSP sends one request as Envoy forwards it: clientIP in
// x-meshguard-client-ip ("" for a direct caller).
func postCSP(t testing.TB, url, ctype, body, clientIP string) cspPost {
	t.Helper()
	req, err := http.NewRequestWithContext(context.Background(), http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if clientIP != "" {
		req.Header.Set(clientaddr.ShippedHeader, clientIP)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return cspPost{resp.StatusCode, resp.Header.Get("Retry-After")}
}

func storedFrom(sink *collectSink, ip string) int {
	n := 0
	for _, r := range sink.records() {
		if r.IPAddress == ip {
			n++
		}
	}
	return n
}

// TestCSPReportClientBudget: a client's budget is counted in reports (a
// batch of 100 spends 100), refills at per_client_rate, and is shared by
// its whole IPv6 /64 and by both spellings of an IPv4 address; other
// clients have their own.
func TestCSPReportClientBudget(t *testing.T) {
	sink := &collectSink{}
	s, clk, url := startCSP(t, sink) // 2 reports/s, burst 100
	const lr, rj = "application/csp-report", "application/reports+json"

	if r := postCSP(t, url, rj, batch(100), "203.0.113.5"); r.status != 204 {
		t.Fatalf("a full batch within the burst: %d", r.status)
	}
	if r := postCSP(t, url, lr, oneReport, "203.0.113.5"); r.status != 429 || r.retryAfter != "1" {
		t.Fatalf("the 101st report: %d Retry-After %q, want 429 and 1 (one report refills in 0.5 s)", r.status, r.retryAfter)
	}
	if r := postCSP(t, url, rj, batch(7), "::ffff:203.0.113.5"); r.status != 429 || r.retryAfter != "4" {
		t.Fatalf("7 more as IPv4-mapped: %d Retry-After %q, want 429 and 4 (3.5 s for 7 reports)", r.status, r.retryAfter)
	}
	if r := postCSP(t, url, lr, oneReport, "203.0.113.6"); r.status != 204 {
		t.Fatalf("another client: %d", r.status)
	}
	clk.add(500 * time.Millisecond)
	if r := postCSP(t, url, lr, oneReport, "203.0.113.5"); r.status != 204 {
		t.Fatalf("after 0.5 s, one report: %d", r.status)
	}
	if r := postCSP(t, url, lr, oneReport, "203.0.113.5"); r.status != 429 {
		t.Fatalf("the refill is spent: %d", r.status)
	}

	// IPv6: one /64 is one client, the next /64 another.
	if r := postCSP(t, url, rj, batch(100), "2001:db8:5:1::1"); r.status != 204 {
		t.Fatalf("IPv6 batch: %d", r.status)
	}
	if r := postCSP(t, url, lr, oneReport, "2001:db8:5:1:ffff::9"); r.status != 429 {
		t.Fatalf("another address of the same /64: %d, want 429", r.status)
	}
	if r := postCSP(t, url, lr, oneReport, "2001:db8:5:2::1"); r.status != 204 {
		t.Fatalf("the next /64: %d", r.status)
	}

	if got, want := len(sink.records()), 100+1+1+100+1; got != want {
		t.Errorf("stored %d rows, want %d", got, want)
	}
	if got := storedFrom(sink, "203.0.113.5"); got != 101 {
		t.Errorf("rows from 203.0.113.5: %d, want 101", got)
	}
	for _, c := range []struct {
		outcome string
		want    float64
	}{{"rate_limited", 4}, {"stored", 203}} {
		if got := metricValue(s.m.csp.WithLabelValues(c.outcome)); got != c.want {
			t.Errorf("outcome %s = %v, want %v", c.outcome, got, c.want)
		}
	}
	if got := metricValue(s.m.cspDroppedClient); got != 1+7+1+1 {
		t.Errorf("dropped{rate_limited} = %v reports, want 10", got)
	}
}

// TestCSPReportGarbageSpendsNothing: requests refused by validation (405,
// 415, 413, 400) are counted and spend no budget, the client's or the
// trail's, even from the same address.
func TestCSPReportGarbageSpendsNothing(t *testing.T) {
	sink := &collectSink{}
	s, _, url := startCSP(t, sink)
	const ip = "198.51.100.9"
	huge := `{"csp-report":{"effective-directive":"img-src","script-sample":"` + strings.Repeat("a", maxCSPBody) + `"}}`
	for range 50 {
		for _, g := range []struct {
			ctype, body string
			status      int
		}{
			{"application/json", oneReport, 415},
			{"", oneReport, 415},
			{"application/csp-report", `{"csp-report":`, 400},
			{"application/reports+json", "[" + strings.Repeat(`{"type":"x"},`, maxCSPReports) + `{"type":"x"}]`, 400},
			{"application/reports+json", `[{"type":"csp-violation"}]`, 400},
			{"application/csp-report", huge, 413},
		} {
			if r := postCSP(t, url, g.ctype, g.body, ip); r.status != g.status {
				t.Fatalf("garbage %q: %d, want %d", g.body[:min(len(g.body), 30)], r.status, g.status)
			}
		}
		req := httptest.NewRequest(http.MethodGet, "/v1/csp-reports", nil)
		req.Header.Set(clientaddr.ShippedHeader, ip)
		s.CSPReportHandler().ServeHTTP(httptest.NewRecorder(), req)
	}
	if r := postCSP(t, url, "application/reports+json", batch(100), ip); r.status != 204 {
		t.Fatalf("a full batch after 350 garbage requests from the same address: %d", r.status)
	}
	for outcome, want := range map[string]float64{"unsupported_media_type": 100, "malformed": 150, "too_large": 50, "method_not_allowed": 50, "stored": 100, "rate_limited": 0} {
		if got := metricValue(s.m.csp.WithLabelValues(outcome)); got != want {
			t.Errorf("outcome %s = %v, want %v", outcome, got, want)
		}
	}
}

// TestCSPReportTrailCap: past max_rows_burst the trail refuses reports with
// 429 whoever sends them, and a client refused there keeps its own budget.
func TestCSPReportTrailCap(t *testing.T) {
	sink := &collectSink{}
	cfg := DefaultCSPReportsConfig()
	cfg.MaxRowsPerSecond, cfg.MaxRowsBurst = 100, 250
	s, clk, url := startCSPConfig(t, cfg, sink)
	const rj = "application/reports+json"
	for _, ip := range []string{"192.0.2.1", "192.0.2.2"} {
		if r := postCSP(t, url, rj, batch(100), ip); r.status != 204 {
			t.Fatalf("%s: %d", ip, r.status)
		}
	}
	if r := postCSP(t, url, rj, batch(60), "192.0.2.3"); r.status != 429 || r.retryAfter != "1" {
		t.Fatalf("60 reports with 50 rows left: %d Retry-After %q, want 429, 1", r.status, r.retryAfter)
	}
	if r := postCSP(t, url, rj, batch(50), "192.0.2.4"); r.status != 204 {
		t.Fatalf("the last 50 rows: %d", r.status)
	}
	if r := postCSP(t, url, "application/csp-report", oneReport, "192.0.2.5"); r.status != 429 {
		t.Fatalf("an empty trail budget: %d", r.status)
	}
	// One second later 100 rows are back; 192.0.2.3 gets all of them,
	// which it could not had its refused 60 been spent.
	clk.add(time.Second)
	if r := postCSP(t, url, rj, batch(100), "192.0.2.3"); r.status != 204 {
		t.Fatalf("after the refill, the refused client's full batch: %d", r.status)
	}
	if got := len(sink.records()); got != 350 {
		t.Errorf("stored %d rows, want 350 (burst 250 + 1 s at 100/s)", got)
	}
	if got := metricValue(s.m.csp.WithLabelValues("trail_capped")); got != 2 {
		t.Errorf("trail_capped = %v requests, want 2", got)
	}
	if got := metricValue(s.m.cspDroppedTrail); got != 61 {
		t.Errorf("dropped{trail_capped} = %v reports, want 61", got)
	}
}

// TestCSPReportSinkRefusalRefunds: reports the writer refused were not
// stored, so they spend nobody's budget.
func TestCSPReportSinkRefusalRefunds(t *testing.T) {
	sink := &collectSink{err: fmt.Errorf("spool full")}
	_, _, url := startCSP(t, sink)
	for range 3 {
		if r := postCSP(t, url, "application/reports+json", batch(100), "192.0.2.8"); r.status != 503 {
			t.Fatalf("writer refuses: %d, want 503", r.status)
		}
	}
	sink.setErr(nil)
	if r := postCSP(t, url, "application/reports+json", batch(100), "192.0.2.8"); r.status != 204 {
		t.Fatalf("after the writer recovers: %d, want the full batch stored", r.status)
	}
}

// TestCSPReportClientAddress: the address comes from the configured header
// when it holds exactly one address; otherwise (absent, repeated, not an
// address, or no header configured) from the connection's peer.
func TestCSPReportClientAddress(t *testing.T) {
	for _, tc := range []struct {
		name, header string
		values       []string
		want         string
	}{
		{"via Envoy", clientaddr.ShippedHeader, []string{"203.0.113.77"}, "203.0.113.77"},
		{"IPv6 with a zone", clientaddr.ShippedHeader, []string{"2001:db8::7%eth0"}, "2001:db8::7"},
		{"direct caller", clientaddr.ShippedHeader, nil, "192.0.2.200"},
		{"two values", clientaddr.ShippedHeader, []string{"203.0.113.1", "203.0.113.2"}, "192.0.2.200"},
		{"not an address", clientaddr.ShippedHeader, []string{"203.0.113.1:80"}, "192.0.2.200"},
		{"no header configured", "", []string{"203.0.113.77"}, "192.0.2.200"},
		{"another header", "X-Real-Client", []string{"203.0.113.78"}, "203.0.113.78"},
		{"configured in lower case", "x-real-client", []string{"203.0.113.79"}, "203.0.113.79"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.CSPReports.ClientIPHeader = tc.header
			sink := &collectSink{}
			s, _ := newTestServer(t, cfg, sink)
			req := httptest.NewRequest(http.MethodPost, "/v1/csp-reports", strings.NewReader(oneReport))
			req.RemoteAddr = "192.0.2.200:50000"
			req.Header.Set("Content-Type", "application/csp-report")
			h := tc.header
			if h == "" {
				h = clientaddr.ShippedHeader
			}
			for _, v := range tc.values {
				req.Header.Add(h, v)
			}
			rec := httptest.NewRecorder()
			s.CSPReportHandler().ServeHTTP(rec, req)
			if rec.Code != 204 {
				t.Fatalf("status %d", rec.Code)
			}
			if got := sink.records()[0].IPAddress; got != tc.want {
				t.Errorf("row's address %q, want %q", got, tc.want)
			}
		})
	}
}

// TestCSPReportFloodSparesOthers runs the handler as served on a real HTTP
// server: one client floods it from many addresses of its /64 (and its
// IPv4 address in both spellings) with garbage of every kind and with
// full valid batches, from several connections at once, while another
// client sends a few reports. Every one of the other client's reports is
// stored, and the flooder stores no more than its burst.
func TestCSPReportFloodSparesOthers(t *testing.T) {
	sink := &collectSink{}
	s, _, url := startCSP(t, sink) // the clock stands still: no refill
	const lr, rj = "application/csp-report", "application/reports+json"
	flood := []struct{ ctype, body string }{
		{rj, batch(100)},
		{"text/plain", oneReport},
		{lr, `{"csp-report":{}}`},
		{rj, `[` + strings.Repeat(`{"type":"x"},`, 200) + `{}]`},
		{lr, strings.Repeat(" ", maxCSPBody+1)},
		{rj, batch(1)},
	}
	var sent atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				ip := fmt.Sprintf("2001:db8:bad:1:%x::%x", w, i)
				if i%3 == 0 {
					ip = "203.0.113.66"
				} else if i%3 == 1 {
					ip = "::ffff:203.0.113.66"
				}
				f := flood[(w+i)%len(flood)]
				if r := postCSP(t, url, f.ctype, f.body, ip); r.status == 204 && f.body != batch(100) && f.body != batch(1) {
					t.Errorf("garbage accepted: %q", f.body[:20])
				}
				sent.Add(1)
			}
		})
	}
	deadline := time.Now().Add(30 * time.Second)
	for sent.Load() < 300 {
		if time.Now().After(deadline) {
			t.Fatal("the flood did not get going")
		}
		runtime.Gosched()
	}
	var victim []int
	for range 20 {
		victim = append(victim, postCSP(t, url, lr, oneReport, "198.51.100.7").status)
	}
	for range 2 {
		victim = append(victim, postCSP(t, url, rj, batch(10), "2001:db8:600d:1::7").status)
	}
	before := sent.Load()
	for sent.Load() < before+300 && time.Now().Before(deadline) { // the flood outlasts the victim
		runtime.Gosched()
	}
	close(stop)
	wg.Wait()
	for i, st := range victim {
		if st != 204 {
			t.Errorf("the other client's request %d: %d, want 204", i, st)
		}
	}
	if got := storedFrom(sink, "198.51.100.7"); got != 20 {
		t.Errorf("stored %d of the other client's 20 IPv4 reports", got)
	}
	if got := storedFrom(sink, "2001:db8:600d:1::7"); got != 20 {
		t.Errorf("stored %d of the other client's 20 IPv6 reports", got)
	}
	flooder := 0
	for _, r := range sink.records() {
		if r.IPAddress == "203.0.113.66" || strings.HasPrefix(r.IPAddress, "2001:db8:bad:1:") {
			flooder++
		}
	}
	// Two clients (the IPv4 address and the /64), each at most its burst.
	if flooder > 200 {
		t.Errorf("the flooder stored %d rows from %d requests, want at most its two bursts (200)", flooder, sent.Load())
	}
	if metricValue(s.m.cspRateLimited) == 0 || metricValue(s.m.cspMalformed) == 0 || metricValue(s.m.cspTooLarge) == 0 || metricValue(s.m.cspMediaType) == 0 {
		t.Error("the flood's refusals were not all counted")
	}
	t.Logf("flood: %d requests, %d rows stored for the flooder", sent.Load(), flooder)
}

// TestCSPClientTableBounded: reports from 100,000 distinct clients (IPv4
// addresses and IPv6 /64s) leave the per-client table at max_clients, its
// slots never reallocated, and the heap where 10,000 clients left it.
func TestCSPClientTableBounded(t *testing.T) {
	cfg := DefaultConfig()
	cfg.CSPReports.MaxClients = 1024
	s, _ := newTestServer(t, cfg, &discardSink{})
	h := s.CSPReportHandler()
	body := []byte(oneReport)
	send := func(from, to int) {
		for i := from; i < to; i++ {
			var ip string
			if i%2 == 0 {
				ip = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String()
			} else {
				ip = fmt.Sprintf("2001:db8:%x:%x::1", i>>16, i&0xffff)
			}
			req := httptest.NewRequest(http.MethodPost, "/v1/csp-reports", strings.NewReader(string(body)))
			req.Header.Set("Content-Type", "application/csp-report")
			req.Header.Set(clientaddr.ShippedHeader, ip)
			h.ServeHTTP(httptest.NewRecorder(), req)
		}
	}
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	slots := make([]int, clientShards)
	for i := range s.cspClients.shards {
		slots[i] = cap(s.cspClients.shards[i].ent)
	}
	send(0, 10_000)
	h10k := heap()
	send(10_000, 100_000)
	h100k := heap()

	held, evicted := s.cspClients.stats()
	if held != 1024 || evicted != 100_000-1024 {
		t.Errorf("table holds %d clients, evicted %d; want 1024 and %d", held, evicted, 100_000-1024)
	}
	for i := range s.cspClients.shards {
		sh := &s.cspClients.shards[i]
		if len(sh.idx) > slots[i] || cap(sh.ent) != slots[i] {
			t.Errorf("shard %d: %d in the index, %d slots; want at most %d, not reallocated", i, len(sh.idx), cap(sh.ent), slots[i])
		}
	}
	if grew := int64(h100k) - int64(h10k); grew > 1<<20 {
		t.Errorf("heap grew %d bytes from 10,000 to 100,000 clients, want under 1 MiB", grew)
	}
	t.Logf("heap after 10k clients %d, after 100k %d", h10k, h100k)
}

// TestClientShardLRU: the least recently seen client is the one evicted,
// and a client seen again moves to the front.
func TestClientShardLRU(t *testing.T) {
	tb := newClientTable(clientShards*3, 1, 100) // three slots a shard
	// Four keys of one shard.
	var keys []clientKey
	for i := 0; len(keys) < 4; i++ {
		k := keyOf(netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), 32))
		if tb.shard(&k) == &tb.shards[0] {
			keys = append(keys, k)
		}
	}
	for _, k := range keys[:3] {
		tb.take(k, 0, 100) // each bucket now empty
	}
	tb.take(keys[0], 0, 0) // keys[0] seen again: keys[1] is the oldest
	tb.take(keys[3], 0, 1) // evicts keys[1]
	sh := &tb.shards[0]
	if _, ok := sh.idx[keys[1]]; ok {
		t.Error("the least recently seen client was kept")
	}
	for _, k := range []clientKey{keys[0], keys[2], keys[3]} {
		if _, ok := sh.idx[k]; !ok {
			t.Errorf("client %v evicted", k)
		}
	}
	if ok, _ := tb.take(keys[0], 0, 1); ok {
		t.Error("a kept client's spent budget came back")
	}
	if ok, _ := tb.take(keys[1], 0, 100); !ok {
		t.Error("an evicted client does not start from a full burst")
	}
	// Walk the list both ways: every slot once, consistent links.
	seen := 0
	for i, prev := sh.head, int32(-1); i >= 0; prev, i = i, sh.ent[i].next {
		if sh.ent[i].prev != prev {
			t.Fatalf("slot %d: prev %d, want %d", i, sh.ent[i].prev, prev)
		}
		seen++
	}
	if seen != 3 || sh.ent[sh.tail].next != -1 {
		t.Errorf("list of %d, want 3", seen)
	}
}

func TestCSPReportsConfigValidate(t *testing.T) {
	def := DefaultCSPReportsConfig()
	if err := def.Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*CSPReportsConfig)
		want string
	}{
		{"zero rate", func(c *CSPReportsConfig) { c.PerClientRate = 0 }, "audit.csp_reports.per_client_rate: must be a number of reports per second above 0"},
		{"client above trail", func(c *CSPReportsConfig) { c.PerClientRate = 500 }, "audit.csp_reports.per_client_rate: 500 is above max_rows_per_second (100)"},
		{"negative trail rate", func(c *CSPReportsConfig) { c.MaxRowsPerSecond = -1 }, "audit.csp_reports.max_rows_per_second: must be a number"},
		{"burst below a batch", func(c *CSPReportsConfig) { c.PerClientBurst = 10 }, "audit.csp_reports.per_client_burst: must be at least 100"},
		{"trail burst below a client's", func(c *CSPReportsConfig) { c.MaxRowsBurst = 99 }, "audit.csp_reports.max_rows_burst: must be at least per_client_burst (100)"},
		{"tiny table", func(c *CSPReportsConfig) { c.MaxClients = 1 }, "audit.csp_reports.max_clients: must be between 16 and 1048576, got 1"},
		{"prefix", func(c *CSPReportsConfig) { c.IPv6Prefix = 16 }, "identity.ipv6_prefix: must be between 32 and 128, got 16"},
	} {
		c := def
		tc.mod(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestRetryAfter(t *testing.T) {
	for d, want := range map[time.Duration]int64{0: 1, time.Millisecond: 1, time.Second: 1, 1001 * time.Millisecond: 2, 3500 * time.Millisecond: 4, 24 * time.Hour: 3600} {
		if got := retryAfter(d); got != want {
			t.Errorf("retryAfter(%v) = %d, want %d", d, got, want)
		}
	}
}
