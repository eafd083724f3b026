package auditsink

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// The hash chain. Each writer owns one chain (ChainID); rows get Seq 1, 2, …
// and Hash = SHA-256(canonical(row) ‖ PrevHash) where canonical is a
// versioned, length-prefixed encoding of every stored column, computed in Go
// (never from the database's text forms, which depend on server settings).
// The first row of a chain has PrevHash = 32 zero bytes.

const hashVersion = "meshguard-audit-v1"

// zeroHash is the PrevHash of the first row of every chain.
var zeroHash = make([]byte, sha256.Size)

// ChainHead is the latest row of one chain: what is published outside the
// database and what Verify can be checked against.
type ChainHead struct {
	ChainID string    `json:"chain_id"`
	Seq     int64     `json:"seq"`
	Hash    []byte    `json:"hash"`
	At      time.Time `json:"at"`
}

// chain assigns the chain columns. Only the writer goroutine uses it.
type chain struct {
	id   string
	seq  int64
	prev []byte
	buf  []byte
}

func newChain(id string) *chain {
	return &chain{id: id, prev: zeroHash}
}

// chainIDFor is <prefix>/<start time in ns> (prefix: audit.chain_id, else
// the hostname): every writer start begins a new chain, so a restarted
// writer never reuses the (chain_id, seq) keys of its previous run.
func chainIDFor(prefix string, now time.Time) string {
	if prefix == "" {
		host, err := os.Hostname()
		if err != nil || host == "" {
			host = "meshguard"
		}
		prefix = host
	}
	return prefix + "/" + strconv.FormatInt(now.UnixNano(), 10)
}

// link normalises recs into their stored form and assigns ChainID, Seq,
// PrevHash and Hash, advancing the chain head.
func (c *chain) link(recs []Record) {
	for i := range recs {
		normalize(&recs[i])
	}
	c.linkNormalized(recs)
}

// linkNormalized is link for records normalize already saw.
func (c *chain) linkNormalized(recs []Record) {
	for i := range recs {
		r := &recs[i]
		c.seq++
		r.ChainID, r.Seq, r.PrevHash = c.id, c.seq, c.prev
		c.buf = appendCanonical(c.buf[:0], r)
		sum := sha256.Sum256(c.buf)
		r.Hash = sum[:]
		c.prev = r.Hash
	}
}

// rowHash recomputes the hash of a stored row.
func rowHash(r *Record, buf []byte) ([]byte, []byte) {
	buf = appendCanonical(buf[:0], r)
	sum := sha256.Sum256(buf)
	return sum[:], buf
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
