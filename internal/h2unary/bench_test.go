package h2unary_test

import (
	"context"
	"runtime"
	"testing"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"

	"github.com/meshguard/meshguard/internal/h2unary"
)

// BenchmarkUnaryRoundTrip measures ShouldRateLimit calls from a grpc-go
// client, about 50 at a time on one connection, to a trivial handler.
func BenchmarkUnaryRoundTrip(b *testing.B) {
	resp := &rlsv3.RateLimitResponse{
		OverallCode: rlsv3.RateLimitResponse_OK,
		Statuses:    []*rlsv3.RateLimitResponse_DescriptorStatus{{Code: rlsv3.RateLimitResponse_OK, LimitRemaining: 9}},
	}
	ts := startServer(b, h2unary.Options{}, func(context.Context, *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		return resp, nil
	})
	client := rlsv3.NewRateLimitServiceClient(dial(b, ts))
	req := request("bench", "user-1234")
	if _, err := client.ShouldRateLimit(b.Context(), req); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetParallelism(max(1, 50/runtime.GOMAXPROCS(0)))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := client.ShouldRateLimit(context.Background(), req); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
