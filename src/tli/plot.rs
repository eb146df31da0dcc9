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

/// Alignment (mean cosine) by layer, one line per pooling rule.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty report or a drawing failure.
pub fn scan_svg(report: &ScanReport) -> Result<String> {
    if report.layers.is_empty() {
        return Err(fail("nothing to plot: the scan has no layers"));
    }
    let max_i = report.layers.iter().map(|l| l.index).max().unwrap_or(0);
    let finite = report
        .layers
        .iter()
        .map(|l| l.mean)
        .filter(|m| m.is_finite());
    let lo = finite.clone().fold(0.0f64, f64::min).min(0.0);
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
            .y_desc("mean cosine")
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
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(fail)?;
        root.present().map_err(fail)?;
    }
    Ok(svg)
}

/// Each pair's cosine after against before, one colour per set, with the
/// line `after = before`: points above it improved.
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
    let pad = ((hi - lo) * 0.05).max(0.01);
    let (lo, hi) = (lo - pad, hi + pad);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        let mut chart = ChartBuilder::on(&root)
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
                    s.before.iter().zip(&s.after).map(|(&b, &a)| {
                        Circle::new((f64::from(b), f64::from(a)), 2, color.filled())
                    }),
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
        root.present().map_err(fail)?;
    }
    Ok(svg)
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
