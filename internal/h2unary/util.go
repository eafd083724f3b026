package h2unary

import (
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
)

// parseTimeout parses a grpc-timeout value: 1 to 8 digits and a unit
// (H, M, S, m, u, n).
func parseTimeout(v string) (time.Duration, bool) {
	if len(v) < 2 || len(v) > 9 {
		return 0, false
	}
	n, err := strconv.ParseUint(v[:len(v)-1], 10, 64)
	if err != nil || v[0] == '+' {
		return 0, false
	}
	var unit time.Duration
	switch v[len(v)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, false
	}
	// 8 digits of hours fit in a Duration? 99999999h overflows: cap it.
	if d := time.Duration(n); d > (1<<63-1)/unit {
		return 1<<63 - 1, true
	}
	return time.Duration(n) * unit, true
}

var codeTexts = func() (t [codes.Unauthenticated + 1]string) {
	for i := range t {
		t[i] = strconv.Itoa(i)
	}
	return t
}()

// codeText is grpc-status's value for code.
func codeText(code codes.Code) string {
	if int(code) < len(codeTexts) {
		return codeTexts[code]
	}
	return strconv.FormatUint(uint64(code), 10)
}

func httpStatusText(s int) string {
	if s == 200 {
		return "200"
	}
	return strconv.Itoa(s)
}

// encodeGRPCMessage percent-encodes grpc-message as gRPC's HTTP/2 protocol
// asks: bytes outside printable ASCII, and '%', become %XX.
func encodeGRPCMessage(msg string) string {
	const hex = "0123456789ABCDEF"
	clean := true
	for i := 0; i < len(msg); i++ {
		if b := msg[i]; b < 0x20 || b > 0x7e || b == '%' {
			clean = false
			break
		}
	}
	if clean {
		return msg
	}
	out := make([]byte, 0, len(msg)+16)
	for i := 0; i < len(msg); i++ {
		b := msg[i]
		if b < 0x20 || b > 0x7e || b == '%' {
			out = append(out, '%', hex[b>>4], hex[b&15])
			continue
		}
		out = append(out, b)
	}
	return string(out)
}

// bufPool holds request buffers: most requests are a few hundred bytes.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 1024); return &b }}

// maxPooledBuf: larger buffers are left to the garbage collector.
const maxPooledBuf = 64 << 10

// clip shortens a client's value quoted in an error message.
func clip(v string) string {
	const limit = 128
	if len(v) <= limit {
		return v
	}
	return v[:limit] + "..."
}
