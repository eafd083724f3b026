package grpcserver

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshguard/meshguard/internal/servertest"
)

const (
	healthCheck = "/grpc.health.v1.Health/Check"
	healthWatch = "/grpc.health.v1.Health/Watch"
	holdMethod  = "/meshguard.test.Holder/Hold"
)

// holder is a test service whose Hold decodes a Struct, then waits until
// release is closed (or its context ends), holding its share of the
// decoding budget.
type holder struct {
	entered chan struct{}
	release chan struct{}
}

var holderDesc = grpc.ServiceDesc{
	ServiceName: "meshguard.test.Holder",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{MethodName: "Hold", Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
		in := new(structpb.Struct)
		if err := dec(in); err != nil {
			return nil, err
		}
		h := srv.(*holder)
		h.entered <- struct{}{}
		select {
		case <-h.release:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		return &emptypb.Empty{}, nil
	}}},
}

// guardServer serves health and holder through a Guard and returns a
// client connection and the metrics.
func guardServer(t *testing.T, lim Limits, bounds map[string]MethodBounds) (*grpc.ClientConn, *Metrics, *holder) {
	t.Helper()
	m := NewMetrics(prometheus.NewRegistry())
	gs := New(lim, m)
	r := NewGuard("test", lim, m, bounds).Wrap(gs)
	hs := health.NewServer()
	hs.SetServingStatus("up", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(r, hs)
	h := &holder{entered: make(chan struct{}, 16), release: make(chan struct{})}
	r.RegisterService(&holderDesc, h)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc, m, h
}

// rawCodec sends pre-encoded requests.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)      { return v.([]byte), nil }
func (rawCodec) Unmarshal(data []byte, v any) error { return nil }
func (rawCodec) Name() string                       { return "proto" }

func invokeRaw(ctx context.Context, cc *grpc.ClientConn, method string, b []byte) error {
	return cc.Invoke(ctx, method, b, new(emptypb.Empty), grpc.ForceCodec(rawCodec{}))
}

func TestGuardRefuses(t *testing.T) {
	lim := DefaultLimits()
	lim.MaxRecvMsgSize = 64 << 10
	cc, m, _ := guardServer(t, lim, map[string]MethodBounds{healthCheck: {MaxBytes: 1 << 10}})
	hc := healthpb.NewHealthClient(cc)
	ctx := t.Context()

	badUTF8 := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), []byte{0xff, 0xfe})
	for _, tc := range []struct {
		name   string
		call   func() error
		code   codes.Code
		msg    string
		reason string
	}{
		{"over the method's limit", func() error {
			_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: strings.Repeat("s", 2000)})
			return err
		}, codes.ResourceExhausted, "request of 2003 bytes; the limit of /grpc.health.v1.Health/Check is 1024", "too_large"},
		{"over the listener's limit", func() error {
			_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: strings.Repeat("s", 100<<10)})
			return err
		}, codes.ResourceExhausted, "grpc: received message larger than max", "too_large"},
		{"truncated", func() error {
			return invokeRaw(ctx, cc, healthCheck, []byte{0x0a, 0x05, 'a'})
		}, codes.InvalidArgument, "service: malformed: unexpected EOF", "malformed"},
		{"invalid UTF-8 (protobuf-go refuses it)", func() error {
			return invokeRaw(ctx, cc, healthCheck, badUTF8)
		}, codes.InvalidArgument, "malformed request:", "malformed"},
		{"a streaming method", func() error {
			w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: strings.Repeat("s", 100<<10)})
			if err == nil {
				_, err = w.Recv()
			}
			return err
		}, codes.ResourceExhausted, "grpc: received message larger than max", "too_large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if st := status.Convert(err); st.Code() != tc.code || !strings.Contains(st.Message(), tc.msg) {
				t.Errorf("got %v %q, want %v containing %q", st.Code(), st.Message(), tc.code, tc.msg)
			}
		})
	}
	// Every refusal is counted by reason, and as a handled RPC with its
	// code, although the interceptors never saw the unary ones.
	for _, c := range []struct {
		method, reason string
		want           float64
	}{
		{healthCheck, "too_large", 2}, {healthCheck, "malformed", 2}, {healthWatch, "too_large", 1},
	} {
		if got := testutil.ToFloat64(m.rejected.WithLabelValues("test", c.method, c.reason)); got != c.want {
			t.Errorf("rejected{%s,%s} = %v, want %v", c.method, c.reason, got, c.want)
		}
	}
	if got := testutil.ToFloat64(m.handled.WithLabelValues(healthCheck, "ResourceExhausted")); got != 2 {
		t.Errorf("handled{Check,ResourceExhausted} = %v, want 2", got)
	}
	if got := testutil.ToFloat64(m.handled.WithLabelValues(healthCheck, "InvalidArgument")); got != 2 {
		t.Errorf("handled{Check,InvalidArgument} = %v, want 2", got)
	}
	if got := testutil.ToFloat64(m.handled.WithLabelValues(healthWatch, "ResourceExhausted")); got != 1 {
		t.Errorf("handled{Watch,ResourceExhausted} = %v, want 1", got)
	}
	// A good request still passes, unknown fields and all.
	if resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "up"}); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Check(up) = %v, %v", resp, err)
	}
	withUnknown := protowire.AppendString(protowire.AppendTag([]byte("\x0a\x02up"), 99, protowire.BytesType), "newer")
	if err := invokeRaw(ctx, cc, healthCheck, withUnknown); err != nil {
		t.Fatalf("a request with an unknown field: %v", err)
	}
}

// structOf returns an encoded Struct of n small fields: about 300 bytes a
// field once decoded, by the scan's estimate.
func structOf(n int) []byte {
	var b []byte
	for i := range n {
		entry := protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), strings.Repeat("k", 8)+string(rune('a'+i%26))+string(rune('a'+i/26%26))+string(rune('a'+i/676%26)))
		entry = protowire.AppendBytes(protowire.AppendTag(entry, 2, protowire.BytesType), []byte{0x20, 0x01}) // bool_value: true
		b = protowire.AppendBytes(protowire.AppendTag(b, 1, protowire.BytesType), entry)
	}
	return b
}

// TestGuardDecodingBudget: unary requests hold their share of the
// listener's decoding budget until their handlers return; one that does
// not fit waits, within its deadline, and goes on when shares are freed.
func TestGuardDecodingBudget(t *testing.T) {
	lim := DefaultLimits()
	lim.MaxDecodedBytes = 1 << 20
	cc, m, h := guardServer(t, lim, nil)
	big := structOf(2000) // more than half the budget
	ctx := t.Context()

	first := make(chan error, 1)
	go func() { first <- invokeRaw(ctx, cc, holdMethod, big) }()
	<-h.entered
	held := testutil.ToFloat64(m.decoding.WithLabelValues("test"))
	if held < 512<<10 || held > 1<<20 {
		t.Fatalf("decoding_bytes while one request is held = %v, want more than half the budget", held)
	}

	// A second one does not fit: with a short deadline it gives up.
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if err := invokeRaw(short, cc, holdMethod, big); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("a request over the budget with a short deadline: %v, want DeadlineExceeded", err)
	}
	// With time to wait it goes on once the first is released.
	waitsBefore := testutil.ToFloat64(m.decodeWaits.WithLabelValues("test"))
	second := make(chan error, 1)
	go func() { second <- invokeRaw(ctx, cc, holdMethod, big) }()
	servertest.WaitUntil(t, 30*time.Second, "the second request to wait for the budget", func() bool {
		return testutil.ToFloat64(m.decodeWaits.WithLabelValues("test")) > waitsBefore
	})
	select {
	case <-h.entered:
		t.Fatal("the second request was decoded while the first held the budget")
	default:
	}
	close(h.release)
	for _, c := range []chan error{first, second} {
		if err := <-c; err != nil {
			t.Fatal(err)
		}
	}
	if got := testutil.ToFloat64(m.decoding.WithLabelValues("test")); got != 0 {
		t.Errorf("decoding_bytes after every handler returned = %v, want 0", got)
	}
	// A request whose estimate exceeds the whole budget is refused at once.
	if err := invokeRaw(ctx, cc, holdMethod, structOf(5000)); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a request over the whole budget: %v, want ResourceExhausted", err)
	}
}
