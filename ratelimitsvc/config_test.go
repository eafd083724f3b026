package ratelimitsvc

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meshguard/meshguard/internal/secret"
)

// TestBadDomainFiles: every rejected file in testdata/bad gets an error that
// names the file, the descriptor path and the field.
func TestBadDomainFiles(t *testing.T) {
	cases := map[string][]string{
		"duplicate_key.yaml":          {`descriptors[1] (client): duplicate descriptor "client", already at descriptors[0]`},
		"duplicate_nested.yaml":       {`descriptors[0] (route=login).descriptors[1] (client=ip:1.2.3.4): duplicate descriptor "client=ip:1.2.3.4"`},
		"bad_unit.yaml":               {`descriptors[0] (client).rate_limit.unit: must be second, minute, hour, day, week, month or year, got "fortnight"`},
		"unit_with_unlimited.yaml":    {`descriptors[0] (client).rate_limit.unit: must not be set with unlimited: true, got "minute"`},
		"self_replace.yaml":           {`descriptors[0] (client).rate_limit.replaces[0].name: a rule cannot replace itself ("per_client")`},
		"empty_replace.yaml":          {`descriptors[0] (client).rate_limit.replaces[0].name: must not be empty`},
		"empty_key.yaml":              {`descriptors[0] (route).descriptors[0] (=x).key: must not be empty`},
		"empty_domain.yaml":           {`domain: must not be empty`},
		"unknown_field.yaml":          {`line 4: field burst not found in type ratelimitsvc.RateLimitConfig`},
		"unknown_preset.yaml":         {`descriptors[0] (client).rate_limit.preset: unknown preset "generous" (known: ai, auth, auth_ip, csp_report, relaxed, standard, static, strict, upload)`},
		"preset_with_unit.yaml":       {`descriptors[0] (client).rate_limit.preset: "auth" sets the limit; unit, window and requests_per_unit must not be set with it`},
		"unit_and_window.yaml":        {`descriptors[0] (client).rate_limit.window: set unit or window, not both (unit "minute", window 15m0s)`},
		"bad_window.yaml":             {`descriptors[0] (client).rate_limit.window: must be between 1s and 8784h0m0s, got 10ms`},
		"bad_algorithm.yaml":          {`descriptors[0] (client).rate_limit.algorithm: must be sliding_window or fixed_window, got "token_bucket"`},
		"no_limit.yaml":               {`descriptors[0] (client).rate_limit.unit: one of unit, window, preset or unlimited: true is required`},
		"missing_requests.yaml":       {`descriptors[0] (client).rate_limit.requests_per_unit: required with unit or window`},
		"negative_requests.yaml":      {`line 4: cannot unmarshal !!int ` + "`-1`" + ` into uint32`},
		"two_documents.yaml":          {`a file holds one domain (one YAML document); found a second`},
		"not_yaml.yaml":               {`not valid YAML`},
		"share_without_wildcard.yaml": {`descriptors[0] (path=/api).share_threshold: needs a value with a * wildcard, got "/api"`},
		"duplicate_name.yaml":         {`descriptors[1] (b).rate_limit.name: "n" already used by descriptors[0] (a)`},
		"empty.yaml":                  {`file is empty`},
	}
	entries, err := os.ReadDir("testdata/bad")
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(cases) {
		t.Errorf("testdata/bad has %d files, the table %d", len(entries), len(cases))
	}
	for name, wants := range cases {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			data, err := os.ReadFile(filepath.Join("testdata/bad", name))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := DefaultConfig()
			cfg.ConfigDir = dir
			err = cfg.Validate()
			if err == nil {
				t.Fatal("Validate accepted the file")
			}
			prefix := "ratelimit.config_dir: " + filepath.Join(dir, name) + ": "
			for _, want := range wants {
				if !strings.Contains(err.Error(), prefix+want) {
					t.Errorf("error\n%v\ndoes not contain\n%s%s", err, prefix, want)
				}
			}
		})
	}
}

// TestConformanceFilesLoad: the conformance corpus and the defaults are valid.
func TestConformanceFilesLoad(t *testing.T) {
	if err := testConfig().Validate(); err != nil {
		t.Fatal(err)
	}
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatal(err)
	}
}

func u32(v uint32) *uint32 { return &v }

// TestConfigValidate covers the section's own fields, inline domains,
// presets and the two directory-level errors.
func TestConfigValidate(t *testing.T) {
	dupDir := t.TempDir()
	for _, n := range []string{"a.yaml", "b.yml"} {
		os.WriteFile(filepath.Join(dupDir, n), []byte("domain: same\n"), 0o644)
	}
	cases := []struct {
		name   string
		mutate func(*Config)
		want   []string
	}{
		{"defaults", func(*Config) {}, nil},
		{"failure mode", func(c *Config) { c.FailureMode = "maybe" }, []string{`ratelimit.failure_mode: must be allow or deny, got "maybe"`}},
		{"reload interval", func(c *Config) { c.ReloadInterval = time.Millisecond }, []string{`ratelimit.reload_interval: must be at least 100ms, got 1ms`}},
		{"cache size", func(c *Config) { c.LocalCacheSize = -1 }, []string{`ratelimit.local_cache_size: must not be negative, got -1`}},
		{"missing dir", func(c *Config) { c.ConfigDir = "/nonexistent/rl" }, []string{`ratelimit.config_dir: reading /nonexistent/rl: open /nonexistent/rl: no such file or directory`}},
		{"same domain in two files", func(c *Config) { c.ConfigDir = dupDir },
			[]string{`ratelimit.config_dir: ` + filepath.Join(dupDir, "b.yml") + `: domain: "same" already defined in ` + filepath.Join(dupDir, "a.yaml")}},
		{"inline duplicate domain", func(c *Config) { c.Domains = append(c.Domains, DomainConfig{Domain: "api"}) },
			[]string{`ratelimit.domains[1].domain: "api" already defined by ratelimit.domains[0]`}},
		{"inline bad rule", func(c *Config) {
			c.Domains = []DomainConfig{{Domain: "x", Descriptors: []DescriptorConfig{{Key: "k", RateLimit: &RateLimitConfig{Unit: "fortnight", RequestsPerUnit: u32(1)}}}}}
		}, []string{`ratelimit.domains[0].descriptors[0] (k).rate_limit.unit: must be second, minute, hour, day, week, month or year, got "fortnight"`}},
		{"preset override", func(c *Config) {
			c.Presets = map[string]PresetConfig{"auth": {RequestsPerUnit: 3, Window: 10 * time.Millisecond, Algorithm: "gcra"}}
		}, []string{`ratelimit.presets.auth.window: must be between 1s and 8784h0m0s, got 10ms`, `ratelimit.presets.auth.algorithm: must be sliding_window or fixed_window, got "gcra"`}},
		{"everything at once", func(c *Config) { c.FailureMode = ""; c.LocalCacheSize = -5 },
			[]string{`ratelimit.failure_mode`, `ratelimit.local_cache_size`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			tc.mutate(&c)
			err := c.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error\n%v\ndoes not contain\n%s", err, w)
				}
			}
		})
	}
}

// TestPresetOverride: an overridden preset changes the default api domain.
func TestPresetOverride(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Presets = map[string]PresetConfig{"auth": {RequestsPerUnit: 2, Window: time.Minute}}
	h := startServer(t, cfg, NewMemoryStore(), newFakeClock())
	req := request("api", kv("preset", "auth", "client", "ip:1.1.1.1"))
	var codes []string
	for range 3 {
		resp, err := h.client.ShouldRateLimit(t.Context(), req)
		if err != nil {
			t.Fatal(err)
		}
		codes = append(codes, resp.OverallCode.String())
		if l := resp.Statuses[0].CurrentLimit; l.RequestsPerUnit != 2 || l.Unit.String() != "MINUTE" {
			t.Fatalf("limit %v, want 2 per MINUTE", l)
		}
	}
	if got := strings.Join(codes, ","); got != "OK,OK,OVER_LIMIT" {
		t.Errorf("codes %s", got)
	}
}

func TestRedisConfigValidate(t *testing.T) {
	cases := []struct {
		name string
		c    RedisConfig
		want string
	}{
		{"defaults", DefaultRedisConfig(), ""},
		{"url", RedisConfig{URL: "rediss://:pw@h:6380/1", Timeout: time.Second}, ""},
		{"sentinel", RedisConfig{Sentinel: SentinelConfig{Master: "m", Addrs: []string{"s:26379"}}, Timeout: time.Second}, ""},
		{"timeout", RedisConfig{}, "redis.timeout: must be positive, got 0s"},
		{"url and cluster", RedisConfig{URL: "redis://h:1", Cluster: []string{"a:1"}, Timeout: 1}, "redis: set url or cluster, not both"},
		{"scheme", RedisConfig{URL: "http://h:1", Timeout: 1}, `redis.url: scheme must be redis or rediss, got "http"`},
		{"url password redacted", RedisConfig{URL: secret.URL("redis://:hunter2@/0"), Timeout: 1}, `redis.url: no host in "redis://:[REDACTED]@/0"`},
		{"cluster addr", RedisConfig{Cluster: []string{"nohost"}, Timeout: 1}, `redis.cluster[0]: not a host:port address: "nohost"`},
		{"sentinel without master", RedisConfig{Sentinel: SentinelConfig{Addrs: []string{"s:1"}}, Timeout: 1}, "redis.sentinel.master: required with redis.sentinel.addrs"},
		{"sentinel without addrs", RedisConfig{Sentinel: SentinelConfig{Master: "m"}, Timeout: 1}, "redis.sentinel.addrs: required with redis.sentinel.master"},
		{"pool", RedisConfig{Timeout: 1, PoolSize: -1}, "redis.pool_size: must be between 0 and 10000, got -1"},
		{"prefix", RedisConfig{Timeout: 1, KeyPrefix: "a{b"}, `redis.key_prefix: must not contain braces or spaces, got "a{b"`},
		{"tls with url", RedisConfig{URL: "redis://h:1", TLS: true, Timeout: 1}, "redis.tls: applies to cluster and sentinel; for redis.url use the rediss:// scheme"},
		{"ca file missing", RedisConfig{TLSCAFile: "/nonexistent/ca.pem", Timeout: 1}, "redis.tls_ca_file: open /nonexistent/ca.pem: no such file or directory"},
		{"ca file not PEM", RedisConfig{TLSCAFile: "testdata/conformance/basic.yaml", Timeout: 1}, "redis.tls_ca_file: no PEM certificates in testdata/conformance/basic.yaml"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if err != nil && strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("password leaked: %v", err)
			}
		})
	}
}

// FuzzParseDomain: any file either loads or is rejected with an error;
// parsing and compiling never panic.
func FuzzParseDomain(f *testing.F) {
	for _, dir := range []string{"testdata/conformance", "testdata/bad"} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
			f.Add(data)
		}
	}
	presets := BuiltinPresets()
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := ParseDomain(data)
		if err != nil {
			return
		}
		dom, err := compileDomain(d, presets, "")
		if err == nil && dom == nil {
			t.Fatal("no domain and no error")
		}
	})
}

// TestInlineDomainsYAML decodes the ratelimit section as the top-level
// config does (strictly, over the defaults), in the shape DESIGN.md shows.
func TestInlineDomainsYAML(t *testing.T) {
	const doc = `
failure_mode: deny
presets:
  search: {requests_per_unit: 60, window: 1m, algorithm: fixed_window}
domains:
  - domain: api
    descriptors:
      - key: preset
        value: auth
        descriptors:
          - key: client
            rate_limit: {preset: auth}
      - key: preset
        value: login
        descriptors:
          - key: client
            rate_limit: {requests_per_unit: 5, window: 15m}
      - key: preset
        value: search
        descriptors:
          - key: client
            rate_limit: {preset: search}
`
	cfg := DefaultConfig()
	dec := yaml.NewDecoder(strings.NewReader(doc))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	l, err := cfg.compile()
	if err != nil {
		t.Fatal(err)
	}
	r, _ := l.domains["api"].match(request("api", kv("preset", "login", "client", "x")).Descriptors[0].Entries, nil)
	if r == nil || r.limit != 5 || r.window != 15*time.Minute || r.fixed {
		t.Fatalf("login rule = %+v", r)
	}
	r, _ = l.domains["api"].match(request("api", kv("preset", "search", "client", "x")).Descriptors[0].Entries, nil)
	if r == nil || r.limit != 60 || r.window != time.Minute || !r.fixed {
		t.Fatalf("search rule = %+v", r)
	}
}
