package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meshguard/meshguard/auditsink"
	"github.com/meshguard/meshguard/extauthz"
	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/internal/pgpool"
	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/tracing"
	"github.com/meshguard/meshguard/ratelimitsvc"
)

// Config is the whole configuration file. Every key is optional; the zero
// file means DefaultConfig.
type Config struct {
	Environment string                   `yaml:"environment"`
	Listen      ListenConfig             `yaml:"listen"`
	Log         LogConfig                `yaml:"log"`
	GRPC        grpcserver.Limits        `yaml:"grpc"`
	Shutdown    ShutdownConfig           `yaml:"shutdown"`
	Redis       ratelimitsvc.RedisConfig `yaml:"redis"`
	Database    pgpool.Config            `yaml:"database"`
	Ratelimit   ratelimitsvc.Config      `yaml:"ratelimit"`
	CORS        extauthz.CORSConfig      `yaml:"cors"`
	Identity    extauthz.IdentityConfig  `yaml:"identity"`
	CSP         extauthz.CSPConfig       `yaml:"csp"`
	Audit       auditsink.Config         `yaml:"audit"`
	Tracing     tracing.Config           `yaml:"tracing"`
}

// ListenConfig holds the listener addresses.
type ListenConfig struct {
	GRPC string `yaml:"grpc"`
	HTTP string `yaml:"http"`
	// RateLimit serves ShouldRateLimit (and grpc.health.v1) alone, on a
	// second gRPC server with the gRPC listener's options, so rate limit
	// calls are isolated from ext_authz and access-log traffic: point
	// Envoy's rate limit cluster here. Empty: not served apart.
	RateLimit string `yaml:"ratelimit"`
}

// LogConfig sets the log level and format.
type LogConfig struct {
	// Level is debug, info, warn or error.
	Level string `yaml:"level"`
	// Format is json or text; empty means json in production, text in development.
	Format string `yaml:"format"`
}

// ShutdownConfig bounds how long a SIGTERM waits for in-flight work.
type ShutdownConfig struct {
	// DrainDelay is how long meshguard keeps serving after SIGTERM while
	// its health checks answer NOT_SERVING, so that Envoy's health checks
	// and the endpoints of the Service move calls to other replicas before
	// any connection is closed. 0: stop at once.
	DrainDelay time.Duration `yaml:"drain_delay"`
	// Timeout bounds the drain that follows: in-flight RPCs, streams, HTTP
	// requests and the audit queue.
	Timeout time.Duration `yaml:"timeout"`
}

// DefaultConfig returns the configuration used when a key is absent.
func DefaultConfig() Config {
	return Config{
		Environment: "production",
		Listen:      ListenConfig{GRPC: "127.0.0.1:8081", HTTP: "127.0.0.1:8080", RateLimit: "127.0.0.1:8082"},
		Log:         LogConfig{Level: "info"},
		GRPC:        grpcserver.DefaultLimits(),
		Shutdown:    ShutdownConfig{Timeout: 8 * time.Second},
		Redis:       ratelimitsvc.DefaultRedisConfig(),
		Database:    pgpool.DefaultConfig(),
		Ratelimit:   ratelimitsvc.DefaultConfig(),
		CORS:        extauthz.DefaultCORSConfig(),
		Identity:    extauthz.DefaultIdentityConfig(),
		CSP:         extauthz.DefaultCSPConfig(),
		Audit:       auditsink.DefaultConfig(),
		Tracing:     tracing.DefaultConfig(),
	}
}

// Development reports whether the environment is development.
func (c Config) Development() bool { return c.Environment == "development" }

// decodeErrors lists configuration errors found while decoding YAML, as opposed
// to validation.
type decodeErrors []string

func (d decodeErrors) Error() string { return strings.Join(d, "\n") }

// unknownField matches yaml.v3's message for a key with no struct field.
var unknownField = regexp.MustCompile(`^line (\d+): field (.+) not found in type \S+$`)

// parseConfig decodes a YAML document over the defaults, strictly: an unknown
// key is an error naming the key and its line. Type errors do not stop the
// decoding, so every one of them is reported, and the returned Config holds
// everything that did decode. It does no I/O.
func parseConfig(data []byte) (Config, error) {
	cfg := DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return cfg, fmt.Errorf("config is not valid YAML: %w", err)
		}
		var errs decodeErrors
		for _, e := range te.Errors {
			if m := unknownField.FindStringSubmatch(e); m != nil {
				e = fmt.Sprintf("line %s: unknown key %q", m[1], m[2])
			}
			errs = append(errs, e)
		}
		return cfg, errs
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return cfg, errors.New("a config file holds one YAML document; found a second")
	}
	return cfg, nil
}

// loadConfig reads path (empty: defaults only), applies environment
// overrides and validates the result, returning every error at once.
func loadConfig(path string, getenv func(string) string) (Config, error) {
	cfg := DefaultConfig()
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return cfg, fmt.Errorf("reading config: %w", err)
		}
		var perr error
		cfg, perr = parseConfig(data)
		var derr decodeErrors
		if perr != nil && !errors.As(perr, &derr) {
			return cfg, perr
		}
		// Keep going after key and type errors, so one run lists them all.
		if perr != nil {
			return cfg, errors.Join(perr, applyEnv(&cfg, getenv), cfg.Validate())
		}
	}
	if err := applyEnv(&cfg, getenv); err != nil {
		return cfg, errors.Join(err, cfg.Validate())
	}
	return cfg, cfg.Validate()
}

// applyEnv overrides file values with the deployment knobs of DESIGN.md.
func applyEnv(c *Config, getenv func(string) string) error {
	var errs []error
	str := func(name string, dst *string) {
		if v := getenv(name); v != "" {
			*dst = v
		}
	}
	list := func(v string) []string {
		var out []string
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
		return out
	}
	integer := func(name string, dst *int32) {
		v := getenv(name)
		if v == "" {
			return
		}
		n, err := strconv.ParseInt(v, 10, 32)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: not an integer: %q", name, v))
			return
		}
		*dst = int32(n)
	}
	str("MESHGUARD_ENV", &c.Environment)
	str("MESHGUARD_GRPC_ADDR", &c.Listen.GRPC)
	str("MESHGUARD_HTTP_ADDR", &c.Listen.HTTP)
	str("MESHGUARD_RATELIMIT_ADDR", &c.Listen.RateLimit)
	str("MESHGUARD_LOG_LEVEL", &c.Log.Level)
	if v := getenv("REDIS_URL"); v != "" {
		c.Redis.URL = secret.URL(v)
	}
	if v := getenv("REDIS_CLUSTER_ADDRS"); v != "" {
		c.Redis.Cluster = list(v)
	}
	if v := getenv("DATABASE_URL"); v != "" {
		c.Database.URL = secret.URL(v)
	}
	integer("DATABASE_POOL_MIN", &c.Database.Pool.MinConns)
	integer("DATABASE_POOL_MAX", &c.Database.Pool.MaxConns)
	str("PUBLIC_URL", &c.CORS.PublicOrigin)
	if v := getenv("ALLOWED_ORIGINS"); v != "" {
		c.CORS.AllowedOrigins = list(v)
	}
	if v := getenv("MESHGUARD_ADMIN_TOKEN"); v != "" {
		c.Audit.AdminToken = secret.String(v)
	}
	if v := getenv("MESHGUARD_ACCOUNT_KEY"); v != "" {
		c.Identity.AccountKey = secret.String(v)
	}
	return errors.Join(errs...)
}

// Validate reports every invalid field at once, each naming its YAML path.
func (c Config) Validate() error {
	var errs []error
	if c.Environment != "production" && c.Environment != "development" {
		errs = append(errs, fmt.Errorf("environment: must be production or development, got %q", c.Environment))
	}
	for name, addr := range map[string]string{"listen.grpc": c.Listen.GRPC, "listen.http": c.Listen.HTTP, "listen.ratelimit": c.Listen.RateLimit} {
		if name == "listen.ratelimit" && addr == "" {
			continue // off
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("%s: not a host:port address: %q", name, addr))
		}
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.Log.Level)); err != nil {
		errs = append(errs, fmt.Errorf("log.level: must be debug, info, warn or error, got %q", c.Log.Level))
	}
	if f := c.Log.Format; f != "" && f != "json" && f != "text" {
		errs = append(errs, fmt.Errorf("log.format: must be json or text, got %q", f))
	}
	if n := c.GRPC.MaxRecvMsgSize; n < 1<<10 || n > 64<<20 {
		errs = append(errs, fmt.Errorf("grpc.max_recv_msg_size: must be between 1 KiB and 64 MiB, got %d", n))
	}
	if c.GRPC.MaxConcurrentStreams < 1 {
		errs = append(errs, fmt.Errorf("grpc.max_concurrent_streams: must be at least 1, got %d", c.GRPC.MaxConcurrentStreams))
	}
	if c.GRPC.KeepaliveMinTime <= 0 {
		errs = append(errs, fmt.Errorf("grpc.keepalive_min_time: must be positive, got %s", c.GRPC.KeepaliveMinTime))
	}
	if c.GRPC.ConnectionTimeout <= 0 {
		errs = append(errs, fmt.Errorf("grpc.connection_timeout: must be positive, got %s", c.GRPC.ConnectionTimeout))
	}
	if c.Shutdown.DrainDelay < 0 {
		errs = append(errs, fmt.Errorf("shutdown.drain_delay: must not be negative, got %s", c.Shutdown.DrainDelay))
	}
	if c.Shutdown.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("shutdown.timeout: must be positive, got %s", c.Shutdown.Timeout))
	}
	errs = append(errs,
		c.Redis.Validate(),
		c.Database.Validate(),
		c.Ratelimit.Validate(),
		c.extauthzConfig().Validate(),
		c.Audit.Validate(),
		c.Tracing.Validate(),
	)
	return errors.Join(errs...)
}

func (c Config) extauthzConfig() extauthz.Config {
	return extauthz.Config{Development: c.Development(), CORS: c.CORS, Identity: c.Identity, CSP: c.CSP}
}

// newLogger builds the process logger: JSON in production, text in development.
func newLogger(c LogConfig, development bool, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level)) // validated already
	opts := &slog.HandlerOptions{Level: lvl}
	format := c.Format
	if format == "" {
		format = "json"
		if development {
			format = "text"
		}
	}
	if format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}
