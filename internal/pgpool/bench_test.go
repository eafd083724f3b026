package pgpool

import (
	"context"
	"log/slog"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
)

func BenchmarkStatementLabel(b *testing.B) {
	for _, sql := range []string{"SELECT tenant, origin FROM tenant_origins", "INSERT INTO audit_logs_2026_11 VALUES ($1)"} {
		b.Run(sql[:6], func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				statementLabel(sql)
			}
		})
	}
}

// BenchmarkTracer is the tracer's own cost per statement (start + end), with
// no database: what every query pays for its metrics.
func BenchmarkTracer(b *testing.B) {
	m, _, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	tr := &tracer{log: slog.New(slog.DiscardHandler), m: m, slow: time.Second, now: time.Now}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		qctx := tr.TraceQueryStart(ctx, nil, pgx.TraceQueryStartData{SQL: "SELECT tenant, origin FROM tenant_origins"})
		tr.TraceQueryEnd(qctx, nil, pgx.TraceQueryEndData{})
	}
}

// BenchmarkPoolQuery runs a one-row query with an argument through the
// traced pool, in parallel, and reports p50/p99 latency.
func BenchmarkPoolQuery(b *testing.B) {
	if pg == nil {
		b.Skip("postgres not installed")
	}
	cfg := testConfig(pg.URL())
	cfg.Pool.MaxConns = 4
	p, err := Open(b.Context(), slog.New(slog.DiscardHandler), prometheus.NewRegistry(), cfg, false)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	<-p.done
	lat := make(chan []time.Duration, runtime.GOMAXPROCS(0)*4)
	b.ReportAllocs()
	b.ResetTimer()
	b.SetParallelism(2)
	b.RunParallel(func(pb *testing.PB) {
		var mine []time.Duration
		var n int
		for pb.Next() {
			start := time.Now()
			if err := p.Pool().QueryRow(context.Background(), "SELECT $1::int", 7).Scan(&n); err != nil {
				b.Error(err)
				return
			}
			mine = append(mine, time.Since(start))
		}
		lat <- mine
	})
	b.StopTimer()
	close(lat)
	var all []time.Duration
	for l := range lat {
		all = append(all, l...)
	}
	if len(all) == 0 {
		return
	}
	slices.Sort(all)
	b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
}
