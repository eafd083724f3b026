package grpcserver

import (
	"bytes"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	rlcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Envoy-like requests, as the three services receive them.

func envoyCheck() *authv3.CheckRequest {
	claims, _ := structpb.NewStruct(map[string]any{
		"sub": "user-4711", "role": "admin", "iss": "https://idp.example.com", "aud": []any{"api", "web"},
		"exp": 1.9e9, "iat": 1.8e9, "email": "someone@example.com", "org": map[string]any{"id": "t1", "plan": "pro"},
	})
	headers := map[string]string{
		":authority": "app.example.com", ":method": "POST", ":path": "/api/v1/orders?page=2", ":scheme": "https",
		"accept": "application/json", "accept-encoding": "gzip, deflate, br", "accept-language": "en-GB,en;q=0.9",
		"authorization": "Bearer " + strings.Repeat("e", 600), "content-type": "application/json", "content-length": "512",
		"cookie": "session=" + strings.Repeat("c", 200), "origin": "https://dashboard.example.com",
		"referer": "https://dashboard.example.com/orders", "sec-fetch-mode": "cors", "sec-fetch-site": "same-site",
		"user-agent":   "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
		"x-request-id": "8f0c2d4e-3b1a-4c5d-9e6f-7a8b9c0d1e2f", "x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https",
		"x-envoy-expected-rq-timeout-ms": "15000", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
	}
	addr := func(ip string, port uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Address: addr("203.0.113.7", 51000)},
		Destination: &authv3.AttributeContext_Peer{Address: addr("10.0.0.5", 8443)},
		Request: &authv3.AttributeContext_Request{
			Time: timestamppb.Now(),
			Http: &authv3.AttributeContext_HttpRequest{Id: "1234567890", Method: "POST", Headers: headers,
				Path: "/api/v1/orders?page=2", Host: "app.example.com", Scheme: "https", Protocol: "HTTP/2", Size: 512},
		},
		ContextExtensions: map[string]string{"cors": "enforce", "csp": "nonce", "require_role": "admin"},
		MetadataContext: &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{
			"envoy.filters.http.jwt_authn": {Fields: map[string]*structpb.Value{"jwt_payload": structpb.NewStructValue(claims)}},
		}},
	}}
}

func envoyAccessLogs(n int) *alsv3.StreamAccessLogsMessage {
	authz, _ := structpb.NewStruct(map[string]any{"user": "user-4711", "role": "admin", "origin": "allowed", "client": "user:user-4711"})
	entries := make([]*accesslogv3.HTTPAccessLogEntry, n)
	for i := range entries {
		entries[i] = &accesslogv3.HTTPAccessLogEntry{
			CommonProperties: &accesslogv3.AccessLogCommon{
				StartTime: timestamppb.Now(), Duration: durationpb.New(12 * time.Millisecond),
				DownstreamRemoteAddress: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address: "203.0.113.7", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 51234}}}},
				UpstreamCluster: "app", RouteName: "app_route",
				Metadata: &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.filters.http.ext_authz": authz}},
			},
			ProtocolVersion: accesslogv3.HTTPAccessLogEntry_HTTP2,
			Request: &accesslogv3.HTTPRequestProperties{
				RequestMethod: corev3.RequestMethod_POST, Scheme: "https", Authority: "app.example.com",
				Path: "/api/v1/orders/" + strconv.Itoa(i), UserAgent: "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0",
				RequestId: "8f0c2d4e-3b1a-4c5d-9e6f-" + strconv.Itoa(100000000000+i),
				RequestHeaders: map[string]string{"origin": "https://dashboard.example.com", "content-type": "application/json",
					"sec-fetch-site": "same-site", "x-tenant-id": "t1"},
			},
			Response: &accesslogv3.HTTPResponseProperties{ResponseCode: wrapperspb.UInt32(201), ResponseBodyBytes: 512},
		}
	}
	return &alsv3.StreamAccessLogsMessage{
		Identifier: &alsv3.StreamAccessLogsMessage_Identifier{Node: &corev3.Node{Id: "envoy-1", Cluster: "edge"}, LogName: "meshguard_audit"},
		LogEntries: &alsv3.StreamAccessLogsMessage_HttpLogs{HttpLogs: &alsv3.StreamAccessLogsMessage_HTTPAccessLogEntries{LogEntry: entries}},
	}
}

func envoyRateLimit() *rlsv3.RateLimitRequest {
	kv := func(k, v string) *rlcommon.RateLimitDescriptor_Entry {
		return &rlcommon.RateLimitDescriptor_Entry{Key: k, Value: v}
	}
	return &rlsv3.RateLimitRequest{Domain: "api", HitsAddend: 1, Descriptors: []*rlcommon.RateLimitDescriptor{
		{Entries: []*rlcommon.RateLimitDescriptor_Entry{kv("preset", "standard"), kv("client", "user:user-4711")}},
		{Entries: []*rlcommon.RateLimitDescriptor_Entry{kv("preset", "auth_ip"), kv("client", "ip:2001:db8:1:2::/64")}},
	}}
}

// Hostile requests of about size bytes, made of tiny repeated elements.

func hostileHeaders(size int) []byte {
	var headers []byte
	for i := 0; len(headers) < size; i++ {
		kv := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), strconv.Itoa(i))
		headers = protowire.AppendBytes(protowire.AppendTag(headers, 3, protowire.BytesType), kv)
	}
	http := protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), headers)
	req := protowire.AppendBytes(protowire.AppendTag(nil, 4, protowire.BytesType), http)
	return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), req)
}

func hostileEntries(size int) []byte {
	var entries []byte
	for len(entries) < size {
		entries = protowire.AppendVarint(protowire.AppendTag(entries, 1, protowire.BytesType), 0)
	}
	return protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), entries)
}

func hostileDescriptors(size, entries int) []byte {
	b := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "api")
	var desc []byte
	for range entries {
		entry := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "k")
		desc = protowire.AppendBytes(protowire.AppendTag(desc, 1, protowire.BytesType), entry)
	}
	for len(b) < size {
		b = protowire.AppendBytes(protowire.AppendTag(b, 2, protowire.BytesType), desc)
	}
	return b
}

// hostileStruct nests Struct → map entry → Value depth times in the
// check's metadata_context.
func hostileStruct(depth int) []byte {
	field := func(num protowire.Number, b []byte) []byte {
		return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), b)
	}
	str := func(num protowire.Number, s string) []byte {
		return protowire.AppendString(protowire.AppendTag(nil, num, protowire.BytesType), s)
	}
	var st []byte // an empty Struct
	for range depth {
		value := field(5, st)                                  // Value{struct_value: st}
		st = field(1, append(str(1, "k"), field(2, value)...)) // Struct{fields: {"k": value}}
	}
	metadata := field(1, append(str(1, "f"), field(2, st)...)) // Metadata{filter_metadata: {"f": st}}
	return field(1, field(11, metadata))                       // CheckRequest{attributes: {metadata_context: ...}}
}

func mustMarshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// decodedBytes is what proto.Unmarshal allocates decoding b into a new t:
// the least of three tries, since other goroutines allocate too.
func decodedBytes(t *testing.T, b []byte, typ proto.Message) int64 {
	t.Helper()
	least := int64(-1)
	for range 3 {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		m := typ.ProtoReflect().New().Interface()
		if err := proto.Unmarshal(b, m); err != nil {
			t.Fatal(err)
		}
		runtime.ReadMemStats(&after)
		runtime.KeepAlive(m)
		if n := int64(after.TotalAlloc - before.TotalAlloc); least < 0 || n < least {
			least = n
		}
	}
	return least
}

// TestEstimateCoversDecoding: the scan's estimate is at least what
// protobuf-go allocates decoding the request (so a budget bounds memory),
// and for Envoy's requests within a small factor of it (so the budget
// does not refuse them). It logs the ratios DecodedRatio is chosen from.
func TestEstimateCoversDecoding(t *testing.T) {
	for _, tc := range []struct {
		name    string
		b       []byte
		typ     proto.Message
		envoyLk bool // an Envoy-like request: the estimate must stay close
	}{
		{"check", mustMarshal(t, envoyCheck()), &authv3.CheckRequest{}, true},
		{"access_logs_1", mustMarshal(t, envoyAccessLogs(1)), &alsv3.StreamAccessLogsMessage{}, true},
		{"access_logs_2000", mustMarshal(t, envoyAccessLogs(2000)), &alsv3.StreamAccessLogsMessage{}, true},
		{"rate_limit", mustMarshal(t, envoyRateLimit()), &rlsv3.RateLimitRequest{}, true},
		{"hostile_headers", hostileHeaders(1 << 20), &authv3.CheckRequest{}, false},
		{"hostile_entries", hostileEntries(1 << 20), &alsv3.StreamAccessLogsMessage{}, false},
		{"hostile_descriptors", hostileDescriptors(1<<20, 1), &rlsv3.RateLimitRequest{}, false},
		{"hostile_entries_per_descriptor", hostileDescriptors(1<<20, 1000), &rlsv3.RateLimitRequest{}, false},
		{"hostile_struct_depth", hostileStruct(25), &authv3.CheckRequest{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			est, err := scan([][]byte{tc.b}, newShapes(nil).of(tc.typ.ProtoReflect().Descriptor()), 1<<40)
			if err != nil {
				t.Fatal(err)
			}
			got := decodedBytes(t, tc.b, tc.typ)
			t.Logf("%d bytes on the wire, %d decoded (%.1fx), estimated %d (%.2fx what decoding took)",
				len(tc.b), got, float64(got)/float64(len(tc.b)), est, float64(est)/float64(got))
			if est < got {
				t.Errorf("estimate %d below the %d bytes decoding took", est, got)
			}
			if tc.envoyLk && est > 3*got {
				t.Errorf("estimate %d more than 3x the %d bytes decoding took", est, got)
			}
		})
	}
}

func TestScanRefuses(t *testing.T) {
	rlsCaps := map[protoreflect.FullName]int{
		"envoy.service.ratelimit.v3.RateLimitRequest.descriptors":          32,
		"envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.entries": 16,
	}
	tooManyEntries := mustMarshal(t, &rlsv3.RateLimitRequest{Domain: "api", Descriptors: []*rlcommon.RateLimitDescriptor{
		{Entries: []*rlcommon.RateLimitDescriptor_Entry{{Key: "a"}}},
		{Entries: make([]*rlcommon.RateLimitDescriptor_Entry, 17)},
	}})
	// make() left nil entries, which Marshal writes as empty messages.
	for _, tc := range []struct {
		name   string
		b      []byte
		typ    proto.Message
		budget int64
		code   codes.Code
		reason string
		msg    string
	}{
		{"descriptors", hostileDescriptors(4<<20, 1), &rlsv3.RateLimitRequest{}, 1 << 40, codes.InvalidArgument, "too_many", "descriptors: more than 32"},
		{"entries", tooManyEntries, &rlsv3.RateLimitRequest{}, 1 << 40, codes.InvalidArgument, "too_many", "descriptors[1].entries: more than 16"},
		{"decoded size", hostileHeaders(1 << 20), &authv3.CheckRequest{}, 8 << 20, codes.ResourceExhausted, "decoded_too_large", "request would take more than 8388608 bytes once decoded"},
		{"depth", hostileStruct(60), &authv3.CheckRequest{}, 1 << 40, codes.InvalidArgument, "too_deep", "messages nested deeper than 100"},
		{"truncated", mustMarshal(t, envoyCheck())[:100], &authv3.CheckRequest{}, 1 << 40, codes.InvalidArgument, "malformed", "attributes: malformed: unexpected EOF"},
		{"bad tag", []byte{0x00, 0x01}, &rlsv3.RateLimitRequest{}, 1 << 40, codes.InvalidArgument, "malformed", "malformed: invalid field number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := scan([][]byte{tc.b}, newShapes(rlsCaps).of(tc.typ.ProtoReflect().Descriptor()), tc.budget)
			se, ok := err.(*scanError)
			if !ok {
				t.Fatalf("scan = %v, want a refusal", err)
			}
			if se.code != tc.code || se.reason != tc.reason || se.Error() != tc.msg {
				t.Errorf("scan = %v %s %q, want %v %s %q", se.code, se.reason, se.Error(), tc.code, tc.reason, tc.msg)
			}
		})
	}
}

// TestScanAcceptsWhatDecodes: a request within its caps and budget passes,
// and unknown fields (a newer Envoy's) are allowed.
func TestScanAcceptsWhatDecodes(t *testing.T) {
	b := mustMarshal(t, envoyRateLimit())
	b = protowire.AppendString(protowire.AppendTag(b, 999, protowire.BytesType), "from a newer Envoy")
	caps := map[protoreflect.FullName]int{"envoy.service.ratelimit.v3.RateLimitRequest.descriptors": 2}
	if _, err := scan([][]byte{b}, newShapes(caps).of((&rlsv3.RateLimitRequest{}).ProtoReflect().Descriptor()), 64<<10); err != nil {
		t.Fatalf("scan: %v", err)
	}
}

// chunked splits b into pieces of n bytes, as gRPC receives a message in
// frames.
func chunked(b []byte, n int) [][]byte {
	var out [][]byte
	for len(b) > n {
		out = append(out, b[:n])
		b = b[n:]
	}
	return append(out, b)
}

// TestScanAcrossChunks: a message split anywhere (a varint across two
// buffers, a submessage across many) scans exactly as in one piece.
func TestScanAcrossChunks(t *testing.T) {
	caps := map[protoreflect.FullName]int{"envoy.service.ratelimit.v3.RateLimitRequest.descriptors": 32}
	for _, tc := range []struct {
		name string
		b    []byte
		typ  proto.Message
	}{
		{"check", mustMarshal(t, envoyCheck()), &authv3.CheckRequest{}},
		{"access_logs", mustMarshal(t, envoyAccessLogs(3)), &alsv3.StreamAccessLogsMessage{}},
		{"too many descriptors", hostileDescriptors(2000, 1), &rlsv3.RateLimitRequest{}},
		{"truncated", mustMarshal(t, envoyCheck())[:1500], &authv3.CheckRequest{}},
		{"long varint", append(protowire.AppendTag(nil, 999, protowire.VarintType), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01), &authv3.CheckRequest{}},
		{"varint overflow", append(protowire.AppendTag(nil, 999, protowire.VarintType), bytes.Repeat([]byte{0xff}, 11)...), &authv3.CheckRequest{}},
		{"group", protowire.AppendTag(protowire.AppendVarint(protowire.AppendTag(protowire.AppendTag(nil, 900, protowire.StartGroupType), 1, protowire.VarintType), 7), 900, protowire.EndGroupType), &authv3.CheckRequest{}},
	} {
		sh := newShapes(caps).of(tc.typ.ProtoReflect().Descriptor())
		wantEst, wantErr := scan([][]byte{tc.b}, sh, 1<<30)
		for n := 1; n <= 17; n++ {
			est, err := scan(chunked(tc.b, n), sh, 1<<30)
			if est != wantEst || fmt.Sprint(err) != fmt.Sprint(wantErr) {
				t.Errorf("%s in %d-byte chunks: %d, %v; in one: %d, %v", tc.name, n, est, err, wantEst, wantErr)
			}
		}
	}
}

// FuzzScan: the scan never panics and gives the same answer however the
// input is split.
func FuzzScan(f *testing.F) {
	f.Add(hostileDescriptors(200, 2), uint8(3))
	f.Add(hostileStruct(3), uint8(1))
	f.Add(hostileHeaders(100), uint8(7))
	f.Add(mustMarshal(f, envoyCheck()), uint8(16))
	sh := newShapes(nil).of((&authv3.CheckRequest{}).ProtoReflect().Descriptor())
	f.Fuzz(func(t *testing.T, b []byte, split uint8) {
		est, err := scan([][]byte{b}, sh, 1<<20)
		est2, err2 := scan(chunked(b, int(split)+1), sh, 1<<20)
		if est != est2 || fmt.Sprint(err) != fmt.Sprint(err2) {
			t.Fatalf("whole: %d, %v; in %d-byte chunks: %d, %v", est, err, int(split)+1, est2, err2)
		}
	})
}

func BenchmarkScan(b *testing.B) {
	for _, bc := range []struct {
		name string
		m    proto.Message
	}{
		{"rate_limit", envoyRateLimit()},
		{"check", envoyCheck()},
	} {
		data, _ := proto.Marshal(bc.m)
		sh := newShapes(nil).of(bc.m.ProtoReflect().Descriptor())
		chunks := [][]byte{data}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				if _, err := scan(chunks, sh, 1<<30); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
