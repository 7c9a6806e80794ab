//! Small SVG charts for reports: training curves ([`line_chart`]) and judge win rates
//! with confidence intervals ([`bar_chart`]).
//!
//! Charts are drawn with `plotters`' SVG backend only (no bitmap or system-font
//! features), so the output is a self-contained SVG document returned as a `String`.
//! The same input always renders to the same bytes. Legends sit beside the plot area, never
//! over a curve; tick labels are round numbers chosen here ([`ticks`]), whole numbers on an
//! axis of whole numbers (steps), and never `-0`.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Result};
use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Width of every chart, in pixels.
const WIDTH: u32 = 800;
/// Height of a line chart, in pixels.
const HEIGHT: u32 = 500;
/// Width of the legend column at the right of a line chart, in pixels.
const LEGEND_WIDTH: u32 = 200;
/// Radius of the markers of a [`Mark::Markers`] series, in pixels.
const MARKER_RADIUS: u32 = 4;
/// Height of one bar's row in a [`bar_chart`], in pixels.
const BAR_ROW: u32 = 42;
/// Series colours (Tableau 10: distinct on white, none too pale).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// The one colour of every bar: bars compare values, their colour encodes nothing.
const BAR_COLOR: RGBColor = RGBColor(96, 125, 139);

/// How a [`Series`] is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mark {
    /// A solid line.
    #[default]
    Line,
    /// A thin faded line: the raw values behind their smoothed curve.
    Faded,
    /// A line with a marker at every point: sparse values such as evaluations.
    Markers,
}

/// One named line of a [`line_chart`]: `(x, y)` points, drawn in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Name shown in the legend.
    pub name: String,
    /// Points of the line; points with a NaN or infinite coordinate are skipped.
    pub points: Vec<(f64, f64)>,
    /// How it is drawn.
    pub mark: Mark,
    /// Index of its colour in the palette (modulo its size); a raw curve and its smoothed
    /// curve share one.
    pub color: usize,
}

impl Series {
    /// A solid line of colour `color`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, color: usize) -> Series {
        Series { name: name.into(), points, mark: Mark::Line, color }
    }

    /// The same series drawn with `mark`.
    pub fn with_mark(self, mark: Mark) -> Series {
        Series { mark, ..self }
    }
}

/// One bar of a [`bar_chart`], with an optional error bar from `low` to `high`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Label drawn beside the bar.
    pub label: String,
    /// Length of the bar; a non-finite value draws no bar (the label stays).
    pub value: f64,
    /// Lower end of the error bar (e.g. the 95% CI's lower bound); `value` if absent.
    pub low: Option<f64>,
    /// Upper end of the error bar; `value` if absent. No error bar when both are absent.
    pub high: Option<f64>,
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing chart: {e:?}")
}

/// `lo..hi` widened so it is never empty and has a little headroom on both sides.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    if span <= f64::EPSILON * lo.abs().max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - d, hi + d)
    } else {
        (lo - span * 0.05, hi + span * 0.05)
    }
}

/// Min and max of the finite values; `None` if there are none.
fn bounds(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Tick marks of an axis: round values and the labels to print for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticks {
    /// The tick values, increasing.
    pub values: Vec<f64>,
    /// Distance between neighbouring ticks.
    pub step: f64,
}

/// Round ticks inside `lo..=hi`: a step of 1, 2 or 5 times a power of ten giving at most
/// `max` ticks; with `integer`, a whole step (≥ 1), for axes such as optimizer steps.
pub fn ticks(lo: f64, hi: f64, max: usize, integer: bool) -> Ticks {
    let raw = ((hi - lo) / max.max(1) as f64).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    if integer {
        step = step.max(1.0).round();
    }
    let (first, last) = ((lo / step).ceil() as i64, (hi / step).floor() as i64);
    Ticks { values: (first..=last).map(|k| k as f64 * step).collect(), step }
}

impl Ticks {
    /// The label of `v`: as many decimals as the step needs (scientific notation for tiny or
    /// huge values), and `0` for zero (never `-0`).
    pub fn label(&self, v: f64) -> String {
        if v.abs() < self.step * 1e-6 {
            return "0".into();
        }
        let step_exp = self.step.log10().floor() as i32;
        let max = self.values.iter().fold(v.abs(), |m, t| m.max(t.abs()));
        if max < 1e-3 || max >= 1e6 {
            let digits = (max.log10().floor() as i32 - step_exp).max(0) as usize;
            format!("{v:.digits$e}")
        } else {
            let decimals = (-step_exp).max(0) as usize;
            format!("{v:.decimals$}")
        }
    }
}

/// An f64 axis over a range whose tick marks (and grid lines) are exactly `ticks`.
struct Axis {
    range: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Axis {
    fn new(lo: f64, hi: f64, ticks: &Ticks) -> Axis {
        Axis { range: (lo..hi).into(), ticks: ticks.values.clone() }
    }
}

impl Ranged for Axis {
    // Labels always come from a formatter built on `Ticks::label`.
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.range.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.range()
    }
}

/// TensorBoard's smoothing: an exponential moving average with weight `weight` in `[0, 1)`,
/// debiased for its zero start (`s_k = (w·a_{k−1} + (1−w)·y_k) / (1 − w^k)`), so the first
/// smoothed point equals the first value. Points with a non-finite y are kept as they are
/// and do not enter the average. A weight of 0 returns the points unchanged.
pub fn ema(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let (mut acc, mut n) = (0.0, 0);
    points
        .iter()
        .map(|&(x, y)| {
            if !y.is_finite() {
                return (x, y);
            }
            acc = acc * weight + (1.0 - weight) * y;
            n += 1;
            (x, acc / (1.0 - weight.powi(n)))
        })
        .collect()
}

/// Renders an SVG chart that only shows `title` and "no data".
fn no_data(title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
        let (w, h) = root.dim_in_pixel();
        let style = TextStyle::from(("sans-serif", 18).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), style)).map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The drawing style of a series' line.
fn line_style(s: &Series) -> ShapeStyle {
    let color = PALETTE[s.color % PALETTE.len()];
    match s.mark {
        Mark::Faded => color.mix(0.4).stroke_width(1),
        Mark::Line | Mark::Markers => color.stroke_width(2),
    }
}

/// Draws one line per series, with a legend beside the plot area, axis labels and ranges
/// fitted to the data.
///
/// Points with a NaN or infinite coordinate are ignored and a series with no finite point
/// is left out; when nothing is left the chart just says "no data". When every x is a whole
/// number (steps), the x ticks are whole numbers.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<String> {
    let kept: Vec<(&Series, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s, s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect::<Vec<_>>()))
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    let all = || kept.iter().flat_map(|(_, pts)| pts.iter().copied());
    let (Some((x0, x1)), Some((y0, y1))) = (bounds(all().map(|p| p.0)), bounds(all().map(|p| p.1))) else {
        return no_data(title);
    };
    let integer_x = all().all(|(x, _)| x.fract() == 0.0);
    let (x0, x1) = if x0 == x1 { padded(x0, x1) } else { (x0, x1) };
    let (y0, y1) = padded(y0, y1);
    let (xt, yt) = (ticks(x0, x1, 10, integer_x), ticks(y0, y1, 8, false));
    let (x_fmt, y_fmt) = (|v: &f64| xt.label(*v), |v: &f64| yt.label(*v));

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
        let (plot_area, legend_area) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(Axis::new(x0, x1, &xt), Axis::new(y0, y1, &yt))
            .map_err(err)?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 16))
            .bold_line_style(BLACK.mix(0.12))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(err)?;
        // Faded raw curves first, so the curves drawn over them stay visible.
        let mut order: Vec<&(&Series, Vec<(f64, f64)>)> = kept.iter().collect();
        order.sort_by_key(|(s, _)| s.mark != Mark::Faded);
        for (s, pts) in order {
            let style = line_style(s);
            chart.draw_series(LineSeries::new(pts.iter().copied(), style)).map_err(err)?;
            if s.mark == Mark::Markers {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, MARKER_RADIUS, style.filled()))).map_err(err)?;
            }
        }
        legend(&legend_area, &kept.iter().map(|(s, _)| *s).collect::<Vec<_>>())?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Draws the legend of `series` in its own area: per series a sample of its line (and
/// marker) and its name.
fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, series: &[&Series]) -> Result<()> {
    let style = TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, s) in series.iter().enumerate() {
        let y = 30 + 24 * i as i32;
        let line = line_style(s);
        area.draw(&PathElement::new(vec![(4, y), (30, y)], line)).map_err(err)?;
        if s.mark == Mark::Markers {
            area.draw(&Circle::new((17, y), MARKER_RADIUS, line.filled())).map_err(err)?;
        }
        area.draw(&Text::new(s.name.as_str(), (38, y), style.clone())).map_err(err)?;
    }
    Ok(())
}

/// Draws one horizontal bar per entry of `bars`, top to bottom with its label at its left
/// (long labels never overlap), error bars from `low` to `high`, and an optional red
/// vertical `reference_line` (e.g. `0.5` for win-rate parity). Every bar has one neutral
/// colour.
///
/// `value_range` fixes the value axis (e.g. `(0.0, 1.0)` for rates); otherwise it is fitted
/// to zero, the values, the error bars and the reference line. No bars gives a "no data" chart.
pub fn bar_chart(
    title: &str,
    value_label: &str,
    bars: &[Bar],
    value_range: Option<(f64, f64)>,
    reference_line: Option<f64>,
) -> Result<String> {
    if bars.is_empty() {
        return no_data(title);
    }
    let (v0, v1) = match value_range {
        Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
        Some(r) => return Err(anyhow!("bar_chart: invalid value range {r:?}")),
        None => {
            let vals = bars.iter().flat_map(|b| [Some(b.value), b.low, b.high]).flatten();
            let (lo, hi) = bounds(vals.chain([0.0]).chain(reference_line)).unwrap_or((0.0, 1.0));
            let (plo, phi) = padded(lo, hi);
            (if lo >= 0.0 { lo } else { plo }, phi)
        }
    };
    let n = bars.len();
    let height = 120 + BAR_ROW * n as u32;
    // Room for the longest label (about 8 px a character at 14 px), within reason.
    let longest = bars.iter().map(|b| b.label.chars().count()).max().unwrap_or(0) as u32;
    let label_width = (longest * 8 + 20).clamp(60, WIDTH / 2);
    let vt = ticks(v0, v1, 10, false);
    let v_fmt = |v: &f64| vt.label(*v);
    // Bar i at y = n − 1 − i, so the first bar is at the top.
    let row_y = |i: usize| (n - 1 - i) as f64;

    let mut svg = String::new();
    {
        let page = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        page.fill(&WHITE).map_err(err)?;
        let root = page.titled(title, ("sans-serif", 22)).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(15)
            .margin_right(30)
            .x_label_area_size(45)
            .y_label_area_size(label_width)
            .build_cartesian_2d(Axis::new(v0, v1, &vt), -0.5..n as f64 - 0.5)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 16))
            .bold_line_style(BLACK.mix(0.12))
            .x_label_formatter(&v_fmt)
            .x_desc(value_label)
            .draw()
            .map_err(err)?;

        let clamp = |v: f64| v.clamp(v0, v1);
        let base = clamp(0.0);
        for (i, bar) in bars.iter().enumerate() {
            let y = row_y(i);
            if bar.value.is_finite() {
                let rect = [(base, y - 0.32), (clamp(bar.value), y + 0.32)];
                chart.draw_series([Rectangle::new(rect, BAR_COLOR.mix(0.8).filled())]).map_err(err)?;
            }
            if bar.low.is_some() || bar.high.is_some() {
                let v = if bar.value.is_finite() { bar.value } else { f64::NAN };
                let (lo, hi) = (bar.low.unwrap_or(v), bar.high.unwrap_or(v));
                if lo.is_finite() && hi.is_finite() {
                    let mid = if v.is_finite() { clamp(v) } else { clamp((lo + hi) / 2.0) };
                    let eb = ErrorBar::new_horizontal(y, clamp(lo), mid, clamp(hi), BLACK.stroke_width(2), 12);
                    chart.draw_series([eb]).map_err(err)?;
                }
            }
            // Label at the left of the bar, right-aligned against the axis (in the page's
            // pixels: `backend_coord` is absolute, the titled area starts below the title).
            let (px, py) = chart.backend_coord(&(v0, y));
            let style = TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
            page.draw(&Text::new(bar.label.as_str(), (px - 8, py), style)).map_err(err)?;
        }
        if let Some(r) = reference_line.filter(|r| r.is_finite() && (v0..=v1).contains(r)) {
            let line = [(r, -0.5), (r, n as f64 - 0.5)];
            chart.draw_series(LineSeries::new(line, RED.stroke_width(1))).map_err(err)?;
        }
        page.present().map_err(err)?;
    }
    Ok(svg)
}

/// Writes `svg` to `path` atomically (via [`crate::io::write_atomic`]).
pub fn write_svg(path: &Path, svg: &str) -> Result<()> {
    crate::io::write_atomic(path, |w| {
        w.write_all(svg.as_bytes())?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series::new(name, points.to_vec(), 0)
    }

    fn bars(ci: bool) -> Vec<Bar> {
        let rows = [("kto", 0.62, 0.55, 0.69), ("dpo", 0.55, 0.48, 0.62), ("sft", 0.41, 0.34, 0.48)];
        let b = |(l, v, lo, hi): (&str, f64, f64, f64)| Bar { label: l.into(), value: v, low: ci.then_some(lo), high: ci.then_some(hi) };
        rows.into_iter().map(b).collect()
    }

    /// Asserts `svg` is one `<svg>` document that contains every one of `texts`.
    fn assert_svg(svg: &str, texts: &[&str]) {
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        for text in texts {
            assert!(svg.contains(text), "missing {text}");
        }
    }

    /// The `<text>` elements of `svg`: (attributes, content).
    fn texts(svg: &str) -> Vec<(String, String)> {
        svg.split("<text").skip(1).map(|t| {
            let (attrs, rest) = t.split_once('>').unwrap();
            (attrs.to_string(), rest.split("</text>").next().unwrap().trim().to_string())
        })
        .collect()
    }

    /// The numeric attribute `name` of an element's attributes.
    fn attr(attrs: &str, name: &str) -> f64 {
        let at = attrs.find(&format!(" {name}=\"")).unwrap_or_else(|| panic!("no {name} in {attrs}")) + name.len() + 3;
        attrs[at..].split('"').next().unwrap().parse().unwrap()
    }

    /// The text element whose content is `content`.
    fn text<'a>(all: &'a [(String, String)], content: &str) -> &'a String {
        &all.iter().find(|(_, c)| c == content).unwrap_or_else(|| panic!("no text {content}: {all:?}")).0
    }

    /// Tick labels: the texts that parse as numbers.
    fn numeric_labels(svg: &str) -> Vec<String> {
        texts(svg).into_iter().map(|(_, c)| c).filter(|c| c.parse::<f64>().is_ok()).collect()
    }

    #[test]
    fn plot_line_chart_has_title_legend_and_labels() {
        let nan = f64::NAN;
        let s = [
            series("kto_loss", &[(0.0, 1.0), (1.0, 0.7), (2.0, 0.5)]),
            series("dpo_loss", &[(0.0, 0.9), (1.0, nan), (2.0, 0.4), (f64::INFINITY, 1.0)]),
        ];
        let svg = line_chart("Training loss", "step", "loss", &s).unwrap();
        assert_svg(&svg, &["Training loss", "kto_loss", "dpo_loss", "step", "loss"]);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_eq!(svg, line_chart("Training loss", "step", "loss", &s).unwrap());
    }

    #[test]
    fn plot_line_chart_skips_non_finite_and_empty() {
        let s = [series("ok", &[(1.0, 2.0)]), series("all_nan", &[(f64::NAN, 1.0), (2.0, f64::NAN)])];
        let svg = line_chart("t", "x", "y", &s).unwrap();
        assert_svg(&svg, &["ok"]);
        assert!(!svg.contains("all_nan"));
        for empty in [&[][..], &[series("e", &[])][..], &s[1..]] {
            assert_svg(&line_chart("Empty", "x", "y", empty).unwrap(), &["Empty", "no data"]);
        }
    }

    #[test]
    fn plot_three_steps_have_whole_step_ticks_and_no_negative_zero() {
        // Rewards around 0 (step-1 noise), over steps 1 to 3.
        let s = [series("rewards/chosen", &[(1.0, -1e-6), (2.0, 0.012), (3.0, 0.031)]), series("rewards/rejected", &[(1.0, 1e-6), (2.0, -0.01), (3.0, -0.02)])];
        let svg = line_chart("Rewards", "step", "reward", &s).unwrap();
        let labels = numeric_labels(&svg);
        for step in ["1", "2", "3"] {
            assert!(labels.iter().any(|l| l == step), "no tick {step}: {labels:?}");
        }
        assert!(!labels.iter().any(|l| l.parse::<f64>().unwrap() == 0.0 && l.starts_with('-')), "a -0 label: {labels:?}");
        let fractional_steps: Vec<&String> = labels.iter().filter(|l| matches!(l.as_str(), "1.5" | "2.5" | "0.5")).collect();
        assert!(fractional_steps.is_empty(), "{labels:?}");
        assert!(labels.iter().any(|l| l == "0"), "zero is labelled 0: {labels:?}");
    }

    #[test]
    fn plot_ticks_are_round_and_labels_exact() {
        let t = ticks(0.0, 3.0, 10, true);
        assert_eq!((t.values.clone(), t.step), (vec![0.0, 1.0, 2.0, 3.0], 1.0));
        assert_eq!(ticks(0.0, 40.0, 10, true).values, (0..=8).map(|k| k as f64 * 5.0).collect::<Vec<_>>());
        let y = ticks(-0.021, 0.033, 8, false);
        assert_eq!(y.step, 0.01);
        let labels: Vec<String> = y.values.iter().map(|v| y.label(*v)).collect();
        assert_eq!(labels, ["-0.02", "-0.01", "0", "0.01", "0.02", "0.03"]);
        assert_eq!(y.label(-1e-12), "0");
        let lr = ticks(0.0, 5e-6, 6, false);
        assert_eq!(lr.values.iter().map(|v| lr.label(*v)).collect::<Vec<_>>(), ["0", "1e-6", "2e-6", "3e-6", "4e-6", "5e-6"]);
    }

    #[test]
    fn plot_marker_series_has_a_marker_per_point() {
        let train = series("loss", &[(1.0, 0.7), (2.0, 0.6), (3.0, 0.5), (4.0, 0.45)]);
        let eval = Series::new("eval/loss", vec![(0.0, 0.7), (4.0, 0.5)], 1).with_mark(Mark::Markers);
        let with_eval = line_chart("Loss", "step", "loss", &[train.clone(), eval]).unwrap();
        let without = line_chart("Loss", "step", "loss", &[train]).unwrap();
        // Two points and one legend sample.
        assert_eq!(with_eval.matches("<circle").count() - without.matches("<circle").count(), 3);
    }

    #[test]
    fn plot_legend_is_beside_the_plot_area() {
        let s = [series("rewards/chosen", &[(0.0, 0.0), (10.0, 1.0)]), series("eval/rewards/accuracies", &[(0.0, 1.0), (10.0, 0.0)])];
        let svg = line_chart("Legend", "step", "value", &s).unwrap();
        let all = texts(&svg);
        for name in ["rewards/chosen", "eval/rewards/accuracies"] {
            assert!(attr(text(&all, name), "x") >= f64::from(WIDTH - LEGEND_WIDTH), "{name} is drawn over the plot area");
        }
        // Every tick label of the x axis lies left of the legend column.
        let max_tick_x = all.iter().filter(|(_, c)| c.parse::<f64>().is_ok()).map(|(a, _)| attr(a, "x")).fold(0.0, f64::max);
        assert!(max_tick_x < f64::from(WIDTH - LEGEND_WIDTH));
    }

    #[test]
    fn plot_faded_series_is_drawn_first_and_pale() {
        let raw = Series::new("loss", vec![(1.0, 0.9), (2.0, 0.3), (3.0, 0.8)], 0).with_mark(Mark::Faded);
        let smooth = Series::new("loss (EMA 0.6)", ema(&raw.points, 0.6), 0);
        let svg = line_chart("Loss", "step", "loss", &[smooth, raw]).unwrap();
        let lines: Vec<&str> = svg.split("<polyline").skip(1).filter(|l| l.contains("stroke=\"#1F77B4\"")).collect();
        // The two curves, then their two legend samples.
        assert_eq!(lines.len(), 4);
        assert!(lines[0].contains("opacity=\"0.4\""), "the faded line comes first: {}", lines[0]);
        assert!(lines[1].contains("opacity=\"1\""));
    }

    #[test]
    fn plot_ema_is_tensorboards_debiased_average() {
        let pts = [(1.0, 1.0), (2.0, 0.0), (3.0, f64::NAN), (4.0, 1.0)];
        let s = ema(&pts, 0.5);
        // a1 = 0.5 → 1; a2 = 0.25 → 0.25/0.75; NaN passes through; a3 = 0.625 → 0.625/0.875.
        assert_eq!(s[0], (1.0, 1.0));
        assert!((s[1].1 - 1.0 / 3.0).abs() < 1e-12);
        assert!(s[2].1.is_nan());
        assert!((s[3].1 - 0.625 / 0.875).abs() < 1e-12);
        assert_eq!(ema(&pts[..2], 0.0), pts[..2].to_vec());
        assert!(ema(&[(0.0, 2.0); 5], 0.9).iter().all(|p| (p.1 - 2.0).abs() < 1e-12));
    }

    #[test]
    fn plot_bar_chart_labels_error_bars_and_reference() {
        let chart = |ci, r| bar_chart("Win rate vs SFT", "win rate", &bars(ci), Some((0.0, 1.0)), r);
        let (a, b, c) = (chart(false, None).unwrap(), chart(true, None).unwrap(), chart(true, Some(0.5)).unwrap());
        for svg in [&a, &b, &c] {
            assert_svg(svg, &["Win rate vs SFT", "win rate", "kto", "dpo", "sft"]);
        }
        let lines = |s: &str| ["<line", "<polyline", "<path"].iter().map(|p| s.matches(p).count()).sum::<usize>();
        assert!(lines(&b) > lines(&a), "error bars add line elements");
        assert!(lines(&c) > lines(&b), "reference line adds an element");
        assert_eq!(a.matches("<rect").count(), b.matches("<rect").count());
        assert_eq!(c, chart(true, Some(0.5)).unwrap());
    }

    #[test]
    fn plot_bar_labels_never_overlap_and_bars_share_one_colour() {
        let labels = ["win rate", "length-controlled", "arithmetic", "capital", "opposite", "plural", "sound", "time"];
        let many: Vec<Bar> = labels.iter().map(|l| Bar { label: l.to_string(), value: 0.5, low: Some(0.3), high: Some(0.7) }).collect();
        let svg = bar_chart("Win rates", "rate (95% CI)", &many, Some((0.0, 1.0)), Some(0.5)).unwrap();
        let all = texts(&svg);
        let mut ys: Vec<f64> = labels.iter().map(|l| attr(text(&all, l), "y")).collect();
        // One row each, top to bottom in order, at least a 14 px font apart.
        assert!(ys.windows(2).all(|w| w[1] - w[0] >= 20.0), "{ys:?}");
        ys.dedup();
        assert_eq!(ys.len(), labels.len());
        // Each label beside its own bar: its y within the bar's rectangle.
        let rects: Vec<&str> = svg.split("<rect").skip(2).collect();
        for (l, rect) in labels.iter().zip(&rects) {
            let (top, h, y) = (attr(rect, "y"), attr(rect, "height"), attr(text(&all, l), "y"));
            assert!(top < y && y < top + h, "{l} at y = {y}, its bar spans {top}..{}", top + h);
        }
        // Right-aligned against the axis, left of the bars.
        let first_bar_x = attr(rects[0], "x");
        for l in labels {
            let attrs = text(&all, l);
            assert!(attrs.contains("text-anchor=\"end\"") && attr(attrs, "x") < first_bar_x, "{l}: {attrs}");
        }
        let fills: std::collections::BTreeSet<&str> = svg.split("<rect").skip(2).map(|r| r.split("fill=\"").nth(1).unwrap().split('"').next().unwrap()).collect();
        assert_eq!(fills.len(), 1, "{fills:?}");
    }

    #[test]
    fn plot_bar_chart_edge_cases() {
        assert_svg(&bar_chart("None", "y", &[], None, Some(0.5)).unwrap(), &["no data"]);
        let mut odd = bars(true);
        (odd[0].value, odd[1].value, odd[1].high) = (f64::NAN, -2.0, Some(f64::INFINITY));
        assert_svg(&bar_chart("Odd", "delta", &odd, None, None).unwrap(), &["kto", "dpo"]);
        assert_svg(&bar_chart("One", "y", &odd[2..], None, None).unwrap(), &["sft"]);
        assert!(bar_chart("Bad", "y", &odd, Some((1.0, 0.0)), None).is_err());
    }

    #[test]
    fn plot_write_svg_roundtrip_and_escaping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/chart.svg");
        let svg = line_chart("A < B & C", "x", "y", &[series("s<1>", &[(0.0, 0.0), (1.0, 1.0)])]).unwrap();
        assert!(!svg.contains("A < B") && !svg.contains("s<1>"), "text must be XML-escaped");
        write_svg(&path, &svg).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), svg);
    }
}
