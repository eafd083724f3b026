package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/meshguard/meshguard/internal/gctune"
	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/internal/servertls"
	"github.com/meshguard/meshguard/internal/tracing"
	"github.com/meshguard/meshguard/ratelimitsvc"
)

// app is what every component's setup function gets: the process-wide
// logger, registry and configuration, and the shared database pool.
type app struct {
	log *slog.Logger
	reg *prometheus.Registry
	cfg Config
	db  *database // nil when no database is configured
	// tracing is the process's tracer provider (a no-op one when tracing is
	// off), for components that add spans of their own.
	tracing *tracing.Tracing
}

// tracerProvider is what components make their spans with: nil (no
// tracing) in tests that build an app without one.
func (a *app) tracerProvider() trace.TracerProvider {
	if a.tracing == nil {
		return nil
	}
	return a.tracing.TracerProvider()
}

// tracingOptions tune the exporter; tests shorten its batch timeout.
var tracingOptions []tracing.Option

// component is what one package contributes to a serving process.
type component struct {
	name string
	// grpc registers gRPC services.
	grpc func(grpc.ServiceRegistrar)
	// http adds routes to the HTTP listener.
	http func(*http.ServeMux)
	// checks are the dependencies /readyz reports.
	checks []readinessCheck
	// run, if set, does background work until ctx is done.
	run func(ctx context.Context) error
	// shutdown, if set, drains after both listeners have stopped; ctx carries
	// the shutdown deadline.
	shutdown func(ctx context.Context) error
}

// setups lists the components in the order they start; they shut down in
// reverse order.
var setups = []func(ctx context.Context, a *app) (*component, error){
	setupRatelimit,
	setupExtauthz,
	setupAuditsink,
}

func runServe(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "config file (YAML); absent: embedded defaults")
	grpcAddr := fs.String("grpc-addr", "", "gRPC listen address (overrides config and MESHGUARD_GRPC_ADDR)")
	httpAddr := fs.String("http-addr", "", "HTTP listen address (overrides config and MESHGUARD_HTTP_ADDR)")
	rlAddr := fs.String("ratelimit-addr", "", "rate limit listen address (overrides config and MESHGUARD_RATELIMIT_ADDR)")
	logLevel := fs.String("log-level", "", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("serve: unexpected argument %q", fs.Arg(0))
	}
	cfg, err := loadConfig(*configPath, func(k string) string {
		switch {
		case k == "MESHGUARD_GRPC_ADDR" && *grpcAddr != "":
			return *grpcAddr
		case k == "MESHGUARD_HTTP_ADDR" && *httpAddr != "":
			return *httpAddr
		case k == "MESHGUARD_RATELIMIT_ADDR" && *rlAddr != "":
			return *rlAddr
		case k == "MESHGUARD_LOG_LEVEL" && *logLevel != "":
			return *logLevel
		}
		return getenv(k)
	})
	if err != nil {
		return err
	}
	return serve(ctx, cfg, gctune.Apply(getenv), stderr)
}

// serve runs the listeners until ctx is cancelled or one fails, then shuts
// down in order. gc is what gctune set, for the start-up log line.
func serve(ctx context.Context, cfg Config, gc gctune.Settings, logw io.Writer) error {
	s, err := build(ctx, cfg, logw)
	if err != nil {
		return err
	}
	return s.run(ctx, gc)
}

// server is a built meshguard: components set up, services registered,
// listeners bound, nothing served yet.
type server struct {
	log   *slog.Logger
	cfg   Config
	a     *app
	comps []*component

	hs      *health.Server
	grpc    *grpc.Server // listen.grpc: every service
	rl      *grpc.Server // listen.ratelimit: RateLimitService and health; nil when off
	http    *http.Server
	grpcLis net.Listener
	httpLis net.Listener
	rlLis   net.Listener // nil when listen.ratelimit is off
}

// build sets up the components (opening the database first), registers
// their services on the gRPC servers and their routes on the HTTP mux, and
// binds the listeners. On an error it releases what it had set up.
func build(ctx context.Context, cfg Config, logw io.Writer) (_ *server, err error) {
	log := newLogger(cfg.Log, cfg.Development(), logw)
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		newBuildInfo(),
	)
	s := &server{log: log, cfg: cfg, a: &app{log: log, reg: reg, cfg: cfg}}
	if s.a.tracing, err = tracing.New(ctx, cfg.Tracing, version, tracingOptions...); err != nil {
		return nil, err
	}
	if s.a.db, err = openDatabase(ctx, s.a); err != nil {
		s.a.tracing.Shutdown(ctx)
		return nil, err
	}
	defer func() {
		if err != nil {
			s.closeListeners()
			s.closeComponents(ctx)
		}
	}()
	for _, setup := range setups {
		c, err := setup(ctx, s.a)
		if err != nil {
			return nil, err
		}
		s.comps = append(s.comps, c)
	}

	metrics := grpcserver.NewMetrics(reg)
	tlsm := servertls.NewMetrics(reg)
	// Per-server options beyond the limits: TLS credentials, tracing.
	extra := s.a.tracing.ServerOptions()
	if cfg.TLS.GRPC.Enabled() {
		src, err := servertls.New(log, tlsm, "grpc", cfg.TLS.GRPC, "h2")
		if err != nil {
			return nil, err
		}
		extra = append(extra, grpc.Creds(credentials.NewTLS(src.Config())))
	}
	bounds := methodBounds(cfg.GRPC)
	s.grpc = grpcserver.New(cfg.GRPC.limits(false), metrics, extra...)
	grpcReg := grpcserver.NewGuard("grpc", cfg.GRPC.limits(false), metrics, bounds).Wrap(s.grpc)
	s.hs = health.NewServer()
	healthpb.RegisterHealthServer(grpcReg, s.hs)
	reflection.Register(grpcReg)
	// The rate limit listener: a second server with its own limits that
	// serves ShouldRateLimit and health checks alone, so that rate limit
	// calls do not share connections and stream limits with ext_authz.
	var rlReg grpcserver.Registrar
	if cfg.Listen.RateLimit != "" {
		s.rl = grpcserver.New(cfg.GRPC.limits(true), metrics, extra...)
		rlReg = grpcserver.NewGuard("ratelimit", cfg.GRPC.limits(true), metrics, bounds).Wrap(s.rl)
		healthpb.RegisterHealthServer(rlReg, s.hs)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	// The gRPC health status over HTTP, for readiness probes that cannot
	// reach the gRPC listeners: the kubelet's gRPC probe speaks no TLS.
	mux.HandleFunc("GET /healthz/grpc", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		resp, err := s.hs.Check(r.Context(), &healthpb.HealthCheckRequest{})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, "not serving\n")
			return
		}
		io.WriteString(w, "serving\n")
	})
	var checks []readinessCheck
	for _, c := range s.comps {
		if c.grpc != nil {
			c.grpc(grpcReg)
			if s.rl != nil {
				c.grpc(only{rlReg, rlsv3.RateLimitService_ServiceDesc.ServiceName})
			}
		}
		if c.http != nil {
			c.http(mux)
		}
		checks = append(checks, c.checks...)
	}
	if s.a.db != nil {
		checks = append(checks, s.a.db.check())
	}
	mux.Handle("GET /readyz", newReadyHandler(checks))
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg, EnableOpenMetrics: true}))
	for svc := range s.grpc.GetServiceInfo() {
		s.hs.SetServingStatus(svc, healthpb.HealthCheckResponse_SERVING)
	}
	s.hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.http = &http.Server{
		Handler:           servertls.WithPeer(mux),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      5 * time.Minute, // exports stream for a while
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	if cfg.TLS.HTTP.Enabled() {
		// Probes and Prometheus speak HTTP/1.1; browsers' CSP reports
		// arrive through Envoy.
		src, err := servertls.New(log, tlsm, "http", cfg.TLS.HTTP, "h2", "http/1.1")
		if err != nil {
			return nil, err
		}
		s.http.TLSConfig = src.Config()
	}

	if s.grpcLis, err = net.Listen("tcp", cfg.Listen.GRPC); err != nil {
		return nil, fmt.Errorf("listening for gRPC on %s: %w", cfg.Listen.GRPC, err)
	}
	if s.httpLis, err = net.Listen("tcp", cfg.Listen.HTTP); err != nil {
		return nil, fmt.Errorf("listening for HTTP on %s: %w", cfg.Listen.HTTP, err)
	}
	if s.rl != nil {
		if s.rlLis, err = net.Listen("tcp", cfg.Listen.RateLimit); err != nil {
			return nil, fmt.Errorf("listening for rate limit calls on %s: %w", cfg.Listen.RateLimit, err)
		}
	}
	return s, nil
}

// run serves every listener and the components' background work until ctx
// is cancelled or one of them fails, then shuts down.
func (s *server) run(ctx context.Context, gc gctune.Settings) error {
	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBG()
	var serving, background sync.WaitGroup
	errc := make(chan error, 3+len(s.comps))
	start := func(wg *sync.WaitGroup, name string, f func() error) {
		wg.Go(func() {
			if err := f(); err != nil {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		})
	}
	start(&serving, "gRPC server", func() error { return s.grpc.Serve(s.grpcLis) })
	if s.rl != nil {
		start(&serving, "rate limit server", func() error { return s.rl.Serve(s.rlLis) })
	}
	start(&serving, "HTTP server", func() error {
		var err error
		if s.http.TLSConfig != nil {
			err = s.http.ServeTLS(s.httpLis, "", "") // certificates from TLSConfig
		} else {
			err = s.http.Serve(s.httpLis)
		}
		if !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	for _, c := range s.comps {
		if c.run != nil {
			start(&background, c.name, func() error {
				if err := c.run(bg); bg.Err() == nil {
					return err
				}
				return nil
			})
		}
	}
	s.log.Info("meshguard serving", "version", version, "environment", s.cfg.Environment,
		"grpc_addr", s.grpcLis.Addr().String(), "http_addr", s.httpLis.Addr().String(), "ratelimit_addr", addrOf(s.rlLis),
		"grpc_tls", tlsMode(s.cfg.TLS.GRPC), "http_tls", tlsMode(s.cfg.TLS.HTTP),
		"gogc", gc.GCPercent, "gomemlimit_bytes", gc.MemoryLimit)

	var runErr error
	select {
	case <-ctx.Done():
		s.log.Info("shutting down", "drain_delay", s.cfg.Shutdown.DrainDelay, "timeout", s.cfg.Shutdown.Timeout)
		runErr = s.drain(errc)
	case runErr = <-errc:
		s.log.Error("stopping after a fatal error", "err", runErr)
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.Shutdown.Timeout)
	defer cancel()
	s.shutdown(sctx)
	serving.Wait()
	stopBG()
	background.Wait()
	s.closeComponents(sctx)
	s.log.Info("meshguard stopped")
	return runErr
}

// drain turns the health checks NOT_SERVING and keeps serving for
// shutdown.drain_delay, so that Envoy (its health checks of the meshguard
// clusters) and Kubernetes (the gRPC readiness probe) take this replica out
// before any connection closes. A listener that fails meanwhile ends it.
func (s *server) drain(errc <-chan error) error {
	s.hs.Shutdown()
	if s.cfg.Shutdown.DrainDelay <= 0 {
		return nil
	}
	t := time.NewTimer(s.cfg.Shutdown.DrainDelay)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case err := <-errc:
		s.log.Error("stopping after a fatal error", "err", err)
		return err
	}
}

// shutdown stops accepting and drains in-flight RPCs, streams and HTTP
// requests until ctx's deadline, then closes what is left. Health checks
// answer NOT_SERVING meanwhile.
func (s *server) shutdown(ctx context.Context) {
	s.hs.Shutdown()
	var grpcs []*grpc.Server
	for _, gs := range []*grpc.Server{s.grpc, s.rl} {
		if gs != nil {
			grpcs = append(grpcs, gs)
		}
	}
	var drained sync.WaitGroup
	for _, gs := range grpcs {
		drained.Go(gs.GracefulStop)
	}
	stopped := make(chan struct{})
	go func() {
		drained.Wait()
		close(stopped)
	}()
	if err := s.http.Shutdown(ctx); err != nil {
		s.http.Close()
	}
	select {
	case <-stopped:
	case <-ctx.Done():
		s.log.Warn("gRPC drain deadline passed; closing remaining streams")
		for _, gs := range grpcs {
			gs.Stop()
		}
		<-stopped
	}
}

// closeComponents drains the components, last started first, then closes
// the database.
func (s *server) closeComponents(ctx context.Context) {
	for i := len(s.comps) - 1; i >= 0; i-- {
		if c := s.comps[i]; c.shutdown != nil {
			if err := c.shutdown(ctx); err != nil {
				s.log.Error("shutdown failed", "component", c.name, "err", err)
			}
		}
	}
	if s.a.db != nil {
		s.a.db.close()
	}
	if err := s.a.tracing.Shutdown(ctx); err != nil {
		s.log.Warn("flushing traces failed", "err", err)
	}
}

// closeListeners closes the listeners build bound, when it fails later.
func (s *server) closeListeners() {
	for _, l := range []net.Listener{s.grpcLis, s.httpLis, s.rlLis} {
		if l != nil {
			l.Close()
		}
	}
}

// maxCheckHeaders caps the headers of an ext_authz check (either form,
// headers or header_map). Envoy forwards at most its max_headers_count
// (100 by default and in envoy.yaml) plus the few it adds; a check with
// thousands of tiny headers fits the size limits yet costs milliseconds
// of CPU and a map entry each to decode and inspect.
const maxCheckHeaders = 512

// methodBounds bounds the requests of Envoy's two unary methods below their
// listener's message limit: ext_authz checks, whose headers are capped, and
// rate limit requests, whose descriptors and entries ratelimitsvc caps.
func methodBounds(c GRPCConfig) map[string]grpcserver.MethodBounds {
	checkCaps := map[protoreflect.FullName]int{
		(&authv3.AttributeContext_HttpRequest{}).ProtoReflect().Descriptor().Fields().ByName("headers").FullName(): maxCheckHeaders,
		(&corev3.HeaderMap{}).ProtoReflect().Descriptor().Fields().ByName("headers").FullName():                    maxCheckHeaders,
	}
	return map[string]grpcserver.MethodBounds{
		authv3.Authorization_Check_FullMethodName:             {MaxBytes: c.MaxRequestBytes.Check, Caps: checkCaps},
		rlsv3.RateLimitService_ShouldRateLimit_FullMethodName: {MaxBytes: c.MaxRequestBytes.ShouldRateLimit, Caps: ratelimitsvc.RequestCaps()},
	}
}

// only registers the named service and drops the rest: the rate limit
// listener serves the rate limit service of the component that has it.
type only struct {
	r       grpc.ServiceRegistrar
	service string
}

func (o only) RegisterService(desc *grpc.ServiceDesc, impl any) {
	if desc.ServiceName == o.service {
		o.r.RegisterService(desc, impl)
	}
}

// tlsMode names a listener's transport security for the start-up line.
func tlsMode(c servertls.Config) string {
	switch {
	case !c.Enabled():
		return "plaintext"
	case c.ClientCAFile == "":
		return "tls"
	case c.ClientAuth == "verify_if_given":
		return "mtls_if_given"
	}
	return "mtls"
}

// addrOf is l's address, or "" for no listener.
func addrOf(l net.Listener) string {
	if l == nil {
		return ""
	}
	return l.Addr().String()
}

// newBuildInfo exports meshguard_build_info{version,goversion} = 1.
func newBuildInfo() prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshguard_build_info",
		Help: "Build of the running meshguard; the value is always 1.",
	}, []string{"version"})
	g.WithLabelValues(version).Set(1)
	return g
}
