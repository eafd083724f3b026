// Package metrictest reads series from a Prometheus registry in tests, by
// family name and labels: what prometheus/testutil offers for a collector
// in hand (ToFloat64) but not for a registry.
package metrictest

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Value returns the value of the counter, gauge or untyped series
// name{labels} in g, and whether g has that series. labels must name every
// label of the series.
func Value(tb testing.TB, g prometheus.Gatherer, name string, labels map[string]string) (float64, bool) {
	tb.Helper()
	m := find(tb, g, name, labels)
	switch {
	case m == nil:
		return 0, false
	case m.Counter != nil:
		return m.Counter.GetValue(), true
	case m.Gauge != nil:
		return m.Gauge.GetValue(), true
	}
	return m.GetUntyped().GetValue(), true
}

// SampleCount returns the number of observations of the histogram or
// summary series name{labels} in g, and whether g has that series.
func SampleCount(tb testing.TB, g prometheus.Gatherer, name string, labels map[string]string) (uint64, bool) {
	tb.Helper()
	m := find(tb, g, name, labels)
	switch {
	case m == nil:
		return 0, false
	case m.Histogram != nil:
		return m.Histogram.GetSampleCount(), true
	}
	return m.GetSummary().GetSampleCount(), true
}

// Sum adds up the counter, gauge or untyped series of family name in g
// whose labels include every pair in labels (others may be there too).
func Sum(tb testing.TB, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	tb.Helper()
	mfs, err := g.Gather()
	if err != nil {
		tb.Fatalf("gathering metrics: %v", err)
	}
	var total float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if includes(m.GetLabel(), labels) {
				total += m.GetCounter().GetValue() + m.GetGauge().GetValue() + m.GetUntyped().GetValue()
			}
		}
	}
	return total
}

func includes(got []*dto.LabelPair, want map[string]string) bool {
	n := 0
	for _, l := range got {
		if v, ok := want[l.GetName()]; ok {
			if v != l.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(want)
}

func find(tb testing.TB, g prometheus.Gatherer, name string, labels map[string]string) *dto.Metric {
	tb.Helper()
	mfs, err := g.Gather()
	if err != nil {
		tb.Fatalf("gathering metrics: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if matches(m.GetLabel(), labels) {
				return m
			}
		}
	}
	return nil
}

func matches(got []*dto.LabelPair, want map[string]string) bool {
	if len(got) != len(want) {
		return false
	}
	for _, l := range got {
		if v, ok := want[l.GetName()]; !ok || v != l.GetValue() {
			return false
		}
	}
	return true
}
