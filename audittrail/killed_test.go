package audittrail

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// Environment of the helper process TestVerifyChainKilledBeforeFirstInterval starts.
const (
	killedHelperEnv = "MESHGUARD_AUDIT_KILLED_HELPER" // "sqlite:<path>" or "postgres:<url>"
	killedDirEnv    = "MESHGUARD_AUDIT_KILLED_DIR"
	killedKeyEnv    = "MESHGUARD_AUDIT_KILLED_KEY"
)

// TestKilledWriterHelper is not a test: run as a child process, it writes a
// few records through a Writer whose checkpoint interval is an hour, says
// "ready" once they are durable, and waits to be SIGKILLed.
func TestKilledWriterHelper(t *testing.T) {
	target := os.Getenv(killedHelperEnv)
	if target == "" {
		t.Skip("helper process only")
	}
	kind, dsn, _ := strings.Cut(target, ":")
	var store BatchStore
	switch kind {
	case "sqlite":
		s, err := OpenSQLite(context.Background(), discardLog, dsn, Config{})
		if err != nil {
			t.Fatal(err)
		}
		store = s
	case "postgres":
		pool, err := pgxpool.New(context.Background(), dsn)
		if err != nil {
			t.Fatal(err)
		}
		s, err := OpenPostgres(context.Background(), discardLog, pool, DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		store = s
	}
	keys, err := LoadKeyring(KeySource{Key: os.Getenv(killedKeyEnv)}, false)
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	dir := os.Getenv(killedDirEnv)
	cfg.SpoolDir, cfg.WitnessDir, cfg.ChainID = filepath.Join(dir, "spool"), filepath.Join(dir, "witness"), "killed"
	cfg.CheckpointInterval, cfg.BatchInterval = time.Hour, 10*time.Millisecond
	w, err := NewWriter(discardLog, prometheus.NewRegistry(), cfg, store, keys)
	if err != nil {
		t.Fatal(err)
	}
	go w.Run(context.Background())
	if err := w.Enqueue(context.Background(), genRecords(50, time.Now().Add(-time.Minute), "k")); err != nil {
		t.Fatal(err)
	}
	for w.Status().Head.Seq < 50 {
		time.Sleep(5 * time.Millisecond)
	}
	fmt.Println("ready", w.ChainID())
	select {} // until SIGKILL
}

// TestVerifyChainKilledBeforeFirstInterval: a writer SIGKILLed before its
// first checkpoint interval, then its whole chain deleted: the checkpoint
// published at the chain's first write still names it.
func TestVerifyChainKilledBeforeFirstInterval(t *testing.T) {
	freshStores(t, Config{}, func(t *testing.T, mk func(t *testing.T) (testStore, execer)) {
		s, insider := mk(t)
		target := ""
		switch st := s.(type) {
		case *SQLiteStore:
			var path string
			if err := st.db.QueryRow("SELECT file FROM pragma_database_list WHERE name = 'main'").Scan(&path); err != nil {
				t.Fatal(err)
			}
			target = "sqlite:" + path
		case *PGStore:
			target = "postgres:" + st.pool.Config().ConnString()
		}
		dir := t.TempDir()
		cmd := exec.Command(os.Args[0], "-test.run=^TestKilledWriterHelper$", "-test.count=1")
		cmd.Env = append(os.Environ(), killedHelperEnv+"="+target, killedDirEnv+"="+dir, killedKeyEnv+"="+testSigningKey)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Wait()
		defer cmd.Process.Kill()
		ready := make(chan string, 1)
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if c, ok := strings.CutPrefix(sc.Text(), "ready "); ok {
					ready <- c
					return
				}
			}
			close(ready)
		}()
		var chain string
		select {
		case chain = <-ready:
		case <-time.After(60 * time.Second):
			t.Fatal("helper writer never became ready")
		}
		if chain == "" {
			t.Fatal("helper writer exited before it was ready")
		}
		if err := cmd.Process.Kill(); err != nil { // SIGKILL: no Close, no shutdown checkpoint
			t.Fatal(err)
		}
		cmd.Wait()

		insider(t, "DELETE FROM audit_logs WHERE chain_id = ?", chain)
		cps, err := ReadWitness(filepath.Join(dir, "witness"), testKeyring.Verifiers())
		if err != nil {
			t.Fatal(err)
		}
		rep, err := Verify(t.Context(), s, VerifyOptions{Keys: testKeyring, Witness: cps})
		if err != nil {
			t.Fatal(err)
		}
		if b := rep.Break; rep.OK || b.ChainID != chain || b.Seq != 1 || !strings.Contains(b.Reason, "whole chain deleted") {
			t.Fatalf("Verify after deleting the killed writer's chain = %+v, want the whole chain reported deleted", rep.Break)
		}
	})
}
