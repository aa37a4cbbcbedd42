//! SVG charts: HdrHistogram-style latency percentile plots and throughput bars.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::data::Sample;
use crate::report::{median, targets};

/// Line colours, one per target in `runs.json` order.
const PALETTE: [RGBColor; 6] = [
    RGBColor(90, 90, 90),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// The x coordinate of percentile `p` (in percent) on an HdrHistogram plot: `1 / (1 - p)`, so
/// 90% is 10, 99% is 100, 99.9% is 1000.
pub(crate) fn percentile_x(p: f64) -> f64 {
    100.0 / (100.0 - p)
}

/// Axis label for an x coordinate of [`percentile_x`]: `90%`, `99.9%`.
pub(crate) fn percentile_label(x: f64) -> String {
    let p = 100.0 - 100.0 / x;
    let text = format!("{p:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

/// One target's line: (percentile, median over rounds of the value at it), below 100%.
fn percentile_line(
    samples: &[Sample],
    scenario: &str,
    hist: &str,
    target: &str,
) -> Vec<(f64, f64)> {
    let runs: Vec<_> = samples
        .iter()
        .filter(|s| s.entry.scenario == scenario && s.entry.target == target)
        .filter_map(|s| s.run.as_ref()?.histograms.get(hist))
        .filter(|h| h.count > 0.0)
        .collect();
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .percentiles
        .iter()
        .map(|row| row.percentile)
        .filter(|&p| p < 100.0)
        .filter_map(|p| {
            let mut values: Vec<f64> = runs.iter().filter_map(|h| h.at(p)).collect();
            median(&mut values).map(|v| (p, v))
        })
        .collect()
}

/// Latency by percentile, one line per target, log x-axis of `1 / (1 - p)` and log y-axis.
/// Returns false (and writes nothing) when no target has samples.
pub(crate) fn percentile_chart(
    path: &Path,
    title: &str,
    samples: &[Sample],
    scenario: &str,
    hist: &str,
) -> Result<bool, Box<dyn std::error::Error>> {
    let lines: Vec<(String, Vec<(f64, f64)>)> = targets(samples)
        .into_iter()
        .map(|t| {
            let line = percentile_line(samples, scenario, hist, &t);
            (t, line)
        })
        .filter(|(_, line)| !line.is_empty())
        .collect();
    if lines.is_empty() {
        return Ok(false);
    }
    let all = lines.iter().flat_map(|(_, l)| l.iter());
    let max_x = all
        .clone()
        .map(|&(p, _)| percentile_x(p))
        .fold(10.0, f64::max);
    let min_y = all
        .clone()
        .map(|&(_, v)| v)
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let max_y = all.map(|&(_, v)| v).fold(0.0, f64::max).max(min_y * 2.0);

    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (1.8..max_x * 1.5).log_scale(),
            (min_y * 0.8..max_y * 1.25).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (i, (target, line)) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                line.iter().map(|&(p, v)| (percentile_x(p), v)),
                color.stroke_width(2),
            ))?
            .label(target.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}

/// One bar per target. Returns false (and writes nothing) when there are no values.
pub(crate) fn bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    bars: &[(String, f64)],
) -> Result<bool, Box<dyn std::error::Error>> {
    if bars.is_empty() {
        return Ok(false);
    }
    let max = bars.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1.0);
    let n = i32::try_from(bars.len())?;
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        // A segmented 0..n has n + 1 segments (the end is included): one per bar is 0..n - 1.
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..max * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| bars.get(i))
                .map_or_else(String::new, |(name, _)| name.clone()),
            _ => String::new(),
        })
        .y_label_formatter(&|y| crate::report::format_value(Some(*y)))
        .draw()?;
    for (i, (_, value)) in bars.iter().enumerate() {
        let i = i32::try_from(i)?;
        let color = PALETTE[usize::try_from(i)? % PALETTE.len()];
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *value),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 12, 12);
        chart.draw_series(std::iter::once(bar))?;
        chart.draw_series(std::iter::once(Text::new(
            crate::report::format_value(Some(*value)),
            (SegmentValue::CenterOf(i), *value + max * 0.01),
            ("sans-serif", 14)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )))?;
    }
    root.present()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_axis() {
        assert!((percentile_x(50.0) - 2.0).abs() < 1e-9);
        assert!((percentile_x(99.9) - 1000.0).abs() < 1e-6);
        assert_eq!(percentile_label(2.0), "50%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(1.0), "0%");
    }
}
