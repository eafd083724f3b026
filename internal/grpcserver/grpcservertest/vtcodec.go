//go:build vtprotobuf

package grpcservertest

import (
	"google.golang.org/grpc/encoding"
	encproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
)

func init() { vtCodec = vtcodec{std: encoding.GetCodecV2(encproto.Name)} }

// vtcodec marshals with go-control-plane's vtprotobuf code where a message
// has it, and leaves everything else (and every Unmarshal: go-control-plane
// generates no vtprotobuf unmarshalers) to gRPC's proto codec.
type vtcodec struct{ std encoding.CodecV2 }

type vtMarshaler interface {
	SizeVT() int
	MarshalToSizedBufferVTStrict([]byte) (int, error)
}

func (c vtcodec) Name() string { return encproto.Name }

func (c vtcodec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(vtMarshaler)
	if !ok {
		return c.std.Marshal(v)
	}
	size := m.SizeVT()
	if mem.IsBelowBufferPoolingThreshold(size) {
		buf := make([]byte, size)
		if _, err := m.MarshalToSizedBufferVTStrict(buf); err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(buf)}, nil
	}
	pool := mem.DefaultBufferPool()
	buf := pool.Get(size)
	if _, err := m.MarshalToSizedBufferVTStrict((*buf)[:size]); err != nil {
		pool.Put(buf)
		return nil, err
	}
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, nil
}

func (c vtcodec) Unmarshal(data mem.BufferSlice, v any) error { return c.std.Unmarshal(data, v) }
