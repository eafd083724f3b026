package audittrail

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/mod/sumdb/note"

	"github.com/meshguard/meshguard/internal/pgtest"
)

// execer runs tampering SQL against a store's database, as an insider with
// write access to the tables would. Placeholders are written ?.
type execer func(t testing.TB, q string, args ...any)

// freshStores calls fn once per store kind with a constructor of fresh
// stores and a way to run raw SQL on the store it made.
func freshStores(t *testing.T, cfg Config, fn func(t *testing.T, mk func(t *testing.T) (testStore, execer))) {
	srv := pgtest.Start(t)
	t.Run("postgres", func(t *testing.T) {
		fn(t, func(t *testing.T) (testStore, execer) {
			s, pool := openPG(t, srv, cfg)
			return s, pgExec(pool)
		})
	})
	t.Run("sqlite", func(t *testing.T) {
		fn(t, func(t *testing.T) (testStore, execer) {
			s := openSQLite(t, cfg)
			return s, sqliteExec(s.db)
		})
	})
}

func pgExec(pool *pgxpool.Pool) execer {
	return func(t testing.TB, q string, args ...any) {
		t.Helper()
		var b strings.Builder
		n := 0
		for _, c := range q {
			if c == '?' {
				n++
				b.WriteString("$" + strconv.Itoa(n))
				continue
			}
			b.WriteRune(c)
		}
		if _, err := pool.Exec(context.Background(), b.String(), args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

func sqliteExec(db *sql.DB) execer {
	return func(t testing.TB, q string, args ...any) {
		t.Helper()
		if _, err := db.Exec(q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

// rowBySeq reads one row of chain c.
func rowBySeq(t testing.TB, s testStore, c string, seq int64) Record {
	t.Helper()
	var out []Record
	if err := s.scanChain(context.Background(), c, seq-1, seq, func(r *Record) error { out = append(out, *r); return nil }); err != nil || len(out) != 1 {
		t.Fatalf("reading seq %d: %v (%d rows)", seq, err, len(out))
	}
	return out[0]
}

// trail is a store holding one chain written by a real Writer, its witness,
// and the insider's tools.
type trail struct {
	s       testStore
	exec    execer
	pg      bool
	chain   string
	n       int64
	witness string
}

const trailRows = 3000

// newTrail writes trailRows records through a Writer (which publishes the
// chain's checkpoints to the witness) and closes it.
func newTrail(t *testing.T, s testStore, exec execer) *trail {
	cfg := writerConfig(t)
	cfg.CheckpointInterval = time.Hour // first write and Close only
	w, _, stop := startWriter(t, cfg, s)
	start := time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC)
	for i := 0; i < trailRows; i += 500 {
		if err := w.Enqueue(t.Context(), genRecords(500, start.Add(time.Duration(i)*time.Second), fmt.Sprintf("v%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	stop(context.Background())
	_, pg := s.(*PGStore)
	return &trail{s: s, exec: exec, pg: pg, chain: w.ChainID(), n: trailRows, witness: cfg.WitnessDir}
}

// verify runs Verify with keys against the trail's witness.
func (tr *trail) verify(t *testing.T, keys *Keyring) VerifyReport {
	t.Helper()
	cps, err := ReadWitness(tr.witness, keys.Verifiers())
	if err != nil {
		t.Fatal(err)
	}
	rep, err := Verify(t.Context(), tr.s, VerifyOptions{Keys: keys, Witness: cps})
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// insert stores r as the insider would, with plain SQL.
func (tr *trail) insert(t *testing.T, r Record) {
	t.Helper()
	cols := strings.Join(insertColumns, ", ")
	ph := strings.TrimSuffix(strings.Repeat("?, ", len(insertColumns)), ", ")
	var created any = r.CreatedAt
	if !tr.pg {
		created = r.CreatedAt.UnixMicro()
	}
	tr.exec(t, "INSERT INTO audit_logs ("+cols+") VALUES ("+ph+")",
		r.ID, created, r.Action, r.Severity, r.EntityType, r.EntityID, r.UserID, r.IPAddress, r.UserAgent,
		r.Method, r.Path, r.Status, r.RequestID, r.Origin, r.Tenant, nil, nil, nil,
		r.ChainID, r.Seq, r.KeyID, r.PrevHash, r.Hash)
}

// forge makes rows the insider would add after prev: linked, numbered and
// MAC'd as well as they can, with a key of their own.
func (tr *trail) forge(t *testing.T, chain string, chainNo int64, prev Record, count int, action string) []Record {
	t.Helper()
	attacker := newTestKey(t, "meshguard-test")
	recs := genRecords(count, prev.CreatedAt.Add(time.Minute), "forged")
	for i := range recs {
		r := &recs[i]
		normalize(r)
		r.Action, r.Severity, r.UserID = action, SeverityLow, "mallory"
		r.ChainID, r.Seq, r.KeyID, r.PrevHash = chain, prev.Seq+1, testKey.id, prev.Hash
		r.ID = rowID(chainNo, r.Seq)
		r.Hash = macOf(attacker, r)
		prev = *r
	}
	return recs
}

// TestVerifyTamperingTable: every tampering of issue 14's table, done with
// plain SQL as an insider with write access to the database would, fails
// `verify` naming the chain, the seq and what is wrong, on both stores.
func TestVerifyTamperingTable(t *testing.T) {
	cases := []struct {
		name    string
		tamper  func(t *testing.T, tr *trail) (chain string)
		wantSeq func(tr *trail) int64
		want    string // substring of the reason; "" means Verify passes
	}{
		{name: "untouched"},
		{
			name: "edit a row",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "UPDATE audit_logs SET status = 500 WHERE chain_id = ? AND seq = 1234", tr.chain)
				return tr.chain
			},
			wantSeq: seq(1234), want: "MAC does not verify",
		},
		{
			name: "edit metadata",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "UPDATE audit_logs SET metadata = NULL WHERE chain_id = ? AND seq = 77", tr.chain)
				return tr.chain
			},
			wantSeq: seq(77), want: "MAC does not verify",
		},
		{
			name: "delete rows in the middle",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "DELETE FROM audit_logs WHERE chain_id = ? AND seq BETWEEN 1500 AND 1502", tr.chain)
				return tr.chain
			},
			wantSeq: seq(1503), want: "rows 1500..1502 are missing",
		},
		{
			name: "delete the first row",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "DELETE FROM audit_logs WHERE chain_id = ? AND seq = 1", tr.chain)
				return tr.chain
			},
			wantSeq: seq(2), want: "rows 1..1 are missing",
		},
		{
			name: "swap two rows' seq",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "UPDATE audit_logs SET seq = -10 WHERE chain_id = ? AND seq = 10", tr.chain)
				tr.exec(t, "UPDATE audit_logs SET seq = 10 WHERE chain_id = ? AND seq = 11", tr.chain)
				tr.exec(t, "UPDATE audit_logs SET seq = 11 WHERE chain_id = ? AND seq = -10", tr.chain)
				return tr.chain
			},
			wantSeq: seq(10), want: "MAC does not verify",
		},
		{
			name: "change created_at",
			tamper: func(t *testing.T, tr *trail) string {
				if tr.pg {
					tr.exec(t, "UPDATE audit_logs SET created_at = created_at + interval '3 hours' WHERE chain_id = ? AND seq = 42", tr.chain)
				} else {
					tr.exec(t, "UPDATE audit_logs SET created_at = created_at + 10800000000 WHERE chain_id = ? AND seq = 42", tr.chain)
				}
				return tr.chain
			},
			wantSeq: seq(42), want: "MAC does not verify",
		},
		{
			name: "duplicate a row",
			tamper: func(t *testing.T, tr *trail) string {
				// The unique keys stand in the way, so the insider removes them.
				if tr.pg {
					tr.exec(t, "ALTER TABLE audit_logs DROP CONSTRAINT audit_logs_pkey")
					tr.exec(t, "ALTER TABLE audit_logs DROP CONSTRAINT audit_logs_chain_id_seq_created_at_key")
				} else {
					tr.exec(t, "CREATE TABLE audit_logs_copy AS SELECT * FROM audit_logs")
					tr.exec(t, "DROP TABLE audit_logs")
					tr.exec(t, "ALTER TABLE audit_logs_copy RENAME TO audit_logs")
				}
				tr.exec(t, "INSERT INTO audit_logs SELECT * FROM audit_logs WHERE chain_id = ? AND seq = 500", tr.chain)
				return tr.chain
			},
			wantSeq: seq(500), want: "seq 500 repeats",
		},
		{
			name: "tail truncation",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "DELETE FROM audit_logs WHERE chain_id = ? AND seq > 2990", tr.chain)
				return tr.chain
			},
			wantSeq: seq(2991), want: "rows 2991..3000 are missing: the chain's signed checkpoint covers 3000 rows",
		},
		{
			name: "whole-chain deletion",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "DELETE FROM audit_logs WHERE chain_id = ?", tr.chain)
				return tr.chain
			},
			wantSeq: seq(1), want: "whole chain deleted",
		},
		{
			name: "rewrite a row and recompute every hash after it",
			tamper: func(t *testing.T, tr *trail) string {
				attacker := newTestKey(t, "meshguard-test")
				prev := rowBySeq(t, tr.s, tr.chain, 1999)
				for seq := int64(2000); seq <= tr.n; seq++ {
					r := rowBySeq(t, tr.s, tr.chain, seq)
					if seq == 2000 {
						r.Status = 201
						tr.exec(t, "UPDATE audit_logs SET status = 201 WHERE chain_id = ? AND seq = 2000", tr.chain)
					}
					r.PrevHash = prev.Hash
					r.Hash = macOf(attacker, &r)
					tr.exec(t, "UPDATE audit_logs SET prev_hash = ?, hash = ? WHERE chain_id = ? AND seq = ?", r.PrevHash, r.Hash, tr.chain, seq)
					prev = r
				}
				return tr.chain
			},
			wantSeq: seq(2000), want: "MAC does not verify",
		},
		{
			name: "forged appends",
			tamper: func(t *testing.T, tr *trail) string {
				last := rowBySeq(t, tr.s, tr.chain, tr.n)
				for _, r := range tr.forge(t, tr.chain, last.ID>>idSeqBits, last, 5, "LOGIN_SUCCESS") {
					tr.insert(t, r)
				}
				return tr.chain
			},
			wantSeq: func(tr *trail) int64 { return tr.n + 1 }, want: "MAC does not verify",
		},
		{
			name: "forged chain",
			tamper: func(t *testing.T, tr *trail) string {
				for _, r := range tr.forge(t, "evil/1", 999, Record{CreatedAt: time.Date(2026, 10, 2, 0, 0, 0, 0, time.UTC), Hash: zeroHash}, 10, "LOGIN_SUCCESS") {
					tr.insert(t, r)
				}
				return "evil/1"
			},
			wantSeq: seq(1), want: "MAC does not verify",
		},
		{
			name: "forged retention checkpoint vouching for deleted rows",
			tamper: func(t *testing.T, tr *trail) string {
				first, last := rowBySeq(t, tr.s, tr.chain, 100), rowBySeq(t, tr.s, tr.chain, 200)
				tr.exec(t, "DELETE FROM audit_logs WHERE chain_id = ? AND seq BETWEEN 100 AND 200", tr.chain)
				recorded := any(time.Now())
				if !tr.pg {
					recorded = time.Now().UnixMicro()
				}
				tr.exec(t, `INSERT INTO audit_chain_checkpoints (chain_id, first_seq, last_seq, first_prev_hash, last_hash, row_count, partition_name, recorded_at)
					VALUES (?, 100, 200, ?, ?, 101, 'audit_logs_p202609', ?)`, tr.chain, first.PrevHash, last.Hash, recorded)
				return tr.chain
			},
			wantSeq: seq(100), want: "retention checkpoint carries no signed note",
		},
		{
			name: "retention checkpoint signed by the insider's own key",
			tamper: func(t *testing.T, tr *trail) string {
				attacker := &Keyring{Current: newTestKey(t, "meshguard-test"), private: map[string]*Key{}}
				attacker.private[attacker.Current.id] = attacker.Current
				b := newRetentionBuilder(attacker, "audit_logs_p202609", time.Now())
				for seq := int64(100); seq <= 200; seq++ {
					r := rowBySeq(t, tr.s, tr.chain, seq)
					r.KeyID = attacker.Current.id
					r.Hash = macOf(attacker.Current, &r) // the builder checks MACs with its keys
					if err := b.add(&r); err != nil {
						t.Fatal(err)
					}
				}
				rcs, err := b.finish()
				if err != nil {
					t.Fatal(err)
				}
				tr.exec(t, "DELETE FROM audit_logs WHERE chain_id = ? AND seq BETWEEN 100 AND 200", tr.chain)
				sql, args := insertRetentionSQL(sqliteDialect, &rcs[0])
				args[7] = time.Now().UnixMicro()
				if tr.pg {
					args[7] = time.Now()
				}
				tr.exec(t, sql, args...)
				return tr.chain
			},
			wantSeq: seq(100), want: "signed by no known key",
		},
		{
			name: "swap two rows' id",
			tamper: func(t *testing.T, tr *trail) string {
				a, b := rowBySeq(t, tr.s, tr.chain, 300), rowBySeq(t, tr.s, tr.chain, 301)
				tr.exec(t, "UPDATE audit_logs SET id = ? WHERE id = ?", -1, a.ID)
				tr.exec(t, "UPDATE audit_logs SET id = ? WHERE id = ?", a.ID, b.ID)
				tr.exec(t, "UPDATE audit_logs SET id = ? WHERE id = ?", b.ID, -1)
				return tr.chain
			},
			wantSeq: seq(300), want: "ids swapped or rewritten",
		},
	}
	freshStores(t, Config{}, func(t *testing.T, mk func(t *testing.T) (testStore, execer)) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				s, exec := mk(t)
				tr := newTrail(t, s, exec)
				chain := tr.chain
				if tc.tamper != nil {
					chain = tc.tamper(t, tr)
				}
				rep := tr.verify(t, testKeyring)
				if tc.want == "" {
					if !rep.OK || rep.Rows != tr.n || rep.Witnessed != 1 || rep.AfterCheckpoint != 0 {
						t.Fatalf("Verify = %+v, want OK over %d witnessed rows", rep, tr.n)
					}
					return
				}
				if rep.OK || rep.Break == nil {
					t.Fatalf("Verify passed after tampering: %+v", rep)
				}
				if b := rep.Break; b.ChainID != chain || b.Seq != tc.wantSeq(tr) || !strings.Contains(b.Reason, tc.want) {
					t.Fatalf("Verify break = %v, want chain %q seq %d with %q", b, chain, tc.wantSeq(tr), tc.want)
				}
			})
		}
	})
}

func seq(n int64) func(*trail) int64 { return func(*trail) int64 { return n } }

// publicKeys is a keyring holding the test key's public half only, as an
// auditor who may check signatures but not MACs has.
func publicKeys(t *testing.T) *Keyring {
	t.Helper()
	kr, err := LoadKeyring(KeySource{TrustedKeys: []string{testKey.VerifierKey()}, SpoolDir: t.TempDir()}, false)
	if err != nil || kr.HasPrivate() {
		t.Fatalf("public keyring: %v", err)
	}
	return kr
}

// TestVerifyPublicKeyOnly: with the public key alone, what the signed
// checkpoints cover is still vouched for; rows added after the last
// checkpoint are not (and the report says so).
func TestVerifyPublicKeyOnly(t *testing.T) {
	cases := []struct {
		name    string
		tamper  func(t *testing.T, tr *trail) string
		wantSeq int64
		want    string // "" means Verify passes
	}{
		{name: "untouched"},
		{
			name: "rewrite and recompute",
			tamper: func(t *testing.T, tr *trail) string {
				r := rowBySeq(t, tr.s, tr.chain, 10)
				r.UserID = "someone-else"
				tr.exec(t, "UPDATE audit_logs SET user_id = 'someone-else', hash = ? WHERE chain_id = ? AND seq = 10", macOf(newTestKey(t, "x"), &r), tr.chain)
				return tr.chain
			},
			wantSeq: 11, want: "prev_hash does not match",
		},
		{
			name: "edit a row, leave the hashes",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "UPDATE audit_logs SET status = 500 WHERE chain_id = ? AND seq = 2500", tr.chain)
				return tr.chain
			},
			wantSeq: trailRows, want: "do not hash to the root of the chain's signed checkpoint",
		},
		{
			name: "tail truncation",
			tamper: func(t *testing.T, tr *trail) string {
				tr.exec(t, "DELETE FROM audit_logs WHERE chain_id = ? AND seq > 10", tr.chain)
				return tr.chain
			},
			wantSeq: 11, want: "rows 11..3000 are missing",
		},
		{
			name: "forged chain",
			tamper: func(t *testing.T, tr *trail) string {
				for _, r := range tr.forge(t, "evil/1", 999, Record{CreatedAt: time.Date(2026, 10, 2, 0, 0, 0, 0, time.UTC), Hash: zeroHash}, 3, "LOGIN_SUCCESS") {
					tr.insert(t, r)
				}
				return "evil/1"
			},
			wantSeq: 1, want: "no signed checkpoint covers this chain",
		},
	}
	freshStores(t, Config{}, func(t *testing.T, mk func(t *testing.T) (testStore, execer)) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				s, exec := mk(t)
				tr := newTrail(t, s, exec)
				chain := tr.chain
				if tc.tamper != nil {
					chain = tc.tamper(t, tr)
				}
				rep := tr.verify(t, publicKeys(t))
				if rep.MACsChecked {
					t.Fatal("MACs checked without a private key")
				}
				if tc.want == "" {
					if !rep.OK || rep.Witnessed != 1 {
						t.Fatalf("Verify = %+v, want OK", rep)
					}
					return
				}
				if b := rep.Break; rep.OK || b == nil || b.ChainID != chain || b.Seq != tc.wantSeq || !strings.Contains(b.Reason, tc.want) {
					t.Fatalf("Verify break = %v, want chain %q seq %d with %q", rep.Break, chain, tc.wantSeq, tc.want)
				}
			})
		}
	})

	// The documented limit: forged rows appended after the last checkpoint
	// pass a public-key-only verification; they are counted, and the private
	// key catches them (TestVerifyTamperingTable).
	s := openSQLite(t, Config{})
	tr := newTrail(t, s, sqliteExec(s.db))
	last := rowBySeq(t, tr.s, tr.chain, tr.n)
	for _, r := range tr.forge(t, tr.chain, last.ID>>idSeqBits, last, 4, "LOGIN_SUCCESS") {
		tr.insert(t, r)
	}
	if rep := tr.verify(t, publicKeys(t)); !rep.OK || rep.AfterCheckpoint != 4 {
		t.Fatalf("public-key verify after forged appends = %+v, want OK with 4 rows after the checkpoint", rep)
	}
}

// TestVerifyBadInput: a wrong key, a checkpoint by an unknown key, a
// corrupt or missing witness each fail, naming the chain and the seq.
func TestVerifyBadInput(t *testing.T) {
	s := openSQLite(t, Config{})
	tr := newTrail(t, s, sqliteExec(s.db))
	file := witnessFile(tr.witness, tr.chain)

	t.Run("wrong key", func(t *testing.T) {
		other := &Keyring{Current: newTestKey(t, "other"), private: map[string]*Key{}, verifiers: testKeyring.verifiers}
		other.private[other.Current.id] = other.Current
		rep := tr.verify(t, other)
		if b := rep.Break; rep.OK || b.ChainID != tr.chain || b.Seq != 1 || !strings.Contains(b.Reason, "which is not configured") {
			t.Fatalf("Verify with another key: %v", rep.Break)
		}
	})
	t.Run("checkpoint by an unknown key", func(t *testing.T) {
		stranger := &Keyring{Current: newTestKey(t, "other"), private: map[string]*Key{}, verifiers: map[string]note.Verifier{}}
		stranger.add(stranger.Current)
		_, err := ReadWitness(tr.witness, stranger.Verifiers())
		b := WitnessBreak(err)
		if b == nil || b.ChainID != tr.chain || b.Seq != trailRows || !strings.Contains(b.Reason, "signed by no known key (signed by "+testKey.id+")") {
			t.Fatalf("ReadWitness with an unknown signer: %v", err)
		}
	})
	t.Run("corrupt witness", func(t *testing.T) {
		good, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		defer os.WriteFile(file, good, 0o640)
		bad := strings.Replace(string(good), "\n3000\n", "\n3001\n", 1)
		if err := os.WriteFile(file, []byte(bad), 0o640); err != nil {
			t.Fatal(err)
		}
		_, err = ReadWitness(tr.witness, testKeyring.Verifiers())
		b := WitnessBreak(err)
		if b == nil || b.ChainID != tr.chain || b.Seq != 3001 || !strings.Contains(b.Reason, "does not verify (note altered)") {
			t.Fatalf("ReadWitness of an altered checkpoint: %v", err)
		}
		if err := os.WriteFile(file, []byte("garbage"), 0o640); err != nil {
			t.Fatal(err)
		}
		_, err = ReadWitness(tr.witness, testKeyring.Verifiers())
		if b := WitnessBreak(err); b == nil || b.ChainID != tr.chain || !strings.Contains(b.Reason, "not a signed note") {
			t.Fatalf("ReadWitness of garbage: %v", err)
		}
	})
	t.Run("missing witness", func(t *testing.T) {
		_, err := ReadWitness(filepath.Join(t.TempDir(), "gone"), testKeyring.Verifiers())
		if err == nil || !strings.Contains(err.Error(), "reading the witness directory") {
			t.Fatalf("ReadWitness of a missing dir = %v", err)
		}
	})
}

func TestVerifyWindow(t *testing.T) {
	bothStores(t, Config{}, func(t *testing.T, s testStore) {
		start := time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC)
		mustWrite(t, s, newChain("early", testKey), genRecords(100, start.Add(-48*time.Hour), "e"))
		recs := genRecords(2000, start, "w")
		// Event times are not monotonic in seq: streams deliver out of order.
		for i := range recs {
			if i%7 == 0 {
				recs[i].CreatedAt = recs[i].CreatedAt.Add(-30 * time.Second)
			}
		}
		mustWrite(t, s, newChain("w", testKey), recs)
		rep, err := Verify(t.Context(), s, VerifyOptions{Keys: testKeyring, From: start.Add(500 * time.Second), To: start.Add(1500 * time.Second)})
		if err != nil {
			t.Fatal(err)
		}
		if !rep.OK || rep.Chains != 1 || rep.Rows != 2000 {
			t.Fatalf("windowed Verify = %+v, want chain w whole (2000 rows)", rep)
		}
	})
}

// TestVerifyKeyRotation: a chain written with the previous key still
// verifies once that key is listed among the previous ones; without it the
// verifier says which key is missing.
func TestVerifyKeyRotation(t *testing.T) {
	s := openSQLite(t, Config{})
	start := time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC)
	mustWrite(t, s, newChain("before", testKey), genRecords(50, start, "a"))
	dir := t.TempDir()
	newKey := filepath.Join(dir, "new.key")
	skey, _, _ := GenerateKey("meshguard-2027")
	os.WriteFile(newKey, []byte(skey), 0o600)
	oldKey := filepath.Join(dir, "old.key")
	os.WriteFile(oldKey, []byte(testSigningKey), 0o600)

	rotated, err := LoadKeyring(KeySource{KeyFile: newKey, PreviousKeyFiles: []string{oldKey}}, false)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, s, newChain("after", rotated.Current), genRecords(50, start.Add(time.Hour), "b"))
	rep, err := Verify(t.Context(), s, VerifyOptions{Keys: rotated})
	if err != nil || !rep.OK || rep.Chains != 2 || rep.Rows != 100 {
		t.Fatalf("Verify with the rotated keyring = %+v, %v", rep, err)
	}
	current, _ := LoadKeyring(KeySource{KeyFile: newKey}, false)
	rep, err = Verify(t.Context(), s, VerifyOptions{Keys: current})
	if err != nil || rep.OK || rep.Break.ChainID != "before" || !strings.Contains(rep.Break.Reason, testKey.ID()+", which is not configured") {
		t.Fatalf("Verify without the previous key = %+v, %v", rep.Break, err)
	}
}
