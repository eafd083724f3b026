package auditsink

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"

	"github.com/meshguard/meshguard/audittrail"
)

func benchEntries() map[string]*accesslogv3.HTTPAccessLogEntry {
	ua := "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
	authz := map[string]any{"decision": "allow", "reason": "origin_allowed", "user": "u-1001", "role": "admin", "tenant": "tenant1", "client": "user:u-1001"}
	return map[string]*accesslogv3.HTTPAccessLogEntry{
		"kept_update": entry(entryOpts{method: corev3.RequestMethod_PUT, path: "/api/users/42", status: 200, ua: ua,
			reqID: "4f1c2a9e-0d1b-4c59-9d3e-8f4b7f0c1a22", authz: authz, headers: map[string]string{"origin": "https://dashboard.example.com"}}),
		"kept_query_secret": entry(entryOpts{method: corev3.RequestMethod_POST, path: "/api/orders?token=abc&page=2", status: 201, ua: ua,
			reqID: "4f1c2a9e-0d1b-4c59-9d3e-8f4b7f0c1a22", authz: authz}),
		"dropped_get": entry(entryOpts{method: corev3.RequestMethod_GET, path: "/api/orders?page=2", status: 200, ua: ua,
			reqID: "4f1c2a9e-0d1b-4c59-9d3e-8f4b7f0c1a22", authz: authz}),
		"dropped_health": entry(entryOpts{method: corev3.RequestMethod_GET, path: "/healthz", status: 200}),
	}
}

// BenchmarkMapClassify is the per-entry cost of the ingest path: rules
// (default set, first match wins) plus, for kept entries, the audittrail.Record and
// its metadata JSON.
func BenchmarkMapClassify(b *testing.B) {
	m := testMapper(b, nil)
	id := newStreamIdentity(identifier("envoy-front-0", "meshguard_als"))
	for name, e := range benchEntries() {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			var rec audittrail.Record
			for b.Loop() {
				m.mapHTTP(&id, e, &rec)
			}
		})
	}
}

type discardSink struct{ n atomic.Int64 }

func (d *discardSink) Enqueue(_ context.Context, recs []audittrail.Record) error {
	d.n.Add(int64(len(recs)))
	return nil
}

// BenchmarkStreamAccessLogs pushes Envoy-sized messages (20 entries, half
// kept) over real gRPC streams on loopback, 4 streams at once, into a
// sink that discards: the ceiling of the receive path alone. ns/op is per
// entry.
func BenchmarkStreamAccessLogs(b *testing.B) {
	sink := &discardSink{}
	s, _ := newTestServer(b, DefaultConfig(), sink)
	client := startALS(b, s)
	es := benchEntries()
	var batch []*accesslogv3.HTTPAccessLogEntry
	for range 10 {
		batch = append(batch, es["kept_update"], es["dropped_get"])
	}
	const streams = 4
	b.ReportAllocs()
	b.ResetTimer()
	perStream := b.N/(streams*len(batch)) + 1
	var wg sync.WaitGroup
	for w := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := client.StreamAccessLogs(context.Background())
			if err != nil {
				b.Error(err)
				return
			}
			for i := range perStream {
				var id *alsv3.StreamAccessLogsMessage_Identifier
				if i == 0 {
					id = identifier(fmt.Sprintf("envoy-%d", w), "als")
				}
				if err := st.Send(httpBatch(id, batch...)); err != nil {
					b.Error(err)
					return
				}
			}
			if _, err := st.CloseAndRecv(); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	total := streams * perStream * len(batch)
	b.ReportMetric(float64(total)/b.Elapsed().Seconds(), "entries/s")
	if got := sink.n.Load(); got != int64(total/2) {
		b.Fatalf("kept %d, want %d", got, total/2)
	}
}
