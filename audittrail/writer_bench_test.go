package audittrail

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshguard/meshguard/internal/pgtest"
)

// benchRows returns n realistic rows (about 500 bytes each, nine-key metadata).
func benchStoreRows(n int) []Record {
	recs := make([]Record, n)
	start := time.Now().Add(-time.Hour)
	for i := range recs {
		recs[i] = Record{
			CreatedAt: start.Add(time.Duration(i) * time.Millisecond), Action: "UPDATE", Severity: SeverityLow,
			EntityType: "invoice", EntityID: fmt.Sprint(i % 5000), UserID: fmt.Sprintf("user-%d", i%300),
			IPAddress: fmt.Sprintf("10.%d.%d.%d", i%250, i/250%250, i%7), Method: "PUT", Status: 200,
			UserAgent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
			Path:      fmt.Sprintf("/api/v1/invoices/%d", i%5000), RequestID: fmt.Sprintf("%08x-1b2c-4d5e-8f90-%012x", i, i),
			Origin: "https://app.example.com", Tenant: "tenant1",
			Metadata: json.RawMessage(fmt.Sprintf(`{"authority":"api.example.com","upstream_cluster":"app","upstream_host":"10.1.2.%d:8080","flags":"-","duration_ms":%d,"bytes_in":%d,"bytes_out":%d,"xff":"203.0.113.%d","role":"editor"}`,
				i%250, i%900, i%4000, i%90000, i%250)),
		}
	}
	return recs
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkWriterVsCopy measures sustained ingest through the Writer
// (concurrent Enqueue of 20-record messages, as ALS streams deliver them,
// batching, chain hashing, COPY) against a plain pgx CopyFrom of the same
// rows into the same partitioned, indexed table, interleaved A B A B A B in
// one run. It reports the medians and their ratio.
func BenchmarkWriterVsCopy(b *testing.B) {
	const rows, streams, rounds = 100000, 8, 3
	srv := pgtest.Start(b)
	s, pool := openPG(b, srv, Config{PartitionsAhead: 1})
	ctx := context.Background()
	src := benchStoreRows(rows)
	truncate := func() {
		if _, err := pool.Exec(ctx, "TRUNCATE audit_logs"); err != nil {
			b.Fatal(err)
		}
		if _, err := pool.Exec(ctx, "CHECKPOINT"); err != nil {
			b.Fatal(err)
		}
	}
	var writerRates, copyRates, cpuPerRow []float64
	b.ReportAllocs()
	for b.Loop() {
		for round := range rounds {
			// A: through the Writer.
			truncate()
			w, _, stop := startBenchWriter(b, ctx, s, fmt.Sprintf("bench-w-%d", round))
			cpu0, t0 := cpuTime(), time.Now()
			var wg sync.WaitGroup
			for st := range streams {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := st * 20; i < rows; i += streams * 20 {
						msg := make([]Record, min(20, rows-i))
						copy(msg, src[i:])
						if err := w.Enqueue(ctx, msg); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			if err := w.Close(ctx); err != nil {
				b.Fatal(err)
			}
			elapsed, cpu := time.Since(t0), cpuTime()-cpu0
			stop()
			if _, n := w.spool.size(); n != 0 || storeMetric(b, w.m.stored) != rows {
				b.Fatalf("writer stored %v rows, spool %d segments; want %d stored", storeMetric(b, w.m.stored), n, rows)
			}
			writerRates = append(writerRates, rows/elapsed.Seconds())
			cpuPerRow = append(cpuPerRow, float64(cpu.Microseconds())/rows)

			// B: a plain COPY of the same rows.
			truncate()
			plain := slices.Clone(src)
			c := newChain(fmt.Sprintf("bench-c-%d", round), testKey)
			c.link(plain)
			for i := range plain {
				plain[i].ID = rowID(int64(1000+round), plain[i].Seq)
			}
			row := make([]any, len(insertColumns))
			t0 = time.Now()
			n, err := pool.CopyFrom(ctx, pgx.Identifier{"audit_logs"}, insertColumns, pgx.CopyFromSlice(len(plain), func(i int) ([]any, error) {
				pgRow(row, &plain[i])
				return row, nil
			}))
			if err != nil || n != rows {
				b.Fatalf("plain COPY: %d rows, %v", n, err)
			}
			copyRates = append(copyRates, rows/time.Since(t0).Seconds())
		}
	}
	med := func(xs []float64) float64 { xs = slices.Clone(xs); slices.Sort(xs); return xs[len(xs)/2] }
	b.ReportMetric(med(writerRates), "writer_rows/s")
	b.ReportMetric(med(copyRates), "copy_rows/s")
	b.ReportMetric(med(writerRates)/med(copyRates), "ratio")
	b.ReportMetric(med(cpuPerRow), "writer_cpu_µs/row")
	b.Logf("writer rows/s %v; plain COPY rows/s %v", writerRates, copyRates)
}

// BenchmarkChainLink is the cost of normalising, hashing and MACing rows
// into the chain and its Merkle tree (done once per row by the writer).
func BenchmarkChainLink(b *testing.B) {
	recs := benchStoreRows(1000)
	c := newChain("bench", testKey)
	b.ReportAllocs()
	for b.Loop() {
		c.link(recs)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(recs)), "ns/row")
}

// startBenchWriter runs a Writer over s with its own spool and chain; stop
// ends its Run loop (call it after Close).
func startBenchWriter(b *testing.B, ctx context.Context, s BatchStore, chainID string) (*Writer, Config, func()) {
	b.Helper()
	cfg := DefaultConfig()
	cfg.SpoolDir = filepath.Join(b.TempDir(), "spool")
	cfg.ChainID = chainID
	w, err := NewWriter(discardLog, prometheus.NewRegistry(), cfg, s, testKeyring)
	if err != nil {
		b.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	go func() { runDone <- w.Run(rctx) }()
	return w, cfg, func() {
		cancel()
		<-runDone
	}
}

// BenchmarkRowKeyWork is the part of linking that the key adds per row:
// the HMAC of the leaf hash and the Merkle tree append (the leaf hash
// itself replaces the unkeyed chain's SHA-256 of the same bytes).
func BenchmarkRowKeyWork(b *testing.B) {
	c := newChain("bench", testKey)
	var leaf [32]byte
	out := make([]byte, 0, 32)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		leaf[0] = byte(i)
		c.tree.appendLeaf(leaf)
		c.mac.Reset()
		c.mac.Write(leaf[:])
		out = c.mac.Sum(out[:0])
	}
}

// BenchmarkSignCheckpoint is the cost of one checkpoint (once per chain per
// audit.checkpoint_interval, not per row).
func BenchmarkSignCheckpoint(b *testing.B) {
	h := ChainHead{ChainID: "bench/1", Seq: 1 << 20, Root: make([]byte, 32)}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := signCheckpoint(testKey, h, 7, time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}
