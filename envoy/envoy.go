// Package envoy holds the Envoy configuration that puts meshguard in front of
// a web application (envoy.yaml, explained in README.md) and the code that
// checks such a configuration the way Envoy would read it.
//
// ParseBootstrap decodes a YAML bootstrap into go-control-plane's
// bootstrapv3.Bootstrap with protojson, which fails on an unknown field and
// on any typed extension ("@type") whose Go type is not linked in; this file
// links in every extension meshguard's configurations use, so an unknown or
// misspelled extension is an error, not a silently opaque Any. It then runs
// the protoc-gen-validate rules (ValidateAll) of the bootstrap and of the
// message inside every Any, at any depth (the generated validators stop at an
// Any), the same constraints Envoy enforces at load.
//
// The package serves no traffic and exports no metrics.
package envoy

import (
	_ "embed"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/anypb"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"

	// Typed extensions that meshguard's Envoy configurations use or
	// document (the PROXY protocol and original-IP-detection variants).
	// protojson resolves an Any's "@type" through the global registry, which
	// these imports fill. compat/extensions.go links the same list
	// (TestCompatCheckerIsACopy).
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/dns/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/jwt_authn/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ratelimit/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/proxy_protocol/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/original_ip_detection/custom_header/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/original_ip_detection/xff/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/fixed_heap/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

// FrontProxy is envoy.yaml: the front-proxy bootstrap.
//
//go:embed envoy.yaml
var FrontProxy []byte

// Sidecar is sidecar.yaml: the same policy with Envoy, meshguard and the app
// in one pod, every peer on loopback.
//
//go:embed sidecar.yaml
var Sidecar []byte

// ParseBootstrap decodes a YAML (or JSON) Envoy bootstrap strictly and
// validates every message in it; every error names the YAML line and the
// field path. It does no I/O and is safe for concurrent use.
func ParseBootstrap(data []byte) (*bootstrapv3.Bootstrap, error) {
	var b bootstrapv3.Bootstrap
	src, err := decodeYAML(data, &b)
	if err != nil {
		return nil, fmt.Errorf("decoding bootstrap: %w", err)
	}
	if err := validate(&b, src); err != nil {
		return nil, fmt.Errorf("validating bootstrap: %w", err)
	}
	return &b, nil
}

// Validate runs ValidateAll on m and on the message packed in every Any
// reachable from m, and returns every violation, each prefixed with its
// field path.
func Validate(m proto.Message) error { return validate(m, nil) }

// Deprecated lists every field set in m, and every enum value used, that the
// Envoy API marks deprecated, at any depth (inside Anys too), as field paths.
// Envoy accepts them with a warning until a release removes them.
func Deprecated(m proto.Message) []string {
	var out []string
	deprecatedIn(m.ProtoReflect(), "", &out)
	return out
}

func deprecatedIn(m protoreflect.Message, path string, out *[]string) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return // Validate reports it
		}
		deprecatedIn(inner.ProtoReflect(), path+"("+string(inner.ProtoReflect().Descriptor().FullName())+")", out)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := joinPath(path, string(fd.Name()))
		if o, ok := fd.Options().(*descriptorpb.FieldOptions); ok && o.GetDeprecated() {
			*out = append(*out, name)
		}
		enumValue := func(at string, ev protoreflect.EnumNumber) {
			if d := fd.Enum().Values().ByNumber(ev); d != nil {
				if o, ok := d.Options().(*descriptorpb.EnumValueOptions); ok && o.GetDeprecated() {
					*out = append(*out, at+"="+string(d.Name()))
				}
			}
		}
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				at := fmt.Sprintf("%s[%d]", name, i)
				switch fd.Kind() {
				case protoreflect.MessageKind, protoreflect.GroupKind:
					deprecatedIn(l.Get(i).Message(), at, out)
				case protoreflect.EnumKind:
					enumValue(at, l.Get(i).Enum())
				}
			}
		case fd.IsMap():
			if fd.MapValue().Message() != nil {
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					deprecatedIn(mv.Message(), fmt.Sprintf("%s[%q]", name, k.String()), out)
					return true
				})
			}
		case fd.Kind() == protoreflect.MessageKind || fd.Kind() == protoreflect.GroupKind:
			deprecatedIn(v.Message(), name, out)
		case fd.Kind() == protoreflect.EnumKind:
			enumValue(name, v.Enum())
		}
		return true
	})
}
