package audittrail

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"slices"
	"time"

	"golang.org/x/mod/sumdb/tlog"
)

// VerifyOptions says what Verify checks the rows against.
type VerifyOptions struct {
	// From and To restrict verification to the chains with rows whose
	// created_at is in [From, To) (zero: unbounded). Those chains are still
	// checked whole, from seq 1: a checkpoint vouches for a whole prefix.
	From, To time.Time
	// Keys: private keys check every row's MAC; public keys (of the private
	// ones and audit.trusted_keys) check checkpoint and retention
	// signatures. Required.
	Keys *Keyring
	// Witness is the latest signed checkpoint of each chain (ReadWitness).
	Witness []Checkpoint
	// MaxRows stops the walk with a *TooManyRowsError once it has read
	// more rows than this (0: no limit), so an interactive caller can
	// refuse a range too large to verify at once instead of running for
	// hours. The CLI sets none.
	MaxRows int64
}

// TooManyRowsError: the chains of the range hold more rows than
// VerifyOptions.MaxRows; nothing was concluded about them.
type TooManyRowsError struct {
	Max    int64
	Chains int // chains in the range
}

func (e *TooManyRowsError) Error() string {
	return fmt.Sprintf("the %d chains of this range hold more than %d rows, too many to verify at once; narrow the range or run `meshguard audit verify`", e.Chains, e.Max)
}

// VerifyReport is the outcome of Verify. OK is false when the trail does
// not match its keys and witness; Break then describes the first problem
// found (chains are walked in chain id order, rows in seq order).
type VerifyReport struct {
	OK     bool  `json:"ok"`
	Chains int   `json:"chains"`
	Rows   int64 `json:"rows"`
	// MACsChecked: every row's MAC was checked with a private key. Without
	// one, only what signed checkpoints cover is vouched for.
	MACsChecked bool `json:"macs_checked"`
	// Pruned rows are vouched for by signed retention checkpoints.
	Pruned int64 `json:"pruned_rows"`
	// Witnessed counts chains whose rows match a signed checkpoint.
	Witnessed int `json:"witnessed_chains"`
	// AfterCheckpoint counts rows written after their chain's last
	// checkpoint: vouched for by their MACs only (when MACsChecked), and
	// deletable from the end of a chain without a trace.
	AfterCheckpoint int64 `json:"rows_after_checkpoint"`
	// Unwitnessed lists chains with no checkpoint at all (a writer killed
	// between its first write and its first checkpoint): MACs only.
	Unwitnessed []string    `json:"unwitnessed_chains,omitempty"`
	Heads       []ChainHead `json:"heads"` // the last row seen of each chain
	Break       *ChainBreak `json:"break,omitempty"`
}

// ChainBreak is what is wrong and where.
type ChainBreak struct {
	ChainID   string    `json:"chain_id"`
	Seq       int64     `json:"seq"`
	ID        int64     `json:"id,omitempty"` // row id, 0 when the row is missing
	CreatedAt time.Time `json:"created_at,omitzero"`
	Reason    string    `json:"reason"`
}

func (b *ChainBreak) String() string {
	s := fmt.Sprintf("chain %q seq %d", b.ChainID, b.Seq)
	if b.ID != 0 {
		s += fmt.Sprintf(" (id %d, created_at %s)", b.ID, b.CreatedAt.Format(time.RFC3339Nano))
	}
	return s + ": " + b.Reason
}

// WitnessBreak turns an error of ReadWitness into a report break, so a
// corrupt or foreign witness file fails verification naming its chain.
func WitnessBreak(err error) *ChainBreak {
	var we *WitnessError
	if !errors.As(err, &we) {
		return nil
	}
	return &ChainBreak{ChainID: we.ChainID, Seq: we.Seq, Reason: fmt.Sprintf("witness file %s: %v", we.File, we.Err)}
}

// VerifyWitnessed is what `meshguard audit verify` and the console's
// "verify now" run: it reads the witness in dir with opts.Keys' verifiers
// and verifies reader against it. A witness file that does not parse or
// verify is a break naming its chain, not an error.
func VerifyWitnessed(ctx context.Context, reader recordReader, dir string, opts VerifyOptions) (VerifyReport, error) {
	if opts.Keys == nil {
		return VerifyReport{}, errors.New("verifying the audit trail: no keys")
	}
	witness, err := ReadWitness(dir, opts.Keys.Verifiers())
	if b := WitnessBreak(err); b != nil {
		return VerifyReport{Break: b}, nil
	}
	if err != nil {
		return VerifyReport{}, err
	}
	opts.Witness = witness
	return Verify(ctx, reader, opts)
}

// Verify checks the trail in reader (one of the stores) against opts.Keys
// and opts.Witness. Per chain it recomputes every row's leaf hash and, with
// a private key, its MAC; checks seqs, prev_hash links and ids; rebuilds the
// Merkle tree and compares it with the chain's signed checkpoint; bridges
// gaps only with signed retention checkpoints. Chains in the witness with no
// rows left, and (without a private key) chains that no checkpoint covers,
// are breaks. An error means the walk could not finish; tampering is in the
// report.
func Verify(ctx context.Context, reader recordReader, opts VerifyOptions) (VerifyReport, error) {
	cr, ok := reader.(chainReader)
	if !ok {
		return VerifyReport{}, fmt.Errorf("verifying the audit trail: %T cannot read chains", reader)
	}
	if opts.Keys == nil {
		return VerifyReport{}, errors.New("verifying the audit trail: no keys")
	}
	rep := VerifyReport{OK: true, MACsChecked: opts.Keys.HasPrivate()}
	fail := func(b *ChainBreak) (VerifyReport, error) {
		rep.OK, rep.Break = false, b
		return rep, nil
	}
	verifiers := opts.Keys.Verifiers()

	// Retention checkpoints: each must be signed by a known key and be what
	// its row claims; an unsigned one is an insider's.
	stored, err := cr.retentionNotes(ctx)
	if err != nil {
		return rep, err
	}
	retention := map[string]map[int64]*RetentionCheckpoint{}
	for _, sr := range stored {
		if sr.Note == "" {
			return fail(&ChainBreak{ChainID: sr.ChainID, Seq: sr.FirstSeq, Reason: "retention checkpoint carries no signed note (forged, or recorded before signed retention)"})
		}
		rc, err := openRetention(sr.Note, verifiers)
		if err != nil {
			return fail(&ChainBreak{ChainID: sr.ChainID, Seq: sr.FirstSeq, Reason: fmt.Sprintf("retention checkpoint does not verify: %v (forged)", err)})
		}
		if rc.ChainID != sr.ChainID || rc.FirstSeq != sr.FirstSeq {
			return fail(&ChainBreak{ChainID: sr.ChainID, Seq: sr.FirstSeq, Reason: fmt.Sprintf(
				"retention checkpoint row holds the signed note of chain %q seq %d (copied)", rc.ChainID, rc.FirstSeq)})
		}
		if retention[rc.ChainID] == nil {
			retention[rc.ChainID] = map[int64]*RetentionCheckpoint{}
		}
		retention[rc.ChainID][rc.FirstSeq] = &rc
	}

	witness := map[string]*Checkpoint{}
	for i := range opts.Witness {
		cp := &opts.Witness[i]
		if old, ok := witness[cp.ChainID]; !ok || cp.Size > old.Size {
			witness[cp.ChainID] = cp
		}
	}

	ranges, err := cr.chainRanges(ctx, opts.From, opts.To)
	if err != nil {
		return rep, err
	}
	chains := make([]string, 0, len(ranges))
	inRanges := make(map[string]bool, len(ranges))
	for _, rg := range ranges {
		chains = append(chains, rg.ChainID)
		inRanges[rg.ChainID] = true
	}
	windowed := !opts.From.IsZero() || !opts.To.IsZero()
	if !windowed {
		// Every start begins a chain, so both lists grow with restarts:
		// a set, not a scan of chains per witness entry.
		for id := range witness {
			if !inRanges[id] {
				chains = append(chains, id)
			}
		}
	}
	slices.Sort(chains)

	macs := map[string]hash.Hash{}
	var buf []byte
	for _, id := range chains {
		rep.Chains++
		w := &chainWalk{keys: opts.Keys, macs: macs, rep: &rep, chain: id, cp: witness[id], ret: retention[id],
			expect: 1, prev: zeroHash, buf: buf}
		if w.cp != nil {
			w.chainNo = w.cp.ChainNo
		}
		errStop := errors.New("stop")
		err := cr.scanChain(ctx, id, 0, 1<<62, func(r *Record) error {
			rep.Rows++
			if opts.MaxRows > 0 && rep.Rows > opts.MaxRows {
				return &TooManyRowsError{Max: opts.MaxRows, Chains: len(chains)}
			}
			if !w.row(r) {
				return errStop
			}
			return nil
		})
		buf = w.buf
		var tooMany *TooManyRowsError
		if errors.As(err, &tooMany) {
			return VerifyReport{}, tooMany
		}
		if err != nil && !errors.Is(err, errStop) {
			return rep, err
		}
		if rep.Break == nil {
			w.end()
		}
		if rep.Break != nil {
			rep.OK = false
			return rep, nil
		}
		root := w.tree.root()
		rep.Heads = append(rep.Heads, ChainHead{ChainID: id, Seq: w.expect - 1, Root: root[:], Hash: w.prev, KeyID: w.keyID})
	}
	return rep, nil
}

// chainWalk is the state of one chain during Verify.
type chainWalk struct {
	keys    *Keyring
	macs    map[string]hash.Hash
	rep     *VerifyReport
	chain   string
	cp      *Checkpoint // latest signed checkpoint, nil when none
	cpSeen  bool        // the tree reached cp.Size and matched
	ret     map[int64]*RetentionCheckpoint
	expect  int64  // next seq
	prev    []byte // hash the next row must link to
	tree    merkleRange
	keyID   string
	chainNo int64
	rows    int64 // rows seen (not bridged)
	buf     []byte
}

func (w *chainWalk) brk(seq int64, r *Record, format string, args ...any) bool {
	b := &ChainBreak{ChainID: w.chain, Seq: seq, Reason: fmt.Sprintf(format, args...)}
	if r != nil {
		b.ID, b.CreatedAt = r.ID, r.CreatedAt
	}
	w.rep.Break = b
	return false
}

// row checks one row; false when a break was recorded.
func (w *chainWalk) row(r *Record) bool {
	if r.KeyID == "" {
		return w.brk(r.Seq, r, "row names no key (inserted by hand, or written before keyed chains)")
	}
	if w.keyID == "" {
		w.keyID = r.KeyID
	} else if r.KeyID != w.keyID {
		return w.brk(r.Seq, r, "row names key %s but the chain is MAC'd with %s (row forged)", r.KeyID, w.keyID)
	}
	var leaf tlog.Hash
	leaf, w.buf = rowLeaf(r, w.buf)
	if w.keys.HasPrivate() {
		k := w.keys.privateKey(r.KeyID)
		if k == nil {
			return w.brk(r.Seq, r, "row is MAC'd with key %s, which is not configured (a forged row, or add the key to audit.previous_key_files)", r.KeyID)
		}
		mac, ok := w.macs[k.id]
		if !ok {
			mac = hmac.New(sha256.New, k.mac)
			w.macs[k.id] = mac
		}
		if !hmac.Equal(rowMAC(mac, leaf), r.Hash) {
			return w.brk(r.Seq, r, "MAC does not verify with key %s (row modified, forged, or MAC'd with another key)", k.id)
		}
	}
	switch {
	case r.Seq < w.expect:
		return w.brk(r.Seq, r, "seq %d repeats or goes backwards after %d (row duplicated or reordered)", r.Seq, w.expect-1)
	case r.Seq > w.expect:
		if !w.bridge(r.Seq) {
			return w.brk(r.Seq, r, "rows %d..%d are missing (deleted) and no signed retention checkpoint covers them", w.expect, r.Seq-1)
		}
	}
	if !bytes.Equal(r.PrevHash, w.prev) {
		return w.brk(r.Seq, r, "prev_hash does not match the hash of seq %d (rows reordered, replaced or rehashed)", r.Seq-1)
	}
	no, lo := r.ID>>idSeqBits, r.ID&maxChainSeq
	if w.chainNo == 0 {
		w.chainNo = no
	}
	if no == 0 || no != w.chainNo || lo != r.Seq {
		return w.brk(r.Seq, r, "id %d is not this row's (chain number %d, seq %d): ids swapped or rewritten", r.ID, w.chainNo, r.Seq)
	}
	w.tree.appendLeaf(leaf)
	if !w.checkRoot() {
		return false
	}
	w.rows++
	w.expect, w.prev = r.Seq+1, r.Hash
	return true
}

// checkRoot compares the tree with the checkpoint once it reaches its size.
func (w *chainWalk) checkRoot() bool {
	if w.cp == nil || w.cpSeen || w.tree.n != w.cp.Size {
		return true
	}
	w.cpSeen = true
	if w.tree.root() != w.cp.Root {
		return w.brk(w.cp.Size, nil, "rows 1..%d do not hash to the root of the chain's signed checkpoint (rows rewritten)", w.cp.Size)
	}
	return true
}

// bridge follows signed retention checkpoints from w.expect up to seq until
// (exclusive), checking their links, and adds their subtrees to the tree.
func (w *chainWalk) bridge(until int64) bool {
	for w.expect < until {
		rc, ok := w.ret[w.expect]
		if !ok || rc.LastSeq >= until || !bytes.Equal(rc.FirstPrevHash, w.prev) {
			return false
		}
		for _, n := range rc.Nodes {
			before := w.tree.n
			w.tree.appendSubtree(n.Hash, n.Level)
			if w.cp != nil && !w.cpSeen && w.cp.Size > before && w.cp.Size < w.tree.n {
				// The checkpoint's size falls inside a pruned subtree: its
				// root cannot be recomputed, but the pruner, holding the
				// key, checked those rows' MACs before it signed.
				w.cpSeen = true
			}
			if !w.checkRoot() {
				return false
			}
		}
		w.rep.Pruned += rc.LastSeq - rc.FirstSeq + 1
		w.expect, w.prev = rc.LastSeq+1, rc.LastHash
	}
	return true
}

// end checks what the chain's rows left unsaid: a checkpoint beyond them
// (deleted tail or whole chain), no checkpoint at all.
func (w *chainWalk) end() {
	for {
		rc, ok := w.ret[w.expect]
		if !ok || !w.bridge(rc.LastSeq+1) {
			break
		}
	}
	n := w.expect - 1
	switch {
	case w.cp == nil:
		if !w.keys.HasPrivate() {
			w.brk(1, nil, "no signed checkpoint covers this chain and no private key is configured to check its MACs (forged chain?)")
			return
		}
		w.rep.Unwitnessed = append(w.rep.Unwitnessed, w.chain)
		w.rep.AfterCheckpoint += w.rows
	case n < w.cp.Size && n == 0:
		w.brk(1, nil, "the chain's signed checkpoint covers %d rows but none is left (whole chain deleted)", w.cp.Size)
	case n < w.cp.Size:
		w.brk(n+1, nil, "rows %d..%d are missing: the chain's signed checkpoint covers %d rows (tail deleted, or rows still waiting in a writer's spool)", n+1, w.cp.Size, w.cp.Size)
	default:
		w.rep.Witnessed++
		w.rep.AfterCheckpoint += n - w.cp.Size
	}
}

// CheckRow checks one row on its own (an exported or displayed row): that
// its hash is the MAC of its content under the private key it names. It
// says nothing of the row's place in its chain; Verify does.
func (kr *Keyring) CheckRow(r *Record) error {
	k := kr.privateKey(r.KeyID)
	if k == nil {
		return fmt.Errorf("chain %q seq %d: key %q is not configured", r.ChainID, r.Seq, r.KeyID)
	}
	leaf, _ := rowLeaf(r, nil)
	if !hmac.Equal(rowMAC(hmac.New(sha256.New, k.mac), leaf), r.Hash) {
		return fmt.Errorf("chain %q seq %d: MAC does not verify with key %s", r.ChainID, r.Seq, k.id)
	}
	return nil
}
