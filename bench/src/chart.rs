//! The chart of consumer throughput: msgs/s per scenario and concurrency,
//! as SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::BoxError;
use crate::report::Row;

/// Draws one line per consumer scenario over the concurrencies measured.
pub fn consumers(rows: &[Row], path: &Path) -> Result<(), BoxError> {
    let mut concurrencies: Vec<usize> = rows.iter().filter_map(|r| r.concurrency).collect();
    concurrencies.sort_unstable();
    concurrencies.dedup();
    let mut scenarios: Vec<(&str, &str)> = Vec::new();
    for row in rows {
        if !scenarios.iter().any(|(id, _)| *id == row.id) {
            scenarios.push((row.id, row.scenario));
        }
    }
    if concurrencies.is_empty() {
        return Ok(());
    }
    let top = rows.iter().map(|r| r.msgs_per_s).fold(0.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let last = concurrencies.len().saturating_sub(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Consumer throughput (msgs/s, median)", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2..last + 0.2, 0.0..top.max(1.0))?;
    let labels = concurrencies.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("concurrency")
        .y_desc("msgs/s")
        .x_labels(concurrencies.len().max(2))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels
                    .get(i as usize)
                    .map_or(String::new(), |c| c.to_string())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()?;
    for (n, (id, name)) in scenarios.iter().enumerate() {
        let color = Palette99::pick(n).to_rgba();
        let points: Vec<(f64, f64)> = concurrencies
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                rows.iter()
                    .find(|r| r.id == *id && r.concurrency == Some(*c))
                    .map(|r| (i as f64, r.msgs_per_s))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
