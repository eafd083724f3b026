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

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/meshguard/meshguard/internal/gctune"
	"github.com/meshguard/meshguard/internal/grpcserver"
)

// app is what every component's setup function gets: the process-wide
// logger, registry and configuration, and the shared database pool.
type app struct {
	log *slog.Logger
	reg *prometheus.Registry
	cfg Config
	db  *database // nil when no database is configured
}

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

// serve runs both listeners until ctx is cancelled, then shuts down in order:
// stop accepting, drain in-flight RPCs and streams within the deadline, drain
// components, close the database.
// gc is what gctune set, for the start-up log line.
func serve(ctx context.Context, cfg Config, gc gctune.Settings, logw io.Writer) error {
	log := newLogger(cfg.Log, cfg.Development(), logw)
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		newBuildInfo(),
	)
	a := &app{log: log, reg: reg, cfg: cfg}

	db, err := openDatabase(ctx, a)
	if err != nil {
		return err
	}
	a.db = db

	var comps []*component
	closeAll := func(ctx context.Context) {
		for i := len(comps) - 1; i >= 0; i-- {
			if c := comps[i]; c.shutdown != nil {
				if err := c.shutdown(ctx); err != nil {
					log.Error("shutdown failed", "component", c.name, "err", err)
				}
			}
		}
		if a.db != nil {
			a.db.close()
		}
	}
	for _, setup := range setups {
		c, err := setup(ctx, a)
		if err != nil {
			closeAll(ctx)
			return err
		}
		comps = append(comps, c)
	}

	metrics := grpcserver.NewMetrics(reg)
	gs := grpcserver.New(cfg.GRPC, metrics)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	// The rate limit listener: a second server with the same options that
	// serves ShouldRateLimit and health checks alone, so that rate limit
	// calls do not share connections and stream limits with ext_authz.
	var us *grpc.Server
	if cfg.Listen.RateLimit != "" {
		us = grpcserver.New(cfg.GRPC, metrics)
		healthpb.RegisterHealthServer(us, hs)
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	var checks []readinessCheck
	for _, c := range comps {
		if c.grpc != nil {
			c.grpc(gs)
			if us != nil {
				c.grpc(only{us, rlsv3.RateLimitService_ServiceDesc.ServiceName})
			}
		}
		if c.http != nil {
			c.http(mux)
		}
		checks = append(checks, c.checks...)
	}
	if a.db != nil {
		checks = append(checks, a.db.check())
	}
	mux.Handle("GET /readyz", newReadyHandler(checks))
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg, EnableOpenMetrics: true}))
	for svc := range gs.GetServiceInfo() {
		hs.SetServingStatus(svc, healthpb.HealthCheckResponse_SERVING)
	}
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)

	gl, err := net.Listen("tcp", cfg.Listen.GRPC)
	if err != nil {
		closeAll(ctx)
		return fmt.Errorf("listening for gRPC on %s: %w", cfg.Listen.GRPC, err)
	}
	hl, err := net.Listen("tcp", cfg.Listen.HTTP)
	if err != nil {
		gl.Close()
		closeAll(ctx)
		return fmt.Errorf("listening for HTTP on %s: %w", cfg.Listen.HTTP, err)
	}
	var rl net.Listener
	if us != nil {
		if rl, err = net.Listen("tcp", cfg.Listen.RateLimit); err != nil {
			gl.Close()
			hl.Close()
			closeAll(ctx)
			return fmt.Errorf("listening for rate limit calls on %s: %w", cfg.Listen.RateLimit, err)
		}
	}
	httpSrv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      5 * time.Minute, // exports stream for a while
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}

	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBG()
	var wg sync.WaitGroup
	errc := make(chan error, 3+len(comps))
	if rl != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := us.Serve(rl); err != nil {
				errc <- fmt.Errorf("rate limit server: %w", err)
			}
		}()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := gs.Serve(gl); err != nil {
			errc <- fmt.Errorf("gRPC server: %w", err)
		}
	}()
	go func() {
		defer wg.Done()
		if err := httpSrv.Serve(hl); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("HTTP server: %w", err)
		}
	}()
	var bgwg sync.WaitGroup
	for _, c := range comps {
		if c.run == nil {
			continue
		}
		bgwg.Add(1)
		go func() {
			defer bgwg.Done()
			if err := c.run(bg); err != nil && bg.Err() == nil {
				errc <- fmt.Errorf("%s: %w", c.name, err)
			}
		}()
	}
	log.Info("meshguard serving", "version", version, "environment", cfg.Environment,
		"grpc_addr", gl.Addr().String(), "http_addr", hl.Addr().String(), "ratelimit_addr", addrOf(rl),
		"gogc", gc.GCPercent, "gomemlimit_bytes", gc.MemoryLimit)

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down", "timeout", cfg.Shutdown.Timeout)
	case runErr = <-errc:
		log.Error("stopping after a fatal error", "err", runErr)
	}

	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.Shutdown.Timeout)
	defer cancel()
	hs.Shutdown() // health answers NOT_SERVING while we drain
	stopped := make(chan struct{})
	go func() {
		var drain sync.WaitGroup
		if us != nil {
			drain.Add(1)
			go func() {
				defer drain.Done()
				us.GracefulStop()
			}()
		}
		gs.GracefulStop()
		drain.Wait()
		close(stopped)
	}()
	if err := httpSrv.Shutdown(sctx); err != nil {
		httpSrv.Close()
	}
	select {
	case <-stopped:
	case <-sctx.Done():
		log.Warn("gRPC drain deadline passed; closing remaining streams")
		if us != nil {
			us.Stop()
		}
		gs.Stop()
		<-stopped
	}
	wg.Wait()
	stopBG()
	bgwg.Wait()
	closeAll(sctx)
	log.Info("meshguard stopped")
	return runErr
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
