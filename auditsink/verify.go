package auditsink

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"
)

// VerifyReport is the outcome of Verify. OK is false when a link is broken;
// Break then describes the first one found (chains are walked in chain id
// order, rows in seq order).
type VerifyReport struct {
	OK      bool        `json:"ok"`
	Chains  int         `json:"chains"`
	Rows    int64       `json:"rows"`
	Bridged int64       `json:"bridged_rows"` // pruned rows vouched for by checkpoints
	Heads   []ChainHead `json:"heads"`        // the last row seen of each chain
	Break   *ChainBreak `json:"break,omitempty"`
}

// ChainBreak is a broken link: where and why.
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

// Verify walks every chain with rows whose created_at is in [from, to)
// (zero: unbounded) and recomputes each row's hash and link. It reports the
// first modified row (hash mismatch), deleted rows (a seq gap not vouched
// for by a retention checkpoint), and reordered or inserted rows (prev_hash
// or seq out of line). Without from, a chain must start at seq 1 (or be
// bridged from seq 1 by checkpoints); with from, each chain's first row in
// the window is taken as the anchor. reader must be one of the stores.
// An error means the walk could not finish; tampering is in the report.
func Verify(ctx context.Context, reader recordReader, from, to time.Time) (VerifyReport, error) {
	return VerifyHeads(ctx, reader, from, to, nil)
}

// VerifyHeads is Verify that also checks published chain heads (see
// ReadChainHeads): each head's row must exist with that hash, which catches
// rows deleted from the end of a chain. Heads of chains with no rows in the
// window are reported as a break only when from and to are zero.
func VerifyHeads(ctx context.Context, reader recordReader, from, to time.Time, heads []ChainHead) (VerifyReport, error) {
	cr, ok := reader.(chainReader)
	if !ok {
		return VerifyReport{}, fmt.Errorf("verifying the audit chain: %T cannot read chains", reader)
	}
	cps, err := cr.checkpoints(ctx)
	if err != nil {
		return VerifyReport{}, err
	}
	byStart := map[string]map[int64]Checkpoint{}
	for _, c := range cps {
		if byStart[c.ChainID] == nil {
			byStart[c.ChainID] = map[int64]Checkpoint{}
		}
		byStart[c.ChainID][c.FirstSeq] = c
	}
	ranges, err := cr.chainRanges(ctx, from, to)
	if err != nil {
		return VerifyReport{}, err
	}
	want := map[string]ChainHead{}
	for _, h := range heads {
		if h.Seq > want[h.ChainID].Seq {
			want[h.ChainID] = h
		}
	}
	rep := VerifyReport{OK: true}
	windowed := !from.IsZero() || !to.IsZero()
	var buf []byte
	seen := map[string]bool{}
	for _, rg := range ranges {
		rep.Chains++
		seen[rg.ChainID] = true
		w := &chainWalk{cps: byStart[rg.ChainID], rep: &rep, chain: rg.ChainID, head: want[rg.ChainID]}
		after := int64(0)
		if windowed && rg.FirstSeq > 1 {
			after = rg.FirstSeq - 1
			w.anchor = true
		}
		w.expect, w.prev = after+1, zeroHash
		last := rg.LastSeq
		if h, ok := want[rg.ChainID]; ok && !windowed && h.Seq > last {
			last = h.Seq
		}
		errStop := errors.New("stop")
		err := cr.scanChain(ctx, rg.ChainID, after, last, func(r *Record) error {
			rep.Rows++
			var h []byte
			h, buf = rowHash(r, buf)
			if !w.row(r, h) {
				return errStop
			}
			return nil
		})
		if err != nil && !errors.Is(err, errStop) {
			return rep, err
		}
		if rep.Break != nil {
			rep.OK = false
			return rep, nil
		}
		rep.Heads = append(rep.Heads, ChainHead{ChainID: rg.ChainID, Seq: w.expect - 1, Hash: w.prev})
		if h := w.head; h.Seq > 0 && !w.headSeen {
			if h.Seq >= w.expect && !w.bridge(h.Seq+1, nil) {
				rep.Break = &ChainBreak{ChainID: rg.ChainID, Seq: h.Seq, Reason: fmt.Sprintf(
					"published head seq %d is missing: rows %d..%d deleted", h.Seq, w.expect, h.Seq)}
				rep.OK = false
				return rep, nil
			}
		}
	}
	if !windowed {
		for id, h := range want {
			if !seen[id] {
				w := &chainWalk{cps: byStart[id], rep: &rep, chain: id, expect: 1, prev: zeroHash}
				if !w.bridge(h.Seq+1, nil) || !bytes.Equal(w.prev, h.Hash) {
					rep.Break = &ChainBreak{ChainID: id, Seq: h.Seq, Reason: "published chain has no rows left (deleted)"}
					rep.OK = false
					return rep, nil
				}
			}
		}
	}
	return rep, nil
}

// chainWalk is the state of one chain during Verify.
type chainWalk struct {
	cps      map[int64]Checkpoint
	rep      *VerifyReport
	chain    string
	expect   int64  // next seq
	prev     []byte // hash the next row must link to
	anchor   bool   // the next row starts a window: its link is not checked
	head     ChainHead
	headSeen bool
}

// row checks one row; false when a break was recorded.
func (w *chainWalk) row(r *Record, h []byte) bool {
	fail := func(format string, args ...any) bool {
		w.rep.Break = &ChainBreak{ChainID: w.chain, Seq: r.Seq, ID: r.ID, CreatedAt: r.CreatedAt, Reason: fmt.Sprintf(format, args...)}
		return false
	}
	if !bytes.Equal(h, r.Hash) {
		return fail("row content does not match its hash (row modified)")
	}
	switch {
	case r.Seq < w.expect:
		return fail("seq %d repeats or goes backwards after %d (row inserted or reordered)", r.Seq, w.expect-1)
	case w.anchor:
		w.anchor = false
	case r.Seq > w.expect:
		if !w.bridge(r.Seq, r.PrevHash) {
			return fail("rows %d..%d are missing (deleted) and no retention checkpoint covers them", w.expect, r.Seq-1)
		}
	case !bytes.Equal(r.PrevHash, w.prev):
		return fail("prev_hash does not match the hash of seq %d (row reordered or replaced)", r.Seq-1)
	}
	if w.head.Seq == r.Seq {
		w.headSeen = true
		if !bytes.Equal(w.head.Hash, r.Hash) {
			return fail("hash differs from the published chain head %s (chain rewritten)", hex.EncodeToString(w.head.Hash))
		}
	}
	w.expect, w.prev = r.Seq+1, r.Hash
	return true
}

// bridge follows checkpoints from w.expect up to seq until (exclusive),
// checking every link; linkTo, when set, is the prev_hash of the row at
// until. It advances w on success.
func (w *chainWalk) bridge(until int64, linkTo []byte) bool {
	seq, prev, n := w.expect, w.prev, int64(0)
	for seq < until {
		c, ok := w.cps[seq]
		if !ok || c.LastSeq >= until || !bytes.Equal(c.FirstPrevHash, prev) {
			return false
		}
		n += c.LastSeq - c.FirstSeq + 1
		if w.head.Seq >= c.FirstSeq && w.head.Seq <= c.LastSeq {
			if w.head.Seq != c.LastSeq || !bytes.Equal(w.head.Hash, c.LastHash) {
				return false
			}
			w.headSeen = true
		}
		seq, prev = c.LastSeq+1, c.LastHash
	}
	if linkTo != nil && !bytes.Equal(linkTo, prev) {
		return false
	}
	w.rep.Bridged += n
	w.expect, w.prev = seq, prev
	return true
}

// ReadChainHeads reads an audit.chain_head_file and returns the latest
// head of each chain in it.
func ReadChainHeads(path string) ([]ChainHead, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading chain heads: %w", err)
	}
	defer f.Close()
	latest := map[string]int{}
	var out []ChainHead
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var h ChainHead
		if err := json.Unmarshal(sc.Bytes(), &h); err != nil || h.ChainID == "" || h.Seq < 1 || len(h.Hash) != len(zeroHash) {
			return nil, fmt.Errorf("reading chain heads: %s line %d: not a chain head", path, line)
		}
		if i, ok := latest[h.ChainID]; ok {
			if h.Seq > out[i].Seq {
				out[i] = h
			}
			continue
		}
		latest[h.ChainID] = len(out)
		out = append(out, h)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading chain heads: %w", err)
	}
	return out, nil
}
