package ratelimitsvc

import (
	rlv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// RequestCaps caps the repeated fields of a RateLimitRequest, keyed by
// field name, for grpcserver's Guard to enforce while it scans an encoded
// request, before protobuf-go decodes it: a request with more descriptors,
// or a descriptor with more entries, is refused with InvalidArgument
// without one descriptor being allocated. validateRequest holds the same
// limits for decoded requests.
func RequestCaps() map[protoreflect.FullName]int {
	req := (&rlsv3.RateLimitRequest{}).ProtoReflect().Descriptor().Fields()
	desc := (&rlv3.RateLimitDescriptor{}).ProtoReflect().Descriptor().Fields()
	return map[protoreflect.FullName]int{
		req.ByName("descriptors").FullName(): maxDescriptors,
		desc.ByName("entries").FullName():    maxEntries,
	}
}
