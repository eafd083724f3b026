package auditsink

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/audittrail"
)

// TestIngestIntoStores streams hostile entries through the ALS server into
// the real Writer and both stores (PostgreSQL and SQLite): every mapped
// row is accepted as is (no NUL in text, jsonb-safe metadata, inet-safe
// addresses, bounded sizes) and reads back equal to what the mapping made.
func TestIngestIntoStores(t *testing.T) {
	POST := corev3.RequestMethod_POST
	entries := []entryOpts{
		{method: POST, path: "/api/notes/\x00x?password=\"><script>&token=a", status: 201, ip: "not-an-ip", reqID: "hostile",
			ua: "bad\u2028 \"quoted\" \\ \x01\x00", authz: map[string]any{"user": "u\x00ser", "tenant": "t\nx", "role": "=cmd|' /C calc'!A0"}},
		{method: POST, path: "/api/ai/complete", status: 429, ip: "fe80::1%eth0", reqID: "zone", flags: &accesslogv3.ResponseFlags{RateLimited: true}},
		{method: corev3.RequestMethod_DELETE, path: "/api/orders/9", status: 204, ip: "::ffff:10.1.2.3", reqID: "mapped"},
		{method: POST, path: "/api/orders", reqID: "no-response", flags: &accesslogv3.ResponseFlags{DownstreamConnectionTermination: true}},
		{method: POST, path: "/api/" + strings.Repeat("é", 3000), status: 201, ua: strings.Repeat("u", 1000), reqID: "long"},
		{method: POST, path: "/api/orders", status: 201, reqID: "skewed", start: time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)},
		{method: POST, path: "/api/auth/login", status: 401, reqID: "login", headers: map[string]string{"origin": "https://evil.example\x00"}},
	}
	trailStores(t, func(t *testing.T, st trailStore) {
		w, stop := startTrailWriter(t, st)
		s, err := New(discardLogger(), prometheus.NewRegistry(), DefaultConfig(), w)
		if err != nil {
			t.Fatal(err)
		}
		s.now = func() time.Time { return testNow }
		stream, err := startALS(t, s).StreamAccessLogs(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		var want []audittrail.Record
		id := identifier("envoy-0", "als")
		sid := newStreamIdentity(id)
		for _, o := range entries {
			e := entry(o)
			var rec audittrail.Record
			if _, out := s.ingest.mapHTTP(&sid, e, &rec); out != outKept {
				t.Fatalf("%s not kept", o.reqID)
			}
			want = append(want, rec)
			if err := stream.Send(httpBatch(id, e)); err != nil {
				t.Fatal(err)
			}
			id = nil
		}
		if _, err := stream.CloseAndRecv(); err != nil {
			t.Fatal(err)
		}
		if got := metricValue(s.m.enqueueErrors); got != 0 {
			t.Fatalf("writer refused %v batches", got)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stop(ctx) // drains the queue into the store
		var got []audittrail.Record
		if err := st.Scan(ctx, audittrail.Filter{}, func(r *audittrail.Record) error { got = append(got, *r); return nil }); err != nil {
			t.Fatal(err)
		}
		byID := func(a, b audittrail.Record) int { return strings.Compare(a.RequestID, b.RequestID) }
		slices.SortFunc(want, byID)
		slices.SortFunc(got, byID)
		opts := cmp.Options{
			cmpopts.IgnoreFields(audittrail.Record{}, "ID", "ChainID", "Seq", "KeyID", "PrevHash", "Hash"),
			cmpopts.EquateEmpty(),
		}
		// jsonb reorders keys; compare metadata in a canonical form.
		for _, rs := range [][]audittrail.Record{want, got} {
			for i := range rs {
				var v any
				if err := json.Unmarshal(rs[i].Metadata, &v); err != nil {
					t.Fatalf("%s metadata %q: %v", rs[i].RequestID, rs[i].Metadata, err)
				}
				rs[i].Metadata, _ = json.Marshal(v)
			}
		}
		if diff := cmp.Diff(want, got, opts); diff != "" {
			t.Errorf("stored rows differ from the mapping (-want +got):\n%s", diff)
		}
	})
}
