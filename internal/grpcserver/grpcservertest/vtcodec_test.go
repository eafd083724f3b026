//go:build vtprotobuf

package grpcservertest

import (
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc/encoding"
	encproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

func typicalResponse() *rlsv3.RateLimitResponse {
	st := func(c rlsv3.RateLimitResponse_Code) *rlsv3.RateLimitResponse_DescriptorStatus {
		return &rlsv3.RateLimitResponse_DescriptorStatus{Code: c, LimitRemaining: 3,
			CurrentLimit:       &rlsv3.RateLimitResponse_RateLimit{Name: "auth", RequestsPerUnit: 5, Unit: rlsv3.RateLimitResponse_RateLimit_MINUTE},
			DurationUntilReset: durationpb.New(42 * time.Second)}
	}
	return &rlsv3.RateLimitResponse{OverallCode: rlsv3.RateLimitResponse_OVER_LIMIT,
		Statuses:             []*rlsv3.RateLimitResponse_DescriptorStatus{st(rlsv3.RateLimitResponse_OK), st(rlsv3.RateLimitResponse_OVER_LIMIT)},
		ResponseHeadersToAdd: []*corev3.HeaderValue{{Key: "retry-after", Value: "42"}, {Key: "x-ratelimit-limit", Value: "5"}},
		RawBody:              []byte(`{"error":"Too many requests","retryAfter":42}`)}
}

// TestVTCodecSameBytes: the vtprotobuf marshaler writes what protobuf-go does.
func TestVTCodecSameBytes(t *testing.T) {
	resp := typicalResponse()
	got, err := vtCodec.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := proto.MarshalOptions{Deterministic: true}.Marshal(resp)
	if string(got.Materialize()) != string(want) {
		t.Errorf("vt %x\nstd %x", got.Materialize(), want)
	}
}

func BenchmarkResponseMarshal(b *testing.B) {
	resp := typicalResponse()
	for _, c := range []struct {
		name  string
		codec encoding.CodecV2
	}{{"std", encoding.GetCodecV2(encproto.Name)}, {"vt", vtCodec}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				bs, err := c.codec.Marshal(resp)
				if err != nil {
					b.Fatal(err)
				}
				bs.Free()
			}
		})
	}
}
