package ratelimitsvc

import (
	"math"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// verdict is the part of a response most steps check.
type verdict struct {
	Overall  string
	Statuses []st
}

type st struct {
	Code      string
	Limit     uint32 // 0: no current_limit
	Remaining uint32
}

const (
	ok   = "OK"
	over = "OVER_LIMIT"
)

func summarize(resp *rlsv3.RateLimitResponse) verdict {
	v := verdict{Overall: resp.OverallCode.String()}
	for _, s := range resp.Statuses {
		s2 := st{Code: s.Code.String(), Remaining: s.LimitRemaining}
		if s.CurrentLimit != nil {
			s2.Limit = s.CurrentLimit.RequestsPerUnit
		}
		v.Statuses = append(v.Statuses, s2)
	}
	return v
}

func v(overall string, sts ...st) verdict { return verdict{Overall: overall, Statuses: sts} }

// step sends req and checks the verdict.
type step struct {
	req     *rlsv3.RateLimitRequest
	advance time.Duration // clock moves before the request
	want    verdict
}

func repeat(n int, s step) []step {
	out := make([]step, n)
	for i := range out {
		out[i] = s
	}
	return out
}

func withHits(req *rlsv3.RateLimitRequest, hits uint32) *rlsv3.RateLimitRequest {
	req.HitsAddend = hits
	return req
}

func withDescHits(req *rlsv3.RateLimitRequest, i int, hits uint64) *rlsv3.RateLimitRequest {
	req.Descriptors[i].HitsAddend = wrapperspb.UInt64(hits)
	return req
}

// TestConformance runs the envoyproxy/ratelimit matching rules and
// meshguard's extensions, from config files in that format, against every
// store, through a real gRPC server and go-control-plane's client.
func TestConformance(t *testing.T) {
	remote := func(addr string) *rlsv3.RateLimitRequest { return request("basic", kv("remote_address", addr)) }
	cases := []struct {
		name  string
		steps []step
	}{
		{"default key counts each value; refused once the limit is used", []step{
			{req: remote("a"), want: v(ok, st{ok, 3, 2})},
			{req: remote("a"), want: v(ok, st{ok, 3, 1})},
			{req: remote("a"), want: v(ok, st{ok, 3, 0})},
			{req: remote("a"), want: v(over, st{over, 3, 0})},
			{req: remote("b"), want: v(ok, st{ok, 3, 2})},
		}},
		{"exact value, then wildcard, then key alone", []step{
			{req: request("basic", kv("path", "/login")), want: v(ok, st{ok, 2, 1})},
			{req: request("basic", kv("path", "/api/users")), want: v(ok, st{ok, 4, 3})},
			{req: request("basic", kv("path", "/x/admin/y")), want: v(ok, st{ok, 1, 0})},
			{req: request("basic", kv("path", "/other")), want: v(ok, st{ok, 10, 9})},
		}},
		{"a rule applies only at the request's depth", []step{
			{req: request("basic", kv("remote_address", "a", "extra", "x")), want: v(ok, st{ok, 0, 0})},
			{req: request("basic", kv("tenant", "t")), want: v(ok, st{ok, 0, 0})},
			{req: request("basic", kv("tenant", "t", "user", "u")), want: v(ok, st{ok, 2, 1})},
		}},
		{"unknown domain and unmatched descriptor pass", []step{
			{req: request("nope", kv("remote_address", "a")), want: v(ok, st{ok, 0, 0})},
			{req: request("basic", kv("nokey", "a")), want: v(ok, st{ok, 0, 0})},
			{req: request("basic", kv("whitelisted", "a")), want: v(ok, st{ok, 0, 0})},
		}},
		{"unlimited never counts", repeat(5, step{req: request("basic", kv("free", "x")),
			want: v(ok, st{ok, 0, math.MaxUint32})})},
		{"shadow mode counts but never refuses", []step{
			{req: request("basic", kv("shadow", "x")), want: v(ok, st{ok, 1, 0})},
			{req: request("basic", kv("shadow", "x")), want: v(ok, st{ok, 1, 0})},
		}},
		{"requests_per_unit 0 refuses everything", []step{
			{req: request("basic", kv("ban", "x")), want: v(over, st{over, 0, 0})},
		}},
		{"one descriptor over refuses the request and consumes nothing", []step{
			{req: request("basic", kv("remote_address", "a"), kv("ban", "x")), want: v(over, st{ok, 3, 3}, st{over, 0, 0})},
			{req: withDescHits(remote("a"), 0, 0), want: v(ok, st{ok, 3, 3})},
		}},
		{"hits_addend: request level, descriptor level, 0 checks without consuming", []step{
			{req: withHits(remote("a"), 2), want: v(ok, st{ok, 3, 1})},
			{req: withDescHits(remote("a"), 0, 0), want: v(ok, st{ok, 3, 1})},
			{req: withDescHits(withHits(remote("a"), 5), 0, 0), want: v(ok, st{ok, 3, 1})},
			{req: withHits(remote("a"), 2), want: v(over, st{over, 3, 1})},
			{req: remote("a"), want: v(ok, st{ok, 3, 0})},
			{req: withDescHits(remote("a"), 0, 0), want: v(over, st{over, 3, 0})},
		}},
		{"replaces drops the named rule", []step{
			{req: request("replaces", kv("user", "u"), kv("vip", "v")), want: v(ok, st{ok, 0, 0}, st{ok, 5, 4})},
			{req: request("replaces", kv("user", "u"), kv("vip", "v")), want: v(ok, st{ok, 0, 0}, st{ok, 5, 3})},
			{req: request("replaces", kv("user", "u")), want: v(ok, st{ok, 1, 0})},
			{req: request("replaces", kv("user", "u")), want: v(over, st{over, 1, 0})},
		}},
		{"quota mode refuses only when every quota descriptor is over", []step{
			{req: request("quota", kv("plan", "p"), kv("bonus", "b")), want: v(ok, st{ok, 1, 0}, st{ok, 2, 1})},
			{req: request("quota", kv("plan", "p"), kv("bonus", "b")), want: v(ok, st{ok, 1, 0}, st{ok, 2, 0})},
			{req: request("quota", kv("plan", "p"), kv("bonus", "b")), want: v(over, st{over, 1, 0}, st{over, 2, 0})},
		}},
		{"share_threshold: wildcard matches share one counter", []step{
			{req: request("basic", kv("shared", "team-a")), want: v(ok, st{ok, 2, 1})},
			{req: request("basic", kv("shared", "team-b")), want: v(ok, st{ok, 2, 0})},
			{req: request("basic", kv("shared", "team-c")), want: v(over, st{over, 2, 0})},
			{req: request("basic", kv("separate", "team-a")), want: v(ok, st{ok, 2, 1})},
			{req: request("basic", kv("separate", "team-b")), want: v(ok, st{ok, 2, 1})},
		}},
		{"fixed window resets at the boundary", []step{
			{req: request("basic", kv("fixed", "x")), want: v(ok, st{ok, 2, 1})},
			{req: request("basic", kv("fixed", "x")), want: v(ok, st{ok, 2, 0})},
			{req: request("basic", kv("fixed", "x")), want: v(over, st{over, 2, 0})},
			{req: request("basic", kv("fixed", "x")), advance: 50 * time.Second, want: v(ok, st{ok, 2, 1})},
		}},
		{"sliding window: the previous window still counts", []step{
			{req: request("basic", kv("path", "/login")), want: v(ok, st{ok, 2, 1})},
			{req: request("basic", kv("path", "/login")), want: v(ok, st{ok, 2, 0})},
			// 60s later the previous minute still weighs 5/6 of 2 hits.
			{req: request("basic", kv("path", "/login")), advance: 60 * time.Second, want: v(over, st{over, 2, 0})},
			// 50s into the next minute only 1/6 of it weighs: one fits.
			{req: request("basic", kv("path", "/login")), advance: 40 * time.Second, want: v(ok, st{ok, 2, 0})},
		}},
		{"Envoy's per-descriptor limit override", []step{
			{req: overrideReq("basic", 1), want: v(ok, st{ok, 1, 0})},
			{req: overrideReq("basic", 1), want: v(over, st{over, 1, 0})},
			{req: overrideReq("nope", 1), want: v(ok, st{ok, 0, 0})},
		}},
		{"presets: client under preset=auth, 5 per 15 minutes", []step{
			{req: request("api", kv("preset", "auth", "client", "ip:10.0.0.1")), want: v(ok, st{ok, 5, 4})},
			{req: request("api", kv("preset", "auth", "client", "ip:10.0.0.1")), want: v(ok, st{ok, 5, 3})},
			{req: request("api", kv("preset", "auth", "client", "ip:10.0.0.1")), want: v(ok, st{ok, 5, 2})},
			{req: request("api", kv("preset", "auth", "client", "ip:10.0.0.1")), want: v(ok, st{ok, 5, 1})},
			{req: request("api", kv("preset", "auth", "client", "ip:10.0.0.1")), want: v(ok, st{ok, 5, 0})},
			{req: request("api", kv("preset", "auth", "client", "ip:10.0.0.1")), want: v(over, st{over, 5, 0})},
			{req: request("api", kv("preset", "auth", "client", "ip:10.0.0.1")), advance: 10 * time.Minute, want: v(over, st{over, 5, 0})},
			{req: request("api", kv("preset", "auth", "client", "user:42")), want: v(ok, st{ok, 5, 4})},
			{req: request("api", kv("preset", "relaxed", "client", "ip:10.0.0.1")), want: v(ok, st{ok, 300, 299})},
		}},
	}
	for _, kind := range storeKinds(t) {
		t.Run(kind.name, func(t *testing.T) {
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					h := startServer(t, testConfig(), kind.make(t), newFakeClock())
					for i, s := range tc.steps {
						h.clock.Advance(s.advance)
						resp, err := h.client.ShouldRateLimit(t.Context(), s.req)
						if err != nil {
							t.Fatalf("step %d: %v", i, err)
						}
						if diff := cmp.Diff(s.want, summarize(resp)); diff != "" {
							t.Fatalf("step %d (-want +got):\n%s", i, diff)
						}
					}
				})
			}
		})
	}
}

func overrideReq(domain string, limit uint32) *rlsv3.RateLimitRequest {
	req := request(domain, kv("unconfigured", "x"))
	req.Descriptors[0].Limit = &rlv3.RateLimitDescriptor_RateLimitOverride{RequestsPerUnit: limit, Unit: typev3.RateLimitUnit_HOUR}
	return req
}

var (
	_ = corev3.HeaderValue{}
	_ = cmp.Diff
	_ = protocmp.Transform
	_ = durationpb.New
)
