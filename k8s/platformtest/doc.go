// Package platformtest tests meshguard's deployment material against the Go
// libraries of the platforms that consume it: the Helm chart (k8s/helm)
// rendered with Helm's own engine, the Istio manifests (k8s/istio,
// k8s/components/istio-strict) decoded against istio.io/api, and the Envoy
// Gateway manifests (k8s/envoy-gateway) against Envoy Gateway's and the
// Gateway API's types. It is a module of its own so that those libraries
// stay out of meshguard's go.mod. It holds tests only.
package platformtest
