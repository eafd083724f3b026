package audittrail

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"hash"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

// Retention drops whole months older than audit.retention. Before rows go,
// the pruner checks every one of them against its MAC and, for every run of
// consecutive seqs they hold per chain, records a signed retention
// checkpoint (a signed note, in audit_chain_checkpoints):
//
//	meshguard-audit-retention v1
//	chain <chain id>
//	seqs <first> <last>
//	prev <base64 prev_hash of the first row>
//	last <base64 hash of the last row>
//	node <level> <index> <base64>   one per subtree covering the run, left to right
//	partition <name>
//	time <RFC 3339 UTC>
//
// Verify bridges a gap in a chain only with such a note signed by a known
// key: the nodes stand in for the dropped leaves in the chain's Merkle tree,
// prev and last keep the MAC links. A note an insider writes has no valid
// signature, so rows deleted by hand stay a gap.

// retentionHeader is the first line of a retention note.
const retentionHeader = "meshguard-audit-retention v1"

// RetentionCheckpoint vouches for one run of a chain's rows that retention
// dropped.
type RetentionCheckpoint struct {
	ChainID       string
	FirstSeq      int64
	LastSeq       int64
	FirstPrevHash []byte
	LastHash      []byte
	Nodes         []treeNode
	Partition     string
	Time          time.Time
	KeyID         string // the signer
	Note          string // the signed note
}

func (rc *RetentionCheckpoint) text() string {
	var b strings.Builder
	enc := base64.StdEncoding.EncodeToString
	fmt.Fprintf(&b, "%s\nchain %s\nseqs %d %d\nprev %s\nlast %s\n", retentionHeader, rc.ChainID, rc.FirstSeq, rc.LastSeq, enc(rc.FirstPrevHash), enc(rc.LastHash))
	for _, n := range rc.Nodes {
		fmt.Fprintf(&b, "node %d %d %s\n", n.Level, n.Index, enc(n.Hash[:]))
	}
	fmt.Fprintf(&b, "partition %s\ntime %s\n", rc.Partition, rc.Time.UTC().Format(time.RFC3339Nano))
	return b.String()
}

// openRetention checks a retention note's signature and parses it.
func openRetention(msg string, verifiers note.Verifiers) (RetentionCheckpoint, error) {
	if len(msg) > maxNote {
		return RetentionCheckpoint{}, fmt.Errorf("note larger than %d bytes", maxNote)
	}
	text, kid, err := openNote([]byte(msg), verifiers)
	if err != nil {
		return RetentionCheckpoint{}, err
	}
	bad := func(why string) (RetentionCheckpoint, error) {
		return RetentionCheckpoint{}, fmt.Errorf("not a retention checkpoint: %s", why)
	}
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	if len(lines) < 5 || lines[0] != retentionHeader {
		return bad("bad header")
	}
	rc := RetentionCheckpoint{KeyID: kid, Note: msg}
	hash32 := func(s string) ([]byte, bool) {
		b, err := base64.StdEncoding.DecodeString(s)
		return b, err == nil && len(b) == sha256.Size
	}
	var ok bool
	for _, l := range lines[1:] {
		k, v, _ := strings.Cut(l, " ")
		f := strings.Fields(v)
		switch k {
		case "chain":
			rc.ChainID = v
		case "seqs":
			if len(f) != 2 {
				return bad("bad seqs line")
			}
			a, err1 := strconv.ParseInt(f[0], 10, 64)
			z, err2 := strconv.ParseInt(f[1], 10, 64)
			if err1 != nil || err2 != nil || a < 1 || z < a {
				return bad("bad seqs line")
			}
			rc.FirstSeq, rc.LastSeq = a, z
		case "prev":
			if rc.FirstPrevHash, ok = hash32(v); !ok {
				return bad("bad prev line")
			}
		case "last":
			if rc.LastHash, ok = hash32(v); !ok {
				return bad("bad last line")
			}
		case "node":
			if len(f) != 3 {
				return bad("bad node line")
			}
			lvl, err1 := strconv.Atoi(f[0])
			idx, err2 := strconv.ParseInt(f[1], 10, 64)
			h, ok := hash32(f[2])
			if err1 != nil || err2 != nil || !ok || lvl < 0 || lvl > 62 || idx < 0 {
				return bad("bad node line")
			}
			n := treeNode{Level: lvl, Index: idx}
			copy(n.Hash[:], h)
			rc.Nodes = append(rc.Nodes, n)
		case "partition":
			rc.Partition = v
		case "time":
			if rc.Time, err = time.Parse(time.RFC3339Nano, v); err != nil {
				return bad("bad time line")
			}
		}
	}
	if rc.ChainID == "" || rc.FirstSeq == 0 || rc.FirstPrevHash == nil || rc.LastHash == nil {
		return bad("missing fields")
	}
	// The nodes must be exactly the subtrees covering the run.
	want := coverRange(rc.FirstSeq-1, rc.LastSeq)
	if len(want) != len(rc.Nodes) {
		return bad("nodes do not cover the run")
	}
	for i, n := range want {
		if rc.Nodes[i].Level != n.Level || rc.Nodes[i].Index != n.Index {
			return bad("nodes do not cover the run")
		}
	}
	return rc, nil
}

// rangeBuilder folds the leaves of a run starting at any position into the
// subtrees that cover it (merging two nodes only when they are siblings).
type rangeBuilder struct {
	next  int64 // index of the next leaf
	nodes []treeNode
}

func (b *rangeBuilder) append(h tlog.Hash) {
	n := treeNode{Level: 0, Index: b.next, Hash: h}
	b.next++
	for len(b.nodes) > 0 {
		top := b.nodes[len(b.nodes)-1]
		if n.Index%2 != 1 || top.Level != n.Level || top.Index != n.Index-1 {
			break
		}
		n = treeNode{Level: n.Level + 1, Index: n.Index / 2, Hash: tlog.NodeHash(top.Hash, n.Hash)}
		b.nodes = b.nodes[:len(b.nodes)-1]
	}
	b.nodes = append(b.nodes, n)
}

// retentionBuilder turns the rows about to be dropped, in (chain, seq)
// order, into retention checkpoints, checking each row's MAC on the way: a
// pruner signs only what its keys vouch for.
type retentionBuilder struct {
	keys      *Keyring
	partition string
	now       time.Time
	macs      map[string]hash.Hash
	buf       []byte
	out       []RetentionCheckpoint
	cur       *RetentionCheckpoint
	rb        rangeBuilder
	rows      int64
}

func newRetentionBuilder(keys *Keyring, partition string, now time.Time) *retentionBuilder {
	return &retentionBuilder{keys: keys, partition: partition, now: now, macs: map[string]hash.Hash{}}
}

func (b *retentionBuilder) add(r *Record) error {
	k := b.keys.privateKey(r.KeyID)
	if k == nil {
		return fmt.Errorf("chain %q seq %d: cannot vouch for a row MAC'd with key %q, which is not configured (audit.key_file, audit.previous_key_files); not pruned", r.ChainID, r.Seq, r.KeyID)
	}
	mac, ok := b.macs[k.id]
	if !ok {
		mac = hmac.New(sha256.New, k.mac)
		b.macs[k.id] = mac
	}
	var leaf tlog.Hash
	leaf, b.buf = rowLeaf(r, b.buf)
	if !hmac.Equal(rowMAC(mac, leaf), r.Hash) {
		return fmt.Errorf("chain %q seq %d (id %d): MAC does not verify (row modified); not pruned: run `meshguard audit verify`", r.ChainID, r.Seq, r.ID)
	}
	if c := b.cur; c == nil || c.ChainID != r.ChainID || r.Seq != c.LastSeq+1 {
		b.flush()
		b.cur = &RetentionCheckpoint{ChainID: r.ChainID, FirstSeq: r.Seq, FirstPrevHash: r.PrevHash}
		b.rb = rangeBuilder{next: r.Seq - 1}
	}
	b.cur.LastSeq, b.cur.LastHash = r.Seq, r.Hash
	b.rb.append(leaf)
	b.rows++
	return nil
}

func (b *retentionBuilder) flush() {
	if b.cur == nil {
		return
	}
	b.cur.Nodes = b.rb.nodes
	b.out = append(b.out, *b.cur)
	b.cur = nil
}

// finish signs the checkpoints with the current key.
func (b *retentionBuilder) finish() ([]RetentionCheckpoint, error) {
	b.flush()
	if len(b.out) > 0 && b.keys.Current == nil {
		return nil, errors.New("no signing key to sign retention checkpoints with")
	}
	for i := range b.out {
		rc := &b.out[i]
		rc.Partition, rc.Time, rc.KeyID = b.partition, b.now.UTC(), b.keys.Current.id
		msg, err := note.Sign(&note.Note{Text: rc.text()}, b.keys.Current.signer)
		if err != nil {
			return nil, fmt.Errorf("signing a retention checkpoint: %w", err)
		}
		rc.Note = string(msg)
	}
	return b.out, nil
}

// pruner is what `meshguard audit prune` and the retention loop call.
type pruner interface {
	// Prune drops the months that ended at or before now-retention and
	// returns their partition names (audit_logs_pYYYYMM), oldest first.
	Prune(ctx context.Context, now time.Time, keys *Keyring) ([]string, error)
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
