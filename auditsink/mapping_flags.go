package auditsink

import (
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
)

// responseFlagNames are Envoy's %RESPONSE_FLAGS% short names, indexed by
// the bit flagBits uses. Envoy sends the flags as a message of bools, so
// the sink renders the short form itself.
var responseFlagNames = [...]string{
	"LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE",
	"DC", "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DR",
}

func responseFlagBit(name string) (uint64, bool) {
	for i, n := range responseFlagNames {
		if n == name {
			return 1 << uint(i), true
		}
	}
	return 0, false
}

// flagBits folds ResponseFlags into a bit set in responseFlagNames order.
func flagBits(f *accesslogv3.ResponseFlags) uint64 {
	if f == nil {
		return 0
	}
	var b uint64
	set := func(i int, on bool) {
		if on {
			b |= 1 << uint(i)
		}
	}
	set(0, f.GetFailedLocalHealthcheck())
	set(1, f.GetNoHealthyUpstream())
	set(2, f.GetUpstreamRequestTimeout())
	set(3, f.GetLocalReset())
	set(4, f.GetUpstreamRemoteReset())
	set(5, f.GetUpstreamConnectionFailure())
	set(6, f.GetUpstreamConnectionTermination())
	set(7, f.GetUpstreamOverflow())
	set(8, f.GetNoRouteFound())
	set(9, f.GetDelayInjected())
	set(10, f.GetFaultInjected())
	set(11, f.GetRateLimited())
	set(12, f.GetUnauthorizedDetails() != nil)
	set(13, f.GetRateLimitServiceError())
	set(14, f.GetDownstreamConnectionTermination())
	set(15, f.GetUpstreamRetryLimitExceeded())
	set(16, f.GetStreamIdleTimeout())
	set(17, f.GetInvalidEnvoyRequestHeaders())
	set(18, f.GetDownstreamProtocolError())
	set(19, f.GetUpstreamMaxStreamDurationReached())
	set(20, f.GetResponseFromCacheFilter())
	set(21, f.GetNoFilterConfigFound())
	set(22, f.GetDurationTimeout())
	set(23, f.GetUpstreamProtocolError())
	set(24, f.GetNoClusterFound())
	set(25, f.GetOverloadManager())
	set(26, f.GetDnsResolutionFailure())
	set(27, f.GetDownstreamRemoteReset())
	return b
}

// appendFlags appends the set flags as a JSON string, "UAEX,RL".
func appendFlags(b []byte, bits uint64) []byte {
	b = append(b, '"')
	first := true
	for i, n := range responseFlagNames {
		if bits&(1<<uint(i)) == 0 {
			continue
		}
		if !first {
			b = append(b, ',')
		}
		b = append(b, n...)
		first = false
	}
	return append(b, '"')
}
