package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestBadConfigs: every rejected config is a testdata/bad_*.yaml file with the
// error text it must produce. Each file must appear here.
func TestBadConfigs(t *testing.T) {
	tests := map[string][]string{
		"bad_unknown_key.yaml": {`line 4: unknown key "tiemout"`},
		"bad_environment.yaml": {`environment: must be production or development, got "staging"`},
		"bad_listen.yaml":      {`listen.grpc: not a host:port address: "8081"`},
		"bad_duration.yaml":    {"line 2:", "`soon`", "time.Duration"},
		"bad_log_level.yaml":   {`log.level: must be debug, info, warn or error, got "loud"`},
		"bad_grpc_limits.yaml": {"grpc.max_recv_msg_size: must be between 1 KiB and 64 MiB, got 1073741824"},
		"bad_grpc_windows.yaml": {
			"grpc.initial_window_size: must be 0 (grpc-go's dynamic windows) or at least 65536, got 1000",
			"grpc.initial_conn_window_size: must be 0 (grpc-go's dynamic windows) or at least 65536, got -1"},
		"bad_grpc_listener_limits.yaml": {
			"grpc.max_decoded_bytes: must be between 1 MiB and 16 GiB, got 1000",
			"grpc.ratelimit_listener.max_concurrent_streams: must be at least 1, got 0",
			"grpc.max_request_bytes.check: must be between 1 KiB and 64 MiB, got 100"},
		"bad_tls.yaml": {
			"tls.grpc: cert_file and key_file go together",
			`tls.http.client_auth: must be require or verify_if_given, got "optional"`},
		"bad_csp_reports.yaml": {
			"audit.csp_reports.per_client_rate: 500 is above max_rows_per_second (100): one client could fill the trail's share alone",
			"audit.csp_reports.per_client_burst: must be at least 100 (the reports one request may carry) and at most 1000000, got 10",
			"audit.csp_reports.max_clients: must be between 16 and 1048576, got 0"},
		"bad_pool.yaml":          {"database.pool.min_conns", "20", "max_conns 5"},
		"bad_failure_mode.yaml":  {`ratelimit.failure_mode: must be allow or deny, got "maybe"`},
		"bad_cors_mode.yaml":     {`cors.mode: must be enforce or report, got "block"`},
		"bad_admin_role.yaml":    {"audit.admin_role: removed: any caller reaching the listener could forge the role header"},
		"bad_two_documents.yaml": {"a config file holds one YAML document"},
		"bad_yaml_syntax.yaml":   {"config is not valid YAML", "line 1"},
		"bad_many_errors.yaml":   {`line 1: unknown key "bogus"`, `line 5: unknown key "nope"`, `environment: must be production or development, got "staging"`, `cors.mode: must be enforce or report, got "block"`},
	}
	files, _ := filepath.Glob("testdata/bad_*.yaml")
	for _, f := range files {
		if _, ok := tests[filepath.Base(f)]; !ok {
			t.Errorf("%s has no table row", f)
		}
	}
	for name, wants := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := loadConfig(filepath.Join("testdata", name), noEnv)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range wants {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("error leaks the password: %v", err)
			}
		})
	}
}

func TestCheckConfigListsEveryError(t *testing.T) {
	var stdout, stderr bytes.Buffer
	err := run(t.Context(), []string{"meshguard", "check-config", "testdata/bad_many_errors.yaml"}, noEnv, &stdout, &stderr)
	if err == nil {
		t.Fatal("check-config accepted a bad file")
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("want 4 error lines, got %d:\n%s", len(lines), stderr.String())
	}
	if !strings.Contains(lines[0], `unknown key "bogus"`) {
		t.Errorf("first line %q", lines[0])
	}
}

func TestCheckConfigAcceptsShippedConfigs(t *testing.T) {
	files, _ := filepath.Glob("testdata/good_*.yaml")
	if len(files) == 0 {
		t.Fatal("no testdata/good_*.yaml")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if err := run(t.Context(), []string{"meshguard", "check-config", "-no-env", f}, noEnv, &stdout, &stderr); err != nil {
				t.Fatalf("%v\n%s", err, stderr.String())
			}
			if !strings.HasSuffix(strings.TrimSpace(stdout.String()), ": ok") {
				t.Fatalf("stdout %q", stdout.String())
			}
		})
	}
}

func TestEmptyFileIsDefaults(t *testing.T) {
	path := filepath.Join(t.TempDir(), "empty.yaml")
	os.WriteFile(path, nil, 0o600)
	cfg, err := loadConfig(path, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(DefaultConfig(), cfg, cmp.AllowUnexported(Config{})); diff != "" {
		t.Fatalf("empty file differs from defaults (-want +got):\n%s", diff)
	}
}

func TestEnvOverridesFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(path, []byte(`
environment: production
listen: {grpc: "10.0.0.1:1", http: "10.0.0.1:2"}
redis: {url: "redis://file:6379/0", timeout: 75ms}
database: {url: "postgres://file/db", pool: {min_conns: 1, max_conns: 3}}
cors: {public_origin: "https://file.example.com", allowed_origins: ["https://a.example.com"]}
`), 0o600)
	env := map[string]string{
		"MESHGUARD_ENV":         "development",
		"MESHGUARD_GRPC_ADDR":   "127.0.0.1:9001",
		"MESHGUARD_HTTP_ADDR":   "127.0.0.1:9002",
		"MESHGUARD_LOG_LEVEL":   "debug",
		"REDIS_URL":             "redis://:pw@env:6379/1",
		"DATABASE_URL":          "postgres://env/db",
		"DATABASE_POOL_MIN":     "4",
		"DATABASE_POOL_MAX":     "40",
		"PUBLIC_URL":            "https://env.example.com",
		"ALLOWED_ORIGINS":       "https://x.example.com, https://y.example.com,",
		"MESHGUARD_ADMIN_TOKEN": "tok",
	}
	cfg, err := loadConfig(path, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	got := []any{cfg.Environment, cfg.Listen.GRPC, cfg.Listen.HTTP, cfg.Log.Level, cfg.Redis.URL.Reveal(),
		cfg.Redis.Timeout, cfg.Database.URL.Reveal(), cfg.Database.Pool.MinConns, cfg.Database.Pool.MaxConns,
		cfg.CORS.PublicOrigin, cfg.CORS.AllowedOrigins, cfg.Audit.API.AdminToken.Reveal()}
	want := []any{"development", "127.0.0.1:9001", "127.0.0.1:9002", "debug", "redis://:pw@env:6379/1",
		75 * time.Millisecond, "postgres://env/db", int32(4), int32(40),
		"https://env.example.com", []string{"https://x.example.com", "https://y.example.com"}, "tok"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}

	_, err = loadConfig(path, func(k string) string {
		if k == "DATABASE_POOL_MAX" {
			return "lots"
		}
		return ""
	})
	if err == nil || !strings.Contains(err.Error(), `DATABASE_POOL_MAX: not an integer: "lots"`) {
		t.Fatalf("bad env integer: %v", err)
	}
	_, err = loadConfig(path, func(k string) string {
		if k == "REDIS_CLUSTER_ADDRS" {
			return "h1:7000,h2:7000"
		}
		return ""
	})
	if err == nil || !strings.Contains(err.Error(), "redis: set url or cluster, not both") {
		t.Fatalf("url and cluster together: %v", err)
	}
}

// TestFlagsOverrideEnv: serve's flags win over the environment.
func TestFlagsOverrideEnv(t *testing.T) {
	env := func(k string) string {
		if k == "MESHGUARD_GRPC_ADDR" {
			return "bad address"
		}
		return ""
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := newLogWatcher()
	errc := make(chan error, 1)
	go func() {
		errc <- run(ctx, []string{"meshguard", "serve", "--config", testConfig(t, ""), "--grpc-addr", "127.0.0.1:0"}, env, io.Discard, logs)
	}()
	select {
	case line := <-logs.ready:
		if addr, _ := line["grpc_addr"].(string); !strings.HasPrefix(addr, "127.0.0.1:") {
			t.Errorf("grpc_addr = %q, want the flag's 127.0.0.1:0", addr)
		}
	case err := <-errc:
		t.Fatalf("flag did not override env: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatalf("not serving after 30s; logs:\n%s", logs)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// TestShippedKubernetesConfig: the config the k8s base ships passes
// check-config, with its rate limit directory pointed at the files the
// ConfigMap mounts there.
func TestShippedKubernetesConfig(t *testing.T) {
	data, err := os.ReadFile("../../k8s/base/meshguard.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir, _ := filepath.Abs("../../k8s/base/ratelimit")
	const mount = "config_dir: /etc/meshguard/ratelimit"
	if !bytes.Contains(data, []byte(mount)) {
		t.Fatalf("k8s/base/meshguard.yaml no longer has %q; update this test", mount)
	}
	path := filepath.Join(t.TempDir(), "meshguard.yaml")
	os.WriteFile(path, bytes.Replace(data, []byte(mount), []byte("config_dir: "+dir), 1), 0o600)
	var stdout, stderr bytes.Buffer
	if err := run(t.Context(), []string{"meshguard", "check-config", "-no-env", path}, noEnv, &stdout, &stderr); err != nil {
		t.Fatalf("%v\n%s", err, stderr.String())
	}
}
