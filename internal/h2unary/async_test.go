package h2unary_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshguard/meshguard/internal/h2unary"
)

// countingTracker counts an async method's calls as Track asks.
type countingTracker struct {
	begun, ended atomic.Int64
	failed       atomic.Int64
}

func (c *countingTracker) Begin() { c.begun.Add(1) }
func (c *countingTracker) End(_ time.Time, err error) {
	c.ended.Add(1)
	if err != nil {
		c.failed.Add(1)
	}
}

// asyncEcho registers ShouldRateLimit as an asynchronous handler that
// answers like echo, at once for domain "now", with an error for "deny",
// and otherwise from another goroutine after a short wait; each call's
// context is sent on ctxs when non-nil.
func asyncEcho(ctxs chan<- context.Context) func(*h2unary.Server) {
	return func(s *h2unary.Server) {
		s.RegisterAsync(rlsMethod, func(ctx context.Context, dec func(any) error, reply func(any, error)) {
			req := new(rlsv3.RateLimitRequest)
			if err := dec(req); err != nil {
				reply(nil, err)
				return
			}
			if ctxs != nil {
				ctxs <- ctx
			}
			switch req.Domain {
			case "now":
				reply(echo(ctx, req))
			case "deny":
				reply(nil, status.Error(codes.PermissionDenied, "denied"))
			case "hold":
				go func() {
					<-ctx.Done()
					reply(echo(ctx, req))
				}()
			default:
				go func() {
					time.Sleep(time.Millisecond)
					reply(echo(ctx, req))
				}()
			}
		})
	}
}

// TestAsyncHandler: an asynchronous handler answering at once, later from
// another goroutine, or with an error, gives every concurrent caller its
// own answer, and Track counts each call once.
func TestAsyncHandler(t *testing.T) {
	tr := &countingTracker{}
	ts := startServer(t, h2unary.Options{Track: func(m string) h2unary.Tracker {
		if m != rlsMethod {
			t.Errorf("Track(%q)", m)
		}
		return tr
	}}, nil, asyncEcho(nil))
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts))
	var wg sync.WaitGroup
	const goroutines, each = 16, 50
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				domain := [...]string{"now", "later", "deny"}[(g+i)%3]
				req := request(domain, "v", string(rune('a'+g)), string(rune('a'+i%26)))
				resp, err := client.ShouldRateLimit(t.Context(), req)
				if domain == "deny" {
					if status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != "denied" {
						t.Errorf("deny: %v", err)
					}
					continue
				}
				if err != nil {
					t.Errorf("%s: %v", domain, err)
					continue
				}
				if err := checkEcho(req, resp); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if b, e := tr.begun.Load(), tr.ended.Load(); b != goroutines*each || e != b {
		t.Errorf("tracker: %d begun, %d ended, want %d each", b, e, goroutines*each)
	}
	if f := tr.failed.Load(); f == 0 || f >= goroutines*each/2 {
		t.Errorf("tracker: %d failed calls, want the denied third", f)
	}
}

// TestAsyncReplyAfterCancel: a client that gives up cancels the call's
// context; the handler's later reply goes nowhere and the connection keeps
// serving.
func TestAsyncReplyAfterCancel(t *testing.T) {
	ctxs := make(chan context.Context, 1)
	ts := startServer(t, h2unary.Options{}, nil, asyncEcho(ctxs))
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts))
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		_, err := client.ShouldRateLimit(ctx, request("hold", "v"))
		errc <- err
	}()
	var hctx context.Context
	select {
	case hctx = <-ctxs:
	case <-time.After(5 * time.Second):
		t.Fatal("handler not called")
	}
	cancel()
	select {
	case <-hctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the handler's context was not cancelled")
	}
	if err := <-errc; status.Code(err) != codes.Canceled {
		t.Errorf("cancelled call: %v", err)
	}
	// The handler has replied into a reset stream; the next call works.
	resp, err := client.ShouldRateLimit(t.Context(), request("now", "v"))
	if err != nil || len(resp.GetStatuses()) != 1 {
		t.Fatalf("after a reset: %v, %v", resp, err)
	}
	<-ctxs
}

// TestAsyncGracefulStop: GracefulStop waits for an asynchronous call that
// has not been answered yet.
func TestAsyncGracefulStop(t *testing.T) {
	release := make(chan struct{})
	ts := startServer(t, h2unary.Options{}, nil, func(s *h2unary.Server) {
		s.RegisterAsync(rlsMethod, func(ctx context.Context, dec func(any) error, reply func(any, error)) {
			req := new(rlsv3.RateLimitRequest)
			if err := dec(req); err != nil {
				reply(nil, err)
				return
			}
			go func() {
				<-release
				reply(echo(ctx, req))
			}()
		})
	})
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts))
	errc := make(chan error, 1)
	go func() {
		_, err := client.ShouldRateLimit(t.Context(), request("d", "v"))
		errc <- err
	}()
	time.Sleep(100 * time.Millisecond) // the call is in the handler
	stopped := make(chan struct{})
	go func() {
		ts.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
		t.Fatal("GracefulStop returned with a call unanswered")
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-errc; err != nil {
		t.Errorf("call in flight at GracefulStop: %v", err)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("GracefulStop did not return after the last answer")
	}
	if _, err := client.ShouldRateLimit(t.Context(), request("d", "v")); err == nil {
		t.Error("a call after GracefulStop succeeded")
	} else if !errors.Is(err, context.Canceled) && status.Code(err) != codes.Unavailable {
		t.Logf("after GracefulStop: %v", err)
	}
}
