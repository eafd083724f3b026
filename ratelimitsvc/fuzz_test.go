package ratelimitsvc

import (
	"strings"
	"testing"

	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// FuzzShouldRateLimit: any descriptors, hits and overrides get an answer or
// InvalidArgument; never a panic, and one status per descriptor.
// The spec is "domain|k=v,k=v;k=v|..." with optional #hits and !unit.
func FuzzShouldRateLimit(f *testing.F) {
	for _, s := range []string{
		"basic|remote_address=a", "basic|path=/api/x;path=/login", "api|preset=auth,client=ip:1.2.3.4",
		"basic|tenant=t,user=u#0", "basic|unconfigured=x!3", "basic|shared=team-*x", "|=", "basic|",
		"replaces|user=u;vip=v", "quota|plan=p;bonus=b#5", "basic|ban=x#4294967296",
	} {
		f.Add(s, uint32(0))
	}
	srv, err := New(discardLogger(), prometheus.NewRegistry(), testConfig(), NewMemoryStore())
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, spec string, hits uint32) {
		domain, rest, _ := strings.Cut(spec, "|")
		req := &rlsv3.RateLimitRequest{Domain: domain, HitsAddend: hits}
		if rest != "" {
			for _, ds := range strings.Split(rest, ";") {
				d := &rlv3.RateLimitDescriptor{}
				if body, h, ok := strings.Cut(ds, "#"); ok {
					ds = body
					var n uint64
					for _, c := range h {
						n = n*10 + uint64(c-'0')%10
					}
					d.HitsAddend = wrapperspb.UInt64(n)
				}
				if body, u, ok := strings.Cut(ds, "!"); ok && u != "" {
					ds = body
					d.Limit = &rlv3.RateLimitDescriptor_RateLimitOverride{RequestsPerUnit: hits % 7, Unit: typev3.RateLimitUnit(u[0] % 9)}
				}
				if ds != "" {
					for _, e := range strings.Split(ds, ",") {
						k, v, _ := strings.Cut(e, "=")
						d.Entries = append(d.Entries, &rlv3.RateLimitDescriptor_Entry{Key: k, Value: v})
					}
				}
				req.Descriptors = append(req.Descriptors, d)
			}
		}
		resp, err := srv.ShouldRateLimit(t.Context(), req)
		if err != nil {
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("error %v is not InvalidArgument", err)
			}
			return
		}
		if len(resp.Statuses) != len(req.Descriptors) {
			t.Fatalf("%d statuses for %d descriptors", len(resp.Statuses), len(req.Descriptors))
		}
		for i, s := range resp.Statuses {
			if s == nil {
				t.Fatalf("status %d is nil", i)
			}
		}
	})
}
