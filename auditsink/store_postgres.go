package auditsink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PGStore keeps the audit trail in PostgreSQL: table audit_logs,
// range-partitioned by month on created_at. It is safe for concurrent use.
//
// Writes are one binary COPY per batch (pgx CopyFrom) into the partitioned
// parent. CopyFrom needs no named prepared statement: in the pool's exec
// mode (PgBouncer) it describes the columns with an unnamed statement and
// sends COPY as a simple query, so it works through PgBouncer's transaction
// mode too.
type PGStore struct {
	log  *slog.Logger
	pool *pgxpool.Pool
	cfg  Config

	mu     sync.Mutex
	months map[time.Time]bool // partitions known to exist
}

// pgLockKey serialises schema changes (migrations, partition DDL, pruning)
// across replicas: pg_advisory_xact_lock, so it also works through PgBouncer.
const pgLockKey = 0x6d67617564697431 // "mgaudit1"

// OpenPostgres returns a store on pool. It does not touch the database;
// call Migrate before writing.
func OpenPostgres(ctx context.Context, log *slog.Logger, pool *pgxpool.Pool, cfg Config) (*PGStore, error) {
	if pool == nil {
		return nil, errors.New("opening audit store: nil pool")
	}
	return &PGStore{log: log, pool: pool, cfg: cfg, months: map[time.Time]bool{}}, nil
}

// Close releases nothing of its own: the pool belongs to the caller.
func (s *PGStore) Close() {}

// Migrate applies the schema steps not applied yet, in one transaction
// under an advisory lock (so replicas starting together do not race), then
// creates the partitions from last month to PartitionsAhead months ahead.
func (s *PGStore) Migrate(ctx context.Context) error {
	ms, err := migrations("postgres")
	if err != nil {
		return err
	}
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(pgLockKey)); err != nil {
			return fmt.Errorf("taking the migration lock: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS audit_schema_migrations (
			version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return fmt.Errorf("creating audit_schema_migrations: %w", err)
		}
		applied := map[int]bool{}
		rows, err := tx.Query(ctx, "SELECT version FROM audit_schema_migrations")
		if err != nil {
			return fmt.Errorf("reading applied migrations: %w", err)
		}
		vs, err := pgx.CollectRows(rows, pgx.RowTo[int32])
		if err != nil {
			return fmt.Errorf("reading applied migrations: %w", err)
		}
		for _, v := range vs {
			applied[int(v)] = true
		}
		for _, m := range ms {
			if applied[m.version] {
				continue
			}
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return fmt.Errorf("applying migration %s: %w", m.name, err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO audit_schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name); err != nil {
				return fmt.Errorf("recording migration %s: %w", m.name, err)
			}
			s.log.Info("applied audit schema migration", "migration", m.name)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("migrating audit schema: %w", err)
	}
	return s.EnsurePartitions(ctx, time.Now())
}

// EnsurePartitions creates the monthly partitions from the month before
// now's to PartitionsAhead months after it.
func (s *PGStore) EnsurePartitions(ctx context.Context, now time.Time) error {
	m := monthStart(now)
	months := []time.Time{m.AddDate(0, -1, 0)}
	for i := 0; i <= s.cfg.PartitionsAhead; i++ {
		months = append(months, m.AddDate(0, i, 0))
	}
	return s.ensureMonths(ctx, months)
}

// ensureMonths creates any partition of months not known to exist.
func (s *PGStore) ensureMonths(ctx context.Context, months []time.Time) error {
	s.mu.Lock()
	var missing []time.Time
	for _, m := range months {
		if !s.months[m] {
			missing = append(missing, m)
		}
	}
	s.mu.Unlock()
	if len(missing) == 0 {
		return nil
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(pgLockKey)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit TO on"); err != nil {
			return err
		}
		for _, m := range missing {
			name := partitionName(m)
			sql := fmt.Sprintf("CREATE TABLE IF NOT EXISTS %s PARTITION OF audit_logs FOR VALUES FROM ('%s') TO ('%s')",
				pgx.Identifier{name}.Sanitize(), m.Format(time.RFC3339), m.AddDate(0, 1, 0).Format(time.RFC3339))
			if _, err := tx.Exec(ctx, sql); err != nil {
				return fmt.Errorf("creating partition %s: %w", name, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("ensuring audit partitions: %w", err)
	}
	s.mu.Lock()
	for _, m := range missing {
		s.months[m] = true
	}
	s.mu.Unlock()
	return nil
}

// writeBatch COPYs recs into audit_logs in one transaction with
// synchronous_commit on (so an acknowledged batch survives a server crash
// even where the server default is off). A unique
// violation on (chain_id, seq, created_at) means this batch was committed
// before (batches are written whole and replayed whole), so it is reported
// as a duplicate, not an error.
func (s *PGStore) writeBatch(ctx context.Context, recs []Record) (bool, error) {
	if len(recs) == 0 {
		return false, nil
	}
	var months []time.Time
	for i := range recs {
		m := monthStart(recs[i].CreatedAt)
		if len(months) == 0 || months[len(months)-1] != m {
			months = append(months, m)
		}
	}
	if err := s.ensureMonths(ctx, months); err != nil {
		return false, err
	}
	dup, err := s.copyBatch(ctx, recs)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23514" {
		// No partition for a row: one the cache believed in is gone (a
		// crash lost its creation, an operator dropped it, a failover).
		// Forget what we knew and create them again.
		s.mu.Lock()
		clear(s.months)
		s.mu.Unlock()
		if err := s.ensureMonths(ctx, months); err != nil {
			return false, err
		}
		dup, err = s.copyBatch(ctx, recs)
	}
	return dup, err
}

// copyBatch is one attempt of writeBatch.
func (s *PGStore) copyBatch(ctx context.Context, recs []Record) (bool, error) {
	row := make([]any, len(recordColumns))
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// An audit batch is acknowledged (and its spool segment deleted)
		// only once it is on disk, whatever the server's default.
		if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit TO on"); err != nil {
			return err
		}
		_, err := tx.CopyFrom(ctx, pgx.Identifier{"audit_logs"}, recordColumns, pgx.CopyFromSlice(len(recs), func(i int) ([]any, error) {
			pgRow(row, &recs[i])
			return row, nil
		}))
		return err
	})
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "23505" {
			return s.confirmDuplicate(ctx, recs)
		}
		return false, fmt.Errorf("copying %d audit rows: %w", len(recs), err)
	}
	return false, nil
}

// confirmDuplicate checks that a batch refused as a duplicate is really
// stored already (a replay), not a different batch claiming its keys.
func (s *PGStore) confirmDuplicate(ctx context.Context, recs []Record) (bool, error) {
	q, args := sameBatchSQL(pgDialect, recs)
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return false, fmt.Errorf("checking a duplicate audit batch: %w", err)
	}
	stored := map[int64][]byte{}
	var seq int64
	var hash []byte
	_, err = pgx.ForEachRow(rows, []any{&seq, &hash}, func() error { stored[seq] = hash; return nil })
	if err != nil {
		return false, fmt.Errorf("checking a duplicate audit batch: %w", err)
	}
	if !sameBatch(recs, stored) {
		return false, fmt.Errorf("chain %q seq %d..%d: %w", recs[0].ChainID, recs[0].Seq, recs[len(recs)-1].Seq, errChainConflict)
	}
	return true, nil
}

// pgRow fills row with r's column values in recordColumns order.
func pgRow(row []any, r *Record) {
	row[0] = r.CreatedAt
	row[1] = r.Action
	row[2] = r.Severity
	row[3] = nullString(r.EntityType)
	row[4] = nullString(r.EntityID)
	row[5] = nullString(r.UserID)
	row[6] = nullString(r.IPAddress)
	row[7] = nullString(r.UserAgent)
	row[8] = nullString(r.Method)
	row[9] = nullString(r.Path)
	if r.Status != 0 {
		row[10] = int32(r.Status)
	} else {
		row[10] = nil
	}
	row[11] = nullString(r.RequestID)
	row[12] = nullString(r.Origin)
	row[13] = nullString(r.Tenant)
	row[14] = nullJSON(r.Metadata)
	row[15] = nullJSON(r.OldValues)
	row[16] = nullJSON(r.NewValues)
	row[17] = r.ChainID
	row[18] = r.Seq
	row[19] = r.PrevHash
	row[20] = r.Hash
}

// nullJSON maps a nil JSON value to SQL NULL (a typed nil would be JSON null).
func nullJSON(raw json.RawMessage) any {
	if raw == nil {
		return nil
	}
	return []byte(raw)
}

// List implements recordReader.
func (s *PGStore) List(ctx context.Context, f Filter, cur Cursor, limit int) ([]Record, Cursor, error) {
	return listRecords(ctx, s, pgDialect, f, cur, limit)
}

// Scan implements recordReader: ascending keyset pages, so memory stays
// bounded by one page whatever the range.
func (s *PGStore) Scan(ctx context.Context, f Filter, fn func(*Record) error) error {
	return scanRecords(ctx, s, pgDialect, f, fn)
}

// chainRanges implements chainReader.
func (s *PGStore) chainRanges(ctx context.Context, from, to time.Time) ([]chainRange, error) {
	q, args := chainRangesSQL(pgDialect, from, to)
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("reading audit chains: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (chainRange, error) {
		var c chainRange
		err := row.Scan(&c.ChainID, &c.FirstSeq, &c.LastSeq)
		return c, err
	})
	if err != nil {
		return nil, fmt.Errorf("reading audit chains: %w", err)
	}
	return out, nil
}

// scanChain implements chainReader.
func (s *PGStore) scanChain(ctx context.Context, chain string, after, last int64, fn func(*Record) error) error {
	return scanChainRecords(ctx, s, pgDialect, chain, after, last, fn)
}

// checkpoints implements chainReader.
func (s *PGStore) checkpoints(ctx context.Context) ([]Checkpoint, error) {
	rows, err := s.pool.Query(ctx, `SELECT chain_id, first_seq, last_seq, first_prev_hash, last_hash, row_count, partition_name
		FROM audit_chain_checkpoints ORDER BY chain_id, first_seq`)
	if err != nil {
		return nil, fmt.Errorf("reading chain checkpoints: %w", err)
	}
	cps, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Checkpoint, error) {
		var c Checkpoint
		err := row.Scan(&c.ChainID, &c.FirstSeq, &c.LastSeq, &c.FirstPrevHash, &c.LastHash, &c.Rows, &c.Partition)
		return c, err
	})
	if err != nil {
		return nil, fmt.Errorf("reading chain checkpoints: %w", err)
	}
	return cps, nil
}

// query runs sql and either collects the rows (fn nil) or streams them to fn.
func (s *PGStore) query(ctx context.Context, sql string, args []any, fn func(*Record) error) ([]Record, error) {
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Record
	var r Record
	var entityType, entityID, userID, ip, ua, method, path, requestID, origin, tenant pgtype.Text
	var status pgtype.Int4
	var meta, oldV, newV []byte
	for rows.Next() {
		r = Record{}
		if err := rows.Scan(&r.ID, &r.CreatedAt, &r.Action, &r.Severity, &entityType, &entityID, &userID, &ip, &ua,
			&method, &path, &status, &requestID, &origin, &tenant, &meta, &oldV, &newV,
			&r.ChainID, &r.Seq, &r.PrevHash, &r.Hash); err != nil {
			return nil, err
		}
		r.CreatedAt = r.CreatedAt.UTC()
		r.EntityType, r.EntityID, r.UserID, r.IPAddress = entityType.String, entityID.String, userID.String, ip.String
		r.UserAgent, r.Method, r.Path, r.RequestID = ua.String, method.String, path.String, requestID.String
		r.Origin, r.Tenant, r.Status = origin.String, tenant.String, int(status.Int32)
		r.Metadata, r.OldValues, r.NewValues = jsonOrNil(meta), jsonOrNil(oldV), jsonOrNil(newV)
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

// jsonOrNil returns the canonical form of a jsonb value read back (jsonb
// reorders keys and re-spaces), nil for SQL NULL.
func jsonOrNil(b []byte) json.RawMessage {
	if b == nil {
		return nil
	}
	if c, err := canonicalJSON(b); err == nil {
		return c
	}
	return json.RawMessage(append([]byte(nil), b...))
}
