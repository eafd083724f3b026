package metrictest

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestValueAndSampleCount(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "c_total", Help: "h"}, []string{"a", "b"})
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "g", Help: "h"})
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "h_seconds", Help: "h"}, []string{"a"})
	reg.MustRegister(c, g, h)
	c.WithLabelValues("x", "y").Add(3)
	c.WithLabelValues("x", "z").Add(5)
	g.Set(-2)
	h.WithLabelValues("x").Observe(1)
	h.WithLabelValues("x").Observe(2)
	for _, tc := range []struct {
		name   string
		labels map[string]string
		want   float64
		ok     bool
	}{
		{"c_total", map[string]string{"a": "x", "b": "z"}, 5, true},
		{"c_total", map[string]string{"a": "x", "b": "y"}, 3, true},
		{"c_total", map[string]string{"a": "x"}, 0, false}, // labels must be exact
		{"c_total", map[string]string{"a": "x", "b": "y", "c": ""}, 0, false},
		{"g", nil, -2, true},
		{"absent", nil, 0, false},
	} {
		if v, ok := Value(t, reg, tc.name, tc.labels); v != tc.want || ok != tc.ok {
			t.Errorf("Value(%s%v) = %v, %v, want %v, %v", tc.name, tc.labels, v, ok, tc.want, tc.ok)
		}
	}
	if n, ok := SampleCount(t, reg, "h_seconds", map[string]string{"a": "x"}); n != 2 || !ok {
		t.Errorf("SampleCount = %d, %v, want 2, true", n, ok)
	}
	if n, ok := SampleCount(t, reg, "h_seconds", map[string]string{"a": "y"}); n != 0 || ok {
		t.Errorf("SampleCount of an absent series = %d, %v", n, ok)
	}
}

func TestSum(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "c_total", Help: "h"}, []string{"a", "b"})
	reg.MustRegister(c)
	c.WithLabelValues("x", "y").Add(3)
	c.WithLabelValues("x", "z").Add(5)
	c.WithLabelValues("w", "y").Add(7)
	for _, tc := range []struct {
		labels map[string]string
		want   float64
	}{
		{nil, 15},
		{map[string]string{"a": "x"}, 8},
		{map[string]string{"b": "y"}, 10},
		{map[string]string{"a": "x", "b": "z"}, 5},
		{map[string]string{"a": "v"}, 0},
		{map[string]string{"c": ""}, 0}, // a label the series do not have
	} {
		if got := Sum(t, reg, "c_total", tc.labels); got != tc.want {
			t.Errorf("Sum(c_total%v) = %v, want %v", tc.labels, got, tc.want)
		}
	}
}
