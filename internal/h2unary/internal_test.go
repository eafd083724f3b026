package h2unary

import (
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestParseTimeout shows which grpc-timeout values are accepted and what
// they mean.
func TestParseTimeout(t *testing.T) {
	for _, c := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"1H", time.Hour, true},
		{"2M", 2 * time.Minute, true},
		{"3S", 3 * time.Second, true},
		{"50m", 50 * time.Millisecond, true},
		{"7u", 7 * time.Microsecond, true},
		{"9n", 9, true},
		{"0S", 0, true},
		{"99999999S", 99999999 * time.Second, true},
		{"99999999H", 1<<63 - 1, true}, // overflows a Duration: capped
		{"123456789S", 0, false},       // 9 digits
		{"S", 0, false},
		{"", 0, false},
		{"10", 0, false},
		{"1s", 0, false},
		{"+1S", 0, false},
		{"-1S", 0, false},
		{" 1S", 0, false},
		{"1.5S", 0, false},
	} {
		got, ok := parseTimeout(c.in)
		if got != c.want || ok != c.ok {
			t.Errorf("parseTimeout(%q) = %v, %v; want %v, %v", c.in, got, ok, c.want, c.ok)
		}
	}
}

// TestEncodeGRPCMessage shows that '%' and bytes outside printable ASCII
// are percent-encoded and nothing else is.
func TestEncodeGRPCMessage(t *testing.T) {
	for in, want := range map[string]string{
		"":                 "",
		"plain text ~!{}":  "plain text ~!{}",
		"100%":             "100%25",
		"ça\n":             "%C3%A7a%0A",
		"\x00\x1f\x7f\xff": "%00%1F%7F%FF",
		"%41":              "%2541",
		"tab\there":        "tab%09here",
		"日本":               "%E6%97%A5%E6%9C%AC",
	} {
		if got := encodeGRPCMessage(in); got != want {
			t.Errorf("encodeGRPCMessage(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestContentTypes shows which content types are gRPC, and which of those
// the server decodes.
func TestContentTypes(t *testing.T) {
	for _, c := range []struct {
		ct         string
		grpc, ours bool
	}{
		{"application/grpc", true, true},
		{"application/grpc+proto", true, true},
		{"application/grpc;charset=utf-8", true, true},
		{"application/grpc+proto; x=y", true, true},
		{"application/grpc+json", true, false},
		{"application/grpc+", true, false},
		{"application/grpcx", false, false},
		{"application/json", false, false},
		{"", false, false},
	} {
		if got := grpcContentType(c.ct); got != c.grpc {
			t.Errorf("grpcContentType(%q) = %v", c.ct, got)
		}
		if got := contentSubtypeOK(c.ct); got != c.ours {
			t.Errorf("contentSubtypeOK(%q) = %v", c.ct, got)
		}
	}
}

// TestGracefulStopBeforePreface shows that a connection accepted but
// still waiting for the client's preface when GracefulStop runs is either
// closed silently or answered starting with the server's SETTINGS (RFC
// 9113 §3.4: the server preface is a SETTINGS frame and must be the first
// frame sent), and that GracefulStop does not wait for it.
func TestGracefulStopBeforePreface(t *testing.T) {
	s := NewServer(Options{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(lis) }()
	t.Cleanup(func() { s.Stop(); <-served })

	nc, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	waitFor(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.conns) == 1
	})
	stopped := make(chan struct{})
	go func() {
		s.GracefulStop()
		close(stopped)
	}()
	// GracefulStop holds s.mu while it sends GOAWAYs: once draining is
	// seen under s.mu, it has done so.
	waitFor(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.draining
	})

	fr := http2.NewFramer(nc, nc)
	if _, err := nc.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	fr.WriteSettings() // the server may have closed already: not an error
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	var frames []http2.Frame
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		frames = append(frames, f)
	}
	// Closing such a connection without a word is fine too.
	if len(frames) > 0 {
		if sf, ok := frames[0].(*http2.SettingsFrame); !ok || sf.IsAck() {
			t.Errorf("first frame %v, want the server's SETTINGS", frames[0])
		}
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("GracefulStop did not return")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(time.Millisecond)
	}
}
