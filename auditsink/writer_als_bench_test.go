package auditsink

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alsv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"github.com/jackc/pgx/v5"

	"github.com/meshguard/meshguard/internal/pgtest"

	"github.com/meshguard/meshguard/audittrail"
)

// BenchmarkALSToPostgres is the end-to-end ingest rate: 8 concurrent ALS
// streams over real gRPC on loopback send Envoy-sized messages (20 kept
// entries) to the ingest Server, whose sink is a Writer over PostgreSQL;
// the clock stops when the Writer has committed every row. In the same run,
// interleaved, the very rows it stored are COPYed plainly into the same
// (truncated) table. Reports medians and their ratio.
func BenchmarkALSToPostgres(b *testing.B) {
	const streams, msgsPerStream, rounds = 8, 500, 3
	srv := pgtest.Start(b)
	s, pool := openTrailPG(b, srv)
	ctx := context.Background()
	kept := benchEntries()["kept_update"]
	batch := make([]*accesslogv3.HTTPAccessLogEntry, 20)
	for i := range batch {
		batch[i] = kept
	}
	total := streams * msgsPerStream * len(batch)
	truncate := func() {
		for _, q := range []string{"TRUNCATE audit_logs", "CHECKPOINT"} {
			if _, err := pool.Exec(ctx, q); err != nil {
				b.Fatal(err)
			}
		}
	}
	var alsRates, copyRates []float64
	b.ReportAllocs()
	for b.Loop() {
		for range rounds {
			truncate()
			w, stop := startTrailWriter(b, s)
			server, _ := newTestServer(b, DefaultConfig(), w)
			client := startALS(b, server)

			t0 := time.Now()
			var wg sync.WaitGroup
			for st := range streams {
				wg.Add(1)
				go func() {
					defer wg.Done()
					stream, err := client.StreamAccessLogs(ctx)
					if err != nil {
						b.Error(err)
						return
					}
					for i := range msgsPerStream {
						var id *alsv3.StreamAccessLogsMessage_Identifier
						if i == 0 {
							id = identifier(fmt.Sprintf("envoy-%d", st), "als")
						}
						if err := stream.Send(httpBatch(id, batch...)); err != nil {
							b.Error(err)
							return
						}
					}
					if _, err := stream.CloseAndRecv(); err != nil {
						b.Error(err)
					}
				}()
			}
			wg.Wait()
			for st := w.Status(); st.Head.Seq < int64(total) || st.SpoolSegments > 0; st = w.Status() {
				if st.LastError != "" {
					b.Fatalf("writer: %s", st.LastError)
				}
				time.Sleep(time.Millisecond) // a benchmark's clock, not a test's wait
			}
			alsRates = append(alsRates, float64(total)/time.Since(t0).Seconds())
			stop(ctx)

			// The same rows, plain COPY.
			var rows []audittrail.Record
			if err := s.Scan(ctx, audittrail.Filter{}, func(r *audittrail.Record) error { rows = append(rows, *r); return nil }); err != nil {
				b.Fatal(err)
			}
			if len(rows) != total {
				b.Fatalf("stored %d rows, want %d", len(rows), total)
			}
			truncate()
			row := make([]any, len(copyColumns))
			t0 = time.Now()
			n, err := pool.CopyFrom(ctx, pgx.Identifier{"audit_logs"}, copyColumns, pgx.CopyFromSlice(len(rows), func(i int) ([]any, error) {
				copyRow(row, &rows[i])
				return row, nil
			}))
			if err != nil || int(n) != total {
				b.Fatalf("plain COPY: %d rows, %v", n, err)
			}
			copyRates = append(copyRates, float64(total)/time.Since(t0).Seconds())
		}
	}
	med := func(xs []float64) float64 { xs = slices.Clone(xs); slices.Sort(xs); return xs[len(xs)/2] }
	b.ReportMetric(med(alsRates), "als_rows/s")
	b.ReportMetric(med(copyRates), "copy_rows/s")
	b.ReportMetric(med(alsRates)/med(copyRates), "ratio")
	b.Logf("ALS→Writer rows/s %v; plain COPY rows/s %v", alsRates, copyRates)
}

// copyColumns and copyRow are a plain COPY of stored rows, every column.
var copyColumns = []string{"id", "created_at", "action", "severity", "entity_type", "entity_id", "user_id", "ip_address",
	"user_agent", "method", "path", "status", "request_id", "origin", "tenant", "metadata", "old_values", "new_values",
	"chain_id", "seq", "key_id", "prev_hash", "hash"}

// copyRow fills row as the store's own COPY does (pointers: no boxing).
func copyRow(row []any, r *audittrail.Record) {
	str := func(i int, s *string) {
		if *s == "" {
			row[i] = nil
			return
		}
		row[i] = s
	}
	js := func(i int, b []byte) {
		if b == nil {
			row[i] = nil
			return
		}
		row[i] = b
	}
	row[0], row[1], row[2], row[3] = &r.ID, r.CreatedAt, &r.Action, &r.Severity
	str(4, &r.EntityType)
	str(5, &r.EntityID)
	str(6, &r.UserID)
	str(7, &r.IPAddress)
	str(8, &r.UserAgent)
	str(9, &r.Method)
	str(10, &r.Path)
	row[11] = int32(r.Status)
	str(12, &r.RequestID)
	str(13, &r.Origin)
	str(14, &r.Tenant)
	js(15, r.Metadata)
	js(16, r.OldValues)
	js(17, r.NewValues)
	row[18], row[19] = &r.ChainID, &r.Seq
	str(20, &r.KeyID)
	row[21], row[22] = r.PrevHash, r.Hash
}
