//! The chart: throughput over `acks=all`, a bar per mode and payload size.
//!
//! A bar chart drawn from rectangles (the workspace builds plotters with
//! the SVG backend and line series only). Each bar carries its ratio as
//! text, because a collapsed mode's bar is too short to read.

use std::path::Path;

use plotters::prelude::*;

use super::report::{payload_label, ProducerCostReport};
use super::ProducerMode;
use crate::error::{KafkaTransactionsError, Result};

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
];

pub(super) fn throughput_ratios(report: &ProducerCostReport, path: &Path) -> Result<()> {
    draw(report, path).map_err(|detail| KafkaTransactionsError::Chart {
        path: path.to_owned(),
        detail,
    })
}

fn draw(report: &ProducerCostReport, path: &Path) -> Result<(), String> {
    let payloads = report.payload_sizes();
    let mut modes: Vec<ProducerMode> = Vec::new();
    for m in &report.measurements {
        if !modes.contains(&m.mode) {
            modes.push(m.mode);
        }
    }
    let bars: Vec<(usize, usize, f64)> = report
        .measurements
        .iter()
        .filter_map(|m| {
            let ratio = report.ratios(m)?.throughput;
            let mode = modes.iter().position(|x| *x == m.mode)?;
            let payload = payloads.iter().position(|x| *x == m.payload_bytes)?;
            Some((mode, payload, ratio))
        })
        .collect();
    if bars.is_empty() {
        return Err("no measurement has an acks=all baseline to divide by".to_owned());
    }
    let top = bars.iter().map(|(_, _, ratio)| *ratio).fold(1.0, f64::max) * 1.15;

    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let root = SVGBackend::new(path, (1000, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "producer throughput relative to acks=all (same payload)",
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        // Mode i's bars are centred on x = i, where its label goes.
        .build_cartesian_2d(-0.5f64..modes.len() as f64 - 0.5, 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(modes.len())
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() > 1e-6 || *x < 0.0 {
                return String::new();
            }
            modes
                .get(x.round() as usize)
                .map(|m| m.short_label())
                .unwrap_or_default()
        })
        .y_desc("msgs/s ÷ acks=all msgs/s")
        .y_label_formatter(&|y| format!("{y:.1}×"))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            [(-0.5, 1.0), (modes.len() as f64 - 0.5, 1.0)],
            BLACK.mix(0.5).stroke_width(1),
        ))
        .map_err(|e| e.to_string())?;

    let width = 0.8 / payloads.len() as f64;
    for (p, payload) in payloads.iter().enumerate() {
        let color = COLORS[p % COLORS.len()];
        let series: Vec<(f64, f64)> = bars
            .iter()
            .filter(|(_, bar_payload, _)| *bar_payload == p)
            .map(|(mode, _, ratio)| (*mode as f64 - 0.4 + width * p as f64, *ratio))
            .collect();
        chart
            .draw_series(series.iter().map(|(left, ratio)| {
                Rectangle::new(
                    [(*left, 0.0), (left + width * 0.92, *ratio)],
                    color.filled(),
                )
            }))
            .map_err(|e| e.to_string())?
            .label(payload_label(*payload))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
        chart
            .draw_series(series.iter().map(|(left, ratio)| {
                Text::new(
                    format!("{ratio:.2}"),
                    (*left, ratio + top * 0.03),
                    ("sans-serif", 12).into_font(),
                )
            }))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
