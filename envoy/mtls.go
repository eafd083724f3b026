package envoy

import (
	_ "embed"
	"fmt"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
)

// upstreamTLS is mtls/upstream-tls.yaml: the transport socket of the
// meshguard clusters when meshguard serves mutual TLS itself.
//
//go:embed mtls/upstream-tls.yaml
var upstreamTLS []byte

// MeshguardClusters are the clusters of the shipped bootstraps that call
// meshguard's gRPC listeners.
var MeshguardClusters = []string{"meshguard", "meshguard_ratelimit"}

// MutualTLS decodes mtls/upstream-tls.yaml strictly and validates it.
func MutualTLS() (*corev3.TransportSocket, error) {
	var c clusterv3.Cluster // the file is a cluster's transport_socket, alone
	if _, err := decodeYAML(upstreamTLS, &c); err != nil {
		return nil, fmt.Errorf("decoding mtls/upstream-tls.yaml: %w", err)
	}
	if c.GetTransportSocket() == nil {
		return nil, fmt.Errorf("mtls/upstream-tls.yaml: no transport_socket")
	}
	if err := Validate(c.GetTransportSocket()); err != nil {
		return nil, fmt.Errorf("validating mtls/upstream-tls.yaml: %w", err)
	}
	return c.GetTransportSocket(), nil
}

// WithMutualTLS returns a copy of b whose MeshguardClusters carry
// MutualTLS's transport socket: the mutual-TLS variant of a shipped
// bootstrap.
func WithMutualTLS(b *bootstrapv3.Bootstrap) (*bootstrapv3.Bootstrap, error) {
	ts, err := MutualTLS()
	if err != nil {
		return nil, err
	}
	out := proto.Clone(b).(*bootstrapv3.Bootstrap)
	found := 0
	for _, c := range out.GetStaticResources().GetClusters() {
		for _, name := range MeshguardClusters {
			if c.GetName() == name {
				c.TransportSocket = proto.Clone(ts).(*corev3.TransportSocket)
				found++
			}
		}
	}
	if found != len(MeshguardClusters) {
		return nil, fmt.Errorf("the bootstrap has %d of the clusters %v", found, MeshguardClusters)
	}
	return out, nil
}
