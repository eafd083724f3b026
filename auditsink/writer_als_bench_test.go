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
	s, pool := openPG(b, srv, Config{PartitionsAhead: 1})
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
		for round := range rounds {
			truncate()
			w, cfg, stop := startBenchWriter(b, ctx, s, fmt.Sprintf("bench-als-%d", round))
			server, _ := newTestServer(b, cfg, w)
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
			storeWaitUntil(b, "every row committed", func() bool { return storeMetric(b, w.m.stored) >= float64(total) })
			alsRates = append(alsRates, float64(total)/time.Since(t0).Seconds())
			if err := w.Close(ctx); err != nil {
				b.Fatal(err)
			}
			stop()

			// The same rows, plain COPY.
			var rows []Record
			if err := s.Scan(ctx, Filter{}, func(r *Record) error { rows = append(rows, *r); return nil }); err != nil {
				b.Fatal(err)
			}
			if len(rows) != total {
				b.Fatalf("stored %d rows, want %d", len(rows), total)
			}
			truncate()
			row := make([]any, len(insertColumns))
			t0 = time.Now()
			n, err := pool.CopyFrom(ctx, pgx.Identifier{"audit_logs"}, insertColumns, pgx.CopyFromSlice(len(rows), func(i int) ([]any, error) {
				pgRow(row, &rows[i])
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
