//! The latency CDF of the relays at one rate, as an SVG.

use std::path::Path;

use crate::CdcError;

/// Draws one step line per relay: the share of events delivered within x
/// milliseconds, x on a log scale (the pollers' seconds and NOTIFY's
/// milliseconds fit on one axis).
pub(crate) fn draw_cdf(
    path: &Path,
    title: &str,
    series: &[(&str, &[f64])],
) -> Result<(), CdcError> {
    draw(path, title, series).map_err(|e| CdcError::Chart(format!("{}: {e}", path.display())))
}

fn draw(
    path: &Path,
    title: &str,
    series: &[(&str, &[f64])],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;

    let series: Vec<&(&str, &[f64])> = series.iter().filter(|(_, v)| !v.is_empty()).collect();
    if series.is_empty() {
        return Err("no latencies to chart".into());
    }
    // From the decade below the fastest 0.1% (one early outlier would
    // otherwise stretch the axis over empty decades) to past the slowest.
    let fastest = series
        .iter()
        .filter_map(|(_, v)| telemetry::nearest_rank(v, 0.001))
        .fold(f64::INFINITY, f64::min);
    let slowest = series
        .iter()
        .filter_map(|(_, v)| v.last().copied())
        .fold(0.0, f64::max);
    let x_min = 10f64.powf(fastest.clamp(0.1, 1000.0).log10().floor());
    let x_max = slowest.max(x_min * 10.0) * 1.3;
    let colors = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xd6, 0x27, 0x28),
    ];

    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend) = root.split_vertically(480);
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("commit → consumer receive, ms (log scale)")
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
    for (i, (_, values)) in series.iter().enumerate() {
        chart.draw_series(LineSeries::new(
            telemetry::cdf_steps(values, x_min),
            colors[i % colors.len()].stroke_width(2),
        ))?;
    }
    // The legend below the plot, where it hides no curve.
    for (i, (label, _)) in series.iter().enumerate() {
        let x = 70 + 200 * i as i32;
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
