package ratelimitsvc

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/meshguard/meshguard/internal/servertest"
)

// TestConfigDirReload: an edited file is applied after it settles; a bad
// file keeps the old config in force and is reported in metrics and
// ConfigError; fixing it recovers.
func TestConfigDirReload(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "web.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(file, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("domain: web\ndescriptors:\n  - key: client\n    rate_limit: {unit: minute, requests_per_unit: 100}\n")
	cfg := DefaultConfig()
	cfg.ConfigDir = dir
	cfg.ReloadInterval = 100 * time.Millisecond
	h := startServer(t, cfg, NewMemoryStore(), newFakeClock())
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- h.srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	limitOf := func() uint32 {
		resp, err := h.client.ShouldRateLimit(t.Context(), request("web", kv("client", "c")))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Statuses[0].CurrentLimit.GetRequestsPerUnit()
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		servertest.WaitUntil(t, 5*time.Second, what, cond)
	}
	if got := limitOf(); got != 100 {
		t.Fatalf("initial limit %d", got)
	}

	write("domain: web\ndescriptors:\n  - key: client\n    rate_limit: {unit: minute, requests_per_unit: 7}\n")
	waitFor("the edit to apply", func() bool { return limitOf() == 7 })

	write("domain: web\ndescriptors:\n  - key: client\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n")
	waitFor("the bad file to be reported", func() bool { return h.srv.ConfigError() != nil })
	if err := h.srv.ConfigError(); !strings.Contains(err.Error(), file+`: descriptors[0] (client).rate_limit.unit: must be second, minute, hour, day, week, month or year, got "fortnight"`) {
		t.Errorf("ConfigError = %v", err)
	}
	if got := limitOf(); got != 7 {
		t.Errorf("limit after a bad file = %d, want the old 7", got)
	}
	// The same bad file is counted once, however often Run looks at it.
	looked := h.srv.looks.Load()
	waitFor("three more looks at config_dir", func() bool { return h.srv.looks.Load() >= looked+3 })
	if n := testutil.ToFloat64(h.srv.m.reloads.WithLabelValues("error")); n != 1 {
		t.Errorf("reload errors = %v, want 1", n)
	}
	if n := testutil.ToFloat64(h.srv.m.configOK); n != 0 {
		t.Errorf("last reload successful = %v, want 0", n)
	}

	write("domain: web\ndescriptors:\n  - key: client\n    rate_limit: {unit: minute, requests_per_unit: 9}\n")
	waitFor("the fixed file to apply", func() bool { return limitOf() == 9 })
	if err := h.srv.ConfigError(); err != nil {
		t.Errorf("ConfigError after the fix: %v", err)
	}
	if n := testutil.ToFloat64(h.srv.m.configOK); n != 1 {
		t.Errorf("last reload successful = %v, want 1", n)
	}
	if n := testutil.ToFloat64(h.srv.m.reloads.WithLabelValues("success")); n != 2 {
		t.Errorf("reload successes = %v, want 2", n)
	}

	// Removing the file removes the domain: its requests pass unlimited.
	os.Remove(file)
	waitFor("the removal to apply", func() bool {
		resp, _ := h.client.ShouldRateLimit(t.Context(), request("web", kv("client", "c")))
		return resp.OverallCode == rlsv3.RateLimitResponse_OK && resp.Statuses[0].CurrentLimit == nil
	})
	if n := h.srv.m.rules.DeletePartialMatch(prometheus.Labels{"domain": "web"}); n != 0 {
		t.Errorf("series of the removed domain remain: %v", n)
	}
}

// TestNewRejectsBadConfigDir: a bad file at start is an error, not a silent
// empty config.
func TestNewRejectsBadConfigDir(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "x.yaml"), []byte("domain: x\ndescriptors: [{key: ''}]\n"), 0o644)
	cfg := DefaultConfig()
	cfg.ConfigDir = dir
	if _, err := New(discardLogger(), prometheus.NewRegistry(), cfg, NewMemoryStore()); err == nil || !strings.Contains(err.Error(), "descriptors[0] ().key: must not be empty") {
		t.Fatalf("New = %v", err)
	}
}

// TestConfigMapLayout: a Kubernetes ConfigMap mount (files are symlinks into
// a hidden ..data directory that is swapped atomically) loads, and a swap is
// picked up even though no visible file's own modification time changes.
func TestConfigMapLayout(t *testing.T) {
	dir := t.TempDir()
	mkdata := func(name string, limit int) {
		d := filepath.Join(dir, name)
		os.Mkdir(d, 0o755)
		body := "domain: cm\ndescriptors:\n  - key: client\n    rate_limit: {unit: minute, requests_per_unit: " + strconv.Itoa(limit) + "}\n"
		if err := os.WriteFile(filepath.Join(d, "cm.yaml"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mkdata("..2026_01_01_a", 11)
	os.Symlink("..2026_01_01_a", filepath.Join(dir, "..data"))
	os.Symlink(filepath.Join("..data", "cm.yaml"), filepath.Join(dir, "cm.yaml"))
	os.WriteFile(filepath.Join(dir, ".hidden.yaml"), []byte("not: [valid"), 0o644)
	os.WriteFile(filepath.Join(dir, "README.txt"), []byte("ignored"), 0o644)

	cfg := DefaultConfig()
	cfg.ConfigDir = dir
	cfg.ReloadInterval = 100 * time.Millisecond
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	h := startServer(t, cfg, NewMemoryStore(), newFakeClock())
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go h.srv.Run(ctx)
	limitOf := func() uint32 {
		resp, err := h.client.ShouldRateLimit(t.Context(), request("cm", kv("client", "c")))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Statuses[0].CurrentLimit.GetRequestsPerUnit()
	}
	if got := limitOf(); got != 11 {
		t.Fatalf("limit %d, want 11", got)
	}
	// The kubelet's swap: new data dir, then rename a new ..data link over the old.
	mkdata("..2026_01_01_b", 22)
	os.Symlink("..2026_01_01_b", filepath.Join(dir, "..data_tmp"))
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	servertest.WaitUntil(t, 5*time.Second, "the ConfigMap swap to be picked up", func() bool { return limitOf() == 22 })
}
