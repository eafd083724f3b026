// Command compat checks Envoy bootstraps against the oldest Envoy API that
// meshguard supports: this module pins go-control-plane to that release
// (go.mod), and check.go is the same decoder and validator that package
// envoy runs against the newest. A field, enum value or extension that the
// older Envoy does not know, or a rule it enforces, is reported with the
// file, YAML line and field path, and the command exits 1.
//
//	go run . FILE...
//
// `go test ./envoy/` in the main module runs it on every shipped bootstrap.
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/debug"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(files []string, stdout, stderr io.Writer) int {
	if len(files) == 0 {
		fmt.Fprintln(stderr, "usage: compat FILE...")
		return 2
	}
	api := apiVersion()
	failed := false
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			fmt.Fprintln(stderr, err)
			failed = true
			continue
		}
		if err := check(data); err != nil {
			fmt.Fprintf(stderr, "%s: go-control-plane %s: %v\n", f, api, err)
			failed = true
			continue
		}
		fmt.Fprintf(stdout, "%s: loads on go-control-plane %s\n", f, api)
	}
	if failed {
		return 1
	}
	return 0
}

// check decodes and validates one bootstrap.
func check(data []byte) error {
	var b bootstrapv3.Bootstrap
	src, err := decodeYAML(data, &b)
	if err != nil {
		return fmt.Errorf("decoding bootstrap: %w", err)
	}
	if err := validate(&b, src); err != nil {
		return fmt.Errorf("validating bootstrap: %w", err)
	}
	return nil
}

// apiVersion is the go-control-plane release this binary was built with.
func apiVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/envoyproxy/go-control-plane/envoy" {
				return d.Version
			}
		}
	}
	return "(unknown)"
}
