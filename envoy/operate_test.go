package envoy

import (
	"strings"
	"testing"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	previoushostsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
)

// expectedDrainDelay is how long meshguard keeps serving after SIGTERM,
// answering NOT_SERVING to health checks (shutdown.drain_delay in
// k8s/base/meshguard.yaml, checked there by k8s's tests). Envoy must have
// taken a draining pod out of rotation within it.
const expectedDrainDelay = 10 * time.Second

// TestMeshguardClustersForRollouts: a meshguard pod that turns NOT_SERVING
// leaves rotation before it stops, a failing one is ejected, retries go to
// another host, and retries are bounded by a budget, not by a fixed cap
// for the whole cluster.
func TestMeshguardClustersForRollouts(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		for _, name := range []string{"meshguard", "meshguard_ratelimit"} {
			c := fp.clusters[name]
			if c == nil {
				t.Fatalf("no cluster %s", name)
			}
			hc := c.GetHealthChecks()[0]
			// Worst case from NOT_SERVING to out of rotation: a check just
			// missed, then unhealthy_threshold checks (each up to the timeout
			// late), plus jitter.
			worst := time.Duration(hc.GetUnhealthyThreshold().GetValue())*(hc.GetInterval().AsDuration()+hc.GetIntervalJitter().AsDuration()) +
				hc.GetInterval().AsDuration() + hc.GetTimeout().AsDuration()
			if worst >= expectedDrainDelay {
				t.Errorf("%s: a draining meshguard leaves rotation after up to %s, not within its drain delay %s", name, worst, expectedDrainDelay)
			}
			od := c.GetOutlierDetection()
			for what, v := range map[string]*uint32{
				"enforcing_consecutive_5xx":                  ptr(od.GetEnforcingConsecutive_5Xx().GetValue()),
				"enforcing_consecutive_gateway_failure":      ptr(od.GetEnforcingConsecutiveGatewayFailure().GetValue()),
				"enforcing_consecutive_local_origin_failure": ptr(od.GetEnforcingConsecutiveLocalOriginFailure().GetValue()),
			} {
				if *v == 0 {
					t.Errorf("%s: outlier_detection.%s is 0%%: detections never eject", name, what)
				}
			}
			if od.GetEnforcingConsecutiveGatewayFailure() == nil {
				t.Errorf("%s: enforcing_consecutive_gateway_failure unset (Envoy's default is 0%%)", name)
			}
			if !od.GetSplitExternalLocalOriginErrors() || od.GetConsecutiveLocalOriginFailure().GetValue() == 0 {
				t.Errorf("%s: connect failures should be counted as local-origin errors", name)
			}
			if p := od.GetMaxEjectionPercent().GetValue(); p == 0 || p > 50 {
				t.Errorf("%s: max_ejection_percent %d: ejections must leave at least half the hosts", name, p)
			}
			for _, th := range c.GetCircuitBreakers().GetThresholds() {
				if th.GetRetryBudget() == nil {
					t.Errorf("%s: circuit breaker %v has no retry_budget", name, th.GetPriority())
				}
				if th.GetMaxRetries() != nil {
					t.Errorf("%s: max_retries %d is a cap for the whole cluster; the retry budget replaces it", name, th.GetMaxRetries().GetValue())
				}
			}
		}
		// ext_authz's and the rate limit filter's retries go to another
		// meshguard: a retry on the draining or failing host would fail
		// the same way.
		for what, rp := range map[string]*corev3.RetryPolicy{
			"ext_authz":          fp.authz.GetGrpcService().GetRetryPolicy(),
			"rate limit service": fp.rl.GetRateLimitService().GetGrpcService().GetRetryPolicy(),
		} {
			if !usesPreviousHosts(t, rp) {
				t.Errorf("the %s's retry_policy must use envoy.retry_host_predicates.previous_hosts", what)
			}
		}
	})
}

func ptr[T any](v T) *T { return &v }

func usesPreviousHosts(t *testing.T, rp *corev3.RetryPolicy) bool {
	t.Helper()
	for _, p := range rp.GetRetryHostPredicate() {
		if p.GetName() == "envoy.retry_host_predicates.previous_hosts" {
			unpack[*previoushostsv3.PreviousHostsPredicate](t, p.GetTypedConfig())
			return rp.GetHostSelectionRetryMaxAttempts() > 0
		}
	}
	return false
}

// TestLocalReplies: every local reply Envoy sends (400 and 431 from the
// codec, 408, the escaped-slash redirect, ext_authz and rate limit answers)
// carries the security headers, and a 429 gets Retry-After.
func TestLocalReplies(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		mappers := fp.hcm.GetLocalReplyConfig().GetMappers()
		if len(mappers) == 0 {
			t.Fatal("no local_reply_config mappers: local replies skip the route's security headers")
		}
		// Mappers apply first match only: the one for each status must carry
		// the whole set.
		for _, status := range []uint32{400, 403, 307, 408, 429, 431, 503} {
			m := firstMapper(t, mappers, status)
			if m == nil {
				t.Errorf("no mapper matches a local %d", status)
				continue
			}
			got := map[string]*corev3.HeaderValueOption{}
			for _, h := range m.GetHeadersToAdd() {
				got[strings.ToLower(h.GetHeader().GetKey())] = h
			}
			for _, name := range []string{"strict-transport-security", "x-content-type-options", "x-frame-options", "referrer-policy", "content-security-policy", "cross-origin-opener-policy"} {
				h := got[name]
				switch {
				case h == nil:
					t.Errorf("local %d: no %s", status, name)
				case h.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
					t.Errorf("local %d: %s append_action %v", status, name, h.GetAppendAction())
				case name != "content-security-policy" && h.GetHeader().GetValue() != headerValue(fp.vhost.GetResponseHeadersToAdd(), name):
					t.Errorf("local %d: %s = %q, the virtual host sends %q", status, name, h.GetHeader().GetValue(), headerValue(fp.vhost.GetResponseHeadersToAdd(), name))
				case name == "content-security-policy" && !strings.HasPrefix(h.GetHeader().GetValue(), "default-src 'none'"):
					t.Errorf("local %d: CSP %q, want default-src 'none' (local replies carry no page)", status, h.GetHeader().GetValue())
				}
			}
			if status == 429 {
				ra := got["retry-after"]
				if ra == nil || ra.GetHeader().GetValue() != "%RESP(X-RATELIMIT-RESET)%" || ra.GetAppendAction() != corev3.HeaderValueOption_ADD_IF_ABSENT {
					t.Errorf("local 429: Retry-After = %v, want %%RESP(X-RATELIMIT-RESET)%% if absent", ra)
				}
			}
			if m.GetBodyFormatOverride() != nil || m.GetBody() != nil {
				t.Errorf("local %d: the mapper replaces the body (meshguard's JSON answers would be lost)", status)
			}
		}
	})
}

// firstMapper returns the mapper Envoy applies to a local reply with
// status: the first whose filter matches. Only status code filters are
// understood here.
func firstMapper(t *testing.T, ms []*hcmv3.ResponseMapper, status uint32) *hcmv3.ResponseMapper {
	t.Helper()
	for _, m := range ms {
		f := m.GetFilter().GetStatusCodeFilter()
		if f == nil {
			t.Fatalf("mapper filter %v: only status_code_filter is understood here", m.GetFilter())
		}
		v := f.GetComparison().GetValue().GetDefaultValue()
		match := false
		switch f.GetComparison().GetOp() {
		case accesslogv3.ComparisonFilter_EQ:
			match = status == v
		case accesslogv3.ComparisonFilter_GE:
			match = status >= v
		case accesslogv3.ComparisonFilter_LE:
			match = status <= v
		}
		if match {
			return m
		}
	}
	return nil
}

// TestTracing: Envoy traces with OpenTelemetry (W3C traceparent, which
// ext_authz and the rate limit filter pass to meshguard on their gRPC
// calls), samples a small share, and exports to a collector cluster over
// HTTP/2.
func TestTracing(t *testing.T) {
	forEach(t, func(t *testing.T, fp *frontProxy) {
		tr := fp.hcm.GetTracing()
		if tr == nil || tr.GetProvider().GetName() != "envoy.tracers.opentelemetry" {
			t.Fatalf("tracing provider = %v, want envoy.tracers.opentelemetry", tr.GetProvider())
		}
		otel := unpack[*tracev3.OpenTelemetryConfig](t, tr.GetProvider().GetTypedConfig())
		c := fp.clusters[otel.GetGrpcService().GetEnvoyGrpc().GetClusterName()]
		if c == nil || !explicitHTTP2(t, c) {
			t.Errorf("OpenTelemetry exporter cluster %q is missing or not HTTP/2 (OTLP/gRPC)", otel.GetGrpcService().GetEnvoyGrpc().GetClusterName())
		}
		if otel.GetServiceName() == "" {
			t.Error("OpenTelemetry service_name unset")
		}
		// Unset random_sampling means 100%.
		if s := tr.GetRandomSampling(); s == nil || s.GetValue() > 10 {
			t.Errorf("random_sampling = %v, want at most 10%%", s)
		}
		if d := otel.GetGrpcService().GetTimeout().AsDuration(); d <= 0 || d > time.Second {
			t.Errorf("span export timeout %s", d)
		}
	})
}
