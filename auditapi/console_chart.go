package auditapi

import (
	"strconv"
	"strings"
	"time"

	"github.com/meshguard/meshguard/audittrail"
)

// chart is a server-rendered SVG of events per hour, stacked by severity:
// the template draws Bars as rects, and the same numbers as a table for
// screen readers and for anyone who wants them exact.
type chart struct {
	Width, Height int
	Bars          []chartBar
	Hours         []chartHour // the table: one row per hour with events
	Max           int64
	Clamped       bool
	From, To      time.Time
	Ticks         []chartTick
	Severities    []string
	Total         int64
}

type chartBar struct {
	X, Y, W, H int
	Class      string
	Title      string
}

type chartTick struct {
	X     int
	Label string
}

type chartHour struct {
	Hour   time.Time
	Counts []int64 // per severity, in consoleSeverities order
	Total  int64
}

const (
	chartWidth  = 720
	chartHeight = 180
	chartLeft   = 40 // room for the axis labels
	chartBottom = 20
)

func severityChart(counts []audittrail.HourCount, from, to time.Time, clamped bool) *chart {
	hours := int(to.Sub(from) / time.Hour)
	if hours < 1 {
		hours = 1
	}
	ch := &chart{Width: chartWidth, Height: chartHeight, Clamped: clamped, From: from, To: to, Severities: consoleSeverities}
	per := make([][]int64, hours)
	for _, hc := range counts {
		i := int(hc.Hour.Sub(from) / time.Hour)
		if i < 0 || i >= hours {
			continue
		}
		if per[i] == nil {
			per[i] = make([]int64, len(consoleSeverities))
		}
		for j, s := range consoleSeverities {
			if s == hc.Group {
				per[i][j] += hc.Count
			}
		}
	}
	for i, row := range per {
		if row == nil {
			continue
		}
		var t int64
		for _, n := range row {
			t += n
		}
		ch.Max = max(ch.Max, t)
		ch.Total += t
		ch.Hours = append(ch.Hours, chartHour{Hour: from.Add(time.Duration(i) * time.Hour), Counts: row, Total: t})
	}
	plotW, plotH := chartWidth-chartLeft, chartHeight-chartBottom
	barW := max(plotW/hours, 1)
	gap := 0
	if barW > 3 {
		gap = 1
	}
	for i, row := range per {
		if row == nil {
			continue
		}
		x := chartLeft + i*plotW/hours
		y := plotH
		at := from.Add(time.Duration(i) * time.Hour).UTC().Format("2006-01-02 15:00 UTC")
		for j, n := range row {
			if n == 0 {
				continue
			}
			h := int(int64(plotH) * n / ch.Max)
			if h < 1 {
				h = 1
			}
			y -= h
			ch.Bars = append(ch.Bars, chartBar{X: x, Y: y, W: barW - gap, H: h, Class: "sev-" + strings.ToLower(consoleSeverities[j]),
				Title: at + ": " + strconv.FormatInt(n, 10) + " " + consoleSeverities[j]})
		}
	}
	// Up to 6 time labels along the axis.
	step := max(hours/6, 1)
	for i := 0; i < hours; i += step {
		t := from.Add(time.Duration(i) * time.Hour).UTC()
		label := t.Format("15:00")
		if t.Hour() == 0 || i == 0 {
			label = t.Format("Jan 2 15:00")
		}
		ch.Ticks = append(ch.Ticks, chartTick{X: chartLeft + i*plotW/hours, Label: label})
	}
	return ch
}
