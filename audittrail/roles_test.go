package audittrail

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/meshguard/meshguard/internal/pgtest"
)

// loginAs makes a login role that is a member of group and returns a pool
// on url connected as it.
func loginAs(t *testing.T, srv *pgtest.Server, url, group string) *pgxpool.Pool {
	t.Helper()
	var b [4]byte
	rand.Read(b[:])
	name := "u_" + group[len("meshguard_audit_"):] + "_" + hex.EncodeToString(b[:])
	if err := srv.Exec(t.Context(), "CREATE ROLE "+name+" LOGIN IN ROLE "+group); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(t.Context(), strings.Replace(url, "postgres://postgres@", "postgres://"+name+"@", 1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func wantDenied(t *testing.T, pool *pgxpool.Pool, sql string) {
	t.Helper()
	_, err := pool.Exec(context.Background(), sql)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
		t.Fatalf("%s: err = %v, want permission denied (42501)", sql, err)
	}
}

// TestLeastPrivilegeRoles: the roles the migration makes do their jobs and
// nothing more. serve's writer appends and reads but cannot UPDATE, DELETE
// or TRUNCATE (not through the parent, not through a partition) nor drop a
// partition; retention drops old partitions, vouched for by signed
// checkpoints, and cannot edit rows either.
func TestLeastPrivilegeRoles(t *testing.T) {
	srv := pgtest.Start(t)
	url := srv.NewDatabase(t)
	owner, err := pgxpool.New(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer owner.Close()
	cfg := DefaultConfig()
	cfg.Retention = 60 * 24 * time.Hour
	ownerStore, err := OpenPostgres(t.Context(), discardLog, owner, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := ownerStore.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}

	writer := loginAs(t, srv, url, "meshguard_audit_writer")
	ws, err := OpenPostgres(t.Context(), discardLog, writer, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := ws.Migrate(t.Context()); err != nil {
		t.Fatalf("serve's start-up migration as the writer (nothing to apply): %v", err)
	}
	if extra, err := ws.Privileges(t.Context()); err != nil || len(extra) != 0 {
		t.Fatalf("writer privileges beyond INSERT/SELECT: %v %v", extra, err)
	}
	if extra, err := ownerStore.Privileges(t.Context()); err != nil || len(extra) != 3 {
		t.Fatalf("the owner should be reported with UPDATE, DELETE, TRUNCATE: %v %v", extra, err)
	}
	// The writer writes old and new months (creating partitions through
	// audit_ensure_partition) with a real Writer.
	wcfg := writerConfig(t)
	w, _, stop := startWriter(t, wcfg, ws)
	old := genRecords(100, time.Now().AddDate(0, -5, 0), "old")
	recent := genRecords(100, time.Now().Add(-time.Hour), "new")
	for _, recs := range [][]Record{old, recent} {
		if err := w.Enqueue(t.Context(), recs); err != nil {
			t.Fatal(err)
		}
	}
	stop(context.Background())
	if st := w.Status(); st.SpoolSegments != 0 || st.LastError != "" {
		t.Fatalf("the writer role could not write: %+v", st)
	}
	part := partitionName(time.Now())
	for _, sql := range []string{
		"UPDATE audit_logs SET status = 500",
		"DELETE FROM audit_logs",
		"TRUNCATE audit_logs",
		"UPDATE " + part + " SET status = 500",
		"DELETE FROM " + part,
		"TRUNCATE " + part,
		"DROP TABLE " + part,
		"ALTER TABLE audit_logs DETACH PARTITION " + part,
		"SELECT audit_drop_partition('" + partitionName(time.Now().AddDate(0, -5, 0)) + "')",
		"UPDATE audit_chain_checkpoints SET note = NULL",
		"INSERT INTO audit_chain_checkpoints (chain_id, first_seq, last_seq, first_prev_hash, last_hash, row_count, partition_name) VALUES ('x', 1, 1, '', '', 1, 'p')",
		"DELETE FROM audit_chains",
	} {
		wantDenied(t, writer, sql)
	}

	retention := loginAs(t, srv, url, "meshguard_audit_retention")
	rs, err := OpenPostgres(t.Context(), discardLog, retention, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{
		"UPDATE audit_logs SET status = 500",
		"DELETE FROM audit_logs",
		"TRUNCATE audit_logs",
		"DELETE FROM " + part,
		"DROP TABLE " + part,
		"UPDATE audit_chain_checkpoints SET note = NULL",
	} {
		wantDenied(t, retention, sql)
	}
	// The function refuses a month that is not over.
	if _, err := retention.Exec(t.Context(), "SELECT audit_drop_partition($1)", part); err == nil || !strings.Contains(err.Error(), "not older than a day") {
		t.Fatalf("dropping the current month: %v", err)
	}
	dropped, err := rs.Prune(t.Context(), time.Now(), testKeyring)
	if err != nil || len(dropped) == 0 {
		t.Fatalf("retention role Prune = %v, %v", dropped, err)
	}
	checkVerifies(t, ws, wcfg.WitnessDir)
}
