//! The SVG chart of the latency distributions.

use std::path::Path;

use anyhow::{ensure, Context};

use super::latency::{LoadResult, ModeResult};
use super::report::quantile;

pub(crate) fn chart_if_asked(path: Option<&Path>, modes: &[ModeResult]) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    draw_chart(path, modes).with_context(|| format!("drawing the chart {}", path.display()))?;
    eprintln!("chart written to {}", path.display());
    Ok(())
}

fn draw_chart(path: &Path, modes: &[ModeResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;

    let series: Vec<(&str, &LoadResult)> = modes
        .iter()
        .filter_map(|mode| mode.load.as_ref().map(|load| (mode.label, load)))
        .collect();
    ensure!(!series.is_empty(), "no latency run to chart");
    let samples = || {
        series
            .iter()
            .flat_map(|(_, load)| [&load.latencies.confirm, &load.latencies.receive])
    };
    // From the decade below the fastest 0.1% (a rare 0 ms would otherwise
    // stretch the axis over empty decades) to just past the slowest.
    let fastest = samples()
        .map(|values| quantile(values, 0.001))
        .fold(f64::INFINITY, f64::min);
    let slowest = samples()
        .map(|values| quantile(values, 1.0))
        .fold(0.0, f64::max);
    let x_min = 10f64.powf(fastest.clamp(0.01, 1.0).log10().floor());
    let x_max = slowest.max(x_min * 10.0) * 1.3;
    let colors = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
    ];

    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (charts, legend) = root.split_vertically(440);
    let panels = charts.split_evenly((1, 2));
    let titles = ["commit → broker confirm", "commit → consumer receive"];
    for (panel, (title, pick)) in panels.iter().zip(titles.into_iter().zip([0, 1])) {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d((x_min..x_max).log_scale(), 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("latency, ms (log scale)")
            .y_desc("share of events at or below")
            .x_label_formatter(&|v| {
                if *v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v}")
                }
            })
            .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
            .draw()?;
        for (i, (_, load)) in series.iter().enumerate() {
            let values = if pick == 0 {
                &load.latencies.confirm
            } else {
                &load.latencies.receive
            };
            chart.draw_series(LineSeries::new(
                telemetry::cdf_steps(values, x_min),
                colors[i % colors.len()].stroke_width(2),
            ))?;
        }
    }
    // One legend for both panels, below them, where it hides no curve.
    for (i, (label, _)) in series.iter().enumerate() {
        let x = 330 + 170 * i as i32;
        let color = colors[i % colors.len()];
        legend.draw(&PathElement::new(
            vec![(x, 18), (x + 28, 18)],
            color.stroke_width(3),
        ))?;
        legend.draw(&Text::new(
            label.to_string(),
            (x + 36, 11),
            ("sans-serif", 15).into_font(),
        ))?;
    }
    root.present()?;
    Ok(())
}
