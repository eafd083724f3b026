package pgpool

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

type labelKey struct{}

// WithStatementLabel returns a context under which statements are labelled
// name in the query metrics and the slow-query log, instead of the label
// derived from their SQL. name should be a constant (it is a metric label).
func WithStatementLabel(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, labelKey{}, name)
}

// tracer times every statement (query, exec, batch, COPY) for the metrics
// and the slow-query log, and bounds pool acquires by the acquire timeout.
// It sees SQL text only to derive a label and never looks at arguments.
type tracer struct {
	log            *slog.Logger
	m              *metrics
	slow           time.Duration
	acquireTimeout time.Duration
	now            func() time.Time
	lastOK         atomic.Int64 // Unix nanoseconds of the last successful statement
	labels         labelCache
}

// maxCachedLabels and maxCachedSQL bound the SQL texts whose label is
// remembered (at most 4 MiB of keys); others are labelled per statement.
const (
	maxCachedLabels = 1024
	maxCachedSQL    = 4096
)

// labelCache remembers statementLabel per SQL text, so a fixed set of
// statements costs one map lookup and no allocation.
type labelCache struct {
	m sync.Map // SQL -> label
	n atomic.Int32
}

func (c *labelCache) label(sql string) string {
	if l, ok := c.m.Load(sql); ok {
		return l.(string)
	}
	l := statementLabel(sql)
	if len(sql) <= maxCachedSQL && c.n.Load() < maxCachedLabels {
		if _, loaded := c.m.LoadOrStore(sql, l); !loaded {
			c.n.Add(1)
		}
	}
	return l
}

type traceKey struct{}

type acquireKey struct{}

var (
	_ pgx.QueryTracer       = (*tracer)(nil)
	_ pgx.BatchTracer       = (*tracer)(nil)
	_ pgx.CopyFromTracer    = (*tracer)(nil)
	_ pgxpool.AcquireTracer = (*tracer)(nil)
)

func (t *tracer) start(ctx context.Context, label string) context.Context {
	if l, ok := ctx.Value(labelKey{}).(string); ok && l != "" {
		label = sanitizeLabel(l)
	}
	return &traceCtx{Context: ctx, start: t.now(), label: label}
}

func (t *tracer) end(ctx context.Context, err error) {
	qt, ok := ctx.Value(traceKey{}).(*traceCtx)
	if !ok {
		return
	}
	now := t.now()
	d := now.Sub(qt.start)
	obs, label := t.m.observer(qt.label)
	obs.Observe(d.Seconds())
	if err != nil {
		t.m.errors.WithLabelValues(label, errorCode(err)).Inc()
	} else {
		t.lastOK.Store(now.UnixNano())
	}
	if t.slow > 0 && d >= t.slow {
		t.m.slow.WithLabelValues(label).Inc()
		attrs := []any{"statement", label, "duration", d}
		if err != nil {
			// The code only: a server message can quote argument values.
			attrs = append(attrs, "error_code", errorCode(err))
		}
		t.log.Warn("slow query", attrs...)
	}
}

// traceCtx carries one statement's start and label: a context and its
// trace in one allocation.
type traceCtx struct {
	context.Context
	start time.Time
	label string
}

func (c *traceCtx) Value(key any) any {
	if key == (traceKey{}) {
		return c
	}
	return c.Context.Value(key)
}

// TraceQueryStart implements pgx.QueryTracer.
func (t *tracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	return t.start(ctx, t.labels.label(data.SQL))
}

// TraceQueryEnd implements pgx.QueryTracer.
func (t *tracer) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryEndData) {
	t.end(ctx, data.Err)
}

// TraceBatchStart implements pgx.BatchTracer: a batch is one statement
// labelled "batch" (or the context's label).
func (t *tracer) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	return t.start(ctx, "batch")
}

// TraceBatchQuery implements pgx.BatchTracer.
func (t *tracer) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}

// TraceBatchEnd implements pgx.BatchTracer.
func (t *tracer) TraceBatchEnd(ctx context.Context, _ *pgx.Conn, data pgx.TraceBatchEndData) {
	t.end(ctx, data.Err)
}

// TraceCopyFromStart implements pgx.CopyFromTracer.
func (t *tracer) TraceCopyFromStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceCopyFromStartData) context.Context {
	label := "copy"
	if n := len(data.TableName); n > 0 {
		if tbl := tableLabel(data.TableName[n-1]); tbl != "" {
			label = "copy " + tbl
		}
	}
	return t.start(ctx, label)
}

// TraceCopyFromEnd implements pgx.CopyFromTracer.
func (t *tracer) TraceCopyFromEnd(ctx context.Context, _ *pgx.Conn, data pgx.TraceCopyFromEndData) {
	t.end(ctx, data.Err)
}

// TraceAcquireStart implements pgxpool.AcquireTracer: it bounds the wait for
// a connection by the acquire timeout unless the caller's deadline is sooner.
func (t *tracer) TraceAcquireStart(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireStartData) context.Context {
	if t.acquireTimeout <= 0 {
		return ctx
	}
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) <= t.acquireTimeout {
		return ctx
	}
	ctx, cancel := context.WithTimeout(ctx, t.acquireTimeout)
	return context.WithValue(ctx, acquireKey{}, cancel)
}

// TraceAcquireEnd implements pgxpool.AcquireTracer.
func (t *tracer) TraceAcquireEnd(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireEndData) {
	if cancel, ok := ctx.Value(acquireKey{}).(context.CancelFunc); ok {
		cancel()
	}
}

// errorCode classifies err for the error counter: the SQLSTATE when the
// server answered, else canceled, timeout, connection or other.
func errorCode(err error) string {
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr):
		return pgErr.Code
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err):
		return "timeout"
	}
	var connErr *pgconn.ConnectError
	if errors.As(err, &connErr) || pgconn.SafeToRetry(err) {
		return "connection"
	}
	return "other"
}

// statementLabel names a statement by its leading keyword and, for INSERT,
// UPDATE, DELETE and COPY, its target table (with a trailing _<digits>
// partition suffix removed), e.g. "insert audit_logs", "select". It never
// includes literals or parameters.
func statementLabel(sql string) string {
	s := skipSpaceAndComments(sql)
	verb, s := word(s)
	verb = strings.ToLower(verb)
	var next string
	switch verb {
	case "insert":
		next, s = word(skipSpaceAndComments(s))
		if !strings.EqualFold(next, "into") {
			return "insert"
		}
	case "delete":
		next, s = word(skipSpaceAndComments(s))
		if !strings.EqualFold(next, "from") {
			return "delete"
		}
	case "update", "copy":
	case "select", "with", "begin", "commit", "rollback", "end", "set", "show", "reset", "listen",
		"unlisten", "notify", "create", "alter", "drop", "truncate", "lock", "vacuum", "analyze",
		"explain", "prepare", "execute", "deallocate", "savepoint", "release", "do", "call",
		"values", "refresh", "grant", "revoke", "comment", "discard", "fetch", "close", "declare",
		"move", "table", "merge", "start", "abort", "cluster", "reindex", "checkpoint", "load":
		return verb
	case "":
		return "empty"
	default:
		return "other"
	}
	s = skipSpaceAndComments(s)
	if verb == "update" {
		if w, rest := word(s); strings.EqualFold(w, "only") {
			s = skipSpaceAndComments(rest)
		}
	}
	ident := identifier(s)
	if tbl := tableLabel(ident); tbl != "" {
		return verb + " " + tbl
	}
	return verb
}

// skipSpaceAndComments drops leading white space, -- and /* */ comments.
func skipSpaceAndComments(s string) string {
	for {
		s = strings.TrimLeft(s, " \t\r\n\f(")
		switch {
		case strings.HasPrefix(s, "--"):
			i := strings.IndexByte(s, '\n')
			if i < 0 {
				return ""
			}
			s = s[i+1:]
		case strings.HasPrefix(s, "/*"):
			i := strings.Index(s, "*/")
			if i < 0 {
				return ""
			}
			s = s[i+2:]
		default:
			return s
		}
	}
}

// word splits off a leading run of ASCII letters.
func word(s string) (string, string) {
	i := 0
	for i < len(s) && (s[i]|0x20 >= 'a' && s[i]|0x20 <= 'z') {
		i++
	}
	return s[:i], s[i:]
}

// identifier returns a leading (possibly schema-qualified, possibly quoted)
// identifier, at most 128 bytes.
func identifier(s string) string {
	i := 0
	for i < len(s) && i < 128 {
		c := s[i]
		if c == '_' || c == '.' || c == '"' || c >= '0' && c <= '9' || c|0x20 >= 'a' && c|0x20 <= 'z' {
			i++
			continue
		}
		break
	}
	return s[:i]
}

// tableLabel reduces an identifier to a bounded label: the unqualified name,
// lower-cased, quotes and trailing _<digits> partition suffixes removed,
// only [a-z0-9_], at most 48 bytes. "" when nothing is left.
func tableLabel(ident string) string {
	if i := strings.LastIndexByte(ident, '.'); i >= 0 {
		ident = ident[i+1:]
	}
	var b strings.Builder
	for i := 0; i < len(ident) && b.Len() < 48; i++ {
		c := ident[i]
		switch {
		case c >= 'A' && c <= 'Z':
			b.WriteByte(c + 'a' - 'A')
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '_':
			b.WriteByte(c)
		}
	}
	out := b.String()
	for {
		i := strings.LastIndexByte(out, '_')
		if i <= 0 || i == len(out)-1 || strings.Trim(out[i+1:], "0123456789") != "" {
			break
		}
		out = out[:i]
	}
	return out
}

// sanitizeLabel bounds a caller-supplied label to [a-z0-9_ ] and 48 bytes.
func sanitizeLabel(l string) string {
	var b strings.Builder
	for i := 0; i < len(l) && b.Len() < 48; i++ {
		c := l[i]
		switch {
		case c >= 'A' && c <= 'Z':
			b.WriteByte(c + 'a' - 'A')
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '_', c == ' ', c == '-', c == '.':
			b.WriteByte(c)
		}
	}
	if b.Len() == 0 {
		return "other"
	}
	return b.String()
}
