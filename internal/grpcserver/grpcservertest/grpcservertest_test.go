package grpcservertest

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestOptionsVariants(t *testing.T) {
	base, err := Options(prometheus.NewRegistry(), "prod")
	if err != nil {
		t.Fatal(err)
	}
	for variant, extra := range map[string]int{"": 0, "workers=2x,gogc=100": 1, "win=65536": 2} {
		opts, err := Options(prometheus.NewRegistry(), variant)
		if err != nil {
			t.Errorf("Options(%q): %v", variant, err)
			continue
		}
		if len(opts) != len(base)+extra {
			t.Errorf("Options(%q): %d options, want %d", variant, len(opts), len(base)+extra)
		}
	}
	for _, variant := range []string{"codec=json", "codec", "workers=x", "nope=1"} {
		if _, err := Options(prometheus.NewRegistry(), variant); err == nil || !strings.Contains(err.Error(), variant) {
			t.Errorf("Options(%q) = %v, want an error naming it", variant, err)
		}
	}
}
