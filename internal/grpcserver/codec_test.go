package grpcserver

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	encproto "google.golang.org/grpc/encoding/proto"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// stdCodec is gRPC's default codec, the reference.
func stdCodec() encoding.CodecV2 { return encoding.GetCodecV2(encproto.Name) }

// withUnknown sets unknown field 999 (varint 1) on m and returns it.
func withUnknown[M proto.Message](m M) M {
	m.ProtoReflect().SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 999, protowire.VarintType), 1))
	return m
}

func typicalResponse() *rlsv3.RateLimitResponse {
	limit := &rlsv3.RateLimitResponse_RateLimit{Name: "per-client", RequestsPerUnit: 100, Unit: rlsv3.RateLimitResponse_RateLimit_MINUTE}
	return &rlsv3.RateLimitResponse{
		OverallCode: rlsv3.RateLimitResponse_OK,
		Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{
			{Code: rlsv3.RateLimitResponse_OK, CurrentLimit: limit, LimitRemaining: 97, DurationUntilReset: durationpb.New(41_500_000_000)},
			{Code: rlsv3.RateLimitResponse_OK, CurrentLimit: limit, LimitRemaining: 12, DurationUntilReset: durationpb.New(3_000_000)},
		},
	}
}

func typicalRequest() *rlsv3.RateLimitRequest {
	return &rlsv3.RateLimitRequest{Domain: "bench", Descriptors: []*rlv3.RateLimitDescriptor{
		{Entries: []*rlv3.RateLimitDescriptor_Entry{{Key: "client", Value: "ip:10.0.3.17"}, {Key: "route", Value: "api"}}},
		{Entries: []*rlv3.RateLimitDescriptor_Entry{{Key: "route", Value: "api"}, {Key: "client", Value: "ip:10.0.3.17"}}},
	}}
}

func fullQuota() *rlsv3.RateLimitResponse_Quota {
	return &rlsv3.RateLimitResponse_Quota{
		Requests:            7,
		ExpirationSpecifier: &rlsv3.RateLimitResponse_Quota_ValidUntil{ValidUntil: &timestamppb.Timestamp{Seconds: 1_900_000_000, Nanos: 5}},
		Id:                  "q-1",
	}
}

// responseCases: the messages the hand-written Marshal must encode itself
// (hand) or leave to proto.Marshal.
func responseCases() []struct {
	name string
	msg  *rlsv3.RateLimitResponse
	hand bool
} {
	meta1, _ := structpb.NewStruct(map[string]any{"k": "v"})
	metaN, _ := structpb.NewStruct(map[string]any{"a": 1.5, "b": true, "c": []any{"x", nil}, "d": map[string]any{"e": "f"}})
	many := &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_OVER_LIMIT}
	for i := range 100 {
		many.Statuses = append(many.Statuses, &rlsv3.RateLimitResponse_DescriptorStatus{
			Code:               rlsv3.RateLimitResponse_OVER_LIMIT,
			CurrentLimit:       &rlsv3.RateLimitResponse_RateLimit{Name: fmt.Sprint("limit-", i), RequestsPerUnit: uint32(i), Unit: rlsv3.RateLimitResponse_RateLimit_HOUR},
			DurationUntilReset: durationpb.New(-1500 * 1e6 * 1e3 * 1e3),
		})
	}
	cases := []struct {
		name string
		msg  *rlsv3.RateLimitResponse
		hand bool
	}{
		{"nil", nil, true},
		{"empty", &rlsv3.RateLimitResponse{}, true},
		{"typical", typicalResponse(), true},
		{"noop_server", &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_OK, Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{Code: rlsv3.RateLimitResponse_OK}}}, true},
		{"every_field", &rlsv3.RateLimitResponse{
			OverallCode: rlsv3.RateLimitResponse_OVER_LIMIT,
			Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{
				Code:               rlsv3.RateLimitResponse_OVER_LIMIT,
				CurrentLimit:       &rlsv3.RateLimitResponse_RateLimit{Name: "nämé ✓", RequestsPerUnit: 5, Unit: rlsv3.RateLimitResponse_RateLimit_WEEK, UnitMultiplier: wrapperspb.UInt32(15)},
				LimitRemaining:     3,
				DurationUntilReset: &durationpb.Duration{Seconds: 59, Nanos: 999_999_999},
				Quota:              fullQuota(),
			}},
			ResponseHeadersToAdd: []*corev3.HeaderValue{{Key: "retry-after", Value: "59"}, {Key: "x-raw", RawValue: []byte{0xff, 0, 1}}},
			RequestHeadersToAdd:  []*corev3.HeaderValue{{Key: "x-ratelimit", Value: "over"}},
			RawBody:              []byte(`{"error":"too many requests"}`),
			DynamicMetadata:      meta1,
			Quota:                fullQuota(),
		}, true},
		{"zero_sub_messages", &rlsv3.RateLimitResponse{
			Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{
				CurrentLimit:       &rlsv3.RateLimitResponse_RateLimit{UnitMultiplier: &wrapperspb.UInt32Value{}},
				DurationUntilReset: &durationpb.Duration{},
				Quota:              &rlsv3.RateLimitResponse_Quota{ExpirationSpecifier: &rlsv3.RateLimitResponse_Quota_ValidUntil{}},
			}, {}},
			ResponseHeadersToAdd: []*corev3.HeaderValue{{}},
			RequestHeadersToAdd:  []*corev3.HeaderValue{{RawValue: []byte{}}},
			RawBody:              []byte{},
			DynamicMetadata:      &structpb.Struct{},
			Quota:                &rlsv3.RateLimitResponse_Quota{ExpirationSpecifier: &rlsv3.RateLimitResponse_Quota_ValidUntil{ValidUntil: &timestamppb.Timestamp{}}},
		}, true},
		{"nil_elements", &rlsv3.RateLimitResponse{
			Statuses:             []*rlsv3.RateLimitResponse_DescriptorStatus{nil, {Code: rlsv3.RateLimitResponse_OK}, nil},
			ResponseHeadersToAdd: []*corev3.HeaderValue{nil},
			RequestHeadersToAdd:  []*corev3.HeaderValue{nil, {Key: "k"}},
			Quota:                &rlsv3.RateLimitResponse_Quota{ExpirationSpecifier: (*rlsv3.RateLimitResponse_Quota_ValidUntil)(nil)},
		}, true},
		{"huge_values", &rlsv3.RateLimitResponse{
			OverallCode: math.MaxInt32,
			Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{
				Code:               -1,
				CurrentLimit:       &rlsv3.RateLimitResponse_RateLimit{Name: strings.Repeat("n", 300), RequestsPerUnit: math.MaxUint32, Unit: math.MinInt32, UnitMultiplier: wrapperspb.UInt32(math.MaxUint32)},
				LimitRemaining:     math.MaxUint32,
				DurationUntilReset: &durationpb.Duration{Seconds: math.MaxInt64, Nanos: math.MaxInt32},
				Quota:              &rlsv3.RateLimitResponse_Quota{Requests: math.MaxUint32, ExpirationSpecifier: &rlsv3.RateLimitResponse_Quota_ValidUntil{ValidUntil: &timestamppb.Timestamp{Seconds: math.MinInt64, Nanos: math.MinInt32}}},
			}, {
				DurationUntilReset: &durationpb.Duration{Seconds: math.MinInt64, Nanos: -1},
			}},
			ResponseHeadersToAdd: []*corev3.HeaderValue{{Key: strings.Repeat("k", 200), Value: strings.Repeat("v", 20000)}},
		}, true},
		{"negative_duration", &rlsv3.RateLimitResponse{Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{DurationUntilReset: durationpb.New(-1500)}}}, true},
		{"pooled_buffer", &rlsv3.RateLimitResponse{RawBody: bytes.Repeat([]byte("b"), 5000)}, true},
		{"many_statuses", many, true},
		{"metadata_many_keys", &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_OK, DynamicMetadata: metaN}, true},
		{"unknown_top", withUnknown(typicalResponse()), false},
		{"unknown_status", func() *rlsv3.RateLimitResponse {
			r := typicalResponse()
			r.Statuses[1] = withUnknown(r.Statuses[1])
			return r
		}(), false},
		{"unknown_limit", &rlsv3.RateLimitResponse{Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{CurrentLimit: withUnknown(&rlsv3.RateLimitResponse_RateLimit{})}}}, false},
		{"unknown_multiplier", &rlsv3.RateLimitResponse{Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{CurrentLimit: &rlsv3.RateLimitResponse_RateLimit{UnitMultiplier: withUnknown(wrapperspb.UInt32(2))}}}}, false},
		{"unknown_duration", &rlsv3.RateLimitResponse{Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{DurationUntilReset: withUnknown(durationpb.New(5))}}}, false},
		{"unknown_header", &rlsv3.RateLimitResponse{RequestHeadersToAdd: []*corev3.HeaderValue{withUnknown(&corev3.HeaderValue{Key: "k"})}}, false},
		{"unknown_quota", &rlsv3.RateLimitResponse{Quota: withUnknown(fullQuota())}, false},
		{"unknown_status_quota", &rlsv3.RateLimitResponse{Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{Quota: withUnknown(fullQuota())}}}, false},
		{"unknown_valid_until", &rlsv3.RateLimitResponse{Quota: &rlsv3.RateLimitResponse_Quota{ExpirationSpecifier: &rlsv3.RateLimitResponse_Quota_ValidUntil{ValidUntil: withUnknown(&timestamppb.Timestamp{})}}}, false},
		{"unknown_in_metadata", &rlsv3.RateLimitResponse{DynamicMetadata: withUnknown(&structpb.Struct{})}, true},
		{"invalid_utf8_limit_name", &rlsv3.RateLimitResponse{Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{CurrentLimit: &rlsv3.RateLimitResponse_RateLimit{Name: "a\xffb"}}}}, false},
		{"invalid_utf8_header_key", &rlsv3.RateLimitResponse{ResponseHeadersToAdd: []*corev3.HeaderValue{{Key: "\xc3"}}}, false},
		{"invalid_utf8_header_value", &rlsv3.RateLimitResponse{RequestHeadersToAdd: []*corev3.HeaderValue{{Key: "k", Value: "\xed\xa0\x80"}}}, false},
		{"invalid_utf8_quota_id", &rlsv3.RateLimitResponse{Quota: &rlsv3.RateLimitResponse_Quota{Id: "\x80"}}, false},
		{"invalid_utf8_status_quota_id", &rlsv3.RateLimitResponse{Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{Quota: &rlsv3.RateLimitResponse_Quota{Id: "\x80"}}}}, false},
		{"invalid_utf8_metadata", &rlsv3.RateLimitResponse{DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{"\xff": structpb.NewNullValue()}}}, false},
		// Raw bytes are not strings: any bytes go.
		{"raw_bytes_not_utf8", &rlsv3.RateLimitResponse{RawBody: []byte{0xff}, ResponseHeadersToAdd: []*corev3.HeaderValue{{Key: "k", RawValue: []byte{0xc3}}}}, true},
	}
	return cases
}

// responseCase returns responseCases' message called name.
func responseCase(name string) *rlsv3.RateLimitResponse {
	for _, tc := range responseCases() {
		if tc.name == name {
			return tc.msg
		}
	}
	panic("no response case " + name)
}

// materialize copies data out and frees it, as gRPC does once written.
func materialize(data mem.BufferSlice) []byte {
	b := data.Materialize()
	data.Free()
	return b
}

// checkMarshal compares Codec().Marshal(m) with gRPC's codec and
// proto.Marshal: the same error, else bytes proto.Unmarshal reads back as m.
// With exact, the bytes must be proto.Marshal's (true whenever no map has
// two or more entries).
func checkMarshal(t *testing.T, m proto.Message, exact bool) {
	t.Helper()
	want, wantErr := proto.Marshal(m)
	data, err := Codec().Marshal(m)
	_, stdErr := stdCodec().Marshal(m)
	if (err == nil) != (wantErr == nil) || (err != nil && err.Error() != stdErr.Error()) {
		t.Fatalf("Marshal error = %v, want %v (gRPC's codec: %v)", err, wantErr, stdErr)
	}
	if err != nil {
		return
	}
	got := materialize(data)
	if exact && !bytes.Equal(got, want) {
		t.Fatalf("Marshal =\n%x\nproto.Marshal =\n%x", got, want)
	}
	if len(got) != len(want) {
		t.Fatalf("Marshal: %d bytes, proto.Marshal %d", len(got), len(want))
	}
	ref := m.ProtoReflect().Type().New().Interface()
	if err := proto.Unmarshal(want, ref); err != nil {
		if exact {
			return // unknown fields that are not valid protobuf, kept as they are
		}
		t.Fatal(err)
	}
	back := m.ProtoReflect().Type().New().Interface()
	if err := proto.Unmarshal(got, back); err != nil {
		t.Fatalf("proto.Unmarshal(Marshal) = %v", err)
	}
	if !proto.Equal(back, ref) {
		t.Fatalf("decoded Marshal = %v\nwant %v", back, ref)
	}
}

func TestMarshalResponseMatchesProto(t *testing.T) {
	for _, tc := range responseCases() {
		t.Run(tc.name, func(t *testing.T) {
			if _, hand := marshalResponse(tc.msg); hand != tc.hand {
				t.Errorf("encoded by hand: %v, want %v", hand, tc.hand)
			}
			checkMarshal(t, tc.msg, tc.name != "metadata_many_keys")
			// Every decoded message without nil list elements reads back equal.
			if tc.msg != nil && tc.name != "nil_elements" && tc.hand {
				data, err := Codec().Marshal(tc.msg)
				if err != nil {
					t.Fatal(err)
				}
				var back rlsv3.RateLimitResponse
				if err := proto.Unmarshal(materialize(data), &back); err != nil {
					t.Fatal(err)
				}
				if !proto.Equal(&back, tc.msg) {
					t.Errorf("round trip = %v, want %v", &back, tc.msg)
				}
			}
		})
	}
}

// TestUnknownFieldsOffsets: the unknown fields are read from the generated
// structs directly, and agree with protobuf reflection.
func TestUnknownFieldsOffsets(t *testing.T) {
	check := func(name string, ok bool, in func() bool, m proto.Message) {
		t.Helper()
		if !ok {
			t.Errorf("%s: no unknownFields []byte field; reflection instead", name)
		}
		if in() {
			t.Errorf("%s: unknown fields in a new message", name)
		}
		withUnknown(m)
		if !in() {
			t.Errorf("%s: unknown fields not seen", name)
		}
		m.ProtoReflect().SetUnknown(nil)
		if in() {
			t.Errorf("%s: cleared unknown fields seen", name)
		}
	}
	r := &rlsv3.RateLimitResponse{OverallCode: 1, RawBody: []byte("x")}
	check("response", unknownResponse.ok, func() bool { return unknownResponse.in(r) }, r)
	st := &rlsv3.RateLimitResponse_DescriptorStatus{Code: 1}
	check("status", unknownStatus.ok, func() bool { return unknownStatus.in(st) }, st)
	l := &rlsv3.RateLimitResponse_RateLimit{Name: "n"}
	check("limit", unknownLimit.ok, func() bool { return unknownLimit.in(l) }, l)
	q := &rlsv3.RateLimitResponse_Quota{Id: "i"}
	check("quota", unknownQuota.ok, func() bool { return unknownQuota.in(q) }, q)
	h := &corev3.HeaderValue{Key: "k", RawValue: []byte("v")}
	check("header", unknownHeader.ok, func() bool { return unknownHeader.in(h) }, h)
	u := wrapperspb.UInt32(3)
	check("uint32", unknownUInt32.ok, func() bool { return unknownUInt32.in(u) }, u)
	d := durationpb.New(5)
	check("duration", unknownDuration.ok, func() bool { return unknownDuration.in(d) }, d)
	ts := &timestamppb.Timestamp{Seconds: 9}
	check("timestamp", unknownTimestamp.ok, func() bool { return unknownTimestamp.in(ts) }, ts)
	// Without the field, reflection answers.
	noField := unknownFields[rlsv3.RateLimitResponse]{}
	if noField.in(&rlsv3.RateLimitResponse{}) || !noField.in(withUnknown(&rlsv3.RateLimitResponse{})) {
		t.Error("reflection fallback disagrees")
	}
}

// TestMarshalBuffer: a pooled buffer of exactly the message's size, for
// small and large messages, and no allocation but the BufferSlice's.
func TestMarshalBuffer(t *testing.T) {
	for _, m := range []*rlsv3.RateLimitResponse{{}, typicalResponse(), {RawBody: make([]byte, 4000)}, {RawBody: make([]byte, 40000)}} {
		data, err := Codec().Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := data[0].(mem.SliceBuffer); ok || len(data) != 1 || data.Len() != proto.Size(m) {
			t.Errorf("%d-byte message: %d buffers, %T, of %d bytes; want one pooled buffer of %d", proto.Size(m), len(data), data[0], data.Len(), proto.Size(m))
		}
		data.Free()
	}
	resp := typicalResponse()
	if n := testing.AllocsPerRun(1000, func() {
		data, err := Codec().Marshal(resp)
		if err != nil {
			t.Fatal(err)
		}
		data.Free()
	}); n > 1.1 {
		t.Errorf("Marshal(typical response): %v allocations, want 1", n)
	}
}

func TestMarshalOtherTypesFallBack(t *testing.T) {
	for _, m := range []proto.Message{
		&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING},
		typicalRequest(),
		&rlsv3.RateLimitResponse_DescriptorStatus{Code: rlsv3.RateLimitResponse_OK},
		&structpb.Struct{Fields: map[string]*structpb.Value{"\xff": structpb.NewNullValue()}},
	} {
		checkMarshal(t, m, true)
	}
	if _, err := Codec().Marshal("not a message"); err == nil {
		t.Error("Marshal(string) succeeded")
	}
	if err := Codec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(nil)}, new(int)); err == nil {
		t.Error("Unmarshal(*int) succeeded")
	}
	var hc healthpb.HealthCheckRequest
	if err := Codec().Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{0x0a, 1, 'x'})}, &hc); err != nil || hc.Service != "x" {
		t.Errorf("Unmarshal(HealthCheckRequest) = %v, %v", &hc, err)
	}
}

// requestCases: encodings of RateLimitRequest, or of bytes that are not one.
func requestCases() []struct {
	name string
	b    []byte
	hand bool // decoded by hand rather than left to proto.Unmarshal
} {
	mustMarshal := func(m proto.Message) []byte {
		b, err := proto.Marshal(m)
		if err != nil {
			panic(err)
		}
		return b
	}
	tag := func(b []byte, num protowire.Number, typ protowire.Type) []byte {
		return protowire.AppendTag(b, num, typ)
	}
	str := func(b []byte, num protowire.Number, s string) []byte {
		return protowire.AppendString(tag(b, num, protowire.BytesType), s)
	}
	msg := func(b []byte, num protowire.Number, body []byte) []byte {
		return protowire.AppendBytes(tag(b, num, protowire.BytesType), body)
	}
	varint := func(b []byte, num protowire.Number, v uint64) []byte {
		return protowire.AppendVarint(tag(b, num, protowire.VarintType), v)
	}
	entry := func(k, v string) []byte { return str(str(nil, 1, k), 2, v) }
	desc := func(entries ...[]byte) []byte {
		var b []byte
		for _, e := range entries {
			b = msg(b, 1, e)
		}
		return b
	}
	typical := mustMarshal(typicalRequest())
	every := mustMarshal(&rlsv3.RateLimitRequest{
		Domain: "dömain",
		Descriptors: []*rlv3.RateLimitDescriptor{{
			Entries:        []*rlv3.RateLimitDescriptor_Entry{{Key: "k", Value: "v"}, {Key: "only-key"}, {Value: "only-value"}, {}},
			Limit:          &rlv3.RateLimitDescriptor_RateLimitOverride{RequestsPerUnit: 10, Unit: typev3.RateLimitUnit_HOUR, UnitMultiplier: wrapperspb.UInt32(3)},
			HitsAddend:     wrapperspb.UInt64(math.MaxUint64),
			IsNegativeHits: true,
		}, {}, {Limit: &rlv3.RateLimitDescriptor_RateLimitOverride{}, HitsAddend: &wrapperspb.UInt64Value{}}, {Limit: &rlv3.RateLimitDescriptor_RateLimitOverride{UnitMultiplier: &wrapperspb.UInt32Value{}}}},
		HitsAddend: math.MaxUint32,
	})
	cases := []struct {
		name string
		b    []byte
		hand bool
	}{
		{"empty", nil, true},
		{"typical", typical, true},
		{"every_field", every, true},
		{"long_strings", mustMarshal(&rlsv3.RateLimitRequest{Domain: strings.Repeat("d", 1000), Descriptors: []*rlv3.RateLimitDescriptor{{Entries: []*rlv3.RateLimitDescriptor_Entry{{Key: strings.Repeat("k", 200), Value: strings.Repeat("ü", 5000)}}}}}), true},
		{"empty_strings_present", str(desc(entry("", "")), 1, ""), true},
		{"zero_varints_present", varint(msg(varint(nil, 3, 0), 2, varint(msg(nil, 2, varint(varint(nil, 1, 0), 2, 0)), 4, 0)), 3, 0), true},
		{"last_domain_wins", str(str(nil, 1, "first"), 1, "second"), true},
		{"last_key_wins", msg(nil, 2, desc(str(str(str(nil, 1, "a"), 2, "b"), 1, "c"))), true},
		{"hits_addend_truncated_to_uint32", varint(nil, 3, math.MaxUint64), true},
		{"unit_truncated_to_int32", msg(nil, 2, msg(nil, 2, varint(nil, 2, 1<<40|5))), true},
		{"negative_enum", msg(nil, 2, msg(nil, 2, varint(nil, 2, uint64(math.MaxUint64)))), true},
		{"bool_from_big_varint", msg(nil, 2, varint(nil, 4, 1<<62)), true},
		{"limit_merges", msg(nil, 2, msg(msg(nil, 2, varint(msg(nil, 3, varint(nil, 1, 9)), 1, 5)), 2, varint(nil, 2, 3))), true},
		{"multiplier_merges", msg(nil, 2, msg(nil, 2, msg(msg(nil, 3, varint(nil, 1, 9)), 3, nil))), true},
		{"hits_addend_merges", msg(nil, 2, msg(msg(nil, 3, varint(nil, 1, 9)), 3, nil)), true},
		{"wrapper_last_value_wins", msg(nil, 2, msg(nil, 3, varint(varint(nil, 1, 9), 1, 4))), true},
		{"entries_interleaved", msg(nil, 2, msg(varint(msg(nil, 1, entry("a", "1")), 4, 1), 1, entry("b", "2"))), true},
		{"descriptors_interleaved", msg(varint(msg(str(nil, 1, "d"), 2, desc(entry("a", "1"))), 3, 2), 2, desc(entry("b", "2"), entry("c", "3"))), true},
		{"non_minimal_varints", append([]byte{0x8a, 0x80, 0x00, 0x82, 0x00}, "ab"...), true},
		{"unknown_top", varint(typical, 99, 1), false},
		{"unknown_descriptor", msg(nil, 2, varint(desc(entry("a", "b")), 5, 1)), false},
		{"unknown_entry", msg(nil, 2, msg(nil, 1, varint(entry("a", "b"), 3, 1))), false},
		{"unknown_override", msg(nil, 2, msg(nil, 2, str(nil, 4, "x"))), false},
		{"unknown_wrapper", msg(nil, 2, msg(nil, 3, varint(nil, 2, 1))), false},
		{"unknown_group", append(tag(append(tag(nil, 50, protowire.StartGroupType), varint(nil, 1, 1)...), 50, protowire.EndGroupType), typical...), false},
		{"unknown_fixed", protowire.AppendFixed64(tag(protowire.AppendFixed32(tag(nil, 60, protowire.Fixed32Type), 1), 61, protowire.Fixed64Type), 2), false},
		{"wrong_wire_type_domain", varint(nil, 1, 5), false},
		{"wrong_wire_type_descriptors", varint(nil, 2, 5), false},
		{"wrong_wire_type_hits", str(nil, 3, "x"), false},
		{"wrong_wire_type_entry_key", msg(nil, 2, msg(nil, 1, varint(nil, 1, 1))), false},
		{"wrong_wire_type_limit", msg(nil, 2, varint(nil, 2, 1)), false},
		{"wrong_wire_type_is_negative", msg(nil, 2, str(nil, 4, "")), false},
		{"fixed32_as_known_field", protowire.AppendFixed32(tag(nil, 3, protowire.Fixed32Type), 7), false},
		{"invalid_utf8_domain", str(nil, 1, "a\xffb"), false},
		{"invalid_utf8_key", msg(nil, 2, desc(entry("\xc3", "v"))), false},
		{"invalid_utf8_value", msg(nil, 2, desc(entry("k", "\xed\xa0\x80"))), false},
		{"invalid_utf8_last_wins", str(str(nil, 1, "\xff"), 1, "ok"), false},
		{"field_number_zero", varint(nil, 0, 1), false},
		{"end_group_alone", tag(nil, 7, protowire.EndGroupType), false},
		{"wire_type_7", []byte{0x0f}, false},
		{"overlong_varint", append([]byte{0x18}, bytes.Repeat([]byte{0xff}, 10)...), false},
		{"varint_10th_byte_overflow", append(append([]byte{0x18}, bytes.Repeat([]byte{0xff}, 9)...), 0x02), false},
		{"length_past_end", []byte{0x0a, 5, 'a'}, false},
		{"huge_length", append([]byte{0x0a}, protowire.AppendVarint(nil, math.MaxUint64)...), false},
		{"nested_length_past_parent", msg(nil, 2, []byte{0x0a, 10, 0x0a, 1, 'a'}), false},
		{"truncated_tag", []byte{0x80}, false},
	}
	// Every proper prefix of the full message: those cut between two fields
	// are messages too.
	for i := 1; i < len(every); i++ {
		cases = append(cases, struct {
			name string
			b    []byte
			hand bool
		}{fmt.Sprint("prefix_", i), every[:i], proto.Unmarshal(every[:i], new(rlsv3.RateLimitRequest)) == nil})
	}
	return cases
}

// decodeBoth decodes b with Codec (data split into pieces: 0 for one buffer)
// and proto.Unmarshal.
func decodeBoth(b []byte, pieces int) (got, want *rlsv3.RateLimitRequest, gotErr, wantErr error) {
	input := bytes.Clone(b)
	data := mem.BufferSlice{mem.SliceBuffer(input)}
	if pieces > 0 && len(input) > 0 {
		data = nil
		for i := range pieces {
			data = append(data, mem.SliceBuffer(input[i*len(input)/pieces:(i+1)*len(input)/pieces]))
		}
	}
	got, want = &rlsv3.RateLimitRequest{}, &rlsv3.RateLimitRequest{}
	gotErr = Codec().Unmarshal(data, got)
	wantErr = proto.Unmarshal(b, want)
	// Nothing decoded may alias the input, which gRPC reuses.
	for i := range input {
		input[i] = 'X'
	}
	return got, want, gotErr, wantErr
}

func checkUnmarshal(t *testing.T, b []byte) (decoded bool) {
	t.Helper()
	for _, pieces := range []int{0, 2, 3} {
		got, want, gotErr, wantErr := decodeBoth(b, pieces)
		if (gotErr == nil) != (wantErr == nil) || (gotErr != nil && gotErr.Error() != wantErr.Error()) {
			t.Fatalf("%d pieces: Unmarshal(%x) error = %v, proto.Unmarshal: %v", pieces, b, gotErr, wantErr)
		}
		if gotErr == nil && !proto.Equal(got, want) {
			t.Fatalf("%d pieces: Unmarshal(%x) =\n%v\nproto.Unmarshal =\n%v", pieces, b, got, want)
		}
		decoded = gotErr == nil
	}
	return decoded
}

func TestUnmarshalRequestMatchesProto(t *testing.T) {
	for _, tc := range requestCases() {
		t.Run(tc.name, func(t *testing.T) {
			var m rlsv3.RateLimitRequest
			if hand := unmarshalRequest(bytes.Clone(tc.b), &m); hand != tc.hand {
				t.Errorf("decoded by hand: %v, want %v", hand, tc.hand)
			}
			checkUnmarshal(t, tc.b)
		})
	}
}

// TestUnmarshalRequestAllocations: the decoded message shares a few
// allocations but is an ordinary message: appending an entry to one
// descriptor leaves the next one alone, and it re-encodes as sent.
func TestUnmarshalRequestAllocations(t *testing.T) {
	want := typicalRequest()
	b, err := proto.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	var got rlsv3.RateLimitRequest
	if err := Codec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, &got); err != nil {
		t.Fatal(err)
	}
	got.Descriptors[0].Entries = append(got.Descriptors[0].Entries, &rlv3.RateLimitDescriptor_Entry{Key: "new"})
	want.Descriptors[0].Entries = append(want.Descriptors[0].Entries, &rlv3.RateLimitDescriptor_Entry{Key: "new"})
	if !proto.Equal(&got, want) {
		t.Fatalf("after append: %v\nwant %v", &got, want)
	}
	again, err := proto.Marshal(&got)
	if err != nil {
		t.Fatal(err)
	}
	wantB, _ := proto.Marshal(want)
	if !bytes.Equal(again, wantB) {
		t.Errorf("re-encoded %x, want %x", again, wantB)
	}
	data := mem.BufferSlice{mem.SliceBuffer(b)}
	allocs := testing.AllocsPerRun(100, func() {
		var m rlsv3.RateLimitRequest
		if err := Codec().Unmarshal(data, &m); err != nil {
			t.Fatal(err)
		}
	})
	// The message itself, descriptor pointers and structs, entry pointers
	// and structs, and the strings.
	if allocs > 6 {
		t.Errorf("Unmarshal(typical request): %v allocations, want at most 6", allocs)
	}
}

// FuzzRateLimitRequestCodec: any bytes decode iff proto.Unmarshal decodes
// them, with the same error, into an equal message.
func FuzzRateLimitRequestCodec(f *testing.F) {
	for _, tc := range requestCases() {
		f.Add(tc.b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkUnmarshal(t, b)
	})
}

// FuzzRateLimitResponseCodec: responses built from the fuzzer's values
// (flags choosing which sub-messages are present) encode as proto.Marshal
// encodes them, or fail with its error.
func FuzzRateLimitResponseCodec(f *testing.F) {
	f.Add(uint32(0xffff), int32(1), uint8(2), uint32(100), int32(2), "per-client", uint32(97), int64(41), int32(500_000_000), "retry-after", "41", []byte{0xff}, []byte("body"), "q", []byte(nil))
	f.Add(uint32(0), int32(0), uint8(0), uint32(0), int32(0), "", uint32(0), int64(0), int32(0), "", "", []byte(nil), []byte(nil), "", []byte(nil))
	f.Add(uint32(0x5555), int32(-1), uint8(1), uint32(math.MaxUint32), int32(math.MinInt32), "\xff", uint32(math.MaxUint32), int64(math.MinInt64), int32(-1), "k", "\xc3", []byte{}, []byte{}, "\x80", []byte{0x08, 0x01})
	f.Add(uint32(0xaaaa), int32(2), uint8(3), uint32(1), int32(5), "ü", uint32(1), int64(-1), int32(math.MaxInt32), "", "v", []byte("raw"), bytes.Repeat([]byte("x"), 2000), "id", []byte{0xc8, 0x3e, 0x01})
	f.Fuzz(func(t *testing.T, flags uint32, code int32, nStatuses uint8, rpu uint32, unit int32, name string, remaining uint32,
		secs int64, nanos int32, key, value string, raw, body []byte, id string, unknown []byte) {
		has := func(bit int) bool { return flags&(1<<bit) != 0 }
		quota := func(bit int) *rlsv3.RateLimitResponse_Quota {
			if !has(bit) {
				return nil
			}
			q := &rlsv3.RateLimitResponse_Quota{Requests: rpu, Id: id}
			switch {
			case has(bit + 1):
				q.ExpirationSpecifier = &rlsv3.RateLimitResponse_Quota_ValidUntil{ValidUntil: &timestamppb.Timestamp{Seconds: secs, Nanos: nanos}}
			case has(bit + 2):
				q.ExpirationSpecifier = &rlsv3.RateLimitResponse_Quota_ValidUntil{}
			}
			return q
		}
		r := &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_Code(code), RawBody: body, Quota: quota(0)}
		for i := range int(nStatuses % 5) {
			if has(3) && i == 1 {
				r.Statuses = append(r.Statuses, nil)
				continue
			}
			st := &rlsv3.RateLimitResponse_DescriptorStatus{Code: rlsv3.RateLimitResponse_Code(code + int32(i)), LimitRemaining: remaining, Quota: quota(4)}
			if has(7) {
				st.CurrentLimit = &rlsv3.RateLimitResponse_RateLimit{RequestsPerUnit: rpu, Unit: rlsv3.RateLimitResponse_RateLimit_Unit(unit), Name: name}
				if has(8) {
					st.CurrentLimit.UnitMultiplier = wrapperspb.UInt32(remaining)
				}
			}
			if has(9) {
				st.DurationUntilReset = &durationpb.Duration{Seconds: secs, Nanos: nanos}
			}
			r.Statuses = append(r.Statuses, st)
		}
		if has(10) {
			r.ResponseHeadersToAdd = []*corev3.HeaderValue{{Key: key, Value: value}, {Key: key, RawValue: raw}}
		}
		if has(11) {
			r.RequestHeadersToAdd = []*corev3.HeaderValue{{Key: value, Value: key, RawValue: raw}, nil}
		}
		if has(12) {
			r.DynamicMetadata = &structpb.Struct{Fields: map[string]*structpb.Value{key: structpb.NewStringValue(value)}}
		}
		if has(13) && len(unknown) > 0 {
			// proto.Marshal writes unknown fields as they are.
			var target proto.Message = r
			switch {
			case has(14) && len(r.Statuses) > 0 && r.Statuses[0] != nil:
				target = r.Statuses[0]
			case has(15) && r.Quota != nil:
				target = r.Quota
			}
			target.ProtoReflect().SetUnknown(unknown)
		}
		checkMarshal(t, r, true)
	})
}

// rawCodec sends []byte as it is, for requests gRPC's codec will not encode.
type rawCodec struct{}

func (rawCodec) Name() string { return encproto.Name }
func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(*[]byte); ok {
		return mem.BufferSlice{mem.SliceBuffer(*b)}, nil
	}
	return stdCodec().Marshal(v)
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error { return stdCodec().Unmarshal(data, v) }

// echoRLS answers every request with resp and records the request.
type echoRLS struct {
	rlsv3.UnimplementedRateLimitServiceServer
	resp *rlsv3.RateLimitResponse
	got  chan *rlsv3.RateLimitRequest
}

func (s *echoRLS) ShouldRateLimit(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	s.got <- req
	return s.resp, nil
}

func startRLS(t *testing.T, srv *echoRLS, extra ...grpc.ServerOption) *grpc.ClientConn {
	t.Helper()
	opts := append(Options(DefaultLimits()), NewMetrics(prometheus.NewRegistry()).ServerOptions()...)
	gs := grpc.NewServer(append(opts, extra...)...)
	rlsv3.RegisterRateLimitServiceServer(gs, srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(rawCodec{})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// TestServerUsesCodec: through a server on Options, requests arrive and
// responses leave as sent; bytes proto.Unmarshal rejects are refused with
// the status gRPC's codec gives, on either codec.
func TestServerUsesCodec(t *testing.T) {
	resp := responseCase("every_field")
	for _, tc := range []struct {
		name  string
		extra []grpc.ServerOption
	}{{"hand", nil}, {"std", []grpc.ServerOption{grpc.ForceServerCodecV2(stdCodec())}}} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &echoRLS{resp: resp, got: make(chan *rlsv3.RateLimitRequest, 1)}
			cc := startRLS(t, srv, tc.extra...)
			const method = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
			var out rlsv3.RateLimitResponse
			if err := cc.Invoke(t.Context(), method, typicalRequest(), &out); err != nil {
				t.Fatal(err)
			}
			if got := <-srv.got; !proto.Equal(got, typicalRequest()) {
				t.Errorf("server got %v, want %v", got, typicalRequest())
			}
			if !proto.Equal(&out, resp) {
				t.Errorf("client got %v, want %v", &out, resp)
			}
			for _, b := range [][]byte{{0x0a, 1, 0xff}, {0x0a, 5}} {
				err := cc.Invoke(t.Context(), method, &b, &out)
				perr := proto.Unmarshal(b, new(rlsv3.RateLimitRequest))
				if perr == nil {
					t.Fatalf("proto.Unmarshal(%x) succeeded", b)
				}
				want := status.Errorf(codes.Internal, "grpc: failed to unmarshal the received message: %v", perr)
				if status.Code(err) != codes.Internal || err.Error() != want.Error() {
					t.Errorf("request %x: %v, want %v", b, err, want)
				}
			}
		})
	}
}

func TestServerMarshalError(t *testing.T) {
	srv := &echoRLS{resp: responseCase("invalid_utf8_header_value"), got: make(chan *rlsv3.RateLimitRequest, 1)}
	if _, hand := marshalResponse(srv.resp); hand {
		t.Fatal("test needs a response the codec leaves to proto.Marshal")
	}
	cc := startRLS(t, srv)
	err := cc.Invoke(t.Context(), "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit", typicalRequest(), new(rlsv3.RateLimitResponse))
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "invalid UTF-8") {
		t.Errorf("response with invalid UTF-8: %v, want Internal", err)
	}
}

var errSink error

func BenchmarkCodec(b *testing.B) {
	resp := typicalResponse()
	reqBytes, err := proto.Marshal(typicalRequest())
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		codec encoding.CodecV2
	}{{"std", stdCodec()}, {"hand", Codec()}} {
		b.Run("marshal_response/"+c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				data, err := c.codec.Marshal(resp)
				if err != nil {
					b.Fatal(err)
				}
				data.Free()
			}
		})
		b.Run("unmarshal_request/"+c.name, func(b *testing.B) {
			data := mem.BufferSlice{mem.SliceBuffer(reqBytes)}
			b.ReportAllocs()
			for b.Loop() {
				m := new(rlsv3.RateLimitRequest)
				errSink = c.codec.Unmarshal(data, m)
			}
			if errSink != nil {
				b.Fatal(errSink)
			}
		})
	}
}

// fixedRLS answers every request with a typical two-status response, doing
// nothing else: what is left is the gRPC stack and the codec.
type fixedRLS struct {
	rlsv3.UnimplementedRateLimitServiceServer
	resp *rlsv3.RateLimitResponse
}

func (s fixedRLS) ShouldRateLimit(context.Context, *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
	return s.resp, nil
}

// BenchmarkServerCodec serves ShouldRateLimit in process on Options, with
// this codec (hand) and with gRPC's (std), to a client sending the typical
// two-descriptor request over 50 concurrent streams: allocs/op and
// process-cpu-µs/op are client and server together, the client being the
// same for both. Run with -count and compare the medians.
func BenchmarkServerCodec(b *testing.B) {
	for _, c := range []struct {
		name  string
		extra []grpc.ServerOption
	}{{"std", []grpc.ServerOption{grpc.ForceServerCodecV2(stdCodec())}}, {"hand", nil}} {
		b.Run(c.name, func(b *testing.B) {
			gs := grpc.NewServer(append(append(Options(DefaultLimits()), NewMetrics(prometheus.NewRegistry()).ServerOptions()...), c.extra...)...)
			rlsv3.RegisterRateLimitServiceServer(gs, fixedRLS{resp: typicalResponse()})
			lis, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			go gs.Serve(lis)
			defer gs.Stop()
			cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				b.Fatal(err)
			}
			defer cc.Close()
			client := rlsv3.NewRateLimitServiceClient(cc)
			req := typicalRequest()
			ctx := b.Context()
			for range 100 {
				if _, err := client.ShouldRateLimit(ctx, req); err != nil {
					b.Fatal(err)
				}
			}
			b.SetParallelism((50 + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
			b.ReportAllocs()
			before := processCPU(b)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := client.ShouldRateLimit(ctx, req); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64((processCPU(b)-before).Microseconds())/float64(b.N), "process-cpu-µs/op")
		})
	}
}

func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
