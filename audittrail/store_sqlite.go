package audittrail

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
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// SQLiteStore keeps the audit trail in a local SQLite file (pure Go,
// modernc.org/sqlite) when no database is configured: the same columns and
// chain as PGStore in one plain table. It is safe for concurrent use.
type SQLiteStore struct {
	sqlStore
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
	st := &SQLiteStore{log: log, db: db, cfg: cfg}
	st.sqlStore = newSQLStore(sqliteDialect, sqliteDriver{db})
	return st, nil
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

var sqliteInsert = "INSERT INTO audit_logs (" + strings.Join(insertColumns, ", ") + ") VALUES (?" + strings.Repeat(", ?", len(insertColumns)-1) + ")"

// writeBatch inserts recs in one transaction. A UNIQUE (chain_id, seq)
// violation means the batch was committed before: duplicate, no error.
func (s *SQLiteStore) writeBatch(ctx context.Context, recs []Record) (bool, error) {
	if len(recs) == 0 {
		return false, nil
	}
	if err := s.assignIDs(ctx, s.exec, recs); err != nil {
		return false, err
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
	row := make([]any, len(insertColumns))
	for i := range recs {
		pgRow(row, &recs[i])
		row[1] = recs[i].CreatedAt.UnixMicro()
		for j := 15; j <= 17; j++ {
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

func (s *SQLiteStore) exec(ctx context.Context, q string, args ...any) error {
	_, err := s.db.ExecContext(ctx, q, args...)
	return err
}

// sqliteDriver runs the shared queries on the database or in a transaction.
type sqliteDriver struct {
	db interface {
		QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	}
}

func (d sqliteDriver) eachRow(ctx context.Context, q string, args []any, dest []any, fn func() error) error {
	rows, err := d.db.QueryContext(ctx, q, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		if err := rows.Scan(dest...); err != nil {
			return err
		}
		if err := fn(); err != nil {
			return err
		}
	}
	return rows.Err()
}

// query runs q and either collects the rows (fn nil) or streams them to fn.
func (d sqliteDriver) query(ctx context.Context, q string, args []any, fn func(*Record) error) ([]Record, error) {
	rows, err := d.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Record
	var r Record
	var created int64
	var entityType, entityID, userID, ip, ua, method, path, requestID, origin, tenant, meta, oldV, newV, keyID sql.NullString
	var status sql.NullInt64
	for rows.Next() {
		r = Record{}
		if err := rows.Scan(&r.ID, &created, &r.Action, &r.Severity, &entityType, &entityID, &userID, &ip, &ua,
			&method, &path, &status, &requestID, &origin, &tenant, &meta, &oldV, &newV,
			&r.ChainID, &r.Seq, &keyID, &r.PrevHash, &r.Hash); err != nil {
			return nil, err
		}
		r.CreatedAt, r.KeyID = time.UnixMicro(created).UTC(), keyID.String
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

// Prune implements pruner for SQLite: the rows of every month wholly older
// than the retention are checked, vouched for by signed retention
// checkpoints and deleted, in one transaction.
func (s *SQLiteStore) Prune(ctx context.Context, now time.Time, keys *Keyring) ([]string, error) {
	cutoff := pruneCutoff(now, s.cfg.Retention).UnixMicro()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("pruning audit rows: %w", err)
	}
	defer tx.Rollback()
	var names []string
	var m string
	err = sqliteDriver{tx}.eachRow(ctx, `SELECT DISTINCT strftime('%Y%m', created_at / 1000000, 'unixepoch') AS m
		FROM audit_logs WHERE created_at < ? ORDER BY m`, []any{cutoff}, []any{&m}, func() error {
		names = append(names, "audit_logs_p"+m)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing audit months: %w", err)
	}
	if len(names) == 0 {
		return nil, nil
	}
	q := "SELECT " + selectColumns + " FROM audit_logs WHERE created_at < ? ORDER BY chain_id, seq"
	rcs, n, err := s.pruneRows(ctx, sqliteDriver{tx}, q, []any{cutoff}, keys, strings.Join(names, ","), now)
	if err != nil {
		return nil, fmt.Errorf("pruning audit rows: %w", err)
	}
	for i := range rcs {
		q, args := insertRetentionSQL(sqliteDialect, &rcs[i])
		if _, err := tx.ExecContext(ctx, q, args...); err != nil {
			return nil, fmt.Errorf("recording retention checkpoints: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, "DELETE FROM audit_logs WHERE created_at < ?", cutoff); err != nil {
		return nil, fmt.Errorf("deleting old audit rows: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("pruning audit rows: %w", err)
	}
	s.log.Info("pruned audit months", "months", names, "rows", n)
	return names, nil
}

// RunRetention prunes every audit.retention_interval until ctx is done.
func (s *SQLiteStore) RunRetention(ctx context.Context, keys *Keyring) error {
	return retentionLoop(ctx, s.log, s.cfg.RetentionInterval, func(ctx context.Context, now time.Time) error {
		_, err := s.Prune(ctx, now, keys)
		return err
	})
}
