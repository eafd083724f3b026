package envoy

import (
	"bytes"
	"context"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The Envoy releases the shipped configurations support, and the
// go-control-plane API each is checked against: the oldest by the nested
// module in compat/ (pinned in its go.mod), the newest by this module.
const (
	oldestEnvoy = "1.37"
	newestEnvoy = "1.40"
)

// TestSupportedEnvoyVersions decodes and validates every shipped bootstrap
// against the oldest supported Envoy API (compat/, go-control-plane
// v1.37.0) as ParseBootstrap does against the newest (v1.40.0, this
// module's go.mod); a field, enum value or extension the older Envoy lacks
// fails here with the file, line and field.
func TestSupportedEnvoyVersions(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the compat module with the go command")
	}
	if v := moduleVersion(t, "../go.mod", "github.com/envoyproxy/go-control-plane/envoy"); v != "v"+newestEnvoy+".0" {
		t.Errorf("this module checks against go-control-plane %s, want v%s.0 (the newest supported Envoy)", v, newestEnvoy)
	}
	if v := moduleVersion(t, "compat/go.mod", "github.com/envoyproxy/go-control-plane/envoy"); v != "v"+oldestEnvoy+".0" {
		t.Errorf("compat/ checks against go-control-plane %s, want v%s.0 (the oldest supported Envoy)", v, oldestEnvoy)
	}
	files, _ := filepath.Glob("*.yaml")
	files = append(files, "../k8s/base/envoy.yaml")
	out, err := runCompat(t.Context(), files...)
	if err != nil {
		t.Fatalf("the shipped bootstraps do not load on Envoy %s: %v\n%s", oldestEnvoy, err, out)
	}
	for _, f := range files {
		abs, _ := filepath.Abs(f)
		if !bytes.Contains(out, []byte(abs+": loads on go-control-plane v"+oldestEnvoy+".0")) {
			t.Errorf("compat did not report %s:\n%s", f, out)
		}
	}
}

// runCompat runs the compat checker (the oldest supported Envoy API) on
// files, paths relative to this directory, and returns its output.
func runCompat(ctx context.Context, files ...string) ([]byte, error) {
	abs := make([]string, len(files))
	for i, f := range files {
		a, err := filepath.Abs(f)
		if err != nil {
			return nil, err
		}
		abs[i] = a
	}
	ctx, cancel := context.WithTimeout(ctx, 8*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(), append([]string{"run", "."}, abs...)...)
	cmd.Dir = "compat"
	return cmd.CombinedOutput()
}

// goTool is the go command of the toolchain running the tests.
func goTool() string {
	if p := filepath.Join(os.Getenv("GOROOT"), "bin", "go"); os.Getenv("GOROOT") != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "go"
}

func moduleVersion(t *testing.T, gomod, module string) string {
	t.Helper()
	data, err := os.ReadFile(gomod)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(data, []byte("\n")) {
		f := bytes.Fields(line)
		if len(f) >= 2 && string(f[0]) == module {
			return string(f[1])
		}
		if len(f) >= 3 && string(f[0]) == "require" && string(f[1]) == module {
			return string(f[2])
		}
	}
	t.Fatalf("%s does not require %s", gomod, module)
	return ""
}

// TestCompatCheckerIsACopy: compat/ checks with the same code as this
// package (check.go, below its package clause) and links the same typed
// extensions, so the two versions are held to the same rules.
func TestCompatCheckerIsACopy(t *testing.T) {
	body := func(f string) []byte {
		data := mustRead(t, f)
		i := bytes.Index(data, []byte("\npackage "))
		if bytes.HasPrefix(data, []byte("package ")) {
			i = 0
		}
		if i < 0 {
			t.Fatalf("%s: no package clause", f)
		}
		data = data[i:]
		return data[bytes.IndexByte(data[1:], '\n')+1:]
	}
	if !bytes.Equal(body("check.go"), body("compat/check.go")) {
		t.Error("compat/check.go differs from check.go below the package clause: copy it (keep compat's header and package main)")
	}
	blank := func(f string) []string {
		af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, imp := range af.Imports {
			if imp.Name != nil && imp.Name.Name == "_" && strings.Contains(imp.Path.Value, "go-control-plane") {
				p, _ := strconv.Unquote(imp.Path.Value)
				out = append(out, p)
			}
		}
		slices.Sort(out)
		return out
	}
	if a, b := blank("envoy.go"), blank("compat/extensions.go"); !slices.Equal(a, b) {
		t.Errorf("typed extensions linked differ:\nenvoy.go:              %q\ncompat/extensions.go:  %q", a, b)
	}
}

// TestREADMEStatesSupportedVersions: the README's "Supported Envoy
// versions" names the range these tests check.
func TestREADMEStatesSupportedVersions(t *testing.T) {
	readme := string(mustRead(t, "../README.md"))
	_, sec, ok := strings.Cut(readme, "\n## Supported Envoy versions\n")
	if !ok {
		t.Fatal(`README.md has no "## Supported Envoy versions" section`)
	}
	sec, _, _ = strings.Cut(sec, "\n## ")
	if want := "Envoy " + oldestEnvoy + " through " + newestEnvoy; !strings.Contains(sec, want) {
		t.Errorf("README's Supported Envoy versions does not say %q", want)
	}
}
