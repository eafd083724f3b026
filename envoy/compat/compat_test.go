package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestShippedBootstraps: every bootstrap in ../ loads on this API version.
func TestShippedBootstraps(t *testing.T) {
	files, err := filepath.Glob("../*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no bootstraps in ../: %v", err)
	}
	var stdout, stderr bytes.Buffer
	if code := run(files, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d:\n%s", code, stderr.String())
	}
}

// TestRejectsWithFileLineAndField: what an Envoy of this version would refuse
// fails with the file, the YAML line and the field path.
func TestRejectsWithFileLineAndField(t *testing.T) {
	tests := []struct{ name, yaml, want string }{
		{
			// Added to the rate limit filter after this release.
			name: "a field this API does not have",
			yaml: `static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 0.0.0.0, port_value: 8000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: x
          route_config: {}
          http_filters:
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: api
              enable_retry_after_header: true
`,
			want: `line 17: static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.enable_retry_after_header: proto: (line 17:1): unknown field "enable_retry_after_header"`,
		},
		{
			name: "a rule this API enforces",
			yaml: `static_resources:
  clusters:
  - name: c
    type: STATIC
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 70000}}}
`,
			want: "line 9: static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: invalid SocketAddress.PortValue",
		},
		{
			name: "an extension this module does not link",
			yaml: `static_resources:
  clusters:
  - name: c
    cluster_type:
      name: x
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.clusters.nonexistent.v3.Cluster
`,
			want: `line 7: static_resources.clusters[0].cluster_type.typed_config.@type`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), "bootstrap.yaml")
			if err := os.WriteFile(f, []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			var stdout, stderr bytes.Buffer
			if code := run([]string{f}, &stdout, &stderr); code != 1 {
				t.Fatalf("exit %d, want 1", code)
			}
			// protobuf-go writes its "proto:" prefix with a space or a
			// no-break space, chosen per binary so that nobody matches
			// its error text exactly; read both as a space.
			got := strings.ReplaceAll(stderr.String(), "\u00a0", " ")
			if !strings.HasPrefix(got, f+": go-control-plane v1.37.0: ") || !strings.Contains(got, tc.want) {
				t.Errorf("stderr = %q, want %s: go-control-plane v1.37.0: ... %s", got, f, tc.want)
			}
		})
	}
}
