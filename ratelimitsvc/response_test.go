package ratelimitsvc

import (
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshguard/meshguard/internal/metrictest"
)

// TestOverLimitResponse checks a whole OVER_LIMIT answer: status with the
// preset's limit as unit and multiplier, time until one request fits again,
// the JSON body and the headers, with and without response_headers.
func TestOverLimitResponse(t *testing.T) {
	authLimit := &rlsv3.RateLimitResponse_RateLimit{Name: "auth", RequestsPerUnit: 5,
		Unit: rlsv3.RateLimitResponse_RateLimit_MINUTE, UnitMultiplier: wrapperspb.UInt32(15)}
	// 5 hits at 10s into a 15-minute bucket: one fits again when the
	// estimate falls to 4, i.e. 890s to the bucket end plus 900s*(1-4/5).
	const retry = 890 + 180
	body := `{"error":"Too many requests","message":"You have exceeded the rate limit. Please try again later.","retryAfter":1070}`
	for _, headers := range []bool{true, false} {
		t.Run(map[bool]string{true: "headers", false: "no headers"}[headers], func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.ResponseHeaders = headers
			h := startServer(t, cfg, NewMemoryStore(), newFakeClock())
			req := request("api", kv("preset", "auth", "client", "ip:192.0.2.1"))
			for range 5 {
				if _, err := h.client.ShouldRateLimit(t.Context(), req); err != nil {
					t.Fatal(err)
				}
			}
			got, err := h.client.ShouldRateLimit(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			want := &rlsv3.RateLimitResponse{
				OverallCode: rlsv3.RateLimitResponse_OVER_LIMIT,
				Statuses: []*rlsv3.RateLimitResponse_DescriptorStatus{{
					Code: rlsv3.RateLimitResponse_OVER_LIMIT, CurrentLimit: authLimit,
					DurationUntilReset: durationpb.New(retry * time.Second),
				}},
				RawBody:              []byte(body),
				ResponseHeadersToAdd: []*corev3.HeaderValue{{Key: "content-type", Value: "application/json"}},
			}
			if headers {
				want.ResponseHeadersToAdd = append(want.ResponseHeadersToAdd,
					&corev3.HeaderValue{Key: "retry-after", Value: "1070"},
					&corev3.HeaderValue{Key: "x-ratelimit-limit", Value: "5"},
					&corev3.HeaderValue{Key: "x-ratelimit-remaining", Value: "0"},
					&corev3.HeaderValue{Key: "x-ratelimit-reset", Value: "1070"},
				)
			}
			if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
				t.Errorf("over-limit response (-want +got):\n%s", diff)
			}
			// The same answer again comes from the over-limit cache.
			again, err := h.client.ShouldRateLimit(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, again, protocmp.Transform()); diff != "" {
				t.Errorf("cached over-limit response (-want +got):\n%s", diff)
			}
			if n := testutil.ToFloat64(h.srv.m.localCache.WithLabelValues("api")); n != 1 {
				t.Errorf("local cache answers = %v, want 1", n)
			}
			if n := testutil.ToFloat64(h.srv.m.decisions.WithLabelValues("api", "over_limit")); n != 2 {
				t.Errorf("over_limit decisions = %v, want 2", n)
			}
		})
	}
}

// TestOverLimitCacheExpires: once the cached time passes, the store is asked
// again and the request fits.
func TestOverLimitCacheExpires(t *testing.T) {
	h := startServer(t, testConfig(), NewMemoryStore(), newFakeClock())
	req := request("basic", kv("fixed", "x"))
	for range 2 {
		h.client.ShouldRateLimit(t.Context(), req)
	}
	for i := range 3 {
		resp, _ := h.client.ShouldRateLimit(t.Context(), req)
		if resp.OverallCode != rlsv3.RateLimitResponse_OVER_LIMIT {
			t.Fatalf("request %d: %v, want OVER_LIMIT", i, resp.OverallCode)
		}
	}
	if n := testutil.ToFloat64(h.srv.m.localCache.WithLabelValues("basic")); n != 2 {
		t.Errorf("local cache answers = %v, want 2", n)
	}
	h.clock.Advance(50 * time.Second) // next fixed minute
	resp, _ := h.client.ShouldRateLimit(t.Context(), req)
	if resp.OverallCode != rlsv3.RateLimitResponse_OK {
		t.Fatalf("after reset: %v, want OK", resp.OverallCode)
	}
}

// TestInvalidRequests: malformed or oversized requests get InvalidArgument
// naming the field; nothing panics.
func TestInvalidRequests(t *testing.T) {
	h := startServer(t, testConfig(), NewMemoryStore(), newFakeClock())
	big := strings.Repeat("x", maxValueBytes+1)
	many := func(n int) *rlsv3.RateLimitRequest {
		req := &rlsv3.RateLimitRequest{Domain: "basic"}
		for range n {
			req.Descriptors = append(req.Descriptors, &rlv3.RateLimitDescriptor{Entries: []*rlv3.RateLimitDescriptor_Entry{{Key: "k", Value: "v"}}})
		}
		return req
	}
	deep := &rlsv3.RateLimitRequest{Domain: "basic", Descriptors: []*rlv3.RateLimitDescriptor{{}}}
	for range maxEntries + 1 {
		deep.Descriptors[0].Entries = append(deep.Descriptors[0].Entries, &rlv3.RateLimitDescriptor_Entry{Key: "k"})
	}
	badUnit := request("basic", kv("k", "v"))
	badUnit.Descriptors[0].Limit = &rlv3.RateLimitDescriptor_RateLimitOverride{RequestsPerUnit: 1}
	hugeHits := request("basic", kv("k", "v"))
	hugeHits.Descriptors[0].HitsAddend = wrapperspb.UInt64(1 << 40)
	cases := []struct {
		name    string
		req     *rlsv3.RateLimitRequest
		want    string
		encoded bool // refused from the encoded request (RequestCaps), before decoding
	}{
		{"empty domain", request("", kv("k", "v")), "domain: must not be empty", false},
		{"long domain", request(strings.Repeat("d", 256), kv("k", "v")), "domain: 256 bytes, limit 255", false},
		{"no descriptors", &rlsv3.RateLimitRequest{Domain: "basic"}, "descriptors: at least one is required", false},
		{"too many descriptors", many(maxDescriptors + 1), "descriptors: more than 32", true},
		{"descriptor without entries", &rlsv3.RateLimitRequest{Domain: "basic", Descriptors: []*rlv3.RateLimitDescriptor{{}}}, "descriptors[0].entries: at least one is required", false},
		{"too many entries", deep, "descriptors[0].entries: more than 16", true},
		{"empty key", request("basic", kv("remote_address", "a"), kv("", "v")), "descriptors[1].entries[0].key: must not be empty", false},
		{"long key", request("basic", kv(strings.Repeat("k", 257), "v")), "descriptors[0].entries[0].key: 257 bytes, limit 256", false},
		{"long value", request("basic", kv("k", big)), "descriptors[0].entries[0].value: 1025 bytes, limit 1024", false},
		{"override without unit", badUnit, "descriptors[0].limit.unit: must be SECOND to YEAR, got UNKNOWN", false},
		{"absurd hits", hugeHits, "descriptors[0].hits_addend: 1099511627776, limit 4294967295", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := h.client.ShouldRateLimit(t.Context(), tc.req)
			st, _ := grpcstatus.FromError(err)
			if st.Code() != codes.InvalidArgument || st.Message() != tc.want {
				t.Errorf("got %v %q, want InvalidArgument %q", st.Code(), st.Message(), tc.want)
			}
		})
	}
	handled := 0
	for _, tc := range cases {
		if !tc.encoded {
			handled++
		}
	}
	if n := testutil.ToFloat64(h.srv.m.invalid); n != float64(handled) {
		t.Errorf("invalid requests metric = %v, want %d", n, handled)
	}
	// The caps' refusals are counted where they happen, in the Guard.
	tooMany := metrictest.Sum(t, h.reg, "meshguard_grpc_server_rejected_requests_total", map[string]string{"reason": "too_many"})
	if tooMany != float64(len(cases)-handled) {
		t.Errorf("requests refused for too many elements = %v, want %d", tooMany, len(cases)-handled)
	}
}

// TestRuleMetrics: rule labels are config paths; values appear only with
// detailed_metric; shadow-mode refusals are counted apart.
func TestRuleMetrics(t *testing.T) {
	one := uint32(1)
	cfg := DefaultConfig()
	cfg.Domains = []DomainConfig{{Domain: "m", Descriptors: []DescriptorConfig{
		{Key: "plain", RateLimit: &RateLimitConfig{Unit: "minute", RequestsPerUnit: &one}},
		{Key: "detailed", DetailedMetric: true, RateLimit: &RateLimitConfig{Unit: "minute", RequestsPerUnit: &one}},
		{Key: "shadow", ShadowMode: true, RateLimit: &RateLimitConfig{Unit: "minute", RequestsPerUnit: &one}},
	}}}
	h := startServer(t, cfg, NewMemoryStore(), newFakeClock())
	for _, req := range []*rlsv3.RateLimitRequest{
		request("m", kv("plain", "secret-ip")), request("m", kv("plain", "secret-ip")),
		request("m", kv("detailed", "v1")), request("m", kv("detailed", "v1")), request("m", kv("detailed", "v1")),
		request("m", kv("shadow", "s")), request("m", kv("shadow", "s")),
	} {
		if _, err := h.client.ShouldRateLimit(t.Context(), req); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		rule, code string
		want       float64
	}{
		{"plain", "ok", 1}, {"plain", "over_limit", 1},
		{"detailed=v1", "ok", 1}, {"detailed=v1", "over_limit", 2},
		{"shadow", "ok", 1}, {"shadow", "shadow_over_limit", 1},
	} {
		if got := testutil.ToFloat64(h.srv.m.rules.WithLabelValues("m", c.rule, c.code)); got != c.want {
			t.Errorf("rule %s code %s = %v, want %v", c.rule, c.code, got, c.want)
		}
	}
	mfs, _ := h.reg.Gather()
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if strings.Contains(l.GetValue(), "secret-ip") {
					t.Errorf("%s carries a request value: %v", mf.GetName(), m)
				}
			}
		}
	}
}
