package audittrail

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

// TestMerkleMatchesTlog: the chain's tree is the one golang.org/x/mod's tlog
// computes, so third-party tools agree with its checkpoints.
func TestMerkleMatchesTlog(t *testing.T) {
	var stored []tlog.Hash
	var m merkleRange
	for i := range int64(300) {
		data := []byte(fmt.Sprintf("record %d", i))
		leaf := append([]byte{0}, data...)
		if leafHash(leaf) != tlog.RecordHash(data) {
			t.Fatal("leafHash differs from tlog.RecordHash")
		}
		hs, err := tlog.StoredHashes(i, data, tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
			out := make([]tlog.Hash, len(idx))
			for j, x := range idx {
				out[j] = stored[x]
			}
			return out, nil
		}))
		if err != nil {
			t.Fatal(err)
		}
		stored = append(stored, hs...)
		m.appendLeaf(tlog.RecordHash(data))
		want, err := tlog.TreeHash(i+1, tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
			out := make([]tlog.Hash, len(idx))
			for j, x := range idx {
				out[j] = stored[x]
			}
			return out, nil
		}))
		if err != nil {
			t.Fatal(err)
		}
		if m.root() != want {
			t.Fatalf("root of %d leaves differs from tlog.TreeHash", i+1)
		}
		// Any run [a, i+1) folded on its own and appended as subtrees
		// gives the same root (what retention checkpoints rely on).
		for _, a := range []int64{0, i / 2, i} {
			var prefix merkleRange
			for k := range a {
				prefix.appendLeaf(tlog.RecordHash([]byte(fmt.Sprintf("record %d", k))))
			}
			rb := rangeBuilder{next: a}
			for k := a; k <= i; k++ {
				rb.append(tlog.RecordHash([]byte(fmt.Sprintf("record %d", k))))
			}
			cover := coverRange(a, i+1)
			if len(cover) != len(rb.nodes) {
				t.Fatalf("[%d,%d): %d nodes, cover %d", a, i+1, len(rb.nodes), len(cover))
			}
			for k, n := range rb.nodes {
				if n.Level != cover[k].Level || n.Index != cover[k].Index {
					t.Fatalf("[%d,%d): node %d is %+v, cover says %+v", a, i+1, k, n, cover[k])
				}
				prefix.appendSubtree(n.Hash, n.Level)
			}
			if prefix.root() != want {
				t.Fatalf("[%d,%d) appended as subtrees: root differs", a, i+1)
			}
		}
	}
	var empty merkleRange
	if empty.root() != sha256.Sum256(nil) {
		t.Fatal("empty tree root")
	}
}

// TestCheckpointFormat: a published checkpoint is a C2SP tlog-checkpoint
// that note.Open accepts with the public key alone.
func TestCheckpointFormat(t *testing.T) {
	h := ChainHead{ChainID: "pod-a/1700000000000000000", Seq: 42, Root: make([]byte, 32)}
	h.Root[0] = 7
	at := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	msg, err := signCheckpoint(testKey, h, 3, at)
	if err != nil {
		t.Fatal(err)
	}
	v, err := note.NewVerifier(testKey.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	n, err := note.Open(msg, note.VerifierList(v))
	if err != nil {
		t.Fatal(err)
	}
	want := "pod-a/1700000000000000000\n42\n" + base64.StdEncoding.EncodeToString(h.Root) + "\ntime 2026-05-01T12:00:00Z\nchain-no 3\n"
	if n.Text != want {
		t.Fatalf("checkpoint text:\n%s\nwant:\n%s", n.Text, want)
	}
	cp, err := OpenCheckpoint(msg, testKeyring.Verifiers())
	if err != nil || cp.Size != 42 || cp.ChainNo != 3 || !cp.Time.Equal(at) || cp.KeyID != testKey.ID() || cp.Root[0] != 7 {
		t.Fatalf("OpenCheckpoint = %+v, %v", cp, err)
	}
}

// TestPublisherKeepsAWitnessItCannotParse: serve never overwrites a
// witness file that does not open (an investigator wants it as it is),
// reports the failure, and goes on publishing other chains.
func TestPublisherKeepsAWitnessItCannotParse(t *testing.T) {
	dir := t.TempDir()
	p, err := newPublisher(discardLog, dir, testKeyring, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	head := func(chain string, seq int64) ChainHead {
		return ChainHead{ChainID: chain, Seq: seq, Root: make([]byte, 32), Hash: make([]byte, 32)}
	}
	if first := p.update(head("a/1", 10)); !first {
		t.Fatal("first update not reported first")
	}
	if err := p.publish(); err != nil {
		t.Fatal(err)
	}
	file := witnessFile(dir, "a/1")
	if err := os.WriteFile(file, []byte("a/1\n99999\nnot a note\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	p.update(head("a/1", 20))
	p.update(head("b/2", 5))
	err = p.publish()
	if err == nil || !strings.Contains(err.Error(), "not overwritten") {
		t.Fatalf("publish over a corrupt witness = %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "a/1\n99999\nnot a note\n" {
		t.Fatalf("corrupt witness overwritten: %q", b)
	}
	if _, lastErr := p.status(); !strings.Contains(lastErr, "not overwritten") {
		t.Fatalf("status error %q", lastErr)
	}
	if _, err := readCheckpointFile(witnessFile(dir, "b/2"), testKeyring.Verifiers()); err != nil {
		t.Fatalf("the other chain was not published: %v", err)
	}
	// A checkpoint signed by another key is not parsed either.
	stranger := newTestKey(t, "stranger")
	msg, _ := signCheckpoint(stranger, head("b/2", 6), 0, time.Now())
	os.WriteFile(witnessFile(dir, "b/2"), msg, 0o640)
	p.update(head("b/2", 7))
	if err := p.publish(); err == nil || !strings.Contains(err.Error(), "signed by no known key") {
		t.Fatalf("publish over a stranger's checkpoint = %v", err)
	}
}

// TestCheckpointsHandler: GET /v1/audit/checkpoints serves what the
// witness holds, with the public keys to check it.
func TestCheckpointsHandler(t *testing.T) {
	dir := t.TempDir()
	p, err := newPublisher(discardLog, dir, testKeyring, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	p.update(ChainHead{ChainID: "c/1", Seq: 3, Root: make([]byte, 32)})
	if err := p.publish(); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	CheckpointsHandler(discardLog, dir, testKeyring).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/v1/audit/checkpoints", nil))
	var body struct {
		VerifierKeys []string     `json:"verifier_keys"`
		Checkpoints  []Checkpoint `json:"checkpoints"`
	}
	if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &body) != nil {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if len(body.VerifierKeys) != 1 || body.VerifierKeys[0] != testKey.VerifierKey() || len(body.Checkpoints) != 1 || body.Checkpoints[0].Size != 3 {
		t.Fatalf("body %+v", body)
	}
	// A collector can check the note with the published key alone.
	v, _ := note.NewVerifier(body.VerifierKeys[0])
	if _, err := note.Open([]byte(body.Checkpoints[0].Note), note.VerifierList(v)); err != nil {
		t.Fatal(err)
	}
}

// TestCheckpointsHandlerReadsOncePerSecond: callers within
// checkpointsCacheFor share one reading of the witness (one signature check
// a chain), so callers without a token cannot make the endpoint cost more;
// after it, a new checkpoint is served.
func TestCheckpointsHandlerReadsOncePerSecond(t *testing.T) {
	dir := t.TempDir()
	clock := time.Date(2026, 12, 4, 5, 0, 0, 0, time.UTC)
	p, err := newPublisher(discardLog, dir, testKeyring, func() time.Time { return clock })
	if err != nil {
		t.Fatal(err)
	}
	p.update(ChainHead{ChainID: "c/1", Seq: 3, Root: make([]byte, 32)})
	if err := p.publish(); err != nil {
		t.Fatal(err)
	}
	h := checkpointsHandler(discardLog, dir, testKeyring, func() time.Time { return clock })
	chains := func() int {
		t.Helper()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/v1/audit/checkpoints", nil))
		var body struct{ Checkpoints []Checkpoint }
		if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &body) != nil {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		return len(body.Checkpoints)
	}
	if n := chains(); n != 1 {
		t.Fatalf("%d chains, want 1", n)
	}
	p.update(ChainHead{ChainID: "c/2", Seq: 1, Root: make([]byte, 32)})
	if err := p.publish(); err != nil {
		t.Fatal(err)
	}
	clock = clock.Add(checkpointsCacheFor - time.Millisecond)
	if n := chains(); n != 1 {
		t.Errorf("within %v: %d chains, want the shared reading's 1", checkpointsCacheFor, n)
	}
	clock = clock.Add(time.Millisecond)
	if n := chains(); n != 2 {
		t.Errorf("after %v: %d chains, want the new reading's 2", checkpointsCacheFor, n)
	}
	os.RemoveAll(dir) // a witness that cannot be read: 500, once the reading is stale
	clock = clock.Add(checkpointsCacheFor)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/v1/audit/checkpoints", nil))
	if rec.Code != http.StatusInternalServerError || !strings.Contains(rec.Body.String(), "cannot be read") {
		t.Errorf("unreadable witness: %d %s", rec.Code, rec.Body)
	}
}

// TestLoadKeyringGenerates: with no key configured serve generates one
// (0600) in the spool dir and finds the same one next time; a verifier
// (generate false) does not make one.
func TestLoadKeyringGenerates(t *testing.T) {
	dir := t.TempDir()
	kr, err := LoadKeyring(KeySource{SpoolDir: dir}, false)
	if err != nil || kr.Current != nil {
		t.Fatalf("verifier keyring without a key = %+v, %v", kr, err)
	}
	kr, err = LoadKeyring(KeySource{SpoolDir: dir}, true)
	if err != nil || kr.Current == nil || !kr.Generated {
		t.Fatalf("generated keyring = %+v, %v", kr, err)
	}
	st, err := os.Stat(dir + "/" + generatedKeyFile)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("generated key file: %v %v", st, err)
	}
	again, err := LoadKeyring(KeySource{SpoolDir: dir}, true)
	if err != nil || again.Current.ID() != kr.Current.ID() {
		t.Fatalf("second start got another key: %v", err)
	}
	if _, err := LoadKeyring(KeySource{Key: "PRIVATE+KEY+bad"}, true); err == nil || !strings.Contains(err.Error(), "MESHGUARD_AUDIT_KEY") {
		t.Fatalf("bad env key = %v", err)
	}
	// Rotation: rows of the previous key still verify.
	old := t.TempDir() + "/old.key"
	os.WriteFile(old, []byte(testSigningKey), 0o600)
	rot, err := LoadKeyring(KeySource{SpoolDir: dir, PreviousKeyFiles: []string{old}}, true)
	if err != nil || rot.privateKey(testKey.ID()) == nil || rot.Current.ID() == testKey.ID() {
		t.Fatalf("rotated keyring = %+v, %v", rot, err)
	}
}
