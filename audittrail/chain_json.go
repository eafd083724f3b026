package audittrail

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// canonicalJSON re-encodes one JSON value in the canonical form the chain
// hashes: no insignificant space, object keys sorted bytewise (a duplicate
// key keeps its last value, as jsonb does), strings unescaped except for
// '"', '\\' and control characters, NUL and invalid UTF-8 replaced by
// U+FFFD (jsonb refuses them), numbers in shortest float64 form. jsonb keeps
// a value's meaning but not its bytes, so the writer hashes this form and
// Verify recomputes it from what the store returns.
func canonicalJSON(raw []byte) ([]byte, error) {
	c := canonicalizer{in: raw, out: make([]byte, 0, len(raw))}
	c.space()
	if err := c.value(0); err != nil {
		return nil, err
	}
	c.space()
	if c.pos != len(c.in) {
		return nil, fmt.Errorf("canonical JSON: trailing data at offset %d", c.pos)
	}
	return c.out, nil
}

const maxJSONDepth = 64

var (
	errBadJSON = errors.New("canonical JSON: invalid JSON")
	errTooDeep = fmt.Errorf("canonical JSON: nested deeper than %d", maxJSONDepth)
)

type canonicalizer struct {
	in  []byte
	pos int
	out []byte
	tmp []byte
}

type jsonMember struct {
	key        []byte // decoded
	start, end int    // the member "key":value in out
}

func (c *canonicalizer) space() {
	for c.pos < len(c.in) {
		switch c.in[c.pos] {
		case ' ', '\t', '\n', '\r':
			c.pos++
		default:
			return
		}
	}
}

func (c *canonicalizer) value(depth int) error {
	if depth > maxJSONDepth {
		return errTooDeep
	}
	if c.pos >= len(c.in) {
		return errBadJSON
	}
	switch b := c.in[c.pos]; {
	case b == '{':
		return c.object(depth)
	case b == '[':
		c.pos++
		c.out = append(c.out, '[')
		c.space()
		if c.pos < len(c.in) && c.in[c.pos] == ']' {
			c.pos++
			c.out = append(c.out, ']')
			return nil
		}
		for {
			c.space()
			if err := c.value(depth + 1); err != nil {
				return err
			}
			c.space()
			if c.pos >= len(c.in) {
				return errBadJSON
			}
			switch c.in[c.pos] {
			case ',':
				c.pos++
				c.out = append(c.out, ',')
			case ']':
				c.pos++
				c.out = append(c.out, ']')
				return nil
			default:
				return errBadJSON
			}
		}
	case b == '"':
		s, err := c.str()
		if err != nil {
			return err
		}
		c.out = appendCanonicalString(c.out, s)
		return nil
	case b == 't':
		return c.literal("true")
	case b == 'f':
		return c.literal("false")
	case b == 'n':
		return c.literal("null")
	case b == '-' || (b >= '0' && b <= '9'):
		return c.number()
	}
	return errBadJSON
}

func (c *canonicalizer) literal(lit string) error {
	if !bytes.HasPrefix(c.in[c.pos:], []byte(lit)) {
		return errBadJSON
	}
	c.pos += len(lit)
	c.out = append(c.out, lit...)
	return nil
}

func (c *canonicalizer) number() error {
	start := c.pos
	for c.pos < len(c.in) {
		b := c.in[c.pos]
		if (b >= '0' && b <= '9') || b == '-' || b == '+' || b == '.' || b == 'e' || b == 'E' {
			c.pos++
			continue
		}
		break
	}
	text := c.in[start:c.pos]
	if !validJSONNumber(text) {
		return errBadJSON
	}
	f, err := strconv.ParseFloat(string(text), 64)
	if err != nil || math.IsInf(f, 0) {
		// Out of float64 range: keep it as a string so the row still stores.
		c.out = appendCanonicalString(c.out, text)
		return nil
	}
	if f == math.Trunc(f) && math.Abs(f) < 1e15 {
		c.out = strconv.AppendInt(c.out, int64(f), 10)
	} else {
		c.out = strconv.AppendFloat(c.out, f, 'g', -1, 64)
	}
	return nil
}

// validJSONNumber checks the JSON number grammar.
func validJSONNumber(s []byte) bool {
	i := 0
	if i < len(s) && s[i] == '-' {
		i++
	}
	digits := func() int {
		n := 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
			n++
		}
		return n
	}
	if i < len(s) && s[i] == '0' {
		i++
	} else if digits() == 0 {
		return false
	}
	if i < len(s) && s[i] == '.' {
		i++
		if digits() == 0 {
			return false
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		if digits() == 0 {
			return false
		}
	}
	return i == len(s)
}

func (c *canonicalizer) object(depth int) error {
	c.pos++ // {
	start := len(c.out)
	c.out = append(c.out, '{')
	c.space()
	if c.pos < len(c.in) && c.in[c.pos] == '}' {
		c.pos++
		c.out = append(c.out, '}')
		return nil
	}
	var buf [16]jsonMember
	members := buf[:0]
	sorted := true
	for {
		c.space()
		if c.pos >= len(c.in) || c.in[c.pos] != '"' {
			return errBadJSON
		}
		key, err := c.str()
		if err != nil {
			return err
		}
		if len(members) > 0 {
			c.out = append(c.out, ',')
			if bytes.Compare(members[len(members)-1].key, key) >= 0 {
				sorted = false
			}
		}
		m := jsonMember{key: key, start: len(c.out)}
		c.out = appendCanonicalString(c.out, key)
		c.space()
		if c.pos >= len(c.in) || c.in[c.pos] != ':' {
			return errBadJSON
		}
		c.pos++
		c.out = append(c.out, ':')
		c.space()
		if err := c.value(depth + 1); err != nil {
			return err
		}
		m.end = len(c.out)
		members = append(members, m)
		c.space()
		if c.pos >= len(c.in) {
			return errBadJSON
		}
		if c.in[c.pos] == '}' {
			c.pos++
			break
		}
		if c.in[c.pos] != ',' {
			return errBadJSON
		}
		c.pos++
	}
	if sorted {
		c.out = append(c.out, '}')
		return nil
	}
	// Sort (stable, so among duplicates the last stays last) and keep the
	// last of each key.
	slices.SortStableFunc(members, func(a, b jsonMember) int { return bytes.Compare(a.key, b.key) })
	c.tmp = append(c.tmp[:0], c.out[start:]...)
	c.out = append(c.out[:start], '{')
	first := true
	for i, m := range members {
		if i+1 < len(members) && bytes.Equal(members[i+1].key, m.key) {
			continue
		}
		if !first {
			c.out = append(c.out, ',')
		}
		first = false
		c.out = append(c.out, c.tmp[m.start-start:m.end-start]...)
	}
	c.out = append(c.out, '}')
	return nil
}

// str decodes the JSON string at pos. The result aliases the input when it
// has no escapes.
func (c *canonicalizer) str() ([]byte, error) {
	c.pos++ // opening quote
	start := c.pos
	for c.pos < len(c.in) {
		b := c.in[c.pos]
		if b == '"' {
			s := c.in[start:c.pos]
			c.pos++
			return s, nil
		}
		if b == '\\' || b < 0x20 {
			break
		}
		c.pos++
	}
	// Slow path: escapes.
	buf := append([]byte(nil), c.in[start:c.pos]...)
	for c.pos < len(c.in) {
		b := c.in[c.pos]
		switch {
		case b == '"':
			c.pos++
			return buf, nil
		case b < 0x20:
			return nil, errBadJSON
		case b != '\\':
			buf = append(buf, b)
			c.pos++
			continue
		}
		if c.pos+1 >= len(c.in) {
			return nil, errBadJSON
		}
		e := c.in[c.pos+1]
		c.pos += 2
		switch e {
		case '"', '\\', '/':
			buf = append(buf, e)
		case 'b':
			buf = append(buf, '\b')
		case 'f':
			buf = append(buf, '\f')
		case 'n':
			buf = append(buf, '\n')
		case 'r':
			buf = append(buf, '\r')
		case 't':
			buf = append(buf, '\t')
		case 'u':
			r, ok := c.hex4()
			if !ok {
				return nil, errBadJSON
			}
			if utf16.IsSurrogate(r) {
				r2 := utf8.RuneError
				if c.pos+1 < len(c.in) && c.in[c.pos] == '\\' && c.in[c.pos+1] == 'u' {
					save := c.pos
					c.pos += 2
					if lo, ok := c.hex4(); ok {
						r2 = utf16.DecodeRune(r, lo)
						if r2 == utf8.RuneError {
							c.pos = save
						}
					} else {
						return nil, errBadJSON
					}
				}
				r = r2
			}
			buf = utf8.AppendRune(buf, r)
		default:
			return nil, errBadJSON
		}
	}
	return nil, errBadJSON
}

func (c *canonicalizer) hex4() (rune, bool) {
	if c.pos+4 > len(c.in) {
		return 0, false
	}
	v, err := strconv.ParseUint(string(c.in[c.pos:c.pos+4]), 16, 32)
	if err != nil {
		return 0, false
	}
	c.pos += 4
	return rune(v), true
}

// appendCanonicalString appends s as a canonical JSON string: NUL and invalid
// UTF-8 become U+FFFD; only '"', '\\' and control characters are escaped.
func appendCanonicalString(b, s []byte) []byte {
	b = append(b, '"')
	plain := true
	for _, c := range s {
		if c < 0x20 || c == '"' || c == '\\' || c >= utf8.RuneSelf {
			plain = false
			break
		}
	}
	if plain {
		b = append(b, s...)
		return append(b, '"')
	}
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == 0:
				b = append(b, "\uFFFD"...)
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case c < 0x20:
				b = append(b, fmt.Sprintf(`\u%04x`, c)...)
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRune(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, "\uFFFD"...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}
