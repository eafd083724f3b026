package ratelimitsvc

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meshguard/meshguard/internal/secret"
)

// RedisConfig is the `redis:` section. Redis is configured when URL, Cluster
// or Sentinel is set; otherwise quotas live in process memory. The zero value
// is "no Redis".
type RedisConfig struct {
	// URL is a redis:// or rediss:// (TLS) URL of a standalone server. It may
	// carry a username, password and database number.
	URL secret.URL `yaml:"url"`
	// Cluster lists host:port seeds of a Redis Cluster.
	Cluster []string `yaml:"cluster"`
	// Sentinel selects a master through Redis Sentinel.
	Sentinel SentinelConfig `yaml:"sentinel"`
	// Username and Password authenticate to Cluster nodes or to the master
	// found through Sentinel (a URL carries its own).
	Username string        `yaml:"username"`
	Password secret.String `yaml:"password"`
	// TLS turns on TLS for Cluster and Sentinel connections (a URL says
	// rediss:// instead).
	TLS bool `yaml:"tls"`
	// TLSCAFile is a PEM file of CA certificates to verify the servers with,
	// instead of the system roots.
	TLSCAFile string `yaml:"tls_ca_file"`
	// Timeout bounds every store operation on the decision path as a whole:
	// dial, pool wait, write and read.
	Timeout time.Duration `yaml:"timeout"`
	// PoolSize is the number of connections per node. 0: 10 per CPU.
	PoolSize int `yaml:"pool_size"`
	// MinIdleConns keeps this many connections open per node.
	MinIdleConns int `yaml:"min_idle_conns"`
	// KeyPrefix starts every key meshguard writes.
	KeyPrefix string `yaml:"key_prefix"`
	// Autopipeline sends the decisions queued while a batch is in flight
	// together, in one go-redis pipeline (far fewer round trips and system
	// calls per decision). false: one go-redis round trip each.
	Autopipeline bool `yaml:"autopipeline"`
}

// SentinelConfig names a master monitored by Redis Sentinel. The zero value
// means Sentinel is not used.
type SentinelConfig struct {
	// Master is the monitored master's name.
	Master string `yaml:"master"`
	// Addrs lists the sentinels' host:port addresses.
	Addrs []string `yaml:"addrs"`
	// Password authenticates to the sentinels themselves.
	Password secret.String `yaml:"password"`
}

// Enabled reports whether a Redis store is configured.
func (c RedisConfig) Enabled() bool {
	return c.URL.IsSet() || len(c.Cluster) > 0 || c.Sentinel.Master != "" || len(c.Sentinel.Addrs) > 0
}

// PresetConfig is a named quota that descriptors refer to with
// `rate_limit: {preset: name}`.
type PresetConfig struct {
	RequestsPerUnit uint32        `yaml:"requests_per_unit"`
	Window          time.Duration `yaml:"window"`
	// Algorithm is sliding_window (default) or fixed_window.
	Algorithm string `yaml:"algorithm"`
}

// Config is the `ratelimit:` section.
type Config struct {
	// FailureMode is what a decision does when the store cannot answer
	// within redis.timeout: allow or deny.
	FailureMode string `yaml:"failure_mode"`
	// ResponseHeaders adds Retry-After and X-RateLimit-* headers to a 429.
	ResponseHeaders bool `yaml:"response_headers"`
	// ConfigDir is a directory of envoyproxy/ratelimit-format files (*.yaml,
	// *.yml), one domain each, reloaded when they change. A file's domain
	// replaces an inline domain of the same name. Empty: none.
	ConfigDir string `yaml:"config_dir"`
	// ReloadInterval is how often ConfigDir is checked for changes; a change
	// is applied once the directory has stayed the same for one interval.
	ReloadInterval time.Duration `yaml:"reload_interval"`
	// Domains are inline domains in the envoyproxy/ratelimit format. The
	// default holds domain "api" with one rule per preset (descriptor
	// preset=<name>, then client), which is what envoy/envoy.yaml sends.
	Domains []DomainConfig `yaml:"domains"`
	// Presets adds presets or overrides the built-in ones.
	Presets map[string]PresetConfig `yaml:"presets"`
	// LocalCacheSize bounds how many over-limit keys are remembered in
	// process until their reset. 0 turns the cache off.
	LocalCacheSize int `yaml:"local_cache_size"`
}

// BuiltinPresets returns the built-in presets. envoy/envoy.yaml keys auth
// by login account and auth_ip by address, so one NAT (a hospital, a
// school) shares the higher auth_ip ceiling while each account still gets
// five attempts; static (assets, which browsers fetch without a token) and
// csp_report have quotas of their own so neither spends a page's quota.
func BuiltinPresets() map[string]PresetConfig {
	return map[string]PresetConfig{
		"strict":     {RequestsPerUnit: 5, Window: 15 * time.Minute},
		"standard":   {RequestsPerUnit: 100, Window: 15 * time.Minute},
		"relaxed":    {RequestsPerUnit: 300, Window: 15 * time.Minute},
		"auth":       {RequestsPerUnit: 5, Window: 15 * time.Minute},
		"auth_ip":    {RequestsPerUnit: 300, Window: 15 * time.Minute},
		"upload":     {RequestsPerUnit: 20, Window: time.Hour},
		"ai":         {RequestsPerUnit: 30, Window: time.Hour},
		"static":     {RequestsPerUnit: 6000, Window: time.Minute},
		"csp_report": {RequestsPerUnit: 120, Window: time.Minute},
	}
}

// DefaultRedisConfig returns the defaults for the redis section.
func DefaultRedisConfig() RedisConfig {
	return RedisConfig{Timeout: 50 * time.Millisecond, KeyPrefix: "mg:rl:", Autopipeline: true}
}

// DefaultConfig returns the defaults for the ratelimit section.
func DefaultConfig() Config {
	return Config{
		FailureMode:     "allow",
		ResponseHeaders: true,
		ReloadInterval:  2 * time.Second,
		Domains:         []DomainConfig{apiDomain()},
		LocalCacheSize:  100_000,
	}
}

// apiDomain is the built-in domain "api", what envoy/envoy.yaml's routes
// send: (preset=<name>, client=<user:… | ip:… | account:…>) limited by that
// preset, and for static assets, whose route skips ext_authz, (preset=static,
// masked_remote_address=<address/prefix>), the key Envoy computes itself.
func apiDomain() DomainConfig {
	d := presetDomain("api", BuiltinPresets())
	for i := range d.Descriptors {
		if d.Descriptors[i].Value == "static" {
			d.Descriptors[i].Descriptors = append(d.Descriptors[i].Descriptors,
				DescriptorConfig{Key: "masked_remote_address", RateLimit: &RateLimitConfig{Preset: "static"}})
		}
	}
	return d
}

// presetDomain builds a domain with one rule per preset: descriptor
// (preset=<name>, client=<any>) is limited by that preset.
func presetDomain(name string, presets map[string]PresetConfig) DomainConfig {
	names := make([]string, 0, len(presets))
	for n := range presets {
		names = append(names, n)
	}
	sort.Strings(names)
	d := DomainConfig{Domain: name}
	for _, n := range names {
		d.Descriptors = append(d.Descriptors, DescriptorConfig{
			Key: "preset", Value: n,
			Descriptors: []DescriptorConfig{{Key: "client", RateLimit: &RateLimitConfig{Preset: n}}},
		})
	}
	return d
}

// DomainConfig is one domain in the envoyproxy/ratelimit file format.
type DomainConfig struct {
	Domain      string             `yaml:"domain"`
	Descriptors []DescriptorConfig `yaml:"descriptors"`
}

// DescriptorConfig is one level of a domain's descriptor tree.
type DescriptorConfig struct {
	Key         string             `yaml:"key"`
	Value       string             `yaml:"value"`
	RateLimit   *RateLimitConfig   `yaml:"rate_limit"`
	Descriptors []DescriptorConfig `yaml:"descriptors"`
	ShadowMode  bool               `yaml:"shadow_mode"`
	// DetailedMetric and ValueToMetric put the request's value into the
	// rule's metric label (unbounded cardinality: opt in with care).
	DetailedMetric bool `yaml:"detailed_metric"`
	ValueToMetric  bool `yaml:"value_to_metric"`
	// ShareThreshold makes every value matching a wildcard share one counter.
	ShareThreshold bool `yaml:"share_threshold"`
	// QuotaMode: the request is over limit through quota descriptors only
	// when all of them are over.
	QuotaMode bool `yaml:"quota_mode"`
	// Metadata is accepted for compatibility and not used.
	Metadata map[string]any `yaml:"metadata"`
}

// RateLimitConfig is a descriptor's limit.
type RateLimitConfig struct {
	Name            string          `yaml:"name"`
	Replaces        []ReplaceConfig `yaml:"replaces"`
	Unit            string          `yaml:"unit"`
	RequestsPerUnit *uint32         `yaml:"requests_per_unit"`
	Unlimited       bool            `yaml:"unlimited"`
	// Window is meshguard's extension: any window length instead of a unit.
	Window time.Duration `yaml:"window"`
	// Preset takes requests_per_unit, window and algorithm from a preset.
	Preset string `yaml:"preset"`
	// Algorithm is sliding_window (default) or fixed_window.
	Algorithm string `yaml:"algorithm"`
}

// ReplaceConfig names a rule that a matching rule replaces.
type ReplaceConfig struct {
	Name string `yaml:"name"`
}

var unitWindows = map[string]time.Duration{
	"second": time.Second,
	"minute": time.Minute,
	"hour":   time.Hour,
	"day":    24 * time.Hour,
	"week":   7 * 24 * time.Hour,
	"month":  30 * 24 * time.Hour,
	"year":   365 * 24 * time.Hour,
}

const (
	minWindow = time.Second
	maxWindow = 366 * 24 * time.Hour
)

// Validate reports every invalid field, naming it by its YAML path.
func (c RedisConfig) Validate() error {
	var errs []error
	if c.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("redis.timeout: must be positive, got %s", c.Timeout))
	}
	sentinel := c.Sentinel.Master != "" || len(c.Sentinel.Addrs) > 0
	modes := 0
	for _, on := range []bool{c.URL.IsSet(), len(c.Cluster) > 0, sentinel} {
		if on {
			modes++
		}
	}
	if modes > 1 {
		errs = append(errs, errors.New("redis: set url or cluster, not both (nor sentinel with either)"))
	}
	if c.URL.IsSet() {
		u, err := url.Parse(c.URL.Reveal())
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("redis.url: not a URL: %q", c.URL.String()))
		case u.Scheme != "redis" && u.Scheme != "rediss":
			errs = append(errs, fmt.Errorf("redis.url: scheme must be redis or rediss, got %q", u.Scheme))
		case u.Host == "":
			errs = append(errs, fmt.Errorf("redis.url: no host in %q", c.URL.String()))
		}
	}
	for i, a := range c.Cluster {
		if _, _, err := net.SplitHostPort(a); err != nil {
			errs = append(errs, fmt.Errorf("redis.cluster[%d]: not a host:port address: %q", i, a))
		}
	}
	if sentinel {
		if c.Sentinel.Master == "" {
			errs = append(errs, errors.New("redis.sentinel.master: required with redis.sentinel.addrs"))
		}
		if len(c.Sentinel.Addrs) == 0 {
			errs = append(errs, errors.New("redis.sentinel.addrs: required with redis.sentinel.master"))
		}
		for i, a := range c.Sentinel.Addrs {
			if _, _, err := net.SplitHostPort(a); err != nil {
				errs = append(errs, fmt.Errorf("redis.sentinel.addrs[%d]: not a host:port address: %q", i, a))
			}
		}
	}
	if c.TLS && c.URL.IsSet() {
		errs = append(errs, errors.New("redis.tls: applies to cluster and sentinel; for redis.url use the rediss:// scheme"))
	}
	if c.TLSCAFile != "" {
		if _, err := loadCAs(c.TLSCAFile); err != nil {
			errs = append(errs, fmt.Errorf("redis.tls_ca_file: %w", err))
		}
	}
	if c.PoolSize < 0 || c.PoolSize > 10000 {
		errs = append(errs, fmt.Errorf("redis.pool_size: must be between 0 and 10000, got %d", c.PoolSize))
	}
	if c.MinIdleConns < 0 || (c.PoolSize > 0 && c.MinIdleConns > c.PoolSize) {
		errs = append(errs, fmt.Errorf("redis.min_idle_conns: must be between 0 and redis.pool_size, got %d", c.MinIdleConns))
	}
	if strings.ContainsAny(c.KeyPrefix, "{} \r\n") {
		errs = append(errs, fmt.Errorf("redis.key_prefix: must not contain braces or spaces, got %q", c.KeyPrefix))
	}
	return errors.Join(errs...)
}

// loadCAs reads a PEM bundle of CA certificates.
func loadCAs(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no PEM certificates in %s", path)
	}
	return pool, nil
}

// Validate reports every invalid field, naming it by its YAML path. It also
// loads and checks the files in ConfigDir, so check-config reports them.
func (c Config) Validate() error {
	var errs []error
	if c.FailureMode != "allow" && c.FailureMode != "deny" {
		errs = append(errs, fmt.Errorf("ratelimit.failure_mode: must be allow or deny, got %q", c.FailureMode))
	}
	if c.ReloadInterval < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("ratelimit.reload_interval: must be at least 100ms, got %s", c.ReloadInterval))
	}
	if c.LocalCacheSize < 0 {
		errs = append(errs, fmt.Errorf("ratelimit.local_cache_size: must not be negative, got %d", c.LocalCacheSize))
	}
	if _, err := c.compile(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// presets returns the built-in presets with the configured overrides, and
// the errors in those overrides.
func (c Config) presets() (map[string]PresetConfig, error) {
	out := BuiltinPresets()
	var errs []error
	names := make([]string, 0, len(c.Presets))
	for n := range c.Presets {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		p := c.Presets[n]
		path := "ratelimit.presets." + n
		if n == "" {
			errs = append(errs, errors.New("ratelimit.presets: empty preset name"))
		}
		if err := checkWindow(p.Window); err != nil {
			errs = append(errs, fmt.Errorf("%s.window: %w", path, err))
		}
		if err := checkAlgorithm(p.Algorithm); err != nil {
			errs = append(errs, fmt.Errorf("%s.algorithm: %w", path, err))
		}
		out[n] = p
	}
	return out, errors.Join(errs...)
}

func checkWindow(w time.Duration) error {
	if w < minWindow || w > maxWindow {
		return fmt.Errorf("must be between %s and %s, got %s", minWindow, maxWindow, w)
	}
	if w%time.Millisecond != 0 {
		return fmt.Errorf("must be a whole number of milliseconds, got %s", w)
	}
	return nil
}

func checkAlgorithm(a string) error {
	if a != "" && a != "sliding_window" && a != "fixed_window" {
		return fmt.Errorf("must be sliding_window or fixed_window, got %q", a)
	}
	return nil
}

// compile turns the inline domains, the presets and the files in ConfigDir
// into the matching tables. Errors name the YAML path or the file.
func (c Config) compile() (*limits, error) {
	presets, perr := c.presets()
	var errs []error
	if perr != nil {
		errs = append(errs, perr)
	}
	l := &limits{domains: make(map[string]*domain)}
	seen := map[string]int{}
	for i, d := range c.Domains {
		where := fmt.Sprintf("ratelimit.domains[%d]", i)
		if j, dup := seen[d.Domain]; dup && d.Domain != "" {
			errs = append(errs, fmt.Errorf("%s.domain: %q already defined by ratelimit.domains[%d]", where, d.Domain, j))
			continue
		}
		seen[d.Domain] = i
		dom, err := compileDomain(d, presets, where+".")
		if err != nil {
			errs = append(errs, err)
			continue
		}
		l.domains[d.Domain] = dom
	}
	if c.ConfigDir != "" {
		files, err := loadDir(c.ConfigDir)
		if err != nil {
			errs = append(errs, fmt.Errorf("ratelimit.config_dir: %w", err))
		}
		fileOf := map[string]string{}
		for _, f := range files {
			where := "ratelimit.config_dir: " + f.path + ": "
			if f.err != nil {
				errs = append(errs, fmt.Errorf("%s%w", where, f.err))
				continue
			}
			if other, dup := fileOf[f.cfg.Domain]; dup && f.cfg.Domain != "" {
				errs = append(errs, fmt.Errorf("%sdomain: %q already defined in %s", where, f.cfg.Domain, other))
				continue
			}
			fileOf[f.cfg.Domain] = f.path
			dom, err := compileDomain(f.cfg, presets, where)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			l.domains[f.cfg.Domain] = dom
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return l, nil
}

type dirFile struct {
	path string
	cfg  DomainConfig
	err  error
}

// maxConfigFileSize bounds one file in config_dir.
const maxConfigFileSize = 4 << 20

// loadDir parses every *.yaml and *.yml file in dir, in name order. Hidden
// files (Kubernetes ConfigMap mounts keep their data in ..data) are skipped.
func loadDir(dir string) ([]dirFile, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", dir, err)
	}
	var out []dirFile
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") || (!strings.HasSuffix(name, ".yaml") && !strings.HasSuffix(name, ".yml")) {
			continue
		}
		path := filepath.Join(dir, name)
		st, err := os.Stat(path) // follows symlinks
		if err != nil {
			out = append(out, dirFile{path: path, err: err})
			continue
		}
		if st.IsDir() {
			continue
		}
		if st.Size() > maxConfigFileSize {
			out = append(out, dirFile{path: path, err: fmt.Errorf("file is %d bytes, limit %d", st.Size(), maxConfigFileSize)})
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			out = append(out, dirFile{path: path, err: err})
			continue
		}
		cfg, err := ParseDomain(data)
		out = append(out, dirFile{path: path, cfg: cfg, err: err})
	}
	return out, nil
}

// ParseDomain decodes one envoyproxy/ratelimit-format file strictly: unknown
// keys and a second YAML document are errors. It does not validate the
// result; compileDomain does.
func ParseDomain(data []byte) (DomainConfig, error) {
	var d DomainConfig
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&d); err != nil {
		if errors.Is(err, io.EOF) {
			return d, errors.New("file is empty")
		}
		var te *yaml.TypeError
		if errors.As(err, &te) {
			return d, errors.New(strings.Join(te.Errors, "; "))
		}
		return d, fmt.Errorf("not valid YAML: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return d, errors.New("a file holds one domain (one YAML document); found a second")
	}
	return d, nil
}

// compileDomain validates d and builds its matching tree. where prefixes
// every error (a YAML path ending in "." or a "file: " prefix).
func compileDomain(d DomainConfig, presets map[string]PresetConfig, where string) (*domain, error) {
	var errs []error
	if d.Domain == "" {
		errs = append(errs, fmt.Errorf("%sdomain: must not be empty", where))
	}
	dom := &domain{name: d.Domain, root: newNode()}
	names := map[string]string{}
	var compileLevel func(list []DescriptorConfig, parent *node, path string, chain []string, depth int)
	compileLevel = func(list []DescriptorConfig, parent *node, path string, chain []string, depth int) {
		if depth > maxEntries {
			errs = append(errs, fmt.Errorf("%s%s: nested deeper than %d levels", where, path, maxEntries))
			return
		}
		seenKV := map[[2]string]int{}
		for i, dc := range list {
			p := fmt.Sprintf("%sdescriptors[%d]", path, i)
			label := dc.Key
			if dc.Value != "" {
				label += "=" + dc.Value
			}
			p += " (" + label + ")"
			if dc.Key == "" {
				errs = append(errs, fmt.Errorf("%s%s.key: must not be empty", where, p))
				continue
			}
			kv := [2]string{dc.Key, dc.Value}
			if j, dup := seenKV[kv]; dup {
				errs = append(errs, fmt.Errorf("%s%s: duplicate descriptor %q, already at descriptors[%d]", where, p, label, j))
				continue
			}
			seenKV[kv] = i
			n := newNode()
			n.key, n.value = dc.Key, dc.Value
			myChain := append(slices.Clip(chain), label)
			if dc.RateLimit != nil {
				r, rerrs := compileRule(*dc.RateLimit, presets, where+p+".rate_limit")
				errs = append(errs, rerrs...)
				if r != nil {
					r.domain = d.Domain
					r.metricPath = strings.Join(myChain, ".")
					r.shadow = dc.ShadowMode
					r.quota = dc.QuotaMode
					r.detailed = dc.DetailedMetric || dc.ValueToMetric
					if r.name != "" {
						if other, dup := names[r.name]; dup {
							errs = append(errs, fmt.Errorf("%s%s.rate_limit.name: %q already used by %s", where, p, r.name, other))
						}
						names[r.name] = p
					}
					n.rule = r
				}
			}
			if dc.ShareThreshold {
				if !strings.Contains(dc.Value, "*") {
					errs = append(errs, fmt.Errorf("%s%s.share_threshold: needs a value with a * wildcard, got %q", where, p, dc.Value))
				}
				n.share = true
			}
			switch {
			case dc.Value == "":
				parent.defaults[dc.Key] = n
			case strings.Contains(dc.Value, "*"):
				parent.wildcards[dc.Key] = append(parent.wildcards[dc.Key], n)
			default:
				m := parent.exact[dc.Key]
				if m == nil {
					m = map[string]*node{}
					parent.exact[dc.Key] = m
				}
				m[dc.Value] = n
			}
			compileLevel(dc.Descriptors, n, p+".", myChain, depth+1)
		}
	}
	compileLevel(d.Descriptors, dom.root, "", nil, 1)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return dom, nil
}

func compileRule(rc RateLimitConfig, presets map[string]PresetConfig, path string) (*rule, []error) {
	var errs []error
	fail := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", path, field, fmt.Sprintf(format, args...)))
	}
	r := &rule{name: rc.Name}
	for i, rep := range rc.Replaces {
		switch {
		case rep.Name == "":
			fail(fmt.Sprintf("replaces[%d].name", i), "must not be empty")
		case rep.Name == rc.Name:
			fail(fmt.Sprintf("replaces[%d].name", i), "a rule cannot replace itself (%q)", rep.Name)
		default:
			r.replaces = append(r.replaces, rep.Name)
		}
	}
	if err := checkAlgorithm(rc.Algorithm); err != nil {
		fail("algorithm", "%v", err)
	}
	if rc.Unlimited {
		if rc.Unit != "" {
			fail("unit", "must not be set with unlimited: true, got %q", rc.Unit)
		}
		if rc.Window != 0 {
			fail("window", "must not be set with unlimited: true, got %s", rc.Window)
		}
		if rc.Preset != "" {
			fail("preset", "must not be set with unlimited: true, got %q", rc.Preset)
		}
		if rc.RequestsPerUnit != nil {
			fail("requests_per_unit", "must not be set with unlimited: true, got %d", *rc.RequestsPerUnit)
		}
		r.unlimited = true
		return r, errs
	}
	algorithm := rc.Algorithm
	switch {
	case rc.Preset != "":
		p, ok := presets[rc.Preset]
		if !ok {
			fail("preset", "unknown preset %q (known: %s)", rc.Preset, strings.Join(sortedKeys(presets), ", "))
			break
		}
		if rc.Unit != "" || rc.Window != 0 || rc.RequestsPerUnit != nil {
			fail("preset", "%q sets the limit; unit, window and requests_per_unit must not be set with it", rc.Preset)
		}
		r.limit, r.window = uint64(p.RequestsPerUnit), p.Window
		if algorithm == "" {
			algorithm = p.Algorithm
		}
		r.presetName = rc.Preset
	case rc.Unit != "" && rc.Window != 0:
		fail("window", "set unit or window, not both (unit %q, window %s)", rc.Unit, rc.Window)
	case rc.Unit != "":
		w, ok := unitWindows[strings.ToLower(rc.Unit)]
		if !ok {
			fail("unit", "must be second, minute, hour, day, week, month or year, got %q", rc.Unit)
		}
		r.window = w
	case rc.Window != 0:
		if err := checkWindow(rc.Window); err != nil {
			fail("window", "%v", err)
		}
		r.window = rc.Window
	default:
		fail("unit", "one of unit, window, preset or unlimited: true is required")
	}
	if rc.Preset == "" {
		if rc.RequestsPerUnit == nil {
			fail("requests_per_unit", "required with unit or window")
		} else {
			r.limit = uint64(*rc.RequestsPerUnit)
		}
	}
	r.fixed = algorithm == "fixed_window"
	r.unit, r.multiplier = unitOf(r.window)
	if len(errs) > 0 {
		return nil, errs
	}
	return r, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
