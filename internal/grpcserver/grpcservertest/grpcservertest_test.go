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
	bdp, _ := Options(prometheus.NewRegistry(), "swin=0,cwin=0")
	if len(bdp) != len(base)-2 {
		t.Errorf("Options(bdp): %d options, want the two static windows fewer than %d", len(bdp), len(base))
	}
	for variant, extra := range map[string]int{"": 0, "workers=2x,gogc=100": 1, "win=131072": 0, "guard=0": 0} {
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
