package h2unary_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	_ "google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/meshguard/meshguard/internal/h2unary"
)

// TestConcurrentRoundTrips shows that many concurrent calls on one
// connection each get the answer to their own request.
func TestConcurrentRoundTrips(t *testing.T) {
	ts := startServer(t, h2unary.Options{}, echo)
	var dials dialCounter
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts, dials.option()))
	const goroutines, calls = 64, 200
	var wg sync.WaitGroup
	errc := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			for i := range calls {
				values := make([]string, 1+(g+i)%3)
				for k := range values {
					values[k] = strings.Repeat("v", (g*7+i*3+k)%97)
				}
				req := request(fmt.Sprintf("g%d-c%d", g, i), values...)
				ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
				resp, err := client.ShouldRateLimit(ctx, req)
				cancel()
				if err == nil {
					err = checkEcho(req, resp)
				}
				if err != nil {
					errc <- fmt.Errorf("goroutine %d call %d: %w", g, i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	dials.check(t)
}

// TestHandlerErrors shows that a handler's error reaches the client with
// its code and exact message, however the message must be encoded.
func TestHandlerErrors(t *testing.T) {
	long := strings.Repeat("é長%\n", 8000) // 72 KB encoded: needs CONTINUATION frames
	cases := []struct {
		err  error
		code codes.Code
		msg  string
	}{
		{status.Error(codes.PermissionDenied, "plain ascii"), codes.PermissionDenied, "plain ascii"},
		{status.Error(codes.Aborted, "50% off, %41 is not A"), codes.Aborted, "50% off, %41 is not A"},
		{status.Error(codes.InvalidArgument, "100% sûr: ünïcödé ✓, %41 stays, tab\tnewline\n"), codes.InvalidArgument, "100% sûr: ünïcödé ✓, %41 stays, tab\tnewline\n"},
		{status.Error(codes.ResourceExhausted, long), codes.ResourceExhausted, long},
		{status.Error(codes.NotFound, ""), codes.NotFound, ""},
		{errors.New("not a status"), codes.Unknown, "not a status"},
		{fmt.Errorf("wrapped: %w", context.Canceled), codes.Canceled, "wrapped: context canceled"},
		{status.Error(codes.Code(42), "custom code"), codes.Code(42), "custom code"},
	}
	ts := startServer(t, h2unary.Options{}, func(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		var i int
		fmt.Sscan(req.Domain, &i)
		return nil, cases[i].err
	})
	var dials dialCounter
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts, dials.option()))
	defer dials.check(t)
	for i, c := range cases {
		_, err := client.ShouldRateLimit(t.Context(), request(fmt.Sprint(i)))
		st, ok := status.FromError(err)
		if !ok {
			t.Errorf("case %d: %v is not a status", i, err)
			continue
		}
		if st.Code() != c.code || st.Message() != c.msg {
			got := st.Message()
			if len(got) > 80 {
				got = got[:80] + "…"
			}
			t.Errorf("case %d: got %v %q (%d bytes), want %v (%d bytes)", i, st.Code(), got, len(st.Message()), c.code, len(c.msg))
		}
	}
}

// TestDeadline shows that a client's timeout becomes the handler's
// context deadline, that the handler's context ends, and that the client
// gets DEADLINE_EXCEEDED.
func TestDeadline(t *testing.T) {
	type seen struct {
		left  time.Duration // time to the deadline when the handler started
		hasDL bool
		err   error // the context's error once done
	}
	seenc := make(chan seen, 1)
	ts := startServer(t, h2unary.Options{}, func(ctx context.Context, _ *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		dl, ok := ctx.Deadline()
		left := time.Until(dl)
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Second):
		}
		// The server's timer or the client's RST_STREAM, whichever is first.
		seenc <- seen{left, ok, ctx.Err()}
		return nil, ctx.Err()
	})
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts))
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	_, err := client.ShouldRateLimit(ctx, request("d"))
	if status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("client got %v, want DeadlineExceeded", err)
	}
	select {
	case s := <-seenc:
		if !s.hasDL || s.left <= 0 || s.left > 50*time.Millisecond {
			t.Errorf("handler's deadline: %v in %v; want one within the client's 50ms", s.hasDL, s.left)
		}
		if s.err == nil {
			t.Errorf("handler's context did not end")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler's context did not end within 5s of a 50ms deadline")
	}
}

// TestClientCancel shows that a client cancelling its call (RST_STREAM)
// cancels the handler's context.
func TestClientCancel(t *testing.T) {
	started := make(chan struct{})
	ended := make(chan error, 1)
	ts := startServer(t, h2unary.Options{}, func(ctx context.Context, _ *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		if _, ok := ctx.Deadline(); ok {
			t.Errorf("handler has a deadline; the client set none")
		}
		close(started)
		select {
		case <-ctx.Done():
			ended <- ctx.Err()
		case <-time.After(10 * time.Second):
			ended <- nil
		}
		return nil, ctx.Err()
	})
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts))
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		_, err := client.ShouldRateLimit(ctx, request("d"))
		errc <- err
	}()
	<-started
	cancel()
	if err := <-errc; status.Code(err) != codes.Canceled {
		t.Errorf("client got %v, want Canceled", err)
	}
	if err := <-ended; !errors.Is(err, context.Canceled) {
		t.Errorf("handler's context ended with %v, want context.Canceled", err)
	}
}

// TestUnimplemented shows that unknown methods and streaming methods get
// UNIMPLEMENTED while the unary methods of the same service are served.
func TestUnimplemented(t *testing.T) {
	hs := health.NewServer()
	ts := startServer(t, h2unary.Options{}, echo, func(s *h2unary.Server) { healthpb.RegisterHealthServer(s, hs) })
	var dials dialCounter
	cc := dial(t, ts, dials.option())
	defer dials.check(t)

	methods := ts.Methods()
	slices.Sort(methods)
	want := []string{rlsMethod, "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List"}
	slices.Sort(want)
	if !slices.Equal(methods, want) {
		t.Errorf("Methods() = %v, want %v", methods, want)
	}

	hc := healthpb.NewHealthClient(cc)
	resp, err := hc.Check(t.Context(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check: %v, %v; want SERVING", resp, err)
	}

	w, err := hc.Watch(t.Context(), &healthpb.HealthCheckRequest{})
	if err == nil {
		_, err = w.Recv()
	}
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("streaming Watch: %v, want Unimplemented", err)
	}

	var out rlsv3.RateLimitResponse
	err = cc.Invoke(t.Context(), "/envoy.service.ratelimit.v3.RateLimitService/NoSuchMethod", request("d"), &out)
	if status.Code(err) != codes.Unimplemented || !strings.Contains(status.Convert(err).Message(), "NoSuchMethod") {
		t.Errorf("unknown method: %v, want Unimplemented naming the method", err)
	}
	err = cc.Invoke(t.Context(), "/no.such.Service/M", request("d"), &out)
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("unknown service: %v, want Unimplemented", err)
	}

	// The connection still serves.
	if _, err := rlsv3.NewRateLimitServiceClient(cc).ShouldRateLimit(t.Context(), request("d")); err != nil {
		t.Errorf("call after the unimplemented ones: %v", err)
	}
}

// largeRequest returns a request whose encoding is exactly size bytes.
func largeRequest(t *testing.T, size int) *rlsv3.RateLimitRequest {
	req := request("big", "")
	for n := size; ; {
		req.Descriptors[0].Entries[0].Value = strings.Repeat("x", n)
		got := proto.Size(req)
		if got == size {
			return req
		}
		if n += size - got; n < 0 {
			t.Fatalf("cannot build a %d-byte request", size)
		}
	}
}

// TestLargeRequest shows that a request of exactly MaxRecvMsgSize, which
// needs many WINDOW_UPDATEs, is served; that one byte more gets
// RESOURCE_EXHAUSTED naming the limit; and that the connection stays
// usable.
func TestLargeRequest(t *testing.T) {
	const limit = 8 << 20
	ts := startServer(t, h2unary.Options{MaxRecvMsgSize: limit}, echo)
	var dials dialCounter
	cc := dial(t, ts, dials.option())
	defer dials.check(t)
	client := rlsv3.NewRateLimitServiceClient(cc)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	for _, size := range []int{5 << 20, limit} {
		req := largeRequest(t, size)
		resp, err := client.ShouldRateLimit(ctx, req)
		if err != nil {
			t.Fatalf("%d-byte request: %v", size, err)
		}
		if err := checkEcho(req, resp); err != nil {
			t.Errorf("%d-byte request: %v", size, err)
		}
	}

	for _, size := range []int{limit + 1, 9 << 20} {
		_, err := client.ShouldRateLimit(ctx, largeRequest(t, size))
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(status.Convert(err).Message(), fmt.Sprint(limit)) {
			t.Errorf("%d-byte request: %v; want ResourceExhausted naming %d", size, err, limit)
		}
	}

	req := request("after", "v")
	resp, err := client.ShouldRateLimit(ctx, req)
	if err == nil {
		err = checkEcho(req, resp)
	}
	if err != nil {
		t.Errorf("call after the refused ones: %v", err)
	}
}

// TestLargeResponse shows that responses larger than the client's stream
// and connection windows and than a frame arrive intact: the rest of a
// response waits for WINDOW_UPDATEs.
func TestLargeResponse(t *testing.T) {
	body := func(domain string) []byte {
		b := make([]byte, 1<<20+123)
		for i := range b {
			b[i] = domain[i%len(domain)] + byte(i/len(domain))
		}
		return b
	}
	ts := startServer(t, h2unary.Options{}, func(_ context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		return &rlsv3.RateLimitResponse{RawBody: body(req.Domain)}, nil
	})
	for _, tc := range []struct {
		name string
		opts []grpc.DialOption
	}{
		{"default windows", nil}, // 64 KiB windows that grow by BDP estimation
		{"small windows", []grpc.DialOption{grpc.WithInitialWindowSize(65535), grpc.WithInitialConnWindowSize(65535)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var dials dialCounter
			client := rlsv3.NewRateLimitServiceClient(dial(t, ts, append(tc.opts, dials.option())...))
			defer dials.check(t)
			var wg sync.WaitGroup
			for g := range 4 {
				wg.Go(func() {
					for i := range 3 {
						domain := fmt.Sprintf("g%d-i%d", g, i)
						ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
						resp, err := client.ShouldRateLimit(ctx, request(domain))
						cancel()
						if err != nil {
							t.Errorf("%s: %v", domain, err)
							return
						}
						if !bytes.Equal(resp.RawBody, body(domain)) {
							t.Errorf("%s: raw_body of %d bytes differs from the %d sent", domain, len(resp.RawBody), len(body(domain)))
						}
					}
				})
			}
			wg.Wait()
		})
	}
}

// TestCompressedRequest shows that a compressed call gets UNIMPLEMENTED.
func TestCompressedRequest(t *testing.T) {
	ts := startServer(t, h2unary.Options{}, echo)
	var dials dialCounter
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts, dials.option()))
	defer dials.check(t)
	_, err := client.ShouldRateLimit(t.Context(), request("d", "v"), grpc.UseCompressor("gzip"))
	if status.Code(err) != codes.Unimplemented || !strings.Contains(status.Convert(err).Message(), "gzip") {
		t.Errorf("gzip call: %v, want Unimplemented naming gzip", err)
	}
	if _, err := client.ShouldRateLimit(t.Context(), request("d", "v")); err != nil {
		t.Errorf("uncompressed call: %v", err)
	}
}

// TestMaxConcurrentStreams shows that a connection runs at most
// MaxConcurrentStreams handlers at once, and that calls beyond it still
// complete.
func TestMaxConcurrentStreams(t *testing.T) {
	var running, peak atomic.Int32
	both := make(chan struct{})
	var bothOnce sync.Once
	ts := startServer(t, h2unary.Options{MaxConcurrentStreams: 2}, func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		n := running.Add(1)
		defer running.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		if n == 2 {
			bothOnce.Do(func() { close(both) })
		}
		// Hold the slot until two handlers run (the limit is reachable) and
		// a little more, so that a third would overlap if admitted.
		select {
		case <-both:
		case <-time.After(5 * time.Second):
		}
		time.Sleep(20 * time.Millisecond)
		return echo(ctx, req)
	})
	var dials dialCounter
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts, dials.option()))
	defer dials.check(t)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			req := request(fmt.Sprint(i), "v")
			resp, err := client.ShouldRateLimit(ctx, req)
			if err == nil {
				err = checkEcho(req, resp)
			}
			if err != nil {
				t.Errorf("call %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if p := peak.Load(); p != 2 {
		t.Errorf("at most %d handlers ran at once, want 2", p)
	}
}

// TestGracefulStop shows that GracefulStop lets a call in flight finish,
// returns after it, makes Serve return ErrServerStopped, and that later
// calls fail.
func TestGracefulStop(t *testing.T) {
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	ts := startServer(t, h2unary.Options{}, func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		if req.Domain == "slow" {
			started <- struct{}{}
			<-release
		}
		return echo(ctx, req)
	})
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts))
	if _, err := client.ShouldRateLimit(t.Context(), request("warm-up")); err != nil {
		t.Fatal(err)
	}

	callErr := make(chan error, 1)
	go func() {
		req := request("slow", "abc")
		resp, err := client.ShouldRateLimit(t.Context(), req)
		if err == nil {
			err = checkEcho(req, resp)
		}
		callErr <- err
	}()
	<-started
	stopped := make(chan struct{})
	go func() {
		ts.GracefulStop()
		close(stopped)
	}()
	select {
	case <-ts.served:
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after GracefulStop")
	}
	if !errors.Is(ts.err, h2unary.ErrServerStopped) {
		t.Errorf("Serve returned %v, want ErrServerStopped", ts.err)
	}
	select {
	case <-stopped:
		t.Fatal("GracefulStop returned with a call in flight")
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if err := <-callErr; err != nil {
		t.Errorf("call in flight: %v", err)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("GracefulStop did not return after the last call")
	}

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if _, err := client.ShouldRateLimit(ctx, request("late")); status.Code(err) != codes.Unavailable {
		t.Errorf("call after GracefulStop: %v, want Unavailable", err)
	}
	lis, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.Serve(lis); !errors.Is(err, h2unary.ErrServerStopped) {
		t.Errorf("Serve after GracefulStop: %v, want ErrServerStopped", err)
	}
}

// TestStop shows that Stop cancels the contexts of handlers still running
// and fails their calls.
func TestStop(t *testing.T) {
	started := make(chan struct{})
	ended := make(chan error, 1)
	ts := startServer(t, h2unary.Options{}, func(ctx context.Context, _ *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		close(started)
		select {
		case <-ctx.Done():
			ended <- ctx.Err()
		case <-time.After(10 * time.Second):
			ended <- nil
		}
		return nil, ctx.Err()
	})
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts))
	callErr := make(chan error, 1)
	go func() {
		_, err := client.ShouldRateLimit(t.Context(), request("d"))
		callErr <- err
	}()
	<-started
	ts.Stop()
	if err := <-ended; err == nil {
		t.Error("handler's context not cancelled by Stop")
	}
	if err := <-callErr; status.Code(err) != codes.Unavailable {
		t.Errorf("call in flight at Stop: %v, want Unavailable", err)
	}
	<-ts.served
	if !errors.Is(ts.err, h2unary.ErrServerStopped) {
		t.Errorf("Serve returned %v, want ErrServerStopped", ts.err)
	}
}

// TestMaxConnectionIdleKeepsBusyConnection shows that a grpc-go client's
// connection with a call running longer than MaxConnectionIdle is not
// closed under it, and that the client reconnects after an idle GOAWAY.
func TestMaxConnectionIdleKeepsBusyConnection(t *testing.T) {
	ts := startServer(t, h2unary.Options{MaxConnectionIdle: 200 * time.Millisecond}, func(ctx context.Context, req *rlsv3.RateLimitRequest) (*rlsv3.RateLimitResponse, error) {
		if req.Domain == "slow" {
			time.Sleep(700 * time.Millisecond)
		}
		return echo(ctx, req)
	})
	var dials dialCounter
	client := rlsv3.NewRateLimitServiceClient(dial(t, ts, dials.option()))
	for _, d := range []string{"slow", "slow"} {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		req := request(d, "v")
		resp, err := client.ShouldRateLimit(ctx, req)
		cancel()
		if err == nil {
			err = checkEcho(req, resp)
		}
		if err != nil {
			t.Fatalf("call of 700ms with MaxConnectionIdle 200ms: %v", err)
		}
	}
	dials.check(t) // the busy connection was not closed

	time.Sleep(500 * time.Millisecond) // idle: GOAWAY; the next call reconnects
	if _, err := client.ShouldRateLimit(t.Context(), request("after idle")); err != nil {
		t.Errorf("call after an idle GOAWAY: %v", err)
	}
	if n := dials.n.Load(); n < 2 {
		t.Errorf("%d connection after an idle period, want a new one (the idle one closed)", n)
	}
}
