//! SVG plots of scan and eval reports (`plotters`, SVG backend only).

use std::path::Path;

use plotters::prelude::*;

use super::eval::EvalReport;
use super::scan::ScanReport;
use crate::io::write_atomic;
use crate::{Error, Result};

const SIZE: (u32, u32) = (800, 500);
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn fail(e: impl std::fmt::Display) -> Error {
    Error::invalid("plot", e.to_string())
}

/// The corner of the plot with the fewest data points near it (within
/// 40% of each axis), for the legend; ties go to the earlier corner in
/// the order lower right, upper right, upper left, lower left.
fn emptiest_corner(pts: &[(f64, f64)], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    let near = |v: f64, (lo, hi): (f64, f64), high: bool| {
        let t = (v - lo) / (hi - lo).max(f64::MIN_POSITIVE);
        if high { t >= 0.6 } else { t <= 0.4 }
    };
    let corners = [
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let mut best = (usize::MAX, SeriesLabelPosition::LowerRight);
    for (pos, right, top) in corners {
        let n = pts
            .iter()
            .filter(|&&(px, py)| near(px, x, right) && near(py, y, top))
            .count();
        if n < best.0 {
            best = (n, pos);
        }
    }
    best.1
}

/// Alignment (mean cosine) by layer, one solid line per pooling rule, and
/// the margin (matching minus non-matching mean cosine) as a dashed line
/// of the same colour: a high mean with a low margin is collapse, not
/// alignment.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty report or a drawing failure.
pub fn scan_svg(report: &ScanReport) -> Result<String> {
    if report.layers.is_empty() {
        return Err(fail("nothing to plot: the scan has no layers"));
    }
    let max_i = report.layers.iter().map(|l| l.index).max().unwrap_or(0);
    let lo = report
        .layers
        .iter()
        .flat_map(|l| [l.mean, l.specificity.margin])
        .filter(|m| m.is_finite())
        .fold(0.0f64, f64::min);
    let lo = if lo < 0.0 { lo - 0.05 } else { 0.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Swahili-English alignment by layer ({} pairs)",
                    report.pairs.len()
                ),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..(max_i.max(1) as f64), lo..1.0f64)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .x_labels(max_i.max(1) + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("hidden-state index")
            .y_desc("mean cosine / margin")
            .draw()
            .map_err(fail)?;
        for (k, rule) in report.rules().into_iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            let pts: Vec<(f64, f64)> = report
                .layers
                .iter()
                .filter(|l| l.pooling == rule && l.mean.is_finite())
                .map(|l| (l.index as f64, l.mean))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(fail)?
                .label(format!("pooling: {rule}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(fail)?;
            let margins: Vec<(f64, f64)> = report
                .layers
                .iter()
                .filter(|l| l.pooling == rule && l.specificity.margin.is_finite())
                .map(|l| (l.index as f64, l.specificity.margin))
                .collect();
            if !margins.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(margins, 6, 4, color.stroke_width(2)))
                    .map_err(fail)?
                    .label(format!("margin: {rule}"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 8, y)], color.stroke_width(2))
                    });
            }
        }
        let pts: Vec<(f64, f64)> = report
            .layers
            .iter()
            .flat_map(|l| {
                [
                    (l.index as f64, l.mean),
                    (l.index as f64, l.specificity.margin),
                ]
            })
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(emptiest_corner(&pts, (0.0, max_i.max(1) as f64), (lo, 1.0)))
            .draw()
            .map_err(fail)?;
        root.present().map_err(fail)?;
    }
    Ok(svg)
}

/// Two panels. Left: each pair's cosine after against before, one colour
/// per set, with the line `after = before` (points above it improved).
/// Right (when the report carries specificity): per set, the mean pair
/// cosine, the non-matching mean, the margin, top-1 and MRR (Swahili →
/// English) before (open circle) and after (filled), joined by a line: a
/// gain in pair cosine with a flat or falling margin is collapse.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty report or a drawing failure.
pub fn eval_svg(report: &EvalReport) -> Result<String> {
    let all = report
        .sets
        .iter()
        .flat_map(|(_, s)| s.before.iter().chain(&s.after))
        .map(|&v| f64::from(v))
        .filter(|v| v.is_finite());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return Err(fail("nothing to plot: no finite cosines"));
    }
    let with_spec = report.sets.iter().any(|(_, s)| s.specificity.is_some());
    let size = if with_spec {
        (SIZE.0 + SIZE.0 * 3 / 4, SIZE.1)
    } else {
        SIZE
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        if with_spec {
            let (left, right) = root.split_horizontally(SIZE.0);
            scatter_panel(&left, report, lo, hi)?;
            specificity_panel(&right, report)?;
        } else {
            scatter_panel(&root, report, lo, hi)?;
        }
        root.present().map_err(fail)?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn scatter_panel(area: &Area<'_>, report: &EvalReport, lo: f64, hi: f64) -> Result<()> {
    let pad = ((hi - lo) * 0.05).max(0.01);
    let (lo, hi) = (lo - pad, hi + pad);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "Pair cosine before and after (layer {}, pooling {})",
                report.layer, report.pooling
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(lo..hi, lo..hi)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("cosine before")
        .y_desc("cosine after")
        .draw()
        .map_err(fail)?;
    chart
        .draw_series(LineSeries::new(vec![(lo, lo), (hi, hi)], BLACK.mix(0.5)))
        .map_err(fail)?
        .label("after = before")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (k, (name, s)) in report.sets.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        chart
            .draw_series(
                s.before
                    .iter()
                    .zip(&s.after)
                    .map(|(&b, &a)| Circle::new((f64::from(b), f64::from(a)), 2, color.filled())),
            )
            .map_err(fail)?
            .label(format!(
                "{name}: {:.4} -> {:.4} ({:+.1}%)",
                s.before_mean, s.after_mean, s.change_pct
            ))
            .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        // Improved pairs sit above the diagonal: the lower right is
        // where the legend hides the fewest points.
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(fail)?;
    Ok(())
}

/// The quantities of the specificity panel, in x order.
const SPEC_METRICS: [&str; 5] = ["pair cosine", "non-matching", "margin", "top-1", "MRR"];

/// One set in the specificity panel: its index (for the colour), name and
/// `(before, after)` of each of [`SPEC_METRICS`].
type SpecRow<'a> = (usize, &'a str, [(f64, f64); 5]);

fn specificity_panel(area: &Area<'_>, report: &EvalReport) -> Result<()> {
    // (set index, name, [(before, after); 5]) for the sets that have it.
    let rows: Vec<SpecRow<'_>> = report
        .sets
        .iter()
        .enumerate()
        .filter_map(|(k, (name, s))| {
            s.specificity.as_ref().map(|c| {
                let (b, a) = (&c.before, &c.after);
                (
                    k,
                    name.as_str(),
                    [
                        (s.before_mean, s.after_mean),
                        (b.nonmatching_mean, a.nonmatching_mean),
                        (b.margin, a.margin),
                        (b.top1, a.top1),
                        (b.mrr, a.mrr),
                    ],
                )
            })
        })
        .collect();
    let lo = rows
        .iter()
        .flat_map(|(_, _, v)| v.iter().flat_map(|&(b, a)| [b, a]))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::min);
    let lo = if lo < 0.0 { lo - 0.05 } else { 0.0 };
    let k = SPEC_METRICS.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Specificity: before (open) -> after (filled)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(45)
        .build_cartesian_2d(-0.5f64..(k as f64 - 0.5), lo..1.05f64)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .max_light_lines(2)
        .x_labels(k)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < SPEC_METRICS.len() {
                SPEC_METRICS[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("cosine / fraction")
        .draw()
        .map_err(fail)?;
    let ns = rows.len() as f64;
    for (slot, (k_set, name, values)) in rows.iter().enumerate() {
        let color = COLORS[k_set % COLORS.len()];
        let dx = (slot as f64 - (ns - 1.0) / 2.0) * 0.18;
        let pts: Vec<(f64, f64, f64)> = values
            .iter()
            .enumerate()
            .filter(|(_, (b, a))| b.is_finite() && a.is_finite())
            .map(|(i, &(b, a))| (i as f64 + dx, b, a))
            .collect();
        for &(x, b, a) in &pts {
            chart
                .draw_series(LineSeries::new(vec![(x, b), (x, a)], color.stroke_width(2)))
                .map_err(fail)?;
        }
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, b, _)| Circle::new((x, b), 4, color.stroke_width(2))),
            )
            .map_err(fail)?;
        let (mb, ma) = values[2];
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, _, a)| Circle::new((x, a), 4, color.filled())),
            )
            .map_err(fail)?
            .label(format!("{name}: margin {mb:.3} -> {ma:.3}"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .flat_map(|(_, _, v)| {
            v.iter()
                .enumerate()
                .flat_map(|(i, &(b, a))| [(i as f64, b), (i as f64, a)])
        })
        .filter(|p| p.1.is_finite())
        .collect();
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(emptiest_corner(&pts, (-0.5, k as f64 - 0.5), (lo, 1.05)))
        .draw()
        .map_err(fail)?;
    Ok(())
}

/// Write `text` to `path` atomically (temporary file, then rename).
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, |w| {
        w.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
    })
}
