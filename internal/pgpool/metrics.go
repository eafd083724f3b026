package pgpool

import (
	"sync"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// maxStatementLabels caps the distinct statement label values; further
// statements are counted under "other", so a caller that builds SQL
// dynamically cannot grow the metric set without bound.
const maxStatementLabels = 64

// metrics are the query metrics the tracer feeds.
type metrics struct {
	duration *prometheus.HistogramVec
	errors   *prometheus.CounterVec
	slow     *prometheus.CounterVec

	mu     sync.RWMutex
	labels map[string]prometheus.Observer // statement label -> its histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, []prometheus.Collector, error) {
	m := &metrics{
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshguard_db_query_duration_seconds",
			Help:    "Duration of database statements (query, exec, batch, COPY), by statement label.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"statement"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_db_query_errors_total",
			Help: "Database statements that failed, by statement label and SQLSTATE (or canceled, timeout, connection, other).",
		}, []string{"statement", "code"}),
		slow: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshguard_db_slow_queries_total",
			Help: "Database statements that ran at least database.slow_query_threshold, by statement label.",
		}, []string{"statement"}),
		labels: make(map[string]prometheus.Observer),
	}
	cs := []prometheus.Collector{m.duration, m.errors, m.slow}
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			for _, done := range cs[:i] {
				reg.Unregister(done)
			}
			return nil, nil, err
		}
	}
	return m, cs, nil
}

// observer returns the histogram for label, or the "other" one once
// maxStatementLabels distinct labels have been seen; it also returns the
// label actually used.
func (m *metrics) observer(label string) (prometheus.Observer, string) {
	m.mu.RLock()
	o, ok := m.labels[label]
	n := len(m.labels)
	m.mu.RUnlock()
	if ok {
		return o, label
	}
	if n >= maxStatementLabels {
		label = "other"
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if o, ok := m.labels[label]; ok {
		return o, label
	}
	o = m.duration.WithLabelValues(label)
	m.labels[label] = o
	return o, label
}

// poolCollector exports pgxpool's own statistics, read at scrape time.
type poolCollector struct {
	pool *pgxpool.Pool

	total, idle, acquired, constructing, max           *prometheus.Desc
	acquires, acquireSeconds, emptyAcquires, emptyWait *prometheus.Desc
	canceled, newConns, lifetimeDestroys, idleDestroys *prometheus.Desc
}

func newPoolCollector(p *pgxpool.Pool) *poolCollector {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("meshguard_db_pool_"+name, help, nil, nil)
	}
	return &poolCollector{
		pool:             p,
		total:            d("total_conns", "Connections in the pool: idle, acquired and being opened."),
		idle:             d("idle_conns", "Idle connections in the pool."),
		acquired:         d("acquired_conns", "Connections currently acquired by a caller."),
		constructing:     d("constructing_conns", "Connections being opened."),
		max:              d("max_conns", "Most connections the pool may open."),
		acquires:         d("acquires_total", "Successful connection acquires."),
		acquireSeconds:   d("acquire_duration_seconds_total", "Total time spent in successful acquires."),
		emptyAcquires:    d("empty_acquires_total", "Successful acquires that waited because no connection was idle."),
		emptyWait:        d("empty_acquire_wait_seconds_total", "Total time acquires waited because no connection was idle."),
		canceled:         d("canceled_acquires_total", "Acquires abandoned because their context ended (including database.pool.acquire_timeout)."),
		newConns:         d("new_conns_total", "Connections opened."),
		lifetimeDestroys: d("max_lifetime_destroys_total", "Connections closed for reaching max_conn_lifetime."),
		idleDestroys:     d("max_idle_destroys_total", "Connections closed for being idle longer than idle_timeout."),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.total, c.idle, c.acquired, c.constructing, c.max,
		c.acquires, c.acquireSeconds, c.emptyAcquires, c.emptyWait,
		c.canceled, c.newConns, c.lifetimeDestroys, c.idleDestroys} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.pool.Stat()
	g := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	n := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v)
	}
	g(c.total, float64(s.TotalConns()))
	g(c.idle, float64(s.IdleConns()))
	g(c.acquired, float64(s.AcquiredConns()))
	g(c.constructing, float64(s.ConstructingConns()))
	g(c.max, float64(s.MaxConns()))
	n(c.acquires, float64(s.AcquireCount()))
	n(c.acquireSeconds, s.AcquireDuration().Seconds())
	n(c.emptyAcquires, float64(s.EmptyAcquireCount()))
	n(c.emptyWait, s.EmptyAcquireWaitTime().Seconds())
	n(c.canceled, float64(s.CanceledAcquireCount()))
	n(c.newConns, float64(s.NewConnsCount()))
	n(c.lifetimeDestroys, float64(s.MaxLifetimeDestroyCount()))
	n(c.idleDestroys, float64(s.MaxIdleDestroyCount()))
}
