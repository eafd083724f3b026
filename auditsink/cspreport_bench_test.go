package auditsink

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/meshguard/meshguard/internal/clientaddr"
)

// BenchmarkCSPReport is the handler's accept path, as serve mounts it but
// without the network: validation, parsing, both budgets (high enough never
// to refuse), the rows and the enqueue into a sink that discards. ns/report
// and allocs/report divide by the reports in the body. reject is a 415,
// malformed a 400 and too-many-reports a 400 for 64 KiB of empty reports,
// which must cost little, since anyone may send them.
func BenchmarkCSPReport(b *testing.B) {
	for _, bc := range []struct {
		name, ctype, body string
		reports           int
		status            int
	}{
		{"legacy-1", "application/csp-report", legacyBody, 1, 204},
		{"reports+json-10", "application/reports+json", batch(10), 10, 204},
		{"reports+json-100", "application/reports+json", batch(100), 100, 204},
		{"reject-media-type", "text/plain", legacyBody, 1, 415},
		{"malformed", "application/csp-report", `{"csp-report":{"document-uri":"https://a.example/"}}`, 1, 400},
		{"too-many-reports", "application/reports+json", "[" + strings.Repeat("{},", 21844) + "{}]", 1, 400},
	} {
		b.Run(bc.name, func(b *testing.B) {
			cfg := DefaultConfig()
			cfg.CSPReports.PerClientRate, cfg.CSPReports.PerClientBurst = 1e6, 1e6
			cfg.CSPReports.MaxRowsPerSecond, cfg.CSPReports.MaxRowsBurst = 1e6, 1e6
			s, _ := newTestServer(b, cfg, &discardSink{})
			h := s.CSPReportHandler()
			body := strings.NewReader(bc.body)
			req := httptest.NewRequest(http.MethodPost, "/v1/csp-reports", body)
			req.Header.Set("Content-Type", bc.ctype)
			req.Header.Set(clientaddr.ShippedHeader, "2001:db8:1:2::7")
			w := &nopWriter{h: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				body.Reset(bc.body)
				req.Body = io.NopCloser(body)
				clear(w.h)
				h.ServeHTTP(w, req)
				if w.status != bc.status {
					b.Fatalf("status %d", w.status)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*bc.reports), "ns/report")
		})
	}
}

// nopWriter is a ResponseWriter that keeps only the status.
type nopWriter struct {
	h      http.Header
	status int
}

func (w *nopWriter) Header() http.Header         { return w.h }
func (w *nopWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *nopWriter) WriteHeader(code int)        { w.status = code }
