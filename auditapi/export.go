package auditapi

import (
	"bufio"
	"context"
	"encoding/csv"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/meshguard/meshguard/audittrail"
)

// Export formats.
const (
	FormatCSV   = "csv"
	FormatJSONL = "jsonl"
)

// ExportColumns are the CSV header, in column order.
var ExportColumns = []string{
	"id", "created_at", "action", "severity", "entity_type", "entity_id", "user_id", "ip_address",
	"user_agent", "method", "path", "status", "request_id", "origin", "tenant", "metadata",
	"old_values", "new_values", "chain_id", "seq", "key_id", "prev_hash", "hash",
}

const exportBufSize = 64 << 10

// WriteExport streams every row of reader matching f to w, oldest first, as
// CSV or JSON Lines, and returns how many rows it wrote. It reads through
// Scan, so memory stays bounded whatever the range.
//
// JSON Lines is the lossless format: one audittrail.Record per line (hashes in base64),
// from which the chain can be recomputed. CSV is for people and
// spreadsheets: RFC 4180 (CRLF line ends, quoted fields with "" doubled, a
// header row), times in RFC 3339 UTC, hashes in hex, and every cell that
// starts with = + - @ TAB CR LF NUL or ' gets a leading ' so a spreadsheet
// shows it as text instead of evaluating it (strip one leading ' to get the
// value back). Because RFC 4180 line ends are CRLF, a CR inside a value
// does not survive CSV; use JSON Lines where that matters.
func WriteExport(ctx context.Context, w io.Writer, reader recordReader, f audittrail.Filter, format string) (int64, error) {
	bw := bufio.NewWriterSize(w, exportBufSize)
	var (
		rows   int64
		write  func(*audittrail.Record) error
		finish = func() error { return nil }
	)
	switch format {
	case FormatCSV:
		cw := csv.NewWriter(bw)
		cw.UseCRLF = true
		if err := cw.Write(ExportColumns); err != nil {
			return 0, err
		}
		cells := make([]string, len(ExportColumns))
		var scratch []byte
		write = func(r *audittrail.Record) error {
			csvCells(cells, &scratch, r)
			// cw writes straight into bw (bufio.NewWriter reuses a big
			// enough *bufio.Writer), so Write reports a gone client as soon
			// as bw fails to flush.
			return cw.Write(cells)
		}
		finish = func() error {
			cw.Flush()
			return cw.Error()
		}
	case FormatJSONL:
		enc := json.NewEncoder(bw)
		enc.SetEscapeHTML(false)
		write = func(r *audittrail.Record) error { return enc.Encode(r) }
	default:
		return 0, fmt.Errorf("export format must be csv or jsonl, got %q", format)
	}
	err := reader.Scan(ctx, f, func(r *audittrail.Record) error {
		if err := write(r); err != nil {
			return fmt.Errorf("writing export: %w", err)
		}
		rows++
		return nil
	})
	if err != nil {
		return rows, err
	}
	if err := finish(); err != nil {
		return rows, fmt.Errorf("writing export: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return rows, fmt.Errorf("writing export: %w", err)
	}
	return rows, nil
}

// csvCells fills cells (len(ExportColumns)) from r. The derived texts
// (numbers, time, hex, JSON) are built in scratch and converted to one
// string, so a row costs one allocation plus any neutralised cell.
func csvCells(cells []string, scratch *[]byte, r *audittrail.Record) {
	b := (*scratch)[:0]
	var off [10]int
	mark := func(i int) { off[i] = len(b) }
	b = strconv.AppendInt(b, r.ID, 10)
	mark(0)
	b = r.CreatedAt.UTC().AppendFormat(b, time.RFC3339Nano)
	mark(1)
	if r.Status != 0 {
		b = strconv.AppendInt(b, int64(r.Status), 10)
	}
	mark(2)
	b = append(b, r.Metadata...)
	mark(3)
	b = append(b, r.OldValues...)
	mark(4)
	b = append(b, r.NewValues...)
	mark(5)
	if r.Seq != 0 {
		b = strconv.AppendInt(b, r.Seq, 10)
	}
	mark(6)
	b = hex.AppendEncode(b, r.PrevHash)
	mark(7)
	b = hex.AppendEncode(b, r.Hash)
	mark(8)
	*scratch = b
	all := string(b)
	cells[0] = all[:off[0]]
	cells[1] = all[off[0]:off[1]]
	cells[2] = csvSafe(r.Action)
	cells[3] = csvSafe(r.Severity)
	cells[4] = csvSafe(r.EntityType)
	cells[5] = csvSafe(r.EntityID)
	cells[6] = csvSafe(r.UserID)
	cells[7] = csvSafe(r.IPAddress)
	cells[8] = csvSafe(r.UserAgent)
	cells[9] = csvSafe(r.Method)
	cells[10] = csvSafe(r.Path)
	cells[11] = all[off[1]:off[2]]
	cells[12] = csvSafe(r.RequestID)
	cells[13] = csvSafe(r.Origin)
	cells[14] = csvSafe(r.Tenant)
	cells[15] = csvSafe(all[off[2]:off[3]])
	cells[16] = csvSafe(all[off[3]:off[4]])
	cells[17] = csvSafe(all[off[4]:off[5]])
	cells[18] = csvSafe(r.ChainID)
	cells[19] = all[off[5]:off[6]]
	cells[20] = csvSafe(r.KeyID)
	cells[21] = all[off[6]:off[7]]
	cells[22] = all[off[7]:off[8]]
}

// csvSafe neutralises a cell a spreadsheet would read as a formula (OWASP
// CSV injection; ASVS 5.0 V1.2.10): a leading = + - @ TAB CR LF or NUL gets
// a ' in front. A leading ' is doubled the same way, so stripping exactly one
// leading ' always gives the value back.
func csvSafe(s string) string {
	if s == "" {
		return s
	}
	switch s[0] {
	case '=', '+', '-', '@', '\t', '\r', '\n', 0, '\'':
		return "'" + s
	}
	return s
}

var exportParams = []string{"format", "from", "to", "action", "severity", "user_id", "entity_type", "entity_id", "ip_address", "status", "tenant"}

// serveExport answers GET /v1/audit/export?format=csv|jsonl&from=&to= (and
// the list filters), streamed. The EXPORT record is enqueued before the
// first row is read.
func (a *API) serveExport(w http.ResponseWriter, r *http.Request, p principal) (int, error) {
	q, err := parseQuery(r, exportParams...)
	if err != nil {
		return 0, err
	}
	switch {
	case q.format == "":
		return 0, badParam("format", "required: csv or jsonl")
	case q.filter.From.IsZero():
		return 0, badParam("from", "required: the start of the range, RFC 3339")
	case q.filter.To.IsZero():
		return 0, badParam("to", "required: the end of the range (exclusive), RFC 3339")
	}
	meta := accessMeta{Endpoint: "export", Auth: p.via, Token: p.token, Filter: filterDoc(q.filter), Format: q.format}
	return a.streamExport(w, r, p, q, meta)
}

// streamExport records the export, then streams it (the API's and the
// console's). An error before the first byte is returned for the caller to
// answer; after it, the stream is cut so the client sees a truncated
// transfer, never a complete-looking file.
func (a *API) streamExport(w http.ResponseWriter, r *http.Request, p principal, q apiQuery, meta accessMeta) (int, error) {
	select {
	case a.exports <- struct{}{}:
		defer func() { <-a.exports }()
	default:
		w.Header().Set("Retry-After", "30")
		return 0, &apiError{status: http.StatusTooManyRequests, msg: fmt.Sprintf("%d exports already running; try again later", apiMaxExports)}
	}
	if err := a.record(r, p, apiActionExport, apiExportSeverity, meta); err != nil {
		return 0, err
	}
	lw := &lazyResponse{w: w, rc: http.NewResponseController(w), header: func(h http.Header) {
		h.Set("Content-Type", exportContentType(q.format))
		h.Set("Content-Disposition", fmt.Sprintf(`attachment; filename="%s"`, ExportFilename(q.filter, q.format)))
	}}
	rows, err := WriteExport(r.Context(), lw, a.reader, q.filter, q.format)
	a.m.exportRows.WithLabelValues(q.format).Add(float64(rows))
	if err != nil {
		if !lw.started {
			return 0, fmt.Errorf("exporting: %w", err)
		}
		// The status line is gone; cut the stream so the client sees a
		// truncated transfer, not a complete-looking file.
		if !errors.Is(err, context.Canceled) {
			a.log.Error("audit export aborted", "format", q.format, "rows", rows, "err", err)
		}
		a.m.requests.WithLabelValues(meta.Endpoint, "aborted").Inc()
		panic(http.ErrAbortHandler)
	}
	if !lw.started { // cannot happen: a CSV header or nothing for JSONL
		lw.start()
	}
	return http.StatusOK, nil
}

func exportContentType(format string) string {
	if format == FormatCSV {
		return "text/csv; charset=utf-8; header=present"
	}
	return "application/jsonl; charset=utf-8"
}

// ExportFilename names an export of f: audit-<from>-<to>.<format>, times in
// UTC basic format; an open end is "start" or "now".
func ExportFilename(f audittrail.Filter, format string) string {
	from, to := "start", "now"
	if !f.From.IsZero() {
		from = f.From.UTC().Format("20060102T150405Z")
	}
	if !f.To.IsZero() {
		to = f.To.UTC().Format("20060102T150405Z")
	}
	return "audit-" + from + "-" + to + "." + format
}

// lazyResponse sends the export headers and status with the first bytes,
// so a failure before any row can still be answered with an error status,
// and keeps extending the write deadline while rows flow.
type lazyResponse struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	header  func(http.Header)
	started bool
}

func (l *lazyResponse) start() {
	l.started = true
	l.header(l.w.Header())
	l.w.WriteHeader(http.StatusOK)
}

func (l *lazyResponse) Write(p []byte) (int, error) {
	if !l.started {
		l.start()
	}
	// Best effort: not every ResponseWriter supports deadlines.
	_ = l.rc.SetWriteDeadline(time.Now().Add(apiExportWriteWindow))
	return l.w.Write(p)
}

// CLIExportRecord is the audit row that records an export made from the
// command line (`meshguard audit export`) by user (the OS user): action
// EXPORT, the filter and format in its metadata. The CLI enqueues it before
// it reads the first row, as the API does.
func CLIExportRecord(now time.Time, user string, f audittrail.Filter, format, out string) audittrail.Record {
	meta, _ := json.Marshal(struct {
		Endpoint string         `json:"endpoint"`
		Auth     string         `json:"auth"`
		Filter   map[string]any `json:"filter,omitempty"`
		Format   string         `json:"format"`
		Out      string         `json:"out,omitempty"`
	}{"cli_export", "local", filterDoc(f), format, out})
	return audittrail.Record{
		CreatedAt:  now.UTC(),
		Action:     apiActionExport,
		Severity:   apiExportSeverity,
		EntityType: apiEntityType,
		UserID:     apiTruncate("cli:"+user, apiMaxUserLen),
		Path:       "meshguard audit export",
		Metadata:   meta,
	}
}
