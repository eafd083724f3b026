package audittrail

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"hash"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// The chain. Each writer owns one chain (ChainID); rows get Seq 1, 2, … and
// are bound by the trail's key (see keys.go), which the database never
// holds:
//
//	leaf = SHA-256(0x00 ‖ canonical(row))        the row's RFC 6962 leaf hash
//	hash = HMAC-SHA256(macKey, leaf)             stored in the hash column
//
// canonical is a versioned, length-prefixed encoding of every stored column
// but id (which the store derives from the chain and seq, see rowID), the
// key id, and PrevHash, the previous row's hash (32 zero bytes for seq 1).
// It is computed in Go, never from the database's text forms, which depend
// on server settings. The leaves also build the chain's Merkle tree, whose
// signed roots are the checkpoints (checkpoint.go).

const hashVersion = "meshguard-audit-v2"

// zeroHash is the PrevHash of the first row of every chain.
var zeroHash = make([]byte, sha256.Size)

// ChainHead is the latest row of one chain: what a checkpoint signs.
type ChainHead struct {
	ChainID string    `json:"chain_id"`
	Seq     int64     `json:"seq"`  // rows in the chain: its tree size
	Root    []byte    `json:"root"` // Merkle tree hash of rows 1..Seq
	Hash    []byte    `json:"hash"` // the hash (MAC) of row Seq
	KeyID   string    `json:"key_id,omitempty"`
	At      time.Time `json:"at,omitzero"`
}

// Row ids: a row's id is its chain's number (audit_chains, assigned by the
// store on the chain's first write) in the high bits and its seq in the low
// 32, so an id names exactly one (chain, seq) and Verify catches ids moved
// between rows. Ids stay below 2^53 (exact in JSON numbers) up to chain
// number 2^21.
const (
	idSeqBits   = 32
	maxChainSeq = 1<<idSeqBits - 1
)

func rowID(chainNo, seq int64) int64 { return chainNo<<idSeqBits | seq }

// chain assigns the chain columns. Only the writer goroutine uses it.
type chain struct {
	id   string
	key  *Key
	seq  int64
	prev []byte
	tree merkleRange
	buf  []byte
	leaf [sha256.Size]byte
	mac  hash.Hash
}

func newChain(id string, key *Key) *chain {
	return &chain{id: id, key: key, prev: zeroHash, mac: hmac.New(sha256.New, key.mac)}
}

// chainIDFor is <prefix>/<start time in ns> (prefix: audit.chain_id, else
// the hostname): every writer start begins a new chain, so a restarted
// writer never reuses the (chain_id, seq) keys of its previous run.
func chainIDFor(prefix string, now time.Time) string {
	if prefix == "" {
		host, err := os.Hostname()
		if err != nil || !validKeyName(host) {
			host = "meshguard"
		}
		prefix = host
	}
	return prefix + "/" + strconv.FormatInt(now.UnixNano(), 10)
}

// link normalises recs into their stored form and assigns ChainID, Seq,
// KeyID, PrevHash and Hash, advancing the chain head.
func (c *chain) link(recs []Record) {
	for i := range recs {
		normalize(&recs[i])
	}
	c.linkNormalized(recs)
}

// linkNormalized is link for records normalize already saw.
func (c *chain) linkNormalized(recs []Record) {
	hashes := make([]byte, sha256.Size*len(recs)) // one allocation per batch
	for i := range recs {
		r := &recs[i]
		c.seq++
		r.ChainID, r.Seq, r.KeyID, r.PrevHash = c.id, c.seq, c.key.id, c.prev
		c.leaf, c.buf = rowLeaf(r, c.buf)
		c.tree.appendLeaf(c.leaf)
		c.mac.Reset()
		c.mac.Write(c.leaf[:]) // from the struct: a local would escape through the interface
		r.Hash = c.mac.Sum(hashes[i*sha256.Size : i*sha256.Size : (i+1)*sha256.Size])
		c.prev = r.Hash
	}
}

// head is the chain's current head.
func (c *chain) head() ChainHead {
	root := c.tree.root()
	return ChainHead{ChainID: c.id, Seq: c.seq, Root: root[:], Hash: c.prev, KeyID: c.key.id}
}

// rowLeaf returns the leaf hash of a stored row, using buf as scratch.
func rowLeaf(r *Record, buf []byte) ([sha256.Size]byte, []byte) {
	buf = append(buf[:0], 0)
	buf = appendCanonical(buf, r)
	return leafHash(buf), buf
}

// rowMAC is the hash column of a row whose leaf hash is leaf, under mac
// (hmac.New(sha256.New, key.mac)).
func rowMAC(mac hash.Hash, leaf [sha256.Size]byte) []byte {
	mac.Reset()
	mac.Write(leaf[:])
	return mac.Sum(nil)
}

// normalize brings a record into the exact form both stores keep and read
// back, so the hash computed before the write verifies after it: UTC
// microseconds, valid UTF-8 without NUL, canonical JSON objects.
func normalize(r *Record) {
	if r.CreatedAt.IsZero() {
		r.CreatedAt = time.Now()
	}
	r.CreatedAt = r.CreatedAt.UTC().Truncate(time.Microsecond)
	// Indexed columns stay well under PostgreSQL's btree entry limit
	// (~2700 bytes), which would otherwise refuse the whole batch.
	r.Action, r.Severity = clipText(r.Action, maxIndexedText), clipText(r.Severity, maxIndexedText)
	r.EntityType, r.EntityID = clipText(r.EntityType, maxIndexedText), clipText(r.EntityID, maxIndexedText)
	r.UserID, r.Tenant = clipText(r.UserID, maxIndexedText), clipText(r.Tenant, maxIndexedText)
	r.IPAddress, r.UserAgent, r.Method = clipText(r.IPAddress, maxText), clipText(r.UserAgent, maxText), clipText(r.Method, maxText)
	r.Path, r.RequestID, r.Origin = clipText(r.Path, maxText), clipText(r.RequestID, maxText), clipText(r.Origin, maxText)
	r.Metadata = canonicalJSONOrWrap(r.Metadata)
	r.OldValues = canonicalJSONOrWrap(r.OldValues)
	r.NewValues = canonicalJSONOrWrap(r.NewValues)
}

// Text column bounds, in bytes.
const (
	maxIndexedText = 512
	maxText        = 16 << 10
)

// clipText is cleanText cut to at most n bytes on a rune boundary.
func clipText(s string, n int) string {
	s = cleanText(s)
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// cleanText makes s storable as PostgreSQL text: valid UTF-8, no NUL.
func cleanText(s string) string {
	if utf8.ValidString(s) && strings.IndexByte(s, 0) < 0 {
		return s
	}
	s = strings.ToValidUTF8(s, "\uFFFD")
	return strings.ReplaceAll(s, "\x00", "\uFFFD")
}

// canonicalJSONOrWrap returns the canonical form of raw, or, when raw is not
// valid JSON, a JSON object holding it as a string so the row still stores.
func canonicalJSONOrWrap(raw json.RawMessage) json.RawMessage {
	if len(raw) == 0 {
		return nil
	}
	c, err := canonicalJSON(raw)
	if err != nil {
		c, _ = canonicalJSON(mustMarshal(map[string]string{"_invalid_json": string(raw)}))
	}
	return c
}

func mustMarshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// appendCanonical appends the hash input of r: the version, every stored
// column length-prefixed (NULL JSON distinct from empty), and PrevHash.
func appendCanonical(b []byte, r *Record) []byte {
	str := func(s string) {
		b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
		b = append(b, s...)
	}
	raw := func(p []byte, present bool) {
		if !present {
			b = append(b, 0)
			return
		}
		b = append(b, 1)
		b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
		b = append(b, p...)
	}
	str(hashVersion)
	str(r.KeyID)
	str(r.ChainID)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Seq))
	b = binary.BigEndian.AppendUint64(b, uint64(r.CreatedAt.UnixMicro()))
	str(r.Action)
	str(r.Severity)
	str(r.EntityType)
	str(r.EntityID)
	str(r.UserID)
	str(r.IPAddress)
	str(r.UserAgent)
	str(r.Method)
	str(r.Path)
	b = binary.BigEndian.AppendUint64(b, uint64(int64(r.Status)))
	str(r.RequestID)
	str(r.Origin)
	str(r.Tenant)
	raw(r.Metadata, r.Metadata != nil)
	raw(r.OldValues, r.OldValues != nil)
	raw(r.NewValues, r.NewValues != nil)
	raw(r.PrevHash, true)
	return b
}
