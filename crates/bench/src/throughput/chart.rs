//! The sweep as an SVG: messages per second against batch size, one panel
//! per PSP latency. Each broker has one colour, the hardened consumer a
//! solid line and the naive one a dashed line; pgbench's rate of the same
//! transactions is the dotted black line of the PSP that answers at once.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use chaos_lab::BackendKind;
use plotters::prelude::*;

use super::sweep::Sweep;

const COLOURS: [RGBColor; 3] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
];

pub(crate) fn draw(
    path: &Path,
    sweep: &Sweep,
    psp_latencies_ms: &[u64],
    batch_sizes: &[usize],
) -> anyhow::Result<()> {
    draw_panels(path, sweep, psp_latencies_ms, batch_sizes)
        .with_context(|| format!("drawing the chart {}", path.display()))
}

fn draw_panels(
    path: &Path,
    sweep: &Sweep,
    psp_latencies_ms: &[u64],
    batch_sizes: &[usize],
) -> anyhow::Result<()> {
    ensure!(!sweep.cells.is_empty(), "no run to chart");
    let mut backends: Vec<BackendKind> = Vec::new();
    for cell in &sweep.cells {
        if !backends.contains(&cell.setting.backend) {
            backends.push(cell.setting.backend);
        }
    }
    // The batch sizes are evenly spaced by rank, as a log axis would space
    // 1, 10 and 100, without the log mesh's crowd of minor lines.
    let position = |size: usize| batch_sizes.iter().position(|&s| s == size).unwrap_or(0) as f64;
    let x_range = -0.3f64..(batch_sizes.len().max(1) - 1) as f64 + 0.3;

    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let panels_wide = psp_latencies_ms.len().max(1);
    let root = SVGBackend::new(path, (560 * panels_wide as u32, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (charts, legend) = root.split_vertically(440);
    let panels = charts.split_evenly((1, panels_wide));
    for (panel, &ms) in panels.iter().zip(psp_latencies_ms) {
        let latency = Duration::from_millis(ms);
        let with_pgbench = ms == 0;
        let series = |backend: BackendKind, hardened: bool| -> Vec<(f64, f64)> {
            batch_sizes
                .iter()
                .filter_map(|&size| {
                    let cell = sweep.cell(backend, size, latency)?;
                    Some((
                        position(size),
                        if hardened { cell.hardened } else { cell.naive },
                    ))
                })
                .collect()
        };
        let pgbench: Vec<(f64, f64)> = batch_sizes
            .iter()
            .filter_map(|&size| Some((position(size), sweep.pgbench(size)?.messages_per_second())))
            .collect();
        let highest = backends
            .iter()
            .flat_map(|&backend| {
                series(backend, true)
                    .into_iter()
                    .chain(series(backend, false))
            })
            .chain(pgbench.iter().copied().filter(|_| with_pgbench))
            .map(|(_, rate)| rate)
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("PSP answering in {ms} ms"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range.clone(), 0f64..highest * 1.1)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_labels(batch_sizes.len())
            .x_desc("deliveries per receive")
            .y_desc("messages per second")
            .x_label_formatter(&|v| {
                let rank = v.round();
                match batch_sizes.get(rank as usize) {
                    Some(size) if (v - rank).abs() < 0.01 && rank >= 0.0 => size.to_string(),
                    _ => String::new(),
                }
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (i, &backend) in backends.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let hardened = series(backend, true);
            chart.draw_series(LineSeries::new(hardened.clone(), colour.stroke_width(3)))?;
            chart.draw_series(
                hardened
                    .iter()
                    .map(|&point| Circle::new(point, 4, colour.filled())),
            )?;
            chart.draw_series(DashedLineSeries::new(
                series(backend, false),
                8,
                6,
                colour.stroke_width(2),
            ))?;
        }
        if with_pgbench {
            chart.draw_series(DashedLineSeries::new(pgbench, 2, 5, BLACK.stroke_width(2)))?;
        }
    }
    // One legend under the panels, where it hides no line: the hardened
    // consumers on the first row, the naive ones under them.
    let label = |text: String, x: i32, y: i32| {
        Text::new(text, (x + 34, y - 8), ("sans-serif", 15).into_font())
    };
    let column = |i: usize| 24 + 230 * i as i32;
    for (i, &backend) in backends.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let x = column(i);
        legend.draw(&PathElement::new(
            vec![(x, 16), (x + 26, 16)],
            colour.stroke_width(3),
        ))?;
        legend.draw(&label(format!("{} hardened", backend.name()), x, 16))?;
        for dash in [x, x + 16] {
            legend.draw(&PathElement::new(
                vec![(dash, 42), (dash + 10, 42)],
                colour.stroke_width(2),
            ))?;
        }
        legend.draw(&label(format!("{} naive", backend.name()), x, 42))?;
    }
    if psp_latencies_ms.contains(&0) {
        let x = column(backends.len());
        for dot in 0..4 {
            legend.draw(&PathElement::new(
                vec![(x + dot * 7, 16), (x + dot * 7 + 2, 16)],
                BLACK.stroke_width(2),
            ))?;
        }
        legend.draw(&label("pgbench, same transactions".to_owned(), x, 16))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chaos_lab::BackendKind;

    use super::super::pgbench::PgbenchRate;
    use super::super::sweep::{Cell, Sweep};
    use super::super::Setting;

    #[test]
    fn the_chart_has_a_panel_per_psp_latency_and_a_line_per_broker_and_variant() {
        let mut cells = Vec::new();
        for backend in [BackendKind::Rabbitmq, BackendKind::Sqs, BackendKind::Kafka] {
            for ms in [0, 20] {
                for size in [1, 10, 50] {
                    if backend == BackendKind::Sqs && size > 10 {
                        continue;
                    }
                    cells.push(Cell {
                        setting: Setting {
                            backend,
                            batch_size: size,
                            psp_latency: Duration::from_millis(ms),
                        },
                        naive: 100.0 + size as f64,
                        hardened: 80.0 + 10.0 * size as f64,
                        naive_steps: [0.0; 6],
                        hardened_steps: [0.0; 6],
                    });
                }
            }
        }
        let sweep = Sweep {
            cells,
            pgbench: [1, 10, 50]
                .map(|batch_size| PgbenchRate {
                    batch_size,
                    clients: 2,
                    transactions_per_second: 900.0 / batch_size as f64 * 1.4,
                })
                .to_vec(),
            consumers: 2,
            messages: 100,
        };
        let path =
            std::env::temp_dir().join(format!("consumer-throughput-{}.svg", uuid::Uuid::new_v4()));
        super::draw(&path, &sweep, &[0, 20], &[1, 10, 50]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if let Some(keep) = std::env::var_os("EO_KEEP_CHART") {
            std::fs::copy(&path, keep).unwrap();
        }
        std::fs::remove_file(&path).unwrap();
        for text in [
            "PSP answering in 0 ms",
            "PSP answering in 20 ms",
            "rabbitmq hardened",
            "kafka naive",
            "pgbench, same transactions",
        ] {
            assert!(svg.contains(text), "the chart lacks {text:?}");
        }
        // Six lines per panel (three brokers, two variants) and pgbench's.
        assert!(svg.matches("<polyline").count() >= 13, "{svg}");
    }
}
