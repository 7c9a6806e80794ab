//! Small SVG charts for reports: training curves ([`line_chart`]) and judge win rates
//! with confidence intervals ([`bar_chart`]).
//!
//! Charts are drawn with `plotters`' SVG backend only (no bitmap or system-font
//! features), so the output is a self-contained SVG document returned as a `String`.
//! The same input always renders to the same bytes.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Width of every chart, in pixels.
const WIDTH: u32 = 800;
/// Height of every chart, in pixels.
const HEIGHT: u32 = 500;

/// One named line of a [`line_chart`]: `(x, y)` points, drawn in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Name shown in the legend.
    pub name: String,
    /// Points of the line; points with a NaN or infinite coordinate are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One bar of a [`bar_chart`], with an optional error bar from `low` to `high`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Label drawn under the bar.
    pub label: String,
    /// Height of the bar; a non-finite value draws no bar (the label stays).
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
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// Renders an SVG chart that only shows `title` and "no data".
fn no_data(title: &str) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
        let (w, h) = root.dim_in_pixel();
        let style = TextStyle::from(("sans-serif", 18).into_font())
            .pos(Pos::new(HPos::Center, VPos::Center));
        root.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), style))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Draws one line per series with a legend, axis labels and ranges fitted to the data.
///
/// Points with a NaN or infinite coordinate are ignored and a series with no finite point
/// is left out; when nothing is left the chart just says "no data".
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<String> {
    // (palette index, name, finite points) of the series that have any finite point.
    let finite = |s: &Series| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    };
    let kept = series
        .iter()
        .enumerate()
        .map(|(i, s)| (i, s.name.as_str(), finite(s)))
        .filter(|(_, _, pts)| !pts.is_empty())
        .collect::<Vec<_>>();
    let all = || kept.iter().flat_map(|(_, _, pts)| pts.iter().copied());
    let (Some((x0, x1)), Some((y0, y1))) = (bounds(all().map(|p| p.0)), bounds(all().map(|p| p.1)))
    else {
        return no_data(title);
    };
    let (x0, x1) = if x0 == x1 { padded(x0, x1) } else { (x0, x1) };
    let (y0, y1) = padded(y0, y1);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .max_light_lines(4)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 16))
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(err)?;
        for (i, name, pts) in kept {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Draws one labelled bar per entry of `bars`, error bars from `low` to `high`, and an
/// optional red horizontal `reference_line` (e.g. `0.5` for win-rate parity).
///
/// `y_range` fixes the y axis (e.g. `(0.0, 1.0)` for rates); otherwise it is fitted to
/// zero, the values, the error bars and the reference line. No bars gives a "no data" chart.
pub fn bar_chart(
    title: &str,
    y_label: &str,
    bars: &[Bar],
    y_range: Option<(f64, f64)>,
    reference_line: Option<f64>,
) -> Result<String> {
    if bars.is_empty() {
        return no_data(title);
    }
    let (y0, y1) = match y_range {
        Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
        Some(r) => return Err(anyhow!("bar_chart: invalid y_range {r:?}")),
        None => {
            let vals = bars
                .iter()
                .flat_map(|b| [Some(b.value), b.low, b.high])
                .flatten();
            let (lo, hi) = bounds(vals.chain([0.0]).chain(reference_line)).unwrap_or((0.0, 1.0));
            let (plo, phi) = padded(lo, hi);
            (if lo >= 0.0 { lo } else { plo }, phi)
        }
    };
    let n = bars.len();

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .max_light_lines(4)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 16))
            .y_desc(y_label)
            .draw()
            .map_err(err)?;

        let clamp = |v: f64| v.clamp(y0, y1);
        let base = clamp(0.0);
        for (i, bar) in bars.iter().enumerate() {
            let x = i as f64;
            if bar.value.is_finite() {
                let color = Palette99::pick(i).to_rgba();
                let rect = [(x - 0.35, base), (x + 0.35, clamp(bar.value))];
                chart
                    .draw_series([Rectangle::new(rect, color.mix(0.75).filled())])
                    .map_err(err)?;
            }
            if bar.low.is_some() || bar.high.is_some() {
                let v = if bar.value.is_finite() {
                    bar.value
                } else {
                    f64::NAN
                };
                let (lo, hi) = (bar.low.unwrap_or(v), bar.high.unwrap_or(v));
                if lo.is_finite() && hi.is_finite() {
                    let mid = if v.is_finite() {
                        clamp(v)
                    } else {
                        clamp((lo + hi) / 2.0)
                    };
                    let eb = ErrorBar::new_vertical(
                        x,
                        clamp(lo),
                        mid,
                        clamp(hi),
                        BLACK.stroke_width(2),
                        12,
                    );
                    chart.draw_series([eb]).map_err(err)?;
                }
            }
            // Label under the bar, placed in pixels below the x axis.
            let (px, py) = chart.backend_coord(&(x, y0));
            let style = TextStyle::from(("sans-serif", 14).into_font())
                .pos(Pos::new(HPos::Center, VPos::Top));
            root.draw(&Text::new(bar.label.as_str(), (px, py + 8), style))
                .map_err(err)?;
        }
        if let Some(r) = reference_line.filter(|r| r.is_finite() && (y0..=y1).contains(r)) {
            let line = [(-0.5, r), (n as f64 - 0.5, r)];
            chart
                .draw_series(LineSeries::new(line, RED.stroke_width(1)))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
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
        Series {
            name: name.into(),
            points: points.to_vec(),
        }
    }

    fn bars(ci: bool) -> Vec<Bar> {
        let rows = [
            ("kto", 0.62, 0.55, 0.69),
            ("dpo", 0.55, 0.48, 0.62),
            ("sft", 0.41, 0.34, 0.48),
        ];
        let b = |(l, v, lo, hi): (&str, f64, f64, f64)| Bar {
            label: l.into(),
            value: v,
            low: ci.then_some(lo),
            high: ci.then_some(hi),
        };
        rows.into_iter().map(b).collect()
    }

    /// Asserts `svg` is one `<svg>` document that contains every one of `texts`.
    fn assert_svg(svg: &str, texts: &[&str]) {
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        for text in texts {
            assert!(svg.contains(text), "missing {text}");
        }
    }

    #[test]
    fn plot_line_chart_has_title_legend_and_labels() {
        let nan = f64::NAN;
        let s = [
            series("kto_loss", &[(0.0, 1.0), (1.0, 0.7), (2.0, 0.5)]),
            series(
                "dpo_loss",
                &[(0.0, 0.9), (1.0, nan), (2.0, 0.4), (f64::INFINITY, 1.0)],
            ),
        ];
        let svg = line_chart("Training loss", "step", "loss", &s).unwrap();
        assert_svg(
            &svg,
            &["Training loss", "kto_loss", "dpo_loss", "step", "loss"],
        );
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_eq!(
            svg,
            line_chart("Training loss", "step", "loss", &s).unwrap()
        );
    }

    #[test]
    fn plot_line_chart_skips_non_finite_and_empty() {
        let s = [
            series("ok", &[(1.0, 2.0)]),
            series("all_nan", &[(f64::NAN, 1.0), (2.0, f64::NAN)]),
        ];
        let svg = line_chart("t", "x", "y", &s).unwrap();
        assert_svg(&svg, &["ok"]);
        assert!(!svg.contains("all_nan"));
        for empty in [&[][..], &[series("e", &[])][..], &s[1..]] {
            assert_svg(
                &line_chart("Empty", "x", "y", empty).unwrap(),
                &["Empty", "no data"],
            );
        }
    }

    #[test]
    fn plot_bar_chart_labels_error_bars_and_reference() {
        let chart = |ci, r| {
            bar_chart(
                "Win rate vs SFT",
                "win rate",
                &bars(ci),
                Some((0.0, 1.0)),
                r,
            )
        };
        let (a, b, c) = (
            chart(false, None).unwrap(),
            chart(true, None).unwrap(),
            chart(true, Some(0.5)).unwrap(),
        );
        for svg in [&a, &b, &c] {
            assert_svg(svg, &["Win rate vs SFT", "win rate", "kto", "dpo", "sft"]);
        }
        let lines = |s: &str| {
            ["<line", "<polyline", "<path"]
                .iter()
                .map(|p| s.matches(p).count())
                .sum::<usize>()
        };
        assert!(lines(&b) > lines(&a), "error bars add line elements");
        assert!(lines(&c) > lines(&b), "reference line adds an element");
        assert_eq!(a.matches("<rect").count(), b.matches("<rect").count());
        assert_eq!(c, chart(true, Some(0.5)).unwrap());
    }

    #[test]
    fn plot_bar_chart_edge_cases() {
        assert_svg(
            &bar_chart("None", "y", &[], None, Some(0.5)).unwrap(),
            &["no data"],
        );
        let mut odd = bars(true);
        (odd[0].value, odd[1].value, odd[1].high) = (f64::NAN, -2.0, Some(f64::INFINITY));
        assert_svg(
            &bar_chart("Odd", "delta", &odd, None, None).unwrap(),
            &["kto", "dpo"],
        );
        assert_svg(
            &bar_chart("One", "y", &odd[2..], None, None).unwrap(),
            &["sft"],
        );
        assert!(bar_chart("Bad", "y", &odd, Some((1.0, 0.0)), None).is_err());
    }

    #[test]
    fn plot_write_svg_roundtrip_and_escaping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/chart.svg");
        let svg = line_chart(
            "A < B & C",
            "x",
            "y",
            &[series("s<1>", &[(0.0, 0.0), (1.0, 1.0)])],
        )
        .unwrap();
        assert!(
            !svg.contains("A < B") && !svg.contains("s<1>"),
            "text must be XML-escaped"
        );
        write_svg(&path, &svg).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), svg);
    }
}
