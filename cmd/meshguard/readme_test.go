package main

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// TestREADMEConfigReference decodes the configuration reference in README.md
// strictly and requires it to be exactly the defaults, so the README cannot
// drift from the code.
func TestREADMEConfigReference(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)<!-- config-reference -->\n```yaml\n(.*?)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README.md has no config-reference block")
	}
	cfg, err := parseConfig(m[1])
	if err != nil {
		t.Fatalf("README config reference does not decode: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("README config reference is invalid: %v", err)
	}
	// [] in YAML decodes to an empty, non-nil slice.
	if diff := cmp.Diff(DefaultConfig(), cfg, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("README config reference differs from DefaultConfig (-code +README):\n%s", diff)
	}
}

// TestREADMEQuickStart keeps the two set-up commands the README promises.
func TestREADMEQuickStart(t *testing.T) {
	readme, _ := os.ReadFile("../../README.md")
	mk, _ := os.ReadFile("../../Makefile")
	for _, target := range []string{"run", "test"} {
		if !strings.Contains(string(readme), "make "+target) {
			t.Errorf("README lacks `make %s`", target)
		}
		if !regexp.MustCompile(`(?m)^` + target + `:`).Match(mk) {
			t.Errorf("Makefile lacks target %s", target)
		}
	}
}
