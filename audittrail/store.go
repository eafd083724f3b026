package audittrail

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
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

// chainReader is what Verify reads through; both stores implement it.
type chainReader interface {
	// chainRanges returns, per chain, the lowest and highest seq of the rows
	// with created_at in [from, to) (zero: unbounded), ordered by chain id.
	chainRanges(ctx context.Context, from, to time.Time) ([]chainRange, error)
	// scanChain calls fn for the rows of chain with seq in (after, last], in
	// seq order, streaming (keyset pages).
	scanChain(ctx context.Context, chain string, after, last int64, fn func(*Record) error) error
	// retentionNotes returns the signed notes of the retention checkpoints,
	// with the chain and first seq of their rows.
	retentionNotes(ctx context.Context) ([]storedRetention, error)
}

// chainRange is the span of one chain inside a time window.
type chainRange struct {
	ChainID           string
	FirstSeq, LastSeq int64
}

// storedRetention is a row of audit_chain_checkpoints: the signed note
// and the keys it is stored under.
type storedRetention struct {
	ChainID  string
	FirstSeq int64
	Note     string // empty for a row that carries none
}

// scanPageSize is how many rows one keyset page of Scan and scanChains reads.
const scanPageSize = 1000

// recordColumns is the column list every query reads and writes, in the
// order scanRecord expects (id first on reads).
var recordColumns = []string{
	"created_at", "action", "severity", "entity_type", "entity_id", "user_id", "ip_address", "user_agent",
	"method", "path", "status", "request_id", "origin", "tenant", "metadata", "old_values", "new_values",
	"chain_id", "seq", "key_id", "prev_hash", "hash",
}

var (
	selectColumns = "id, " + strings.Join(recordColumns, ", ")
	insertColumns = append([]string{"id"}, recordColumns...)
)

// dialect is the little that differs between the two SQL dialects here.
type dialect struct {
	placeholder func(n int) string // n from 1
	timeArg     func(time.Time) any
	hourBucket  string // SQL: created_at as whole hours since the Unix epoch
}

var (
	pgDialect = dialect{placeholder: func(n int) string { return "$" + strconv.Itoa(n) }, timeArg: func(t time.Time) any { return t.UTC() },
		hourBucket: "floor(extract(epoch from created_at) / 3600)::bigint"}
	sqliteDialect = dialect{placeholder: func(int) string { return "?" }, timeArg: func(t time.Time) any { return t.UTC().UnixMicro() },
		hourBucket: "created_at / 3600000000"}
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
	eq("ip_address", f.IPAddress)
	if f.ID != 0 {
		q.conds = append(q.conds, "id = "+q.arg(f.ID))
	}
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

// HourCount is how many rows of one group (a severity or an action) fall
// in the hour starting at Hour.
type HourCount struct {
	Hour  time.Time
	Group string
	Count int64
}

// hourlyGroups are the columns HourlyCounts may group by.
var hourlyGroups = []string{"severity", "action"}

// hourlyCountsSQL counts the rows matching f per hour and per value of the
// column by (one of hourlyGroups, checked by the caller).
func hourlyCountsSQL(d dialect, f Filter, by string) (string, []any) {
	q := &query{d: d}
	q.filter(f)
	return "SELECT " + d.hourBucket + " AS h, " + by + ", count(*) FROM audit_logs" + q.where() +
		" GROUP BY h, " + by + " ORDER BY h, " + by, q.args
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

// driver is what differs between the two stores' database handles: how a
// query runs and how an audit row is scanned. Everything else a store does
// is written once, on sqlStore.
type driver interface {
	// query runs a SELECT of audit rows (selectColumns), calling fn for each
	// row when fn is set, else collecting them.
	query(ctx context.Context, sql string, args []any, fn func(*Record) error) ([]Record, error)
	// eachRow runs sql and scans each row into dest, then calls fn.
	eachRow(ctx context.Context, sql string, args []any, dest []any, fn func() error) error
}

// sqlStore is the part of both stores that only differs by dialect.
type sqlStore struct {
	d   dialect
	drv driver

	nosMu    sync.Mutex
	chainNos map[string]int64
}

func newSQLStore(d dialect, drv driver) sqlStore {
	return sqlStore{d: d, drv: drv, chainNos: map[string]int64{}}
}

// List implements recordReader: one keyset page, newest first.
func (s *sqlStore) List(ctx context.Context, f Filter, cur Cursor, limit int) ([]Record, Cursor, error) {
	limit = clampLimit(limit)
	sql, args := listSQL(s.d, f, cur, limit)
	recs, err := s.drv.query(ctx, sql, args, nil)
	if err != nil {
		return nil, Cursor{}, fmt.Errorf("listing audit rows: %w", err)
	}
	recs, next := pageResult(recs, limit)
	return recs, next, nil
}

// Scan implements recordReader: ascending keyset pages of scanPageSize
// rows, so memory stays bounded by one page whatever the range.
func (s *sqlStore) Scan(ctx context.Context, f Filter, fn func(*Record) error) error {
	var cur Cursor
	started := false
	for {
		sql, args := scanSQL(s.d, f, cur, started)
		n := 0
		_, err := s.drv.query(ctx, sql, args, func(r *Record) error {
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

// scanChain implements chainReader: the rows of one chain with after < seq
// <= last, in seq order, a page at a time.
func (s *sqlStore) scanChain(ctx context.Context, chain string, after, last int64, fn func(*Record) error) error {
	for after < last {
		sql, args := chainPageSQL(s.d, chain, after, last)
		n := 0
		_, err := s.drv.query(ctx, sql, args, func(r *Record) error {
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

// HourlyCounts counts the rows matching f per hour and per severity or
// action (by), oldest hour first, in the database: the console's charts
// cost one aggregate query, not a scan. Callers bound f's time range.
func (s *sqlStore) HourlyCounts(ctx context.Context, f Filter, by string) ([]HourCount, error) {
	if !slices.Contains(hourlyGroups, by) {
		return nil, fmt.Errorf("counting audit rows: cannot group by %q", by)
	}
	sql, args := hourlyCountsSQL(s.d, f, by)
	var out []HourCount
	var h, n int64
	var g *string
	err := s.drv.eachRow(ctx, sql, args, []any{&h, &g, &n}, func() error {
		c := HourCount{Hour: time.Unix(h*3600, 0).UTC(), Count: n}
		if g != nil {
			c.Group = *g
		}
		out = append(out, c)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("counting audit rows: %w", err)
	}
	return out, nil
}

// chainRanges implements chainReader.
func (s *sqlStore) chainRanges(ctx context.Context, from, to time.Time) ([]chainRange, error) {
	q, args := chainRangesSQL(s.d, from, to)
	var out []chainRange
	var c chainRange
	err := s.drv.eachRow(ctx, q, args, []any{&c.ChainID, &c.FirstSeq, &c.LastSeq}, func() error {
		out = append(out, c)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading audit chains: %w", err)
	}
	return out, nil
}

// retentionNotes implements chainReader.
func (s *sqlStore) retentionNotes(ctx context.Context) ([]storedRetention, error) {
	var out []storedRetention
	var r storedRetention
	var noteText *string
	err := s.drv.eachRow(ctx, "SELECT chain_id, first_seq, note FROM audit_chain_checkpoints ORDER BY chain_id, first_seq", nil,
		[]any{&r.ChainID, &r.FirstSeq, &noteText}, func() error {
			r.Note = ""
			if noteText != nil {
				r.Note = *noteText
			}
			out = append(out, r)
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("reading retention checkpoints: %w", err)
	}
	return out, nil
}

// chainNo returns the number of chain in audit_chains, registering the
// chain on first use. Numbers are cached: they never change.
func (s *sqlStore) chainNo(ctx context.Context, exec func(ctx context.Context, sql string, args ...any) error, chain string) (int64, error) {
	s.nosMu.Lock()
	no, ok := s.chainNos[chain]
	s.nosMu.Unlock()
	if ok {
		return no, nil
	}
	q := &query{d: s.d}
	ins := "INSERT INTO audit_chains (chain_id) VALUES (" + q.arg(chain) + ") ON CONFLICT (chain_id) DO NOTHING"
	if err := exec(ctx, ins, q.args...); err != nil {
		return 0, fmt.Errorf("registering audit chain %q: %w", chain, err)
	}
	q = &query{d: s.d}
	sel := "SELECT chain_no FROM audit_chains WHERE chain_id = " + q.arg(chain)
	err := s.drv.eachRow(ctx, sel, q.args, []any{&no}, func() error { return nil })
	if err != nil || no == 0 {
		return 0, fmt.Errorf("reading the number of audit chain %q: %v", chain, err)
	}
	if no >= 1<<(63-idSeqBits) {
		return 0, fmt.Errorf("audit chain %q: chain number %d out of range", chain, no)
	}
	s.nosMu.Lock()
	s.chainNos[chain] = no
	s.nosMu.Unlock()
	return no, nil
}

// assignIDs gives every record its id from its chain's number and seq.
func (s *sqlStore) assignIDs(ctx context.Context, exec func(ctx context.Context, sql string, args ...any) error, recs []Record) error {
	var chain string
	var no int64
	for i := range recs {
		r := &recs[i]
		if r.ChainID != chain || no == 0 {
			var err error
			if no, err = s.chainNo(ctx, exec, r.ChainID); err != nil {
				return err
			}
			chain = r.ChainID
		}
		r.ID = rowID(no, r.Seq)
	}
	return nil
}

// confirmDuplicate checks that a batch refused as a duplicate is really
// stored already (a replay), not a different batch claiming its keys.
func (s *sqlStore) confirmDuplicate(ctx context.Context, recs []Record) (bool, error) {
	q, args := sameBatchSQL(s.d, recs)
	stored := map[int64][]byte{}
	var seq int64
	var hash []byte
	err := s.drv.eachRow(ctx, q, args, []any{&seq, &hash}, func() error {
		stored[seq] = append([]byte(nil), hash...)
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("checking a duplicate audit batch: %w", err)
	}
	if !sameBatch(recs, stored) {
		return false, fmt.Errorf("chain %q seq %d..%d: %w", recs[0].ChainID, recs[0].Seq, recs[len(recs)-1].Seq, errChainConflict)
	}
	return true, nil
}

// pruneRows streams the rows of q (in chain, seq order) into a retention
// builder and returns the signed checkpoints of their runs.
func (s *sqlStore) pruneRows(ctx context.Context, drv driver, sql string, args []any, keys *Keyring, partition string, now time.Time) ([]RetentionCheckpoint, int64, error) {
	b := newRetentionBuilder(keys, partition, now)
	if _, err := drv.query(ctx, sql, args, b.add); err != nil {
		return nil, 0, err
	}
	rcs, err := b.finish()
	return rcs, b.rows, err
}

// insertRetentionSQL stores one retention checkpoint.
func insertRetentionSQL(d dialect, rc *RetentionCheckpoint) (string, []any) {
	q := &query{d: d}
	vals := []string{q.arg(rc.ChainID), q.arg(rc.FirstSeq), q.arg(rc.LastSeq), q.arg(rc.FirstPrevHash), q.arg(rc.LastHash),
		q.arg(rc.LastSeq - rc.FirstSeq + 1), q.arg(rc.Partition), q.arg(d.timeArg(rc.Time)), q.arg(rc.Note)}
	return `INSERT INTO audit_chain_checkpoints
		(chain_id, first_seq, last_seq, first_prev_hash, last_hash, row_count, partition_name, recorded_at, note)
		VALUES (` + strings.Join(vals, ", ") + `) ON CONFLICT (chain_id, first_seq) DO NOTHING`, q.args
}
