package grpcserver

import (
	"encoding/binary"
	"fmt"
	"reflect"
	"strconv"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// The scan walks an encoded request with protowire, guided by the message's
// descriptor, before protobuf-go decodes it. It does not decode: it adds up
// what decoding would allocate (a struct per message, a copy per string, a
// slice slot per repeated element, an entry per map key), counts the
// repeated fields a service caps, and checks nesting, so that a request
// that would cost more than its budget, or carry more elements than the
// service accepts, is refused before a single struct exists. 600k tiny
// descriptors in 4 MiB cost one pass over the bytes, not 600k structs.
//
// The figures are estimates on the high side: a singular message repeated
// on the wire is merged into one struct by protobuf-go but counted each
// time here, and slices are assumed to have doubled.

// maxDepth bounds how deeply messages may nest in a request. Envoy's
// messages nest a few levels; JSON claims in metadata (Struct, Value,
// ListValue) take two levels per JSON level.
const maxDepth = 100

// What decoding allocates beyond the data, in bytes, measured with
// protobuf-go (TestEstimateCoversDecoding): a slice that grows by append
// allocates about five times its final size in all (Go grows large slices
// by 1.25x), a Go map about twice its final table with the tables it
// outgrew, and allocations round up to size classes.
const (
	listSlot     = 48  // a pointer or scalar element of a repeated field
	listString   = 80  // a string header of a repeated string field
	mapEntry     = 256 // one key of a map field (a map's first key costs its header and a group)
	oneofWrapper = 16  // the interface box of a oneof member
	unknownGrow  = 2   // unknown fields are appended to a growing []byte
	unknownType  = 256 // a message type protobuf-go has no Go type for
)

// maxCaps is how many capped fields one message type may have.
const maxCaps = 4

type fieldKind uint8

const (
	kindScalar fieldKind = iota
	kindBytes
	kindMessage
)

// shape is what the scan knows of one message type.
type shape struct {
	size   int64    // the Go struct decoding allocates
	dense  []*field // by field number, up to denseFields
	sparse map[protowire.Number]*field
}

const denseFields = 256

func (s *shape) field(n protowire.Number) *field {
	if int(n) < len(s.dense) {
		return s.dense[n]
	}
	return s.sparse[n]
}

type field struct {
	name  string
	kind  fieldKind
	wire  protowire.Type // of one unpacked occurrence
	list  bool           // repeated or map: each occurrence adds an element
	extra int64          // per occurrence beyond the data: list slot, oneof box
	msg   *shape         // kindMessage: the element's shape
	max   int32          // occurrences allowed per parent message; 0: any
	slot  int            // the parent frame's counter, when max > 0
}

// shapes builds and keeps the shapes of message types, with the caps
// services declared, keyed by the capped fields' full names.
type shapes struct {
	mu     sync.Mutex
	caps   map[protoreflect.FullName]int
	byName map[protoreflect.FullName]*shape
}

func newShapes(caps map[protoreflect.FullName]int) *shapes {
	return &shapes{caps: caps, byName: map[protoreflect.FullName]*shape{}}
}

// of returns md's shape, building it (and those it refers to) once.
func (ss *shapes) of(md protoreflect.MessageDescriptor) *shape {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.build(md)
}

func (ss *shapes) build(md protoreflect.MessageDescriptor) *shape {
	if s := ss.byName[md.FullName()]; s != nil {
		return s
	}
	s := &shape{size: structSize(md)}
	ss.byName[md.FullName()] = s // before the fields: types may refer to themselves
	fds := md.Fields()
	maxNum := 0
	for i := range fds.Len() {
		maxNum = max(maxNum, int(fds.Get(i).Number()))
	}
	if maxNum < denseFields {
		s.dense = make([]*field, maxNum+1)
	} else {
		s.sparse = make(map[protowire.Number]*field, fds.Len())
	}
	slots := 0
	for i := range fds.Len() {
		fd := fds.Get(i)
		f := &field{name: string(fd.Name()), list: fd.IsList() || fd.IsMap()}
		switch fd.Kind() {
		case protoreflect.GroupKind:
			continue // not in Envoy's APIs; scanned as unknown
		case protoreflect.MessageKind:
			f.kind, f.wire, f.msg = kindMessage, protowire.BytesType, ss.build(fd.Message())
		case protoreflect.StringKind, protoreflect.BytesKind:
			f.kind, f.wire = kindBytes, protowire.BytesType
		case protoreflect.Fixed32Kind, protoreflect.Sfixed32Kind, protoreflect.FloatKind:
			f.kind, f.wire = kindScalar, protowire.Fixed32Type
		case protoreflect.Fixed64Kind, protoreflect.Sfixed64Kind, protoreflect.DoubleKind:
			f.kind, f.wire = kindScalar, protowire.Fixed64Type
		default:
			f.kind, f.wire = kindScalar, protowire.VarintType
		}
		switch {
		case fd.IsMap():
			f.extra = mapEntry
		case f.list && f.kind == kindBytes:
			f.extra = listString
		case f.list:
			f.extra = listSlot
		case fd.ContainingOneof() != nil && !fd.ContainingOneof().IsSynthetic():
			f.extra = oneofWrapper
		}
		if n, ok := ss.caps[fd.FullName()]; ok {
			if slots == maxCaps {
				panic(fmt.Sprintf("grpcserver: more than %d capped fields in %s", maxCaps, md.FullName()))
			}
			f.max, f.slot = int32(n), slots
			slots++
		}
		if s.dense != nil {
			s.dense[fd.Number()] = f
		} else {
			s.sparse[fd.Number()] = f
		}
	}
	return s
}

// roundUp rounds n up to a multiple of m, a power of two.
func roundUp(n, m int64) int64 { return (n + m - 1) &^ (m - 1) }

// structSize is what allocating the Go struct protobuf-go decodes md into
// takes (its size, rounded up as size classes do); a map entry has none
// (mapEntry counts it).
func structSize(md protoreflect.MessageDescriptor) int64 {
	if md.IsMapEntry() {
		return 0
	}
	mt, err := protoregistry.GlobalTypes.FindMessageByName(md.FullName())
	if err != nil {
		return unknownType
	}
	t := reflect.TypeOf(mt.Zero().Interface())
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	n := int64(t.Size())
	return roundUp(n+n/8, 16)
}

// scanError is why a request was refused, with where in it.
type scanError struct {
	code   codes.Code
	reason string // the metric label
	path   string // field path from the root, e.g. descriptors[3].entries
	msg    string
}

func (e *scanError) Error() string {
	if e.path == "" {
		return e.msg
	}
	return e.path + ": " + e.msg
}

// scan checks an encoded message of shape s, held in chunks (the buffers
// gRPC received it in: the scan copies nothing), against the caps in its
// shapes and budget, and returns what decoding it would allocate
// (estimated).
func scan(chunks [][]byte, s *shape, budget int64) (int64, error) {
	c := cursor{chunks: chunks}
	for _, ch := range chunks {
		c.left += len(ch)
	}
	sc := scanner{budget: budget - s.size}
	if sc.budget < 0 {
		return 0, tooLarge(budget)
	}
	if err := sc.walk(&c, s, 1); err != nil {
		if err == errBudget {
			return 0, tooLarge(budget)
		}
		return 0, err
	}
	return budget - sc.budget, nil
}

type scanner struct {
	budget int64 // what decoding may still allocate
}

var errBudget = &scanError{code: codes.ResourceExhausted, reason: "decoded_too_large"}

func tooLarge(budget int64) *scanError {
	return &scanError{code: codes.ResourceExhausted, reason: "decoded_too_large",
		msg: fmt.Sprintf("request would take more than %d bytes once decoded", budget)}
}

// Ways an encoding can be malformed.
var (
	errTruncated   = malformed("unexpected EOF")
	errFieldNumber = malformed("invalid field number")
	errVarint      = malformed("variable-length integer overflow")
	errWireType    = malformed("reserved wire type")
	errEndGroup    = malformed("mismatched end of group")
)

func malformed(what string) *scanError {
	return &scanError{code: codes.InvalidArgument, reason: "malformed", msg: "malformed: " + what}
}

func tooDeep() *scanError {
	return &scanError{code: codes.InvalidArgument, reason: "too_deep", msg: "messages nested deeper than " + strconv.Itoa(maxDepth)}
}

// cursor reads one message (its next left bytes) of an encoding spread
// over chunks. Copying a cursor marks a position.
type cursor struct {
	chunks [][]byte
	b      []byte // the unread rest of the current chunk
	next   int    // the chunk after b
	left   int    // bytes of the message not read yet
}

// fill makes b hold the next byte, if the input has one.
func (c *cursor) fill() {
	for len(c.b) == 0 && c.next < len(c.chunks) {
		c.b = c.chunks[c.next]
		c.next++
	}
}

// skip reads past n bytes of the message.
func (c *cursor) skip(n uint64) *scanError {
	if n > uint64(c.left) {
		return errTruncated
	}
	c.left -= int(n)
	for n > 0 {
		c.fill()
		if len(c.b) == 0 {
			return errTruncated // fewer chunks than lengths said: not from grpc-go
		}
		k := min(n, uint64(len(c.b)))
		c.b = c.b[k:]
		n -= k
	}
	return nil
}

// varint reads a base-128 varint, which may straddle two chunks.
func (c *cursor) varint() (uint64, *scanError) {
	if len(c.b) > 0 && c.left > 0 && c.b[0] < 0x80 { // most tags and lengths
		v := uint64(c.b[0])
		c.b, c.left = c.b[1:], c.left-1
		return v, nil
	}
	c.fill()
	b := c.b
	if len(b) > c.left {
		b = b[:c.left]
	}
	if v, n := protowire.ConsumeVarint(b); n > 0 {
		c.b = c.b[n:]
		c.left -= n
		return v, nil
	}
	var buf [binary.MaxVarintLen64]byte
	k, p := 0, *c
	for k < len(buf) && p.left > 0 {
		if p.fill(); len(p.b) == 0 {
			break
		}
		buf[k] = p.b[0]
		p.b, p.left = p.b[1:], p.left-1
		k++
	}
	v, n := protowire.ConsumeVarint(buf[:k])
	switch {
	case n > 0:
		c.skip(uint64(n))
		return v, nil
	case k == len(buf):
		return 0, errVarint
	}
	return 0, errTruncated
}

// tag reads a field's key.
func (c *cursor) tag() (protowire.Number, protowire.Type, *scanError) {
	v, err := c.varint()
	if err != nil {
		return 0, 0, err
	}
	num, typ := protowire.DecodeTag(v)
	if num < protowire.MinValidNumber || num > protowire.MaxValidNumber {
		return 0, 0, errFieldNumber
	}
	return num, typ, nil
}

// value reads past a field's value, except a length-delimited one's
// contents, whose length it returns.
func (c *cursor) value(num protowire.Number, typ protowire.Type, depth int) (uint64, *scanError) {
	switch typ {
	case protowire.VarintType:
		_, err := c.varint()
		return 0, err
	case protowire.Fixed32Type:
		return 0, c.skip(4)
	case protowire.Fixed64Type:
		return 0, c.skip(8)
	case protowire.BytesType:
		n, err := c.varint()
		if err == nil && n > uint64(c.left) {
			err = errTruncated
		}
		return n, err
	case protowire.StartGroupType:
		return 0, c.group(num, depth)
	case protowire.EndGroupType:
		return 0, errEndGroup
	}
	return 0, errWireType
}

// group reads past a group's fields and its end.
func (c *cursor) group(num protowire.Number, depth int) *scanError {
	if depth > maxDepth {
		return tooDeep()
	}
	for {
		n, typ, err := c.tag()
		if err != nil {
			return err
		}
		if typ == protowire.EndGroupType {
			if n != num {
				return errEndGroup
			}
			return nil
		}
		l, err := c.value(n, typ, depth+1)
		if err == nil {
			err = c.skip(l)
		}
		if err != nil {
			return err
		}
	}
}

func (sc *scanner) walk(c *cursor, s *shape, depth int) *scanError {
	if depth > maxDepth {
		return tooDeep()
	}
	var counts [maxCaps]int32
	start := *c
	for c.left > 0 {
		at := c.left // where this field starts
		num, typ, err := c.tag()
		if err != nil {
			return err
		}
		f := s.field(num)
		packed := f != nil && f.kind == kindScalar && f.list && typ == protowire.BytesType
		if f == nil || (typ != f.wire && !packed) {
			// Unknown, or a wire type protobuf-go keeps as unknown bytes.
			l, err := c.value(num, typ, depth)
			if err == nil {
				err = c.skip(l)
			}
			if err != nil {
				return err
			}
			sc.budget -= unknownGrow * int64(at-c.left)
		} else {
			l, err := c.value(num, typ, depth)
			if err != nil {
				return err.within(f, start, at, num)
			}
			if f.max > 0 {
				if counts[f.slot]++; counts[f.slot] > f.max {
					return &scanError{code: codes.InvalidArgument, reason: "too_many", path: f.name,
						msg: "more than " + strconv.Itoa(int(f.max))}
				}
			}
			switch {
			case packed:
				sc.budget -= listSlot * int64(l)
				err = c.skip(l)
			case f.kind == kindBytes:
				sc.budget -= f.extra + roundUp(int64(l), 8)
				err = c.skip(l)
			case f.kind == kindMessage:
				sc.budget -= f.extra + f.msg.size
				if sc.budget < 0 {
					return errBudget
				}
				rest := c.left - int(l)
				c.left = int(l) // the submessage, read in place
				if err := sc.walk(c, f.msg, depth+1); err != nil {
					if err == errBudget || err.reason == "too_deep" {
						return err
					}
					return err.within(f, start, at, num)
				}
				c.left = rest
			default:
				sc.budget -= f.extra
			}
			if err != nil {
				return err.within(f, start, at, num)
			}
		}
		if sc.budget < 0 {
			return errBudget
		}
	}
	return nil
}

// within prefixes e's path with f, and for a repeated field the index of
// the occurrence that starts where at bytes of its parent were left;
// parent is the cursor at the parent's start. (Counting again: this is the
// error path only.)
func (e *scanError) within(f *field, parent cursor, at int, num protowire.Number) *scanError {
	e = &scanError{code: e.code, reason: e.reason, path: e.path, msg: e.msg}
	seg := f.name
	if f.list {
		seg += "[" + strconv.Itoa(occurrences(parent, at, num)) + "]"
	}
	if e.path == "" {
		e.path = seg
	} else {
		e.path = seg + "." + e.path
	}
	return e
}

// occurrences counts the fields numbered num from c until at bytes are
// left.
func occurrences(c cursor, at int, num protowire.Number) int {
	k := 0
	for c.left > at {
		n, typ, err := c.tag()
		if err != nil {
			break
		}
		l, err := c.value(n, typ, 0)
		if err == nil {
			err = c.skip(l)
		}
		if err != nil {
			break
		}
		if n == num {
			k++
		}
	}
	return k
}
