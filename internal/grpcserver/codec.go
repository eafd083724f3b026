package grpcserver

import (
	"fmt"
	"reflect"
	"sync"
	"unicode/utf8"
	"unsafe"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Codec returns the protobuf codec meshguard's gRPC server uses (see
// Options): gRPC's default "proto" codec, except that the Rate Limit
// Service's hot messages, RateLimitRequest in and RateLimitResponse out, are
// decoded and encoded by hand rather than through protobuf reflection. The
// bytes and messages are the same: whatever the hand-written code does not
// cover (unknown fields, invalid UTF-8, malformed input, any other message
// type) goes through proto.Marshal and proto.Unmarshal exactly as gRPC's
// codec does, errors included. It is not registered with
// encoding.RegisterCodecV2, so clients and other servers in the process keep
// gRPC's.
func Codec() encoding.CodecV2 { return codec{} }

type codec struct{}

// Name is the name gRPC's codec has: content-subtype "proto".
func (codec) Name() string { return "proto" }

func (codec) Marshal(v any) (mem.BufferSlice, error) {
	if r, ok := v.(*rlsv3.RateLimitResponse); ok {
		if data, ok := marshalResponse(r); ok {
			return data, nil
		}
	}
	return stdMarshal(v)
}

func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	r, ok := v.(*rlsv3.RateLimitRequest)
	if !ok || r == nil {
		return stdUnmarshal(data, v)
	}
	// As gRPC's codec: one contiguous view of the message. The caller keeps
	// data referenced until Unmarshal returns and nothing decoded aliases b,
	// so a single buffer needs no reference of its own.
	var b []byte
	if len(data) == 1 {
		b = data[0].ReadOnlyData()
	} else {
		buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
		defer buf.Free()
		b = buf.ReadOnlyData()
	}
	if unmarshalRequest(b, r) {
		return nil
	}
	return proto.Unmarshal(b, r)
}

// stdMarshal is gRPC's default codec's Marshal (encoding/proto, codecV2).
func stdMarshal(v any) (mem.BufferSlice, error) {
	vv := messageV2Of(v)
	if vv == nil {
		return nil, fmt.Errorf("proto: failed to marshal, message is %T, want proto.Message", v)
	}
	size := proto.Size(vv)
	// UseCachedSize reuses the sizes the Size call just stored.
	opts := proto.MarshalOptions{UseCachedSize: true}
	if mem.IsBelowBufferPoolingThreshold(size) {
		buf, err := opts.Marshal(vv)
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(buf)}, nil
	}
	pool := mem.DefaultBufferPool()
	buf := pool.Get(size)
	if _, err := opts.MarshalAppend((*buf)[:0], vv); err != nil {
		pool.Put(buf)
		return nil, err
	}
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, nil
}

// stdUnmarshal is gRPC's default codec's Unmarshal.
func stdUnmarshal(data mem.BufferSlice, v any) error {
	vv := messageV2Of(v)
	if vv == nil {
		return fmt.Errorf("failed to unmarshal, message is %T, want proto.Message", v)
	}
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	return proto.Unmarshal(buf.ReadOnlyData(), vv)
}

func messageV2Of(v any) proto.Message {
	switch v := v.(type) {
	case protoadapt.MessageV1:
		return protoadapt.MessageV2Of(v)
	case protoadapt.MessageV2:
		return v
	}
	return nil
}

// ---- RateLimitResponse ----

// marshalResponse encodes r as proto.Marshal does (the order of
// dynamic_metadata's map entries aside, which proto.Marshal leaves random)
// into a pooled buffer of exactly its size: from responseBufs, or above
// responseBufCap from gRPC's default pool. ok is false for
// what it leaves to proto.Marshal: unknown fields anywhere, invalid UTF-8 in
// a string (proto.Marshal's error), or an error marshaling
// dynamic_metadata.
func marshalResponse(r *rlsv3.RateLimitResponse) (_ mem.BufferSlice, ok bool) {
	if !responseHandled(r) {
		return nil, false
	}
	metaSize := 0
	if r != nil && r.DynamicMetadata != nil {
		metaSize = proto.Size(r.DynamicMetadata)
	}
	size := sizeResponse(r, metaSize)
	var pool mem.BufferPool = &responseBufs
	if size > responseBufCap {
		pool = mem.DefaultBufferPool()
	}
	buf := pool.Get(size)
	b, ok := appendResponse((*buf)[:0], r, metaSize)
	if !ok || len(b) != size {
		// A message changed under us: let proto.Marshal make of it what it will.
		pool.Put(buf)
		return nil, false
	}
	*buf = b
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, true
}

// responseBufs holds the buffers of responses up to responseBufCap bytes
// (all but odd ones, which take mem.DefaultBufferPool's). gRPC's codec
// allocates a slice for a message below its pooling threshold (1 KiB), and
// the mem.Buffer boxing it, as mem.NewBuffer returns a buffer to its pool
// only if its capacity is above that threshold; the default pool's next
// size is 4 KiB, which it zeroes on every Get (70% of the cost of Get in
// the server's CPU profile). A response is about 100 bytes: these 2 KiB
// buffers are pooled, and not zeroed, since a response is written over its
// whole length and nothing reads past it. One allocation per response (the
// BufferSlice) rather than three.
var responseBufs dirtyPool

const responseBufCap = 2 << 10

// dirtyPool is a mem.BufferPool of responseBufCap-byte buffers.
type dirtyPool struct{ p sync.Pool }

func (d *dirtyPool) Get(n int) *[]byte {
	if b, ok := d.p.Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, responseBufCap)
	return &b
}

func (d *dirtyPool) Put(b *[]byte) {
	if cap(*b) == responseBufCap {
		d.p.Put(b)
	}
}

// unknownFields reads the unknown fields of generated messages of type M
// (which only proto.Marshal writes) straight from their unknownFields
// field, as protobuf-go's own fast path does: through ProtoReflect, seven
// checks of a typical response cost more than encoding it. Should the
// generated code lose that []byte field, it asks ProtoReflect.
type unknownFields[M any] struct {
	off uintptr
	ok  bool
}

func unknownFieldsOf[M any]() unknownFields[M] {
	f, ok := reflect.TypeFor[M]().FieldByName("unknownFields")
	if !ok || f.Type != reflect.TypeFor[[]byte]() {
		return unknownFields[M]{}
	}
	return unknownFields[M]{off: f.Offset, ok: true}
}

// in reports whether m, not nil, has unknown fields.
func (u unknownFields[M]) in(m *M) bool {
	if !u.ok {
		return len(any(m).(proto.Message).ProtoReflect().GetUnknown()) != 0
	}
	return len(*(*[]byte)(unsafe.Add(unsafe.Pointer(m), u.off))) != 0
}

var (
	unknownResponse  = unknownFieldsOf[rlsv3.RateLimitResponse]()
	unknownStatus    = unknownFieldsOf[rlsv3.RateLimitResponse_DescriptorStatus]()
	unknownLimit     = unknownFieldsOf[rlsv3.RateLimitResponse_RateLimit]()
	unknownQuota     = unknownFieldsOf[rlsv3.RateLimitResponse_Quota]()
	unknownHeader    = unknownFieldsOf[corev3.HeaderValue]()
	unknownUInt32    = unknownFieldsOf[wrapperspb.UInt32Value]()
	unknownDuration  = unknownFieldsOf[durationpb.Duration]()
	unknownTimestamp = unknownFieldsOf[timestamppb.Timestamp]()
)

// responseHandled reports whether marshalResponse can encode r by hand.
func responseHandled(r *rlsv3.RateLimitResponse) bool {
	if r == nil {
		return true
	}
	if unknownResponse.in(r) || !quotaHandled(r.Quota) || !headersHandled(r.ResponseHeadersToAdd) || !headersHandled(r.RequestHeadersToAdd) {
		return false
	}
	for _, st := range r.Statuses {
		if st == nil {
			continue
		}
		if unknownStatus.in(st) || !quotaHandled(st.Quota) {
			return false
		}
		if l := st.CurrentLimit; l != nil {
			if unknownLimit.in(l) || !utf8.ValidString(l.Name) || (l.UnitMultiplier != nil && unknownUInt32.in(l.UnitMultiplier)) {
				return false
			}
		}
		if d := st.DurationUntilReset; d != nil && unknownDuration.in(d) {
			return false
		}
	}
	return true
}

func quotaHandled(q *rlsv3.RateLimitResponse_Quota) bool {
	if q == nil {
		return true
	}
	if unknownQuota.in(q) || !utf8.ValidString(q.Id) {
		return false
	}
	switch e := q.ExpirationSpecifier.(type) {
	case nil:
	case *rlsv3.RateLimitResponse_Quota_ValidUntil:
		if e != nil && e.ValidUntil != nil && unknownTimestamp.in(e.ValidUntil) {
			return false
		}
	default: // a oneof case this code was not written for
		return false
	}
	return true
}

func headersHandled(hs []*corev3.HeaderValue) bool {
	for _, h := range hs {
		if h != nil && (unknownHeader.in(h) || !utf8.ValidString(h.Key) || !utf8.ValidString(h.Value)) {
			return false
		}
	}
	return true
}

// Field numbers, from rls.pb.go and base.pb.go (go-control-plane envoy
// v1.40.0), and wrappers/duration/timestamp.
const (
	respOverallCode     = 1 // varint enum
	respStatuses        = 2 // repeated DescriptorStatus
	respResponseHeaders = 3 // repeated HeaderValue
	respRequestHeaders  = 4 // repeated HeaderValue
	respRawBody         = 5 // bytes
	respDynamicMetadata = 6 // google.protobuf.Struct
	respQuota           = 7 // Quota

	statusCode               = 1 // varint enum
	statusCurrentLimit       = 2 // RateLimit
	statusLimitRemaining     = 3 // varint uint32
	statusDurationUntilReset = 4 // google.protobuf.Duration
	statusQuota              = 5 // Quota

	limitRequestsPerUnit = 1 // varint uint32
	limitUnit            = 2 // varint enum
	limitName            = 3 // string
	limitUnitMultiplier  = 4 // google.protobuf.UInt32Value

	quotaRequests   = 1 // varint uint32
	quotaValidUntil = 2 // oneof expiration_specifier: google.protobuf.Timestamp
	quotaID         = 3 // string

	headerKey      = 1 // string
	headerValue    = 2 // string
	headerRawValue = 3 // bytes

	// google.protobuf.Duration and Timestamp: seconds int64, nanos int32.
	secondsField = 1
	nanosField   = 2
	// google.protobuf.UInt32Value and UInt64Value.
	wrapperValue = 1
)

// Tag sizes: every field number here is below 16.
const tagSize = 1

func sizeVarintField(v uint64) int {
	if v == 0 {
		return 0
	}
	return tagSize + protowire.SizeVarint(v)
}

func sizeBytesField(n int) int {
	if n == 0 {
		return 0
	}
	return tagSize + protowire.SizeBytes(n)
}

// sizeMessageField is a present sub-message of size n.
func sizeMessageField(n int) int { return tagSize + protowire.SizeBytes(n) }

func sizeResponse(r *rlsv3.RateLimitResponse, metaSize int) int {
	if r == nil {
		return 0
	}
	n := sizeVarintField(uint64(int64(r.OverallCode)))
	for _, st := range r.Statuses {
		n += sizeMessageField(sizeStatus(st))
	}
	for _, h := range r.ResponseHeadersToAdd {
		n += sizeMessageField(sizeHeader(h))
	}
	for _, h := range r.RequestHeadersToAdd {
		n += sizeMessageField(sizeHeader(h))
	}
	n += sizeBytesField(len(r.RawBody))
	if r.DynamicMetadata != nil {
		n += sizeMessageField(metaSize)
	}
	if r.Quota != nil {
		n += sizeMessageField(sizeQuota(r.Quota))
	}
	return n
}

func sizeStatus(st *rlsv3.RateLimitResponse_DescriptorStatus) int {
	if st == nil {
		return 0
	}
	n := sizeVarintField(uint64(int64(st.Code)))
	if st.CurrentLimit != nil {
		n += sizeMessageField(sizeLimit(st.CurrentLimit))
	}
	n += sizeVarintField(uint64(st.LimitRemaining))
	if st.DurationUntilReset != nil {
		n += sizeMessageField(sizeSecondsNanos(st.DurationUntilReset.Seconds, st.DurationUntilReset.Nanos))
	}
	if st.Quota != nil {
		n += sizeMessageField(sizeQuota(st.Quota))
	}
	return n
}

func sizeLimit(l *rlsv3.RateLimitResponse_RateLimit) int {
	n := sizeVarintField(uint64(l.RequestsPerUnit)) +
		sizeVarintField(uint64(int64(l.Unit))) +
		sizeBytesField(len(l.Name))
	if l.UnitMultiplier != nil {
		n += sizeMessageField(sizeVarintField(uint64(l.UnitMultiplier.Value)))
	}
	return n
}

func sizeSecondsNanos(s int64, ns int32) int {
	return sizeVarintField(uint64(s)) + sizeVarintField(uint64(int64(ns)))
}

func sizeQuota(q *rlsv3.RateLimitResponse_Quota) int {
	n := sizeVarintField(uint64(q.Requests)) + sizeBytesField(len(q.Id))
	if e, ok := q.ExpirationSpecifier.(*rlsv3.RateLimitResponse_Quota_ValidUntil); ok && e != nil {
		n += sizeMessageField(sizeTimestamp(e.ValidUntil))
	}
	return n
}

func sizeTimestamp(t *timestamppb.Timestamp) int {
	if t == nil {
		return 0
	}
	return sizeSecondsNanos(t.Seconds, t.Nanos)
}

func sizeHeader(h *corev3.HeaderValue) int {
	if h == nil {
		return 0
	}
	return sizeBytesField(len(h.Key)) + sizeBytesField(len(h.Value)) + sizeBytesField(len(h.RawValue))
}

func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func appendStringField(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func appendBytesField(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

// appendMessageHeader starts a present sub-message of size n.
func appendMessageHeader(b []byte, num protowire.Number, n int) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendVarint(b, uint64(n))
}

func appendResponse(b []byte, r *rlsv3.RateLimitResponse, metaSize int) ([]byte, bool) {
	if r == nil {
		return b, true
	}
	b = appendVarintField(b, respOverallCode, uint64(int64(r.OverallCode)))
	for _, st := range r.Statuses {
		b = appendMessageHeader(b, respStatuses, sizeStatus(st))
		b = appendStatus(b, st)
	}
	for _, h := range r.ResponseHeadersToAdd {
		b = appendMessageHeader(b, respResponseHeaders, sizeHeader(h))
		b = appendHeader(b, h)
	}
	for _, h := range r.RequestHeadersToAdd {
		b = appendMessageHeader(b, respRequestHeaders, sizeHeader(h))
		b = appendHeader(b, h)
	}
	b = appendBytesField(b, respRawBody, r.RawBody)
	if r.DynamicMetadata != nil {
		b = appendMessageHeader(b, respDynamicMetadata, metaSize)
		start := len(b)
		var err error
		// The sizes proto.Size stored in marshalResponse, as gRPC's codec.
		b, err = proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, r.DynamicMetadata)
		if err != nil || len(b)-start != metaSize {
			return b, false
		}
	}
	if r.Quota != nil {
		b = appendMessageHeader(b, respQuota, sizeQuota(r.Quota))
		b = appendQuota(b, r.Quota)
	}
	return b, true
}

func appendStatus(b []byte, st *rlsv3.RateLimitResponse_DescriptorStatus) []byte {
	if st == nil {
		return b
	}
	b = appendVarintField(b, statusCode, uint64(int64(st.Code)))
	if l := st.CurrentLimit; l != nil {
		b = appendMessageHeader(b, statusCurrentLimit, sizeLimit(l))
		b = appendVarintField(b, limitRequestsPerUnit, uint64(l.RequestsPerUnit))
		b = appendVarintField(b, limitUnit, uint64(int64(l.Unit)))
		b = appendStringField(b, limitName, l.Name)
		if m := l.UnitMultiplier; m != nil {
			b = appendMessageHeader(b, limitUnitMultiplier, sizeVarintField(uint64(m.Value)))
			b = appendVarintField(b, wrapperValue, uint64(m.Value))
		}
	}
	b = appendVarintField(b, statusLimitRemaining, uint64(st.LimitRemaining))
	if d := st.DurationUntilReset; d != nil {
		b = appendMessageHeader(b, statusDurationUntilReset, sizeSecondsNanos(d.Seconds, d.Nanos))
		b = appendVarintField(b, secondsField, uint64(d.Seconds))
		b = appendVarintField(b, nanosField, uint64(int64(d.Nanos)))
	}
	if st.Quota != nil {
		b = appendMessageHeader(b, statusQuota, sizeQuota(st.Quota))
		b = appendQuota(b, st.Quota)
	}
	return b
}

// appendQuota writes the oneof last, after field 3, as proto.Marshal does
// (it orders the fields outside oneofs by number, then the oneofs).
func appendQuota(b []byte, q *rlsv3.RateLimitResponse_Quota) []byte {
	b = appendVarintField(b, quotaRequests, uint64(q.Requests))
	b = appendStringField(b, quotaID, q.Id)
	if e, ok := q.ExpirationSpecifier.(*rlsv3.RateLimitResponse_Quota_ValidUntil); ok && e != nil {
		b = appendMessageHeader(b, quotaValidUntil, sizeTimestamp(e.ValidUntil))
		if t := e.ValidUntil; t != nil {
			b = appendVarintField(b, secondsField, uint64(t.Seconds))
			b = appendVarintField(b, nanosField, uint64(int64(t.Nanos)))
		}
	}
	return b
}

func appendHeader(b []byte, h *corev3.HeaderValue) []byte {
	if h == nil {
		return b
	}
	b = appendStringField(b, headerKey, h.Key)
	b = appendStringField(b, headerValue, h.Value)
	return appendBytesField(b, headerRawValue, h.RawValue)
}

// ---- RateLimitRequest ----

// Field numbers, from rls.pb.go and extensions/common/ratelimit/v3
// ratelimit.pb.go (go-control-plane envoy v1.40.0).
const (
	reqDomain      = 1 // string
	reqDescriptors = 2 // repeated RateLimitDescriptor
	reqHitsAddend  = 3 // varint uint32

	descEntries        = 1 // repeated Entry
	descLimit          = 2 // RateLimitOverride
	descHitsAddend     = 3 // google.protobuf.UInt64Value
	descIsNegativeHits = 4 // varint bool

	entryKey   = 1 // string
	entryValue = 2 // string

	overrideRequestsPerUnit = 1 // varint uint32
	overrideUnit            = 2 // varint enum
	overrideUnitMultiplier  = 3 // google.protobuf.UInt32Value
)

// unmarshalRequest decodes b into m, which it resets, as proto.Unmarshal
// would, in two passes over b: the first checks that b holds nothing but
// fields this code knows, with the wire types it expects, well formed and
// with valid UTF-8 strings, and counts descriptors and entries; the second
// fills m from a few allocations: one for every descriptor, one for every
// entry, one for each of their pointer slices, and one string holding b that
// every string field is a substring of. It returns false, having left m
// alone, when the first pass finds anything else (unknown fields, fields of
// an unexpected wire type, which proto.Unmarshal keeps as unknown fields,
// errors): proto.Unmarshal then decides.
func unmarshalRequest(b []byte, m *rlsv3.RateLimitRequest) bool {
	var d reqDecoder
	if !d.request(b, nil) {
		return false
	}
	m.Reset()
	if d.strings {
		d.s = string(b)
	}
	d.base = cap(b)
	if d.nDesc > 0 {
		m.Descriptors = make([]*rlv3.RateLimitDescriptor, 0, d.nDesc)
		d.descs = make([]rlv3.RateLimitDescriptor, d.nDesc)
	}
	if d.nEntry > 0 {
		d.entryPtrs = make([]*rlv3.RateLimitDescriptor_Entry, d.nEntry)
		d.entries = make([]rlv3.RateLimitDescriptor_Entry, d.nEntry)
	}
	d.nDesc, d.nEntry = 0, 0
	return d.request(b, m)
}

// reqDecoder runs both passes of unmarshalRequest: without a message to
// fill (m nil) it checks and counts, with one it fills.
type reqDecoder struct {
	nDesc, nEntry int
	strings       bool // a non-empty string field seen

	// The second pass.
	s         string // b
	base      int    // cap(b): a sub-slice v of b starts at base-cap(v)
	descs     []rlv3.RateLimitDescriptor
	entryPtrs []*rlv3.RateLimitDescriptor_Entry
	entries   []rlv3.RateLimitDescriptor_Entry
}

// field reads one field's tag and value: v is the varint value or the
// bytes of a length-delimited field. n < 0 for malformed input and for wire
// types other than varint and bytes, which no field here has.
func field(b []byte) (num protowire.Number, typ protowire.Type, x uint64, v []byte, n int) {
	// The fields here have one-byte tags, and short ones one-byte values or
	// lengths: decode those inline.
	if len(b) >= 2 && b[0] < 0x80 && b[1] < 0x80 && b[0] >= 1<<3 {
		num, typ = protowire.Number(b[0]>>3), protowire.Type(b[0]&7)
		switch typ {
		case protowire.VarintType:
			return num, typ, uint64(b[1]), nil, 2
		case protowire.BytesType:
			l := int(b[1])
			if l > len(b)-2 {
				return 0, 0, 0, nil, -1
			}
			// Two-index slicing keeps v's capacity running to the end of
			// the buffer, which str relies on.
			return num, typ, 0, b[2 : 2+l], 2 + l
		}
		return 0, 0, 0, nil, -1
	}
	num, typ, n = protowire.ConsumeTag(b)
	if n < 0 {
		return 0, 0, 0, nil, n
	}
	rest := b[n:]
	switch typ {
	case protowire.VarintType:
		var m int
		x, m = protowire.ConsumeVarint(rest)
		if m < 0 {
			return 0, 0, 0, nil, m
		}
		return num, typ, x, nil, n + m
	case protowire.BytesType:
		l, m := protowire.ConsumeVarint(rest)
		if m < 0 {
			return 0, 0, 0, nil, m
		}
		if l > uint64(len(rest)-m) {
			return 0, 0, 0, nil, -1
		}
		return num, typ, 0, rest[m : m+int(l)], n + m + int(l)
	}
	return 0, 0, 0, nil, -1
}

// str returns v, a string field's bytes, checked in the first pass and
// a substring of d.s in the second.
func (d *reqDecoder) str(v []byte, fill bool) (string, bool) {
	if !fill {
		if len(v) > 0 {
			d.strings = true
		}
		return "", utf8.Valid(v)
	}
	if len(v) == 0 {
		return "", true
	}
	off := d.base - cap(v)
	if off < 0 || off+len(v) > len(d.s) {
		return "", false
	}
	return d.s[off : off+len(v)], true
}

func (d *reqDecoder) request(b []byte, m *rlsv3.RateLimitRequest) bool {
	fill := m != nil
	for len(b) > 0 {
		num, typ, x, v, n := field(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		switch {
		case num == reqDomain && typ == protowire.BytesType:
			s, ok := d.str(v, fill)
			if !ok {
				return false
			}
			if fill {
				m.Domain = s
			}
		case num == reqDescriptors && typ == protowire.BytesType:
			var desc *rlv3.RateLimitDescriptor
			if fill {
				desc = &d.descs[d.nDesc]
				m.Descriptors = append(m.Descriptors, desc)
			}
			d.nDesc++
			if !d.descriptor(v, desc) {
				return false
			}
		case num == reqHitsAddend && typ == protowire.VarintType:
			if fill {
				m.HitsAddend = uint32(x)
			}
		default:
			return false
		}
	}
	return true
}

func (d *reqDecoder) descriptor(b []byte, m *rlv3.RateLimitDescriptor) bool {
	fill := m != nil
	first := d.nEntry
	for len(b) > 0 {
		num, typ, x, v, n := field(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		switch {
		case num == descEntries && typ == protowire.BytesType:
			var e *rlv3.RateLimitDescriptor_Entry
			if fill {
				e = &d.entries[d.nEntry]
				d.entryPtrs[d.nEntry] = e
			}
			d.nEntry++
			if !d.entry(v, e) {
				return false
			}
		case num == descLimit && typ == protowire.BytesType:
			// A singular message field seen twice merges, as in proto.Unmarshal.
			if fill && m.Limit == nil {
				m.Limit = &rlv3.RateLimitDescriptor_RateLimitOverride{}
			}
			if !override(v, m.GetLimit(), fill) {
				return false
			}
		case num == descHitsAddend && typ == protowire.BytesType:
			if fill && m.HitsAddend == nil {
				m.HitsAddend = &wrapperspb.UInt64Value{}
			}
			x, set, ok := wrapper(v)
			if !ok {
				return false
			}
			if fill && set {
				m.HitsAddend.Value = x
			}
		case num == descIsNegativeHits && typ == protowire.VarintType:
			if fill {
				m.IsNegativeHits = x != 0
			}
		default:
			return false
		}
	}
	if fill && d.nEntry > first {
		// Capacity capped: appending to one descriptor's entries must not
		// overwrite the next one's.
		m.Entries = d.entryPtrs[first:d.nEntry:d.nEntry]
	}
	return true
}

func (d *reqDecoder) entry(b []byte, m *rlv3.RateLimitDescriptor_Entry) bool {
	fill := m != nil
	for len(b) > 0 {
		num, typ, _, v, n := field(b)
		if n < 0 || typ != protowire.BytesType || (num != entryKey && num != entryValue) {
			return false
		}
		b = b[n:]
		s, ok := d.str(v, fill)
		if !ok {
			return false
		}
		if !fill {
			continue
		}
		if num == entryKey {
			m.Key = s
		} else {
			m.Value = s
		}
	}
	return true
}

func override(b []byte, m *rlv3.RateLimitDescriptor_RateLimitOverride, fill bool) bool {
	for len(b) > 0 {
		num, typ, x, v, n := field(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		switch {
		case num == overrideRequestsPerUnit && typ == protowire.VarintType:
			if fill {
				m.RequestsPerUnit = uint32(x)
			}
		case num == overrideUnit && typ == protowire.VarintType:
			if fill {
				m.Unit = typev3.RateLimitUnit(int32(x))
			}
		case num == overrideUnitMultiplier && typ == protowire.BytesType:
			x, set, ok := wrapper(v)
			if !ok {
				return false
			}
			if fill {
				if m.UnitMultiplier == nil {
					m.UnitMultiplier = &wrapperspb.UInt32Value{}
				}
				if set {
					m.UnitMultiplier.Value = uint32(x)
				}
			}
		default:
			return false
		}
	}
	return true
}

// wrapper decodes a UInt32Value or UInt64Value: its last value field, if
// set.
func wrapper(b []byte) (x uint64, set, ok bool) {
	for len(b) > 0 {
		num, typ, v, _, n := field(b)
		if n < 0 || num != wrapperValue || typ != protowire.VarintType {
			return 0, false, false
		}
		b = b[n:]
		x, set = v, true
	}
	return x, set, true
}
