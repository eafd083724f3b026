package h2unary_test

import (
	"bytes"
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/meshguard/meshguard/internal/h2unary"
)

// seedFrames builds a frame sequence (after the client preface) for
// FuzzConn's corpus.
func seedFrames(f *testing.F, build func(fr *http2.Framer, enc func(...header) []byte)) []byte {
	var buf, hb bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	he := hpack.NewEncoder(&hb)
	enc := func(hs ...header) []byte {
		hb.Reset()
		for _, h := range hs {
			he.WriteField(hpackField(h))
		}
		return bytes.Clone(hb.Bytes())
	}
	build(fr, enc)
	return buf.Bytes()
}

// FuzzConn writes the client preface and arbitrary bytes to a live server
// connection, then a PING, and half-closes it. The server must neither
// panic nor hang: it closes the connection (here: at the latest when it
// reads EOF), and what it wrote must be well-formed HTTP/2 frames.
func FuzzConn(f *testing.F) {
	ts := startServer(f, h2unary.Options{MaxRecvMsgSize: 64 << 10, MaxConcurrentStreams: 8, KeepaliveMinTime: time.Minute}, echo)
	msg := marshal(f, request("fuzz", "v1", "v2"))
	call := frameMsg(0, msg)
	hdrs := grpcHeaders(rlsMethod)

	f.Add([]byte{})
	f.Add([]byte("\x00\x00\x00\x04\x00\x00\x00\x00\x00garbage"))
	f.Add(seedFrames(f, func(fr *http2.Framer, enc func(...header) []byte) {
		fr.WriteSettings()
	}))
	f.Add(seedFrames(f, func(fr *http2.Framer, enc func(...header) []byte) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc(hdrs...), EndHeaders: true})
		fr.WriteData(1, true, call)
	}))
	f.Add(seedFrames(f, func(fr *http2.Framer, enc func(...header) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 10}, http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
		fr.WritePing(false, [8]byte{1})
		fr.WriteWindowUpdate(0, 1000)
		block := enc(append(hdrs, header{"grpc-timeout", "1S"})...)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:5]})
		fr.WriteContinuation(1, true, block[5:])
		fr.WriteData(1, false, call[:3])
		fr.WriteData(1, true, call[3:])
		fr.WriteWindowUpdate(1, 1000)
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	}))
	f.Add(seedFrames(f, func(fr *http2.Framer, enc func(...header) []byte) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc(hdrs...), EndHeaders: true, PadLength: 3,
			Priority: http2.PriorityParam{StreamDep: 0, Weight: 7}})
		fr.WritePriority(1, http2.PriorityParam{StreamDep: 0, Weight: 1})
		fr.WriteRawFrame(0x42, 0, 1, []byte("unknown frame type"))
		fr.WriteDataPadded(1, false, call, make([]byte, 5))
		fr.WriteRSTStream(1, http2.ErrCodeCancel)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: enc(hdrs...), EndHeaders: true})
		fr.WriteData(3, true, append(append([]byte{}, call...), call...))
		fr.WriteGoAway(0, http2.ErrCodeNo, nil)
	}))
	f.Add(seedFrames(f, func(fr *http2.Framer, enc func(...header) []byte) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: enc(header{":method", "GET"}, header{":path", "/"}), EndStream: true, EndHeaders: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: enc(hdrs...), EndHeaders: true})
	}))

	f.Fuzz(func(t *testing.T, data []byte) {
		nc, err := net.DialTimeout("tcp", ts.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(10 * time.Second))
		readErr := make(chan error, 1)
		go func() {
			fr := http2.NewFramer(nil, nc)
			fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
			for {
				if _, err := fr.ReadFrame(); err != nil {
					readErr <- err
					return
				}
			}
		}()
		// Write errors mean the server closed the connection: fine.
		var tail bytes.Buffer
		http2.NewFramer(&tail, nil).WritePing(false, [8]byte{'f', 'u', 'z', 'z'})
		if _, err := nc.Write(append(append([]byte(http2.ClientPreface), data...), tail.Bytes()...)); err == nil {
			nc.(*net.TCPConn).CloseWrite()
		}
		err = <-readErr
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			t.Fatalf("server neither closed the connection nor stopped writing within 10s")
		case !isClosedErr(err):
			t.Fatalf("server wrote something that is not HTTP/2: %v", err)
		}
	})
}
