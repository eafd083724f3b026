package audittrail

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

// Checkpoints. A chain's head is published as a C2SP signed note whose text
// is a C2SP tlog-checkpoint:
//
//	<origin: the chain id>
//	<tree size: rows in the chain>
//	<base64 RFC 6962 root of rows 1..size>
//	time <RFC 3339 UTC>            extension line: when it was signed
//	chain-no <n>                   extension line, once known: the chain's number in row ids
//
//	— <key name> <base64 key hash ‖ Ed25519 signature>
//
// golang.org/x/mod/sumdb/note signs and opens it. Checkpoints go to the
// witness directory (audit.witness_dir), one file per chain holding its
// latest checkpoint, at the chain's first durable batch, every
// audit.checkpoint_interval while it grows and when the writer closes; GET
// /v1/audit/checkpoints serves the same files to an external collector.

// witnessSuffix ends a checkpoint file's name; the rest is the chain id,
// path-escaped.
const witnessSuffix = ".checkpoint"

// maxNote bounds a checkpoint or retention note read back.
const maxNote = 64 << 10

// Checkpoint is one signed checkpoint, opened.
type Checkpoint struct {
	ChainID string    `json:"chain_id"`
	Size    int64     `json:"size"`
	Root    tlog.Hash `json:"-"`
	Time    time.Time `json:"time"`
	ChainNo int64     `json:"chain_no,omitempty"`
	KeyID   string    `json:"key_id"`
	Note    string    `json:"note"` // the signed note, verbatim
	File    string    `json:"-"`
}

// checkpointText is the tlog-checkpoint body of h.
func checkpointText(h ChainHead, chainNo int64, at time.Time) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n%d\n%s\ntime %s\n", h.ChainID, h.Seq, base64.StdEncoding.EncodeToString(h.Root), at.UTC().Format(time.RFC3339Nano))
	if chainNo > 0 {
		fmt.Fprintf(&b, "chain-no %d\n", chainNo)
	}
	return b.String()
}

// signCheckpoint returns the signed note of h.
func signCheckpoint(k *Key, h ChainHead, chainNo int64, at time.Time) ([]byte, error) {
	return note.Sign(&note.Note{Text: checkpointText(h, chainNo, at)}, k.signer)
}

// errUnknownKey marks a note signed by no key the verifier knows.
var errUnknownKey = errors.New("signed by no known key")

// openNote checks msg's signature against verifiers and returns its text
// and the id of the key that signed it.
func openNote(msg []byte, verifiers note.Verifiers) (string, string, error) {
	n, err := note.Open(msg, verifiers)
	if err != nil {
		var unv *note.UnverifiedNoteError
		if errors.As(err, &unv) {
			var ids []string
			for _, s := range unv.Note.UnverifiedSigs {
				ids = append(ids, keyID(s.Name, s.Hash))
			}
			return "", "", fmt.Errorf("%w (signed by %s)", errUnknownKey, strings.Join(ids, ", "))
		}
		var inv *note.InvalidSignatureError
		if errors.As(err, &inv) {
			return "", "", fmt.Errorf("signature by %s does not verify (note altered)", keyID(inv.Name, inv.Hash))
		}
		return "", "", fmt.Errorf("not a signed note: %w", err)
	}
	s := n.Sigs[0]
	return n.Text, keyID(s.Name, s.Hash), nil
}

// OpenCheckpoint opens a signed checkpoint and parses it.
func OpenCheckpoint(msg []byte, verifiers note.Verifiers) (Checkpoint, error) {
	text, kid, err := openNote(msg, verifiers)
	if err != nil {
		return Checkpoint{}, err
	}
	cp, err := parseCheckpointText(text)
	if err != nil {
		return Checkpoint{}, err
	}
	cp.KeyID, cp.Note = kid, string(msg)
	return cp, nil
}

func parseCheckpointText(text string) (Checkpoint, error) {
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	bad := func(why string) (Checkpoint, error) {
		return Checkpoint{}, fmt.Errorf("not a meshguard checkpoint: %s", why)
	}
	if len(lines) < 3 {
		return bad("fewer than 3 lines")
	}
	cp := Checkpoint{ChainID: lines[0]}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil || size < 0 || cp.ChainID == "" {
		return bad("bad origin or size line")
	}
	cp.Size = size
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != tlog.HashSize {
		return bad("bad root hash line")
	}
	copy(cp.Root[:], root)
	for _, l := range lines[3:] {
		k, v, _ := strings.Cut(l, " ")
		switch k {
		case "time":
			if cp.Time, err = time.Parse(time.RFC3339Nano, v); err != nil {
				return bad("bad time line")
			}
		case "chain-no":
			if cp.ChainNo, err = strconv.ParseInt(v, 10, 64); err != nil || cp.ChainNo < 1 {
				return bad("bad chain-no line")
			}
		}
	}
	return cp, nil
}

// witnessFile is the file of chain's latest checkpoint in dir.
func witnessFile(dir, chain string) string {
	return filepath.Join(dir, url.PathEscape(chain)+witnessSuffix)
}

// chainOfWitnessFile is the chain id a witness file is named for.
func chainOfWitnessFile(name string) string {
	c, err := url.PathUnescape(strings.TrimSuffix(filepath.Base(name), witnessSuffix))
	if err != nil {
		return filepath.Base(name)
	}
	return c
}

// WitnessError is a witness file that cannot be used: unreadable, not a
// signed checkpoint, or signed by an unknown key.
type WitnessError struct {
	File    string
	ChainID string // from the file name
	Seq     int64  // the checkpoint's size when it parsed that far
	Err     error
}

func (e *WitnessError) Error() string {
	return fmt.Sprintf("witness %s (chain %q): %v", e.File, e.ChainID, e.Err)
}

func (e *WitnessError) Unwrap() error { return e.Err }

// ReadWitness reads every checkpoint in dir and checks its signature. The
// first file that fails is returned as a *WitnessError; a missing dir is an
// error too (a trail whose witness is gone cannot be vouched for).
func ReadWitness(dir string, verifiers note.Verifiers) ([]Checkpoint, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading the witness directory: %w", err)
	}
	var out []Checkpoint
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), witnessSuffix) {
			continue
		}
		path := filepath.Join(dir, e.Name())
		cp, err := readCheckpointFile(path, verifiers)
		if err != nil {
			return nil, err
		}
		out = append(out, cp)
	}
	slices.SortFunc(out, func(a, b Checkpoint) int { return strings.Compare(a.ChainID, b.ChainID) })
	return out, nil
}

func readCheckpointFile(path string, verifiers note.Verifiers) (Checkpoint, error) {
	chain := chainOfWitnessFile(path)
	werr := func(seq int64, err error) error {
		return &WitnessError{File: path, ChainID: chain, Seq: seq, Err: err}
	}
	f, err := os.Open(path)
	if err != nil {
		return Checkpoint{}, werr(0, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxNote+1))
	if err != nil {
		return Checkpoint{}, werr(0, err)
	}
	if len(b) > maxNote {
		return Checkpoint{}, werr(0, fmt.Errorf("larger than %d bytes", maxNote))
	}
	cp, err := OpenCheckpoint(b, verifiers)
	if err != nil {
		// Name the size it claims, when it parses that far unsigned.
		var seq int64
		if i := bytes.Index(b, []byte("\n\n")); i > 0 {
			if c, perr := parseCheckpointText(string(b[:i+1])); perr == nil {
				seq = c.Size
			}
		}
		return Checkpoint{}, werr(seq, err)
	}
	if cp.ChainID != chain {
		return Checkpoint{}, werr(cp.Size, fmt.Errorf("holds the checkpoint of chain %q (file renamed)", cp.ChainID))
	}
	cp.File = path
	return cp, nil
}

// publisher keeps the witness: it signs the durable heads of this process's
// chains and writes them to the witness directory. It is safe for
// concurrent use.
type publisher struct {
	log       *slog.Logger
	dir       string
	key       *Key
	verifiers note.Verifiers
	now       func() time.Time

	mu      sync.Mutex
	chains  map[string]*pubChain
	lastErr string
	done    int64 // checkpoints written
}

type pubChain struct {
	head      ChainHead
	chainNo   int64
	published ChainHead // last written
	pubNo     int64
}

func newPublisher(log *slog.Logger, dir string, keys *Keyring, now func() time.Time) (*publisher, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("creating the witness directory: %w", err)
	}
	return &publisher{log: log, dir: dir, key: keys.Current, verifiers: keys.Verifiers(), now: now, chains: map[string]*pubChain{}}, nil
}

// update records a chain's new durable head. It reports whether this is the
// chain's first (the caller publishes at once then).
func (p *publisher) update(h ChainHead) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.chains[h.ChainID]
	if !ok {
		c = &pubChain{}
		p.chains[h.ChainID] = c
	}
	if h.Seq > c.head.Seq {
		c.head = h
	}
	return !ok
}

// setChainNo records the number the store gave a chain.
func (p *publisher) setChainNo(chain string, no int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.chains[chain]; ok && c.chainNo == 0 {
		c.chainNo = no
	}
}

// publish writes a checkpoint for every chain whose head or number moved
// since its last one. Writing is serialised by the lock: at most a few
// small files per interval.
func (p *publisher) publish() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	ids := make([]string, 0, len(p.chains))
	for id := range p.chains {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		c := p.chains[id]
		if c.head.Seq == 0 || (c.head.Seq == c.published.Seq && c.chainNo == c.pubNo) {
			continue
		}
		if err := p.write(c); err != nil {
			errs = append(errs, err)
			continue
		}
		c.published, c.pubNo = c.head, c.chainNo
		p.done++
	}
	err := errors.Join(errs...)
	if err != nil {
		p.lastErr = err.Error()
		p.log.Error("publishing audit checkpoints failed", "dir", p.dir, "err", err)
	} else {
		p.lastErr = ""
	}
	return err
}

// write replaces the chain's witness file with a newer checkpoint. It never
// overwrites a file it cannot open (someone else wrote it: keep it for an
// investigator) or one of a larger size.
func (p *publisher) write(c *pubChain) error {
	path := witnessFile(p.dir, c.head.ChainID)
	if _, err := os.Stat(path); err == nil {
		old, err := readCheckpointFile(path, p.verifiers)
		if err != nil {
			return fmt.Errorf("%w; not overwritten", err)
		}
		if old.Size > c.head.Seq {
			return fmt.Errorf("witness %s holds size %d, more than the head %d; not overwritten", path, old.Size, c.head.Seq)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("witness %s: %w", path, err)
	}
	msg, err := signCheckpoint(p.key, c.head, c.chainNo, p.now())
	if err != nil {
		return fmt.Errorf("signing the checkpoint of %s: %w", c.head.ChainID, err)
	}
	tmp := path + ".tmp"
	if err := writeFileSync(tmp, msg); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing the witness: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing the witness: %w", err)
	}
	if err := syncDir(p.dir); err != nil {
		return fmt.Errorf("syncing the witness directory: %w", err)
	}
	p.log.Info("audit checkpoint published", "chain_id", c.head.ChainID, "size", c.head.Seq,
		"root", base64.StdEncoding.EncodeToString(c.head.Root), "key_id", p.key.id)
	return nil
}

// status is the witness's state for /readyz.
func (p *publisher) status() (written int64, lastErr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done, p.lastErr
}

// CheckpointsHandler serves GET /v1/audit/checkpoints: the latest signed
// checkpoint of every chain in the witness directory, and the public keys
// that verify them, as JSON. Checkpoints carry no audit content (chain ids,
// sizes, roots, times), so the endpoint needs no token, like /metrics.
// Reading the witness checks one signature a chain, and every writer start
// adds a chain: the answer is made at most once per checkpointsCacheFor and
// shared, so callers without a token cannot make it cost more than that.
func CheckpointsHandler(log *slog.Logger, dir string, keys *Keyring) http.Handler {
	return checkpointsHandler(log, dir, keys, time.Now)
}

// checkpointsCacheFor is how long one reading of the witness is served; far
// below audit.checkpoint_interval, so a collector misses nothing.
const checkpointsCacheFor = time.Second

func checkpointsHandler(log *slog.Logger, dir string, keys *Keyring, now func() time.Time) http.Handler {
	verifiers := keys.Verifiers()
	var vkeys []string
	for _, k := range keys.private {
		vkeys = append(vkeys, k.vkey)
	}
	slices.Sort(vkeys)
	var (
		mu     sync.Mutex
		made   time.Time
		status int
		body   []byte
	)
	answer := func() (int, []byte) {
		mu.Lock()
		defer mu.Unlock()
		if t := now(); body == nil || t.Sub(made) >= checkpointsCacheFor || t.Before(made) {
			status, body = readCheckpointsAnswer(log, dir, verifiers, vkeys)
			made = t
		}
		return status, body
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		code, b := answer()
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		w.Write(b)
	})
}

// readCheckpointsAnswer reads the witness once and encodes the answer.
func readCheckpointsAnswer(log *slog.Logger, dir string, verifiers note.Verifiers, vkeys []string) (int, []byte) {
	cps, err := ReadWitness(dir, verifiers)
	if err != nil {
		log.Error("serving audit checkpoints: the witness cannot be read", "err", err)
		b, _ := json.Marshal(map[string]string{"error": "the witness cannot be read; see the log"})
		return http.StatusInternalServerError, append(b, '\n')
	}
	if cps == nil {
		cps = []Checkpoint{}
	}
	b, err := json.Marshal(struct {
		VerifierKeys []string     `json:"verifier_keys"`
		Checkpoints  []Checkpoint `json:"checkpoints"`
	}{vkeys, cps})
	if err != nil {
		log.Error("serving audit checkpoints", "err", err)
		return http.StatusInternalServerError, []byte(`{"error":"encoding the checkpoints failed"}` + "\n")
	}
	return http.StatusOK, append(b, '\n')
}
