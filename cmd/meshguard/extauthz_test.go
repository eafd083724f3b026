package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCheckConfigWarnings: a valid file that leans on Envoy (trusted identity
// headers, no client address header) passes check-config with a warning per
// setting that names the key and what Envoy must do; MESHGUARD_ACCOUNT_KEY
// silences the account key warning, and a short one is an error that does
// not quote it.
func TestCheckConfigWarnings(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(path, []byte(`
identity:
  trusted_user_header: x-auth-user
  trusted_role_header: x-auth-role
  client_ip_header: ""
`), 0o600)
	check := func(t *testing.T, env map[string]string) (stdout, stderr string, err error) {
		t.Helper()
		var o, e bytes.Buffer
		err = run(t.Context(), []string{"meshguard", "check-config", path}, func(k string) string { return env[k] }, &o, &e)
		return o.String(), e.String(), err
	}
	stdout, stderr, err := check(t, nil)
	if err != nil || !strings.HasSuffix(strings.TrimSpace(stdout), ": ok") {
		t.Fatalf("check-config: %v, stdout %q, stderr:\n%s", err, stdout, stderr)
	}
	for _, want := range []string{
		`warning: identity.trusted_user_header is "x-auth-user": meshguard believes it on every request without a verified JWT, so Envoy must remove client copies`,
		`warning: identity.trusted_role_header is "x-auth-role"`,
		"warning: identity.client_ip_header is empty: anonymous clients are keyed by the connection peer",
		"warning: no account key (MESHGUARD_ACCOUNT_KEY or identity.account_key_file)",
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
	if n := strings.Count(stderr, "warning: "); n != 4 {
		t.Errorf("%d warnings, want 4:\n%s", n, stderr)
	}

	_, stderr, err = check(t, map[string]string{"MESHGUARD_ACCOUNT_KEY": "0123456789abcdef0123456789abcdef"})
	if err != nil || strings.Contains(stderr, "account key") {
		t.Errorf("with MESHGUARD_ACCOUNT_KEY: %v\n%s", err, stderr)
	}
	_, stderr, err = check(t, map[string]string{"MESHGUARD_ACCOUNT_KEY": "tooshort"})
	if err == nil || !strings.Contains(stderr, "MESHGUARD_ACCOUNT_KEY: must be at least 16 bytes") || strings.Contains(stderr, "tooshort") {
		t.Errorf("short MESHGUARD_ACCOUNT_KEY: %v\n%s", err, stderr)
	}
}

// TestServeLogsWarnings: serve logs the same warnings at start, at warn
// level, from the extauthz component.
func TestServeLogsWarnings(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := newLogWatcher()
	errc := make(chan error, 1)
	cfg := testConfig(t, "environment: production\nidentity: {trusted_user_header: x-auth-user}\n")
	go func() { errc <- run(ctx, []string{"meshguard", "serve", "--config", cfg}, noEnv, io.Discard, logs) }()
	select {
	case <-logs.ready:
	case err := <-errc:
		t.Fatalf("run returned before serving: %v\nlogs:\n%s", err, logs)
	case <-time.After(30 * time.Second):
		t.Fatalf("not serving after 30s; logs:\n%s", logs)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	found := false
	for _, line := range strings.Split(logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil {
			continue
		}
		if msg, _ := m["msg"].(string); strings.HasPrefix(msg, `identity.trusted_user_header is "x-auth-user"`) {
			found = m["level"] == "WARN" && m["component"] == "extauthz"
		}
	}
	if !found {
		t.Errorf("no extauthz warning about identity.trusted_user_header; logs:\n%s", logs)
	}
}
