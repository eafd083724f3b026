package audittrail

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
	sqlStore
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
	s := &PGStore{log: log, pool: pool, cfg: cfg, months: map[time.Time]bool{}}
	s.sqlStore = newSQLStore(pgDialect, pgDriver{pool})
	return s, nil
}

// Close releases nothing of its own: the pool belongs to the caller.
func (s *PGStore) Close() {}

// Migrate applies the schema steps not applied yet, in one transaction
// under an advisory lock (so replicas starting together do not race), then
// creates the partitions from last month to PartitionsAhead months ahead.
// When every step is applied already it runs no DDL, so serve's
// least-privileged writer role (meshguard_audit_writer) can call it.
func (s *PGStore) Migrate(ctx context.Context) error {
	ms, err := migrations("postgres")
	if err != nil {
		return err
	}
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(pgLockKey)); err != nil {
			return fmt.Errorf("taking the migration lock: %w", err)
		}
		applied := map[int]bool{}
		var exists bool
		if err := tx.QueryRow(ctx, "SELECT to_regclass('audit_schema_migrations') IS NOT NULL").Scan(&exists); err != nil {
			return fmt.Errorf("reading applied migrations: %w", err)
		}
		if exists {
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
		} else if _, err := tx.Exec(ctx, `CREATE TABLE audit_schema_migrations (
			version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return fmt.Errorf("creating audit_schema_migrations (run `meshguard migrate` with the schema owner's DATABASE_URL): %w", err)
		}
		for _, m := range ms {
			if applied[m.version] {
				continue
			}
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return fmt.Errorf("applying migration %s (run `meshguard migrate` with the schema owner's DATABASE_URL): %w", m.name, err)
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
			// A SECURITY DEFINER function of the schema owner: the writer
			// role creates partitions without any DDL privilege.
			if _, err := tx.Exec(ctx, "SELECT audit_ensure_partition($1::date)", m.Format(time.DateOnly)); err != nil {
				return fmt.Errorf("creating partition %s: %w", partitionName(m), err)
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
	if err := s.assignIDs(ctx, s.exec, recs); err != nil {
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
	row := make([]any, len(insertColumns))
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// An audit batch is acknowledged (and its spool segment deleted)
		// only once it is on disk, whatever the server's default.
		if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit TO on"); err != nil {
			return err
		}
		_, err := tx.CopyFrom(ctx, pgx.Identifier{"audit_logs"}, insertColumns, pgx.CopyFromSlice(len(recs), func(i int) ([]any, error) {
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

func (s *PGStore) exec(ctx context.Context, sql string, args ...any) error {
	_, err := s.pool.Exec(ctx, sql, args...)
	return err
}

// pgRow fills row with r's column values in insertColumns order.
func pgRow(row []any, r *Record) {
	row[0] = &r.ID // pointers: an int64 put in an interface would allocate per row
	row = row[1:]
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
	row[18] = &r.Seq
	row[19] = nullString(r.KeyID)
	row[20] = r.PrevHash
	row[21] = r.Hash
}

// nullJSON maps a nil JSON value to SQL NULL (a typed nil would be JSON null).
func nullJSON(raw json.RawMessage) any {
	if raw == nil {
		return nil
	}
	return []byte(raw)
}

// pgDriver runs the shared queries on the pool or in a transaction.
type pgDriver struct {
	pool interface {
		Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	}
}

func (d pgDriver) eachRow(ctx context.Context, sql string, args []any, dest []any, fn func() error) error {
	rows, err := d.pool.Query(ctx, sql, args...)
	if err != nil {
		return err
	}
	_, err = pgx.ForEachRow(rows, dest, fn)
	return err
}

// query runs sql and either collects the rows (fn nil) or streams them to fn.
func (d pgDriver) query(ctx context.Context, sql string, args []any, fn func(*Record) error) ([]Record, error) {
	rows, err := d.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Record
	var r Record
	var entityType, entityID, userID, ip, ua, method, path, requestID, origin, tenant, keyID pgtype.Text
	var status pgtype.Int4
	var meta, oldV, newV []byte
	for rows.Next() {
		r = Record{}
		if err := rows.Scan(&r.ID, &r.CreatedAt, &r.Action, &r.Severity, &entityType, &entityID, &userID, &ip, &ua,
			&method, &path, &status, &requestID, &origin, &tenant, &meta, &oldV, &newV,
			&r.ChainID, &r.Seq, &keyID, &r.PrevHash, &r.Hash); err != nil {
			return nil, err
		}
		r.CreatedAt, r.KeyID = r.CreatedAt.UTC(), keyID.String
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

// Prune implements pruner: for each partition wholly older than the
// retention, in one transaction: check its rows' MACs, record signed
// retention checkpoints of their runs, then detach and drop it through
// audit_drop_partition (the retention role's only way to remove rows).
func (s *PGStore) Prune(ctx context.Context, now time.Time, keys *Keyring) ([]string, error) {
	cutoff := pruneCutoff(now, s.cfg.Retention)
	rows, err := s.pool.Query(ctx, `SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = 'audit_logs'::regclass ORDER BY c.relname`)
	if err != nil {
		return nil, fmt.Errorf("listing audit partitions: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("listing audit partitions: %w", err)
	}
	var dropped []string
	for _, name := range names {
		m, ok := partitionMonth(name)
		if !ok || m.AddDate(0, 1, 0).After(cutoff) {
			continue
		}
		var n int64
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(pgLockKey)); err != nil {
				return err
			}
			// Through the parent: the retention role reads audit_logs, not
			// its partitions.
			q := "SELECT " + selectColumns + " FROM audit_logs WHERE created_at >= $1 AND created_at < $2 ORDER BY chain_id, seq"
			rcs, rows, err := s.pruneRows(ctx, pgDriver{tx}, q, []any{m, m.AddDate(0, 1, 0)}, keys, name, now)
			if err != nil {
				return err
			}
			n = rows
			for i := range rcs {
				sql, args := insertRetentionSQL(pgDialect, &rcs[i])
				if _, err := tx.Exec(ctx, sql, args...); err != nil {
					return fmt.Errorf("recording retention checkpoints: %w", err)
				}
			}
			if _, err := tx.Exec(ctx, "SELECT audit_drop_partition($1)", name); err != nil {
				return fmt.Errorf("dropping: %w", err)
			}
			return nil
		})
		if err != nil {
			return dropped, fmt.Errorf("pruning audit partition %s: %w", name, err)
		}
		s.mu.Lock()
		delete(s.months, m)
		s.mu.Unlock()
		s.log.Info("dropped audit partition", "partition", name, "rows", n, "cutoff", cutoff)
		dropped = append(dropped, name)
	}
	return dropped, nil
}

// RunRetention keeps partitions created ahead and, when keys can sign,
// prunes every audit.retention_interval until ctx is done. Zero interval:
// it only waits.
func (s *PGStore) RunRetention(ctx context.Context, keys *Keyring) error {
	return retentionLoop(ctx, s.log, s.cfg.RetentionInterval, func(ctx context.Context, now time.Time) error {
		if err := s.EnsurePartitions(ctx, now); err != nil {
			return err
		}
		_, err := s.Prune(ctx, now, keys)
		return err
	})
}

// Privileges reports what the store's connection role may do to
// audit_logs beyond INSERT and SELECT: serve's role should be able to do
// none of it.
func (s *PGStore) Privileges(ctx context.Context) ([]string, error) {
	var extra []string
	for _, p := range []string{"UPDATE", "DELETE", "TRUNCATE"} {
		var ok bool
		if err := s.pool.QueryRow(ctx, "SELECT has_table_privilege('audit_logs', $1)", p).Scan(&ok); err != nil {
			return nil, fmt.Errorf("reading the audit role's privileges: %w", err)
		}
		if ok {
			extra = append(extra, p)
		}
	}
	return extra, nil
}
