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

	"github.com/meshguard/meshguard/extauthz"
	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/internal/pgpool"
	"github.com/meshguard/meshguard/internal/secret"
	"github.com/meshguard/meshguard/internal/servertls"
	"github.com/meshguard/meshguard/internal/tracing"
	"github.com/meshguard/meshguard/ratelimitsvc"
)

// Config is the whole configuration file. Every key is optional; the zero
// file means DefaultConfig.
type Config struct {
	Environment string                   `yaml:"environment"`
	Listen      ListenConfig             `yaml:"listen"`
	Log         LogConfig                `yaml:"log"`
	GRPC        GRPCConfig               `yaml:"grpc"`
	TLS         TLSConfig                `yaml:"tls"`
	Shutdown    ShutdownConfig           `yaml:"shutdown"`
	Redis       ratelimitsvc.RedisConfig `yaml:"redis"`
	Database    pgpool.Config            `yaml:"database"`
	Ratelimit   ratelimitsvc.Config      `yaml:"ratelimit"`
	CORS        extauthz.CORSConfig      `yaml:"cors"`
	Identity    extauthz.IdentityConfig  `yaml:"identity"`
	CSP         extauthz.CSPConfig       `yaml:"csp"`
	Audit       auditConfig              `yaml:"audit"`
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

// GRPCConfig bounds what clients can make the gRPC listeners hold. A
// connection buffers at most max_concurrent_streams × (initial_window_size
// + max_recv_msg_size) bytes of requests; a request is then refused before
// it is decoded if it is larger than its method's max_request_bytes, would
// take more than grpcserver.DecodedRatio times that once decoded, or breaks
// a service's caps (32 descriptors of 16 entries in a rate limit request);
// and the requests a listener decodes at once share max_decoded_bytes.
type GRPCConfig struct {
	// MaxRecvMsgSize and MaxConcurrentStreams are listen.grpc's: its
	// largest message (an access-log batch is the largest Envoy sends) and
	// the RPCs one connection may have open (beyond it Envoy opens another
	// connection).
	MaxRecvMsgSize       int    `yaml:"max_recv_msg_size"`
	MaxConcurrentStreams uint32 `yaml:"max_concurrent_streams"`
	// MaxDecodedBytes bounds what the requests listen.grpc is decoding (and
	// the unary ones it is handling) may take at once, estimated before
	// decoding; beyond it they wait.
	MaxDecodedBytes int64 `yaml:"max_decoded_bytes"`
	// RateLimitListener holds the same three limits for listen.ratelimit.
	RateLimitListener ListenerLimits `yaml:"ratelimit_listener"`
	// MaxRequestBytes bounds single methods below their listener's limit.
	MaxRequestBytes MethodLimits `yaml:"max_request_bytes"`
	// InitialWindowSize and InitialConnWindowSize fix the flow-control
	// windows of a stream and a connection; 0 lets grpc-go grow them by its
	// bandwidth-delay estimate (up to 16 MiB a stream).
	InitialWindowSize     int32 `yaml:"initial_window_size"`
	InitialConnWindowSize int32 `yaml:"initial_conn_window_size"`
	// KeepaliveMinTime is the shortest client ping interval tolerated.
	KeepaliveMinTime time.Duration `yaml:"keepalive_min_time"`
	// MaxConnectionIdle closes connections idle this long; 0: never.
	MaxConnectionIdle time.Duration `yaml:"max_connection_idle"`
	// ConnectionTimeout bounds the connection handshake.
	ConnectionTimeout time.Duration `yaml:"connection_timeout"`
}

// ListenerLimits are one gRPC listener's message, stream and decoding
// limits.
type ListenerLimits struct {
	MaxRecvMsgSize       int    `yaml:"max_recv_msg_size"`
	MaxConcurrentStreams uint32 `yaml:"max_concurrent_streams"`
	MaxDecodedBytes      int64  `yaml:"max_decoded_bytes"`
}

// MethodLimits are the per-method request size limits, in bytes.
type MethodLimits struct {
	// Check is ext_authz's CheckRequest: the request's headers (Envoy
	// allows 60 KiB by default) and a body buffered by with_request_body.
	Check int `yaml:"check"`
	// ShouldRateLimit is a RateLimitRequest: a few hundred bytes from Envoy.
	ShouldRateLimit int `yaml:"should_rate_limit"`
}

// DefaultGRPCConfig returns the defaults of the grpc section.
func DefaultGRPCConfig() GRPCConfig {
	l := grpcserver.DefaultLimits()
	return GRPCConfig{
		MaxRecvMsgSize:        l.MaxRecvMsgSize,
		MaxConcurrentStreams:  l.MaxConcurrentStreams,
		MaxDecodedBytes:       l.MaxDecodedBytes,
		RateLimitListener:     ListenerLimits{MaxRecvMsgSize: 64 << 10, MaxConcurrentStreams: 100, MaxDecodedBytes: 16 << 20},
		MaxRequestBytes:       MethodLimits{Check: 256 << 10, ShouldRateLimit: 64 << 10},
		InitialWindowSize:     l.InitialWindowSize,
		InitialConnWindowSize: l.InitialConnWindowSize,
		KeepaliveMinTime:      l.KeepaliveMinTime,
		MaxConnectionIdle:     l.MaxConnectionIdle,
		ConnectionTimeout:     l.ConnectionTimeout,
	}
}

// limits returns the server limits of listen.grpc, or of listen.ratelimit.
func (c GRPCConfig) limits(ratelimit bool) grpcserver.Limits {
	l := grpcserver.Limits{
		MaxRecvMsgSize:        c.MaxRecvMsgSize,
		MaxConcurrentStreams:  c.MaxConcurrentStreams,
		MaxDecodedBytes:       c.MaxDecodedBytes,
		InitialWindowSize:     c.InitialWindowSize,
		InitialConnWindowSize: c.InitialConnWindowSize,
		KeepaliveMinTime:      c.KeepaliveMinTime,
		MaxConnectionIdle:     c.MaxConnectionIdle,
		ConnectionTimeout:     c.ConnectionTimeout,
	}
	if ratelimit {
		r := c.RateLimitListener
		l.MaxRecvMsgSize, l.MaxConcurrentStreams, l.MaxDecodedBytes = r.MaxRecvMsgSize, r.MaxConcurrentStreams, r.MaxDecodedBytes
	}
	return l
}

// validate reports every invalid field of the grpc section.
func (c GRPCConfig) validate() []error {
	var errs []error
	size := func(path string, n int) {
		if n < 1<<10 || n > 64<<20 {
			errs = append(errs, fmt.Errorf("%s: must be between 1 KiB and 64 MiB, got %d", path, n))
		}
	}
	streams := func(path string, n uint32) {
		if n < 1 {
			errs = append(errs, fmt.Errorf("%s: must be at least 1, got %d", path, n))
		}
	}
	decoded := func(path string, n int64) {
		if n < 1<<20 || n > 16<<30 {
			errs = append(errs, fmt.Errorf("%s: must be between 1 MiB and 16 GiB, got %d", path, n))
		}
	}
	window := func(path string, n int32) {
		if n != 0 && n < 64<<10 {
			errs = append(errs, fmt.Errorf("%s: must be 0 (grpc-go's dynamic windows) or at least 65536, got %d", path, n))
		}
	}
	size("grpc.max_recv_msg_size", c.MaxRecvMsgSize)
	streams("grpc.max_concurrent_streams", c.MaxConcurrentStreams)
	decoded("grpc.max_decoded_bytes", c.MaxDecodedBytes)
	size("grpc.ratelimit_listener.max_recv_msg_size", c.RateLimitListener.MaxRecvMsgSize)
	streams("grpc.ratelimit_listener.max_concurrent_streams", c.RateLimitListener.MaxConcurrentStreams)
	decoded("grpc.ratelimit_listener.max_decoded_bytes", c.RateLimitListener.MaxDecodedBytes)
	size("grpc.max_request_bytes.check", c.MaxRequestBytes.Check)
	size("grpc.max_request_bytes.should_rate_limit", c.MaxRequestBytes.ShouldRateLimit)
	window("grpc.initial_window_size", c.InitialWindowSize)
	window("grpc.initial_conn_window_size", c.InitialConnWindowSize)
	if c.KeepaliveMinTime <= 0 {
		errs = append(errs, fmt.Errorf("grpc.keepalive_min_time: must be positive, got %s", c.KeepaliveMinTime))
	}
	if c.ConnectionTimeout <= 0 {
		errs = append(errs, fmt.Errorf("grpc.connection_timeout: must be positive, got %s", c.ConnectionTimeout))
	}
	return errs
}

// TLSConfig is the tls section: TLS or mutual TLS per listener, from files
// that are read again when they change. The zero value is plaintext.
type TLSConfig struct {
	// GRPC serves both gRPC listeners (listen.grpc and listen.ratelimit).
	GRPC servertls.Config `yaml:"grpc"`
	// HTTP serves listen.http.
	HTTP servertls.Config `yaml:"http"`
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
		GRPC:        DefaultGRPCConfig(),
		Shutdown:    ShutdownConfig{Timeout: 8 * time.Second},
		Redis:       ratelimitsvc.DefaultRedisConfig(),
		Database:    pgpool.DefaultConfig(),
		Ratelimit:   ratelimitsvc.DefaultConfig(),
		CORS:        extauthz.DefaultCORSConfig(),
		Identity:    extauthz.DefaultIdentityConfig(),
		CSP:         extauthz.DefaultCSPConfig(),
		Audit:       defaultAuditConfig(),
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
		c.Audit.API.AdminToken = secret.String(v)
	}
	if v := getenv("MESHGUARD_AUDIT_KEY"); v != "" {
		c.Audit.Key = secret.String(v)
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
	errs = append(errs, c.GRPC.validate()...)
	errs = append(errs, c.TLS.GRPC.Validate("tls.grpc"), c.TLS.HTTP.Validate("tls.http"))
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
