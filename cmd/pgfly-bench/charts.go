package main

import (
	"bytes"
	"errors"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"
)

// The charts' file names, written beside the markdown report (--out's directory), which
// links them by these relative names.
const (
	chartRelayCost = "relay-cost.svg"
	chartRelayTPS  = "relay-tps.svg"
	chartSeed      = "seed-latency.svg"
	chartMixed     = "mixed-replays.svg"
)

// charts is what the sections hand over to be drawn: the figures of their tables, nothing
// measured anew. A section that did not run leaves its part empty and gets no chart.
type charts struct {
	relay []relayPoint // section 1
	seed  []seedPoint  // section 4
	mixed []mixedPoint // section 6
}

// relayPoint is one pgbench workload at one client count through one endpoint (section 1).
type relayPoint struct {
	workload   string // e.g. "-S -M prepared"
	clients    int
	via        string
	tps        float64
	cpuUSPerTx float64 // the proxy's CPU µs per transaction; NaN where there is no proxy
}

// seedPoint is one setup's latency for one kind of request (section 4).
type seedPoint struct {
	write        bool
	setup        string
	p50MS, p99MS float64
}

// mixedPoint is one run of the mixed load (section 6).
type mixedPoint struct {
	learning       string  // "on" or "off"
	readsReplayed  float64 // share of the reads, 0 to 1
	writesRanFirst float64 // share of the writes the replica region's app ran before their replay
}

// Chart sizes: wide enough for a README column, text at 10 points.
const (
	chartWidth  = 8 * vg.Inch
	chartHeight = 4 * vg.Inch
)

// write draws every chart it has figures for into dir and returns the paths it wrote.
func (c *charts) write(dir string) ([]string, error) {
	var written []string
	for _, ch := range []struct {
		name string
		has  bool
		draw func() (drawer, error)
	}{
		{chartRelayCost, len(c.relay) > 0, c.relayCost},
		{chartRelayTPS, len(c.relay) > 0, c.relayTPS},
		{chartSeed, len(c.seed) > 0, c.seedLatency},
		{chartMixed, len(c.mixed) > 0, c.mixedReplays},
	} {
		if !ch.has {
			continue
		}
		d, err := ch.draw()
		if err != nil {
			return written, fmt.Errorf("chart %s: %w", ch.name, err)
		}
		path := filepath.Join(dir, ch.name)
		if err := saveSVG(path, d); err != nil {
			return written, fmt.Errorf("chart %s: %w", ch.name, err)
		}
		written = append(written, path)
	}
	return written, nil
}

// drawer draws a chart onto a canvas: one plot, or several side by side.
type drawer func(draw.Canvas)

// saveSVG draws d onto an SVG canvas and writes it to path.
//
// The text is laid out with Liberation Sans's metrics but the font is not embedded (its 400 KB
// would add over 500 KB of base64 to each file), so the SVG names the fonts of the same
// metrics a viewer is likelier to have, Arial and Helvetica, and then any sans-serif.
func saveSVG(path string, d drawer) error {
	c := vgsvg.New(chartWidth, chartHeight)
	d(draw.New(c))
	var buf bytes.Buffer
	if _, err := c.WriteTo(&buf); err != nil {
		return err
	}
	svg := bytes.ReplaceAll(buf.Bytes(), []byte("font-family:"+chartFont+";"),
		[]byte("font-family:"+chartFont+",Arial,Helvetica,sans-serif;"))
	return os.WriteFile(path, svg, 0o644)
}

// chartFont is the family every chart's text is set in, one of those plot carries.
const chartFont = "Liberation Sans"

// sans sets a text style in chartFont, at size.
func sans(s *text.Style, size vg.Length) {
	s.Font.Typeface, s.Font.Variant, s.Font.Size = "Liberation", "Sans", size
}

// Series colours, one per endpoint or setup wherever it appears, from a palette readable by
// colour-blind readers (Okabe and Ito).
var (
	colorPgfly     = color.RGBA{0x00, 0x72, 0xb2, 0xff} // blue
	colorBouncer   = color.RGBA{0xe6, 0x9f, 0x00, 0xff} // orange
	colorDirect    = color.RGBA{0x99, 0x99, 0x99, 0xff} // grey
	colorBare      = color.RGBA{0x56, 0xb4, 0xe9, 0xff} // sky blue
	colorRouted    = color.RGBA{0xd5, 0x5e, 0x00, 0xff} // vermilion
	colorPrimary   = color.RGBA{0x00, 0x9e, 0x73, 0xff} // green
	colorLocal     = colorDirect
	colorOther     = color.RGBA{0xcc, 0x79, 0xa7, 0xff} // purple
	colorLearnOn   = colorPgfly
	colorLearnOff  = colorRouted
	colorP50       = colorPgfly
	colorP99       = colorBare
	seriesByPrefix = []struct {
		prefix string
		color  color.Color
	}{
		{"direct", colorDirect}, {"pgfly, Unix socket", colorOther}, {"pgfly", colorPgfly}, {"PgBouncer", colorBouncer}, {"bare", colorBare},
		{setupRouted, colorRouted}, {setupPrimary, colorPrimary}, {"local", colorLocal},
	}
)

func colorFor(series string) color.Color {
	for _, s := range seriesByPrefix {
		if strings.HasPrefix(series, s.prefix) {
			return s.color
		}
	}
	return colorOther
}

// relayCost is section 1's proxy CPU per transaction, by workload and client count.
func (c *charts) relayCost() (drawer, error) {
	g := c.relayBars(func(p relayPoint) float64 { return p.cpuUSPerTx })
	g.title = "Section 1: proxy CPU per transaction (lower is better; a direct connection has no proxy)"
	g.yLabel = "CPU µs per transaction"
	g.label = func(v float64) string { return fmt.Sprintf("%.0f", v) }
	return g.drawer(chartWidth)
}

// relayTPS is section 1's transactions per second, by workload and client count.
func (c *charts) relayTPS() (drawer, error) {
	g := c.relayBars(func(p relayPoint) float64 { return p.tps })
	g.title = "Section 1: pgbench TPS by client count (higher is better)"
	g.yLabel = "transactions per second"
	return g.drawer(chartWidth)
}

// relayBars groups section 1's figures by workload and client count, one series per
// endpoint, in the order they were measured; an endpoint with no figure at all (direct's
// CPU) is left out.
func (c *charts) relayBars(value func(relayPoint) float64) bars {
	var g bars
	group := map[string]int{}
	series := map[string]int{}
	for _, p := range c.relay {
		cat := fmt.Sprintf("%s\n%d %s", p.workload, p.clients, plural(p.clients, "client"))
		if _, ok := group[cat]; !ok {
			group[cat] = len(g.categories)
			g.categories = append(g.categories, cat)
		}
		if _, ok := series[p.via]; !ok {
			series[p.via] = len(g.series)
			g.series = append(g.series, barSeries{name: p.via, color: colorFor(p.via)})
		}
	}
	for i := range g.series {
		g.series[i].values = make([]float64, len(g.categories))
		for j := range g.series[i].values {
			g.series[i].values[j] = math.NaN()
		}
	}
	for _, p := range c.relay {
		cat := fmt.Sprintf("%s\n%d %s", p.workload, p.clients, plural(p.clients, "client"))
		g.series[series[p.via]].values[group[cat]] = value(p)
	}
	g.series = dropEmpty(g.series)
	return g
}

// seedLatency is section 4: write and read latency at p50 and p99 per setup, one panel per
// kind of request.
func (c *charts) seedLatency() (drawer, error) {
	var panels []*plot.Plot
	for _, write := range []bool{true, false} {
		g := bars{yLabel: "latency at the user, ms", label: func(v float64) string { return fmt.Sprintf("%.1f", v) }}
		g.title = "Section 4: read requests (GET /work)"
		if write {
			g.title = "Section 4: write requests (POST /work)"
		}
		p50 := barSeries{name: "p50", color: colorP50}
		p99 := barSeries{name: "p99", color: colorP99}
		for _, p := range c.seed {
			if p.write != write {
				continue
			}
			g.categories = append(g.categories, wrap(p.setup, 14))
			p50.values = append(p50.values, p.p50MS)
			p99.values = append(p99.values, p.p99MS)
		}
		if len(g.categories) == 0 {
			continue
		}
		g.series = []barSeries{p50, p99}
		p, err := g.plot(chartWidth / 2)
		if err != nil {
			return nil, err
		}
		panels = append(panels, p)
	}
	if len(panels) == 0 {
		return nil, errors.New("no figures")
	}
	return func(dc draw.Canvas) {
		tiles := draw.Tiles{Rows: 1, Cols: len(panels), PadX: vg.Points(12), PadTop: vg.Points(4), PadBottom: vg.Points(4),
			PadLeft: vg.Points(4), PadRight: vg.Points(4)}
		canvases := plot.Align([][]*plot.Plot{panels}, tiles, dc)
		for i, p := range panels {
			p.Draw(canvases[0][i])
		}
	}, nil
}

// mixedReplays is section 6: the share of reads replayed, and of writes the replica
// region's app ran first, with learning on and off.
func (c *charts) mixedReplays() (drawer, error) {
	g := bars{
		title:      fmt.Sprintf("Section 6: mixed load, %d clients, 1 request in %d a write (lower is better)", mixedClients, mixedWriteEvery),
		yLabel:     "% of requests",
		categories: []string{"reads replayed\nin the primary region", "writes the replica region's\napp ran before their replay"},
		label:      func(v float64) string { return fmt.Sprintf("%.1f%%", v) },
		yTicks:     []float64{0, 25, 50, 75, 100}, // no 120% above the legend's headroom
	}
	for _, m := range c.mixed {
		col := colorLearnOff
		if m.learning == "on" {
			col = colorLearnOn
		}
		g.series = append(g.series, barSeries{name: "learned write routes " + m.learning, color: col,
			values: []float64{100 * m.readsReplayed, 100 * m.writesRanFirst}})
	}
	return g.drawer(chartWidth)
}

// bars is a grouped bar chart: one group per category, one bar of each series in a group.
type bars struct {
	title, yLabel string
	categories    []string
	series        []barSeries
	label         func(float64) string // the text over each bar; nil for none
	yTicks        []float64            // the value axis's labelled ticks; nil for plot's own
}

// barSeries is one colour of bars, a value per category (NaN: no bar).
type barSeries struct {
	name   string
	color  color.Color
	values []float64
}

func (g bars) drawer(width vg.Length) (drawer, error) {
	p, err := g.plot(width)
	if err != nil {
		return nil, err
	}
	return p.Draw, nil
}

// plot builds the chart for a canvas about width wide.
func (g bars) plot(width vg.Length) (*plot.Plot, error) {
	if len(g.categories) == 0 || len(g.series) == 0 {
		return nil, errors.New("no figures")
	}
	p := plot.New()
	sans(&p.Title.TextStyle, vg.Points(11))
	sans(&p.X.Label.TextStyle, vg.Points(10))
	sans(&p.Y.Label.TextStyle, vg.Points(10))
	sans(&p.X.Tick.Label, vg.Points(9))
	sans(&p.Y.Tick.Label, vg.Points(9))
	sans(&p.Legend.TextStyle, vg.Points(9))
	p.Title.Text = g.title
	p.Title.Padding = vg.Points(6)
	p.Y.Label.Text = g.yLabel
	p.NominalX(g.categories...)
	// Each group spans its category ±0.5, so the bars stay inside the axes.
	p.X.Min, p.X.Max = -0.5, float64(len(g.categories))-0.5
	p.X.Padding, p.Y.Padding = 0, 0
	p.Y.Min = 0
	grid := plotter.NewGrid()
	grid.Vertical.Color = nil // categories need no vertical lines
	p.Add(grid)
	p.Legend.Top, p.Legend.Left = true, true
	p.Legend.Padding = vg.Points(3)
	p.Legend.XOffs = vg.Points(6)

	// Bars take 80% of a group's room; the room is guessed from the canvas, less the Y axis.
	room := (width - 0.8*vg.Inch) / vg.Length(len(g.categories))
	barWidth := room * 0.8 / vg.Length(len(g.series))
	top := 0.0
	for i, s := range g.series {
		vals := make(plotter.Values, len(s.values))
		for j, v := range s.values {
			if !math.IsNaN(v) && !math.IsInf(v, 0) {
				vals[j] = v
				top = max(top, v)
			}
		}
		b, err := plotter.NewBarChart(vals, barWidth)
		if err != nil {
			return nil, fmt.Errorf("series %s: %w", s.name, err)
		}
		b.Color = s.color
		b.LineStyle.Width = 0
		b.Offset = (vg.Length(i) - vg.Length(len(g.series)-1)/2) * barWidth
		p.Add(b)
		p.Legend.Add(s.name, b)
		if g.label != nil {
			l, err := barLabels(s.values, g.label, b.Offset)
			if err != nil {
				return nil, fmt.Errorf("series %s: %w", s.name, err)
			}
			p.Add(l)
		}
	}
	// Headroom for the legend in the top left corner, a line per series.
	if top == 0 {
		top = 1
	}
	p.Y.Max = top * (1.2 + 0.12*float64(len(g.series)))
	if g.yTicks != nil {
		var ticks []plot.Tick
		for _, v := range g.yTicks {
			ticks = append(ticks, plot.Tick{Value: v, Label: fmt.Sprint(v)})
		}
		p.Y.Tick.Marker = plot.ConstantTicks(ticks)
	}
	return p, nil
}

// barLabels writes each value over its bar, offset as the bar is.
func barLabels(values []float64, text func(float64) string, offset vg.Length) (*plotter.Labels, error) {
	var xys plotter.XYs
	var texts []string
	for i, v := range values {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			continue
		}
		xys = append(xys, plotter.XY{X: float64(i), Y: v})
		texts = append(texts, text(v))
	}
	l, err := plotter.NewLabels(plotter.XYLabels{XYs: xys, Labels: texts})
	if err != nil {
		return nil, err
	}
	l.Offset = vg.Point{X: offset, Y: vg.Points(2)}
	for i := range l.TextStyle {
		sans(&l.TextStyle[i], vg.Points(8))
		l.TextStyle[i].XAlign = draw.XCenter
	}
	return l, nil
}

// dropEmpty leaves out the series with no value at all.
func dropEmpty(ss []barSeries) []barSeries {
	var out []barSeries
	for _, s := range ss {
		for _, v := range s.values {
			if !math.IsNaN(v) {
				out = append(out, s)
				break
			}
		}
	}
	return out
}

// wrap breaks s into lines of about n characters at spaces.
func wrap(s string, n int) string {
	var lines []string
	line := ""
	for w := range strings.FieldsSeq(s) {
		if line != "" && len(line)+1+len(w) > n {
			lines = append(lines, line)
			line = w
			continue
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	return strings.Join(append(lines, line), "\n")
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}
