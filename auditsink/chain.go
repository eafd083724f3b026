package auditsink

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"slices"
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

// defaultChainID is hostname/start time: a new chain per process start.
func defaultChainID(now time.Time) string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "meshguard"
	}
	return host + "/" + strconv.FormatInt(now.UnixNano(), 10)
}

// link normalises recs into their stored form and assigns ChainID, Seq,
// PrevHash and Hash, advancing the chain head.
func (c *chain) link(recs []Record) {
	for i := range recs {
		r := &recs[i]
		normalize(r)
		c.seq++
		r.ChainID, r.Seq, r.PrevHash = c.id, c.seq, c.prev
		c.buf = appendCanonical(c.buf[:0], r)
		sum := sha256.Sum256(c.buf)
		r.Hash = sum[:]
		c.prev = r.Hash
	}
}

// head returns the current head.
func (c *chain) head() ChainHead {
	return ChainHead{ChainID: c.id, Seq: c.seq, Hash: c.prev}
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
	for _, s := range []*string{&r.Action, &r.Severity, &r.EntityType, &r.EntityID, &r.UserID, &r.IPAddress,
		&r.UserAgent, &r.Method, &r.Path, &r.RequestID, &r.Origin, &r.Tenant} {
		*s = cleanText(*s)
	}
	r.Metadata = canonicalJSONOrWrap(r.Metadata)
	r.OldValues = canonicalJSONOrWrap(r.OldValues)
	r.NewValues = canonicalJSONOrWrap(r.NewValues)
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

// canonicalJSON re-encodes a JSON value with sorted object keys, no
// insignificant space, numbers in shortest float64 form and strings without
// NUL. jsonb keeps a value's meaning but not its bytes, so the chain hashes
// this form, and verification recomputes it from what the store returns.
func canonicalJSON(raw []byte) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, fmt.Errorf("trailing data after JSON value")
	}
	var buf bytes.Buffer
	if err := writeCanonical(&buf, v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeCanonical(buf *bytes.Buffer, v any) error {
	switch v := v.(type) {
	case nil:
		buf.WriteString("null")
	case bool:
		buf.WriteString(strconv.FormatBool(v))
	case json.Number:
		f, err := strconv.ParseFloat(string(v), 64)
		if err != nil || math.IsInf(f, 0) {
			// Out of float64 range: keep the text so the row still stores.
			writeString(buf, string(v))
			return nil
		}
		if f == math.Trunc(f) && math.Abs(f) < 1e15 {
			buf.WriteString(strconv.FormatInt(int64(f), 10))
		} else {
			buf.WriteString(strconv.FormatFloat(f, 'g', -1, 64))
		}
	case string:
		writeString(buf, v)
	case []any:
		buf.WriteByte('[')
		for i, e := range v {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := writeCanonical(buf, e); err != nil {
				return err
			}
		}
		buf.WriteByte(']')
	case map[string]any:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		buf.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				buf.WriteByte(',')
			}
			writeString(buf, k)
			buf.WriteByte(':')
			if err := writeCanonical(buf, v[k]); err != nil {
				return err
			}
		}
		buf.WriteByte('}')
	default:
		return fmt.Errorf("unexpected JSON value %T", v)
	}
	return nil
}

// writeString writes s as a JSON string; NUL (which jsonb rejects) becomes
// U+FFFD and invalid UTF-8 is replaced.
func writeString(buf *bytes.Buffer, s string) {
	s = cleanText(s)
	enc := json.NewEncoder(buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	buf.Truncate(buf.Len() - 1) // Encode's newline
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
