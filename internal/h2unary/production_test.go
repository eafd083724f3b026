package h2unary_test

import (
	"context"
	"errors"
	"net"
	"testing"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshguard/meshguard/internal/grpcserver"
	"github.com/meshguard/meshguard/internal/h2unary"
)

// TestProductionServer shows that the server as meshguard configures it
// (grpcserver.UnaryServer: its codec, limits and metrics interceptor)
// answers ShouldRateLimit and counts calls by method and code.
func TestProductionServer(t *testing.T) {
	reg := prometheus.NewRegistry()
	srv := grpcserver.UnaryServer(grpcserver.DefaultLimits(), grpcserver.NewMetrics(reg))
	rlsv3.RegisterRateLimitServiceServer(srv, rls{fn: func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		if req.Domain == "deny" {
			return nil, status.Error(codes.PermissionDenied, "denied")
		}
		return echo(ctx, req)
	}})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: srv, addr: lis.Addr().String(), served: make(chan struct{})}
	go func() {
		ts.err = srv.Serve(lis)
		close(ts.served)
	}()
	t.Cleanup(func() {
		srv.GracefulStop()
		<-ts.served
		if !errors.Is(ts.err, h2unary.ErrServerStopped) {
			t.Errorf("Serve: %v", ts.err)
		}
	})
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts))
	for range 3 {
		req := request("prod", "a", "bcd")
		resp, err := client.ShouldRateLimit(t.Context(), req)
		if err == nil {
			err = checkEcho(req, resp)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := client.ShouldRateLimit(t.Context(), request("deny")); status.Code(err) != codes.PermissionDenied {
		t.Errorf("deny: %v", err)
	}

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "meshguard_grpc_server_handled_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["method"] == rlsMethod {
				counts[labels["code"]] = m.GetCounter().GetValue()
			}
		}
	}
	if counts["OK"] != 3 || counts["PermissionDenied"] != 1 {
		t.Errorf("handled_total for %s by code: %v, want OK 3 and PermissionDenied 1", rlsMethod, counts)
	}
}
