package auditsink

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The two stores (PGStore for PostgreSQL, SQLiteStore for the embedded
// default) keep the same trail: same columns, same chain, same queries. This
// file holds what they share: the interfaces the writer and the verifier
// consume and the SQL for the admin filters.

// BatchStore is what the Writer writes through; *PGStore and *SQLiteStore
// implement it (its method is unexported: only this package's stores can).
// A caller holding a store behind its own interface can embed BatchStore in
// that interface. writeBatch stores recs atomically (all or none). A batch
// whose (chain_id, seq) rows are already stored — a spool replay after a
// commit whose acknowledgement was lost — is not stored again: writeBatch
// then returns duplicate = true and no error.
type BatchStore interface {
	writeBatch(ctx context.Context, recs []Record) (duplicate bool, err error)
}

// errChainConflict: a batch collides with stored rows of the same
// (chain_id, seq) that are not the same rows, so it is not a replay. Two
// writers claimed one chain id; the batch must not be taken as stored.
var errChainConflict = errors.New("audit batch collides with different stored rows of the same chain and seq")

// sameBatchSQL reads back the hashes of a batch's first and last rows.
func sameBatchSQL(d dialect, r []Record) (string, []any) {
	q := &query{d: d}
	q.conds = append(q.conds, "chain_id = "+q.arg(r[0].ChainID), "seq IN ("+q.arg(r[0].Seq)+", "+q.arg(r[len(r)-1].Seq)+")")
	return "SELECT seq, hash FROM audit_logs" + q.where(), q.args
}

// sameBatch reports whether the stored (seq, hash) pairs are exactly the
// first and last rows of recs.
func sameBatch(recs []Record, stored map[int64][]byte) bool {
	first, last := recs[0], recs[len(recs)-1]
	return bytes.Equal(stored[first.Seq], first.Hash) && bytes.Equal(stored[last.Seq], last.Hash)
}

// batchStore is the name the package's tests use.
type batchStore = BatchStore

// chainReader is what Verify reads through; both stores implement it.
type chainReader interface {
	// chainRanges returns, per chain, the lowest and highest seq of the rows
	// with created_at in [from, to) (zero: unbounded), ordered by chain id.
	chainRanges(ctx context.Context, from, to time.Time) ([]chainRange, error)
	// scanChain calls fn for the rows of chain with seq in (after, last], in
	// seq order, streaming (keyset pages).
	scanChain(ctx context.Context, chain string, after, last int64, fn func(*Record) error) error
	// checkpoints returns the chain runs recorded before partitions were dropped.
	checkpoints(ctx context.Context) ([]Checkpoint, error)
}

// chainRange is the span of one chain inside a time window.
type chainRange struct {
	ChainID           string
	FirstSeq, LastSeq int64
}

// Checkpoint is one run of consecutive rows of a chain (first..last seq)
// that retention dropped, recorded just before the drop.
type Checkpoint struct {
	ChainID       string
	FirstSeq      int64
	LastSeq       int64
	FirstPrevHash []byte
	LastHash      []byte
	Rows          int64
	Partition     string
}

// scanPageSize is how many rows one keyset page of Scan and scanChains reads.
const scanPageSize = 1000

// recordColumns is the column list every query reads and writes, in the
// order scanRecord expects (id first on reads).
var recordColumns = []string{
	"created_at", "action", "severity", "entity_type", "entity_id", "user_id", "ip_address", "user_agent",
	"method", "path", "status", "request_id", "origin", "tenant", "metadata", "old_values", "new_values",
	"chain_id", "seq", "prev_hash", "hash",
}

var selectColumns = "id, " + strings.Join(recordColumns, ", ")

// dialect is the little that differs between the two SQL dialects here.
type dialect struct {
	placeholder func(n int) string // n from 1
	timeArg     func(time.Time) any
}

var (
	pgDialect     = dialect{placeholder: func(n int) string { return "$" + strconv.Itoa(n) }, timeArg: func(t time.Time) any { return t.UTC() }}
	sqliteDialect = dialect{placeholder: func(int) string { return "?" }, timeArg: func(t time.Time) any { return t.UTC().UnixMicro() }}
)

// query accumulates a WHERE clause and its arguments.
type query struct {
	d     dialect
	conds []string
	args  []any
}

func (q *query) arg(v any) string {
	q.args = append(q.args, v)
	return q.d.placeholder(len(q.args))
}

func (q *query) where() string {
	if len(q.conds) == 0 {
		return ""
	}
	return " WHERE " + strings.Join(q.conds, " AND ")
}

// filter adds the conditions of f.
func (q *query) filter(f Filter) {
	if !f.From.IsZero() {
		q.conds = append(q.conds, "created_at >= "+q.arg(q.d.timeArg(f.From)))
	}
	if !f.To.IsZero() {
		q.conds = append(q.conds, "created_at < "+q.arg(q.d.timeArg(f.To)))
	}
	if len(f.Actions) > 0 {
		ph := make([]string, len(f.Actions))
		for i, a := range f.Actions {
			ph[i] = q.arg(a)
		}
		q.conds = append(q.conds, "action IN ("+strings.Join(ph, ", ")+")")
	}
	eq := func(col, v string) {
		if v != "" {
			q.conds = append(q.conds, col+" = "+q.arg(v))
		}
	}
	eq("severity", f.Severity)
	eq("user_id", f.UserID)
	eq("entity_type", f.EntityType)
	eq("entity_id", f.EntityID)
	eq("tenant", f.Tenant)
	if f.Status != 0 {
		q.conds = append(q.conds, "status = "+q.arg(f.Status))
	}
}

// listSQL is the keyset page newest first: rows strictly before cur.
func listSQL(d dialect, f Filter, cur Cursor, limit int) (string, []any) {
	q := &query{d: d}
	q.filter(f)
	if !cur.CreatedAt.IsZero() || cur.ID != 0 {
		q.conds = append(q.conds, "(created_at, id) < ("+q.arg(d.timeArg(cur.CreatedAt))+", "+q.arg(cur.ID)+")")
	}
	return "SELECT " + selectColumns + " FROM audit_logs" + q.where() +
		" ORDER BY created_at DESC, id DESC LIMIT " + strconv.Itoa(limit+1), q.args
}

// scanSQL is one ascending keyset page after cur (zero cur: from the start).
func scanSQL(d dialect, f Filter, cur Cursor, started bool) (string, []any) {
	q := &query{d: d}
	q.filter(f)
	if started {
		q.conds = append(q.conds, "(created_at, id) > ("+q.arg(d.timeArg(cur.CreatedAt))+", "+q.arg(cur.ID)+")")
	}
	return "SELECT " + selectColumns + " FROM audit_logs" + q.where() +
		" ORDER BY created_at, id LIMIT " + strconv.Itoa(scanPageSize), q.args
}

// chainRangesSQL is the per-chain seq span of a time window.
func chainRangesSQL(d dialect, from, to time.Time) (string, []any) {
	q := &query{d: d}
	q.filter(Filter{From: from, To: to})
	return "SELECT chain_id, min(seq), max(seq) FROM audit_logs" + q.where() + " GROUP BY chain_id ORDER BY chain_id", q.args
}

// chainPageSQL is one seq-ordered page of a chain after seq after.
func chainPageSQL(d dialect, chain string, after, last int64) (string, []any) {
	q := &query{d: d}
	q.conds = append(q.conds, "chain_id = "+q.arg(chain), "seq > "+q.arg(after), "seq <= "+q.arg(last))
	return "SELECT " + selectColumns + " FROM audit_logs" + q.where() + " ORDER BY seq LIMIT " + strconv.Itoa(scanPageSize), q.args
}

// clampLimit keeps a page size sane.
func clampLimit(limit int) int {
	switch {
	case limit <= 0:
		return 100
	case limit > 10000:
		return 10000
	}
	return limit
}

// pageResult trims the look-ahead row of a list page and returns the cursor.
func pageResult(recs []Record, limit int) ([]Record, Cursor) {
	if len(recs) <= limit {
		return recs, Cursor{}
	}
	recs = recs[:limit]
	last := recs[len(recs)-1]
	return recs, Cursor{CreatedAt: last.CreatedAt, ID: last.ID}
}

// nullString maps "" to SQL NULL.
func nullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// monthStart is the first instant of t's month, UTC.
func monthStart(t time.Time) time.Time {
	t = t.UTC()
	return time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
}

// partitionName is the monthly partition holding t: audit_logs_pYYYYMM.
func partitionName(t time.Time) string {
	return "audit_logs_p" + monthStart(t).Format("200601")
}

// partitionMonth parses a partition name back to its month.
func partitionMonth(name string) (time.Time, bool) {
	s, ok := strings.CutPrefix(name, "audit_logs_p")
	if !ok || len(s) != 6 {
		return time.Time{}, false
	}
	t, err := time.Parse("200601", s)
	return t, err == nil
}

// pruneCutoff is the start of the oldest month that is kept: every month
// that ends at or before now-retention is dropped whole.
func pruneCutoff(now time.Time, retention time.Duration) time.Time {
	return monthStart(now.Add(-retention))
}

// rowQuerier runs a SELECT of audit rows in one store's SQL dialect, calling
// fn for each row when fn is set, else collecting them.
type rowQuerier interface {
	query(ctx context.Context, sql string, args []any, fn func(*Record) error) ([]Record, error)
}

// listRecords is List for either store: one keyset page, newest first.
func listRecords(ctx context.Context, q rowQuerier, d dialect, f Filter, cur Cursor, limit int) ([]Record, Cursor, error) {
	limit = clampLimit(limit)
	sql, args := listSQL(d, f, cur, limit)
	recs, err := q.query(ctx, sql, args, nil)
	if err != nil {
		return nil, Cursor{}, fmt.Errorf("listing audit rows: %w", err)
	}
	recs, next := pageResult(recs, limit)
	return recs, next, nil
}

// scanRecords is Scan for either store: ascending keyset pages of
// scanPageSize rows, so memory stays bounded by one page.
func scanRecords(ctx context.Context, q rowQuerier, d dialect, f Filter, fn func(*Record) error) error {
	var cur Cursor
	started := false
	for {
		sql, args := scanSQL(d, f, cur, started)
		n := 0
		_, err := q.query(ctx, sql, args, func(r *Record) error {
			n++
			cur = Cursor{CreatedAt: r.CreatedAt, ID: r.ID}
			return fn(r)
		})
		if err != nil {
			return fmt.Errorf("scanning audit rows: %w", err)
		}
		if n < scanPageSize {
			return nil
		}
		started = true
	}
}

// scanChainRecords is scanChain for either store: the rows of one chain with
// after < seq <= last, in seq order, a page at a time.
func scanChainRecords(ctx context.Context, q rowQuerier, d dialect, chain string, after, last int64, fn func(*Record) error) error {
	for after < last {
		sql, args := chainPageSQL(d, chain, after, last)
		n := 0
		_, err := q.query(ctx, sql, args, func(r *Record) error {
			n++
			after = r.Seq
			return fn(r)
		})
		if err != nil {
			return fmt.Errorf("reading audit chain %q: %w", chain, err)
		}
		if n < scanPageSize {
			return nil
		}
	}
	return nil
}
