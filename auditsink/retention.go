package auditsink

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Retention drops whole months older than audit.retention. Before rows go,
// every run of consecutive seqs they hold per chain is recorded in
// audit_chain_checkpoints (first seq and its prev_hash, last seq and its
// hash), so Verify can still check the links across the gap.

// pruner is what `meshguard audit prune` and the retention loop call.
type pruner interface {
	// Prune drops the months that ended at or before now-retention and
	// returns their partition names (audit_logs_pYYYYMM), oldest first.
	Prune(ctx context.Context, now time.Time) ([]string, error)
}

// checkpointSQL records the runs of the rows in relation src (a partition,
// or a subquery for SQLite). $1/?1 is the partition name; now is the
// recorded_at expression.
func checkpointSQL(src, nameArg, now string) string {
	return `INSERT INTO audit_chain_checkpoints
		(chain_id, first_seq, last_seq, first_prev_hash, last_hash, row_count, partition_name, recorded_at)
	SELECT r.chain_id, r.first_seq, r.last_seq,
		(SELECT x.prev_hash FROM ` + src + ` x WHERE x.chain_id = r.chain_id AND x.seq = r.first_seq LIMIT 1),
		(SELECT x.hash FROM ` + src + ` x WHERE x.chain_id = r.chain_id AND x.seq = r.last_seq LIMIT 1),
		r.n, ` + nameArg + `, ` + now + `
	FROM (SELECT chain_id, min(seq) AS first_seq, max(seq) AS last_seq, count(*) AS n
		FROM (SELECT chain_id, seq, seq - row_number() OVER (PARTITION BY chain_id ORDER BY seq) AS grp FROM ` + src + `) t
		GROUP BY chain_id, grp) r
	WHERE true -- SQLite needs a WHERE before ON CONFLICT in INSERT … SELECT
	ON CONFLICT (chain_id, first_seq) DO NOTHING`
}

// Prune implements pruner: for each partition wholly older than the
// retention, in one transaction, record the checkpoints, detach and drop.
func (s *PGStore) Prune(ctx context.Context, now time.Time) ([]string, error) {
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
		ident := pgx.Identifier{name}.Sanitize()
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(pgLockKey)); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, checkpointSQL(ident, "$1", "now()"), name); err != nil {
				return fmt.Errorf("recording chain checkpoints: %w", err)
			}
			if _, err := tx.Exec(ctx, "ALTER TABLE audit_logs DETACH PARTITION "+ident); err != nil {
				return fmt.Errorf("detaching: %w", err)
			}
			if _, err := tx.Exec(ctx, "DROP TABLE "+ident); err != nil {
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
		s.log.Info("dropped audit partition", "partition", name, "cutoff", cutoff)
		dropped = append(dropped, name)
	}
	return dropped, nil
}

// RunRetention keeps partitions created ahead and prunes every
// audit.retention_interval until ctx is done. Zero interval: it only waits.
func (s *PGStore) RunRetention(ctx context.Context) error {
	return retentionLoop(ctx, s.log, s.cfg.RetentionInterval, func(ctx context.Context, now time.Time) error {
		if err := s.EnsurePartitions(ctx, now); err != nil {
			return err
		}
		_, err := s.Prune(ctx, now)
		return err
	})
}

// Prune implements pruner for SQLite: the rows of every month wholly older
// than the retention are deleted in one transaction after their checkpoints.
func (s *SQLiteStore) Prune(ctx context.Context, now time.Time) ([]string, error) {
	cutoff := pruneCutoff(now, s.cfg.Retention).UnixMicro()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("pruning audit rows: %w", err)
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, `SELECT DISTINCT strftime('%Y%m', created_at / 1000000, 'unixepoch') AS m
		FROM audit_logs WHERE created_at < ? ORDER BY m`, cutoff)
	if err != nil {
		return nil, fmt.Errorf("listing audit months: %w", err)
	}
	var names []string
	for rows.Next() {
		var m string
		if err := rows.Scan(&m); err != nil {
			rows.Close()
			return nil, fmt.Errorf("listing audit months: %w", err)
		}
		names = append(names, "audit_logs_p"+m)
	}
	rows.Close()
	if len(names) == 0 {
		return nil, nil
	}
	src := fmt.Sprintf("(SELECT * FROM audit_logs WHERE created_at < %d)", cutoff)
	if _, err := tx.ExecContext(ctx, checkpointSQL(src, "?", "?"), strings.Join(names, ","), time.Now().UnixMicro()); err != nil {
		return nil, fmt.Errorf("recording chain checkpoints: %w", err)
	}
	if _, err := tx.ExecContext(ctx, "DELETE FROM audit_logs WHERE created_at < ?", cutoff); err != nil {
		return nil, fmt.Errorf("deleting old audit rows: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("pruning audit rows: %w", err)
	}
	s.log.Info("pruned audit months", "months", names)
	return names, nil
}

// RunRetention prunes every audit.retention_interval until ctx is done.
func (s *SQLiteStore) RunRetention(ctx context.Context) error {
	return retentionLoop(ctx, s.log, s.cfg.RetentionInterval, func(ctx context.Context, now time.Time) error {
		_, err := s.Prune(ctx, now)
		return err
	})
}

// retentionLoop runs step now and then every interval; failures are logged
// and retried at the next tick.
func retentionLoop(ctx context.Context, log *slog.Logger, interval time.Duration, step func(context.Context, time.Time) error) error {
	if interval <= 0 {
		<-ctx.Done()
		return nil
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := step(ctx, time.Now()); err != nil && ctx.Err() == nil {
			log.Error("audit retention failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
