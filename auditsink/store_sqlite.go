package auditsink

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// SQLiteStore keeps the audit trail in a local SQLite file (pure Go,
// modernc.org/sqlite) when no database is configured: the same columns and
// chain as PGStore in one plain table. It is safe for concurrent use.
type SQLiteStore struct {
	log *slog.Logger
	db  *sql.DB
	cfg Config
}

// OpenSQLite opens (creating if needed) the SQLite file at path in WAL mode
// with synchronous=FULL, so a committed batch survives a crash. Call Migrate
// before writing.
func OpenSQLite(ctx context.Context, log *slog.Logger, path string, cfg Config) (*SQLiteStore, error) {
	if path == "" {
		return nil, errors.New("opening audit store: empty sqlite path")
	}
	if dir := filepath.Dir(path); dir != "." {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("opening audit store %s: %w", path, err)
		}
	}
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "busy_timeout(10000)", "foreign_keys(1)"} {
		q.Add("_pragma", p)
	}
	// BEGIN IMMEDIATE: a writing transaction takes the write lock up front,
	// so concurrent writers (the committer and the spool replayer) wait on
	// busy_timeout instead of failing on a read-to-write upgrade.
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("opening audit store %s: %w", path, err)
	}
	db.SetMaxOpenConns(4)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("opening audit store %s: %w", path, err)
	}
	return &SQLiteStore{log: log, db: db, cfg: cfg}, nil
}

// Close closes the file.
func (s *SQLiteStore) Close() { s.db.Close() }

// Migrate applies the schema steps not applied yet, in one transaction.
func (s *SQLiteStore) Migrate(ctx context.Context) error {
	ms, err := migrations("sqlite")
	if err != nil {
		return err
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("migrating audit schema: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS audit_schema_migrations (
		version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("creating audit_schema_migrations: %w", err)
	}
	applied := map[int]bool{}
	rows, err := tx.QueryContext(ctx, "SELECT version FROM audit_schema_migrations")
	if err != nil {
		return fmt.Errorf("reading applied migrations: %w", err)
	}
	for rows.Next() {
		var v int
		if err := rows.Scan(&v); err != nil {
			rows.Close()
			return fmt.Errorf("reading applied migrations: %w", err)
		}
		applied[v] = true
	}
	rows.Close()
	for _, m := range ms {
		if applied[m.version] {
			continue
		}
		if _, err := tx.ExecContext(ctx, m.sql); err != nil {
			return fmt.Errorf("applying migration %s: %w", m.name, err)
		}
		if _, err := tx.ExecContext(ctx, "INSERT INTO audit_schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
			m.version, m.name, time.Now().UnixMicro()); err != nil {
			return fmt.Errorf("recording migration %s: %w", m.name, err)
		}
		s.log.Info("applied audit schema migration", "migration", m.name)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("migrating audit schema: %w", err)
	}
	return nil
}

var sqliteInsert = "INSERT INTO audit_logs (" + joinCols(recordColumns) + ") VALUES (?" + repeatString(", ?", len(recordColumns)-1) + ")"

// writeBatch inserts recs in one transaction. A UNIQUE (chain_id, seq)
// violation means the batch was committed before: duplicate, no error.
func (s *SQLiteStore) writeBatch(ctx context.Context, recs []Record) (bool, error) {
	if len(recs) == 0 {
		return false, nil
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("writing audit rows: %w", err)
	}
	defer tx.Rollback()
	stmt, err := tx.PrepareContext(ctx, sqliteInsert)
	if err != nil {
		return false, fmt.Errorf("writing audit rows: %w", err)
	}
	defer stmt.Close()
	row := make([]any, len(recordColumns))
	for i := range recs {
		pgRow(row, &recs[i])
		row[0] = recs[i].CreatedAt.UnixMicro()
		for j := 14; j <= 16; j++ {
			if b, ok := row[j].([]byte); ok {
				row[j] = string(b)
			}
		}
		if _, err := stmt.ExecContext(ctx, row...); err != nil {
			var se *sqlite.Error
			if errors.As(err, &se) && (se.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || se.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY) {
				tx.Rollback()
				return s.confirmDuplicate(ctx, recs)
			}
			return false, fmt.Errorf("writing audit rows: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("committing audit rows: %w", err)
	}
	return false, nil
}

// confirmDuplicate checks that a batch refused as a duplicate is really
// stored already (a replay), not a different batch claiming its keys.
func (s *SQLiteStore) confirmDuplicate(ctx context.Context, recs []Record) (bool, error) {
	q, args := sameBatchSQL(sqliteDialect, recs)
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return false, fmt.Errorf("checking a duplicate audit batch: %w", err)
	}
	defer rows.Close()
	stored := map[int64][]byte{}
	for rows.Next() {
		var seq int64
		var hash []byte
		if err := rows.Scan(&seq, &hash); err != nil {
			return false, fmt.Errorf("checking a duplicate audit batch: %w", err)
		}
		stored[seq] = hash
	}
	if err := rows.Err(); err != nil {
		return false, fmt.Errorf("checking a duplicate audit batch: %w", err)
	}
	if !sameBatch(recs, stored) {
		return false, fmt.Errorf("chain %q seq %d..%d: %w", recs[0].ChainID, recs[0].Seq, recs[len(recs)-1].Seq, errChainConflict)
	}
	return true, nil
}

// List implements recordReader.
func (s *SQLiteStore) List(ctx context.Context, f Filter, cur Cursor, limit int) ([]Record, Cursor, error) {
	return listRecords(ctx, s, sqliteDialect, f, cur, limit)
}

// Scan implements recordReader: ascending keyset pages.
func (s *SQLiteStore) Scan(ctx context.Context, f Filter, fn func(*Record) error) error {
	return scanRecords(ctx, s, sqliteDialect, f, fn)
}

// chainRanges implements chainReader.
func (s *SQLiteStore) chainRanges(ctx context.Context, from, to time.Time) ([]chainRange, error) {
	q, args := chainRangesSQL(sqliteDialect, from, to)
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("reading audit chains: %w", err)
	}
	defer rows.Close()
	var out []chainRange
	for rows.Next() {
		var c chainRange
		if err := rows.Scan(&c.ChainID, &c.FirstSeq, &c.LastSeq); err != nil {
			return nil, fmt.Errorf("reading audit chains: %w", err)
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// scanChain implements chainReader.
func (s *SQLiteStore) scanChain(ctx context.Context, chain string, after, last int64, fn func(*Record) error) error {
	return scanChainRecords(ctx, s, sqliteDialect, chain, after, last, fn)
}

// checkpoints implements chainReader.
func (s *SQLiteStore) checkpoints(ctx context.Context) ([]Checkpoint, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT chain_id, first_seq, last_seq, first_prev_hash, last_hash, row_count, partition_name
		FROM audit_chain_checkpoints ORDER BY chain_id, first_seq`)
	if err != nil {
		return nil, fmt.Errorf("reading chain checkpoints: %w", err)
	}
	defer rows.Close()
	var cps []Checkpoint
	for rows.Next() {
		var c Checkpoint
		if err := rows.Scan(&c.ChainID, &c.FirstSeq, &c.LastSeq, &c.FirstPrevHash, &c.LastHash, &c.Rows, &c.Partition); err != nil {
			return nil, fmt.Errorf("reading chain checkpoints: %w", err)
		}
		cps = append(cps, c)
	}
	return cps, rows.Err()
}

// query runs q and either collects the rows (fn nil) or streams them to fn.
func (s *SQLiteStore) query(ctx context.Context, q string, args []any, fn func(*Record) error) ([]Record, error) {
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Record
	var r Record
	var created int64
	var entityType, entityID, userID, ip, ua, method, path, requestID, origin, tenant, meta, oldV, newV sql.NullString
	var status sql.NullInt64
	for rows.Next() {
		r = Record{}
		if err := rows.Scan(&r.ID, &created, &r.Action, &r.Severity, &entityType, &entityID, &userID, &ip, &ua,
			&method, &path, &status, &requestID, &origin, &tenant, &meta, &oldV, &newV,
			&r.ChainID, &r.Seq, &r.PrevHash, &r.Hash); err != nil {
			return nil, err
		}
		r.CreatedAt = time.UnixMicro(created).UTC()
		r.EntityType, r.EntityID, r.UserID, r.IPAddress = entityType.String, entityID.String, userID.String, ip.String
		r.UserAgent, r.Method, r.Path, r.RequestID = ua.String, method.String, path.String, requestID.String
		r.Origin, r.Tenant, r.Status = origin.String, tenant.String, int(status.Int64)
		r.Metadata, r.OldValues, r.NewValues = sqliteJSON(meta), sqliteJSON(oldV), sqliteJSON(newV)
		if fn != nil {
			if err := fn(&r); err != nil {
				return nil, err
			}
			continue
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func sqliteJSON(s sql.NullString) json.RawMessage {
	if !s.Valid {
		return nil
	}
	return json.RawMessage(s.String)
}

func joinCols(cols []string) string {
	out := ""
	for i, c := range cols {
		if i > 0 {
			out += ", "
		}
		out += c
	}
	return out
}

func repeatString(s string, n int) string {
	out := ""
	for range n {
		out += s
	}
	return out
}
