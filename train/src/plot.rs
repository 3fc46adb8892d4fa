//! PNG plots of training curves with plotters: one run (`curves.png`) or several (`compare`).

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;

use crate::output::{read_metrics, MetricsRow};

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
        // Registration only fails on a malformed font, which the test of this module catches.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// A named series of (x, y) points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

/// One panel of a figure.
#[derive(Default)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// X-axis label.
    pub x_label: String,
    /// The series drawn.
    pub series: Vec<Series>,
    /// A horizontal reference line (a target) and its legend label.
    pub reference: Option<(f64, String)>,
}

/// Draws `panels` side by side (two per row) into a PNG at `path`. Never panics: a failure of
/// the plotting library on odd data (extreme ranges) is returned as an error.
pub fn draw(path: &Path, panels: &[Panel]) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| draw_panels(path, panels)))
        .unwrap_or_else(|_| Err(format!("{}: the plot could not be drawn", path.display())))
}

fn draw_panels(path: &Path, panels: &[Panel]) -> Result<(), String> {
    register_font();
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(2).max(1);
    let size = (560 * cols as u32, 400 * rows as u32);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((rows, cols));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let points = panel.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if let Some((y, _)) = panel.reference.as_ref().filter(|(y, _)| y.is_finite()) {
            (y0, y1) = (y0.min(*y), y1.max(*y));
        }
        let pad = ((y1 - y0) * 0.05).max(1e-3 * y1.abs().max(1.0));
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(panel.x_label.as_str())
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, s) in panel.series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    // A diverged run has NaN or Inf metrics: they are left out of the line.
                    s.points
                        .iter()
                        .copied()
                        .filter(|(x, y)| x.is_finite() && y.is_finite()),
                    colour.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(s.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
        }
        if let Some((y, label)) = panel.reference.as_ref().filter(|(y, _)| y.is_finite()) {
            let grey = BLACK.mix(0.5);
            chart
                .draw_series(DashedLineSeries::new(
                    [(x0, *y), (x1.max(x0 + 1e-9), *y)],
                    6,
                    4,
                    grey.stroke_width(1),
                ))
                .map_err(|e| err(&e))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], grey));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

fn series(
    label: &str,
    rows: &[MetricsRow],
    x: impl Fn(&MetricsRow) -> f64,
    y: impl Fn(&MetricsRow) -> f64,
) -> Series {
    Series {
        label: label.to_string(),
        points: rows.iter().map(|r| (x(r), y(r))).collect(),
    }
}

/// `curves.png` of one run: losses and scores against epochs.
pub fn curves(metrics: &Path, png: &Path) -> Result<(), String> {
    let rows = read_metrics(metrics)?;
    let epoch = |r: &MetricsRow| r.epoch as f64;
    draw(
        png,
        &[
            Panel {
                title: "loss".into(),
                x_label: "epoch".into(),
                series: vec![
                    series("train", &rows, epoch, |r| r.train_loss),
                    series("val", &rows, epoch, |r| r.val_loss),
                ],
                ..Panel::default()
            },
            Panel {
                title: "accuracy / Dice".into(),
                x_label: "epoch".into(),
                series: vec![
                    series("train", &rows, epoch, |r| r.train_score),
                    series("val", &rows, epoch, |r| r.val_score),
                ],
                ..Panel::default()
            },
        ],
    )
}

/// Plots several runs' validation score and training loss against wall time and epochs.
pub fn compare(runs: &[PathBuf], png: &Path) -> Result<(), String> {
    let mut loaded = Vec::new();
    for run in runs {
        let rows = read_metrics(&run.join("metrics.csv"))?;
        let name = run
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| run.display().to_string());
        loaded.push((name, rows));
    }
    let panel =
        |title: &str, x_label: &str, x: fn(&MetricsRow) -> f64, y: fn(&MetricsRow) -> f64| Panel {
            title: title.into(),
            x_label: x_label.into(),
            series: loaded
                .iter()
                .map(|(name, rows)| series(name, rows, x, y))
                .collect(),
            ..Panel::default()
        };
    draw(
        png,
        &[
            panel(
                "validation score",
                "wall time (s)",
                |r| r.wall_s,
                |r| r.val_score,
            ),
            panel(
                "validation score",
                "epoch",
                |r| r.epoch as f64,
                |r| r.val_score,
            ),
            panel(
                "training loss",
                "wall time (s)",
                |r| r.wall_s,
                |r| r.train_loss,
            ),
            panel(
                "training loss",
                "epoch",
                |r| r.epoch as f64,
                |r| r.train_loss,
            ),
        ],
    )
}

/// The demo's figure: each run's validation score against wall time with the target as a
/// dashed line, and its training loss on a log scale; `runs` pairs a run directory with its
/// legend label (say, the time to the target).
pub fn race(runs: &[(PathBuf, String)], target: f64, png: &Path) -> Result<(), String> {
    let mut score = Vec::new();
    let mut loss = Vec::new();
    for (run, label) in runs {
        let rows = read_metrics(&run.join("metrics.csv"))?;
        score.push(series(label, &rows, |r| r.wall_s, |r| r.val_score));
        // log10: non-positive losses become NaN and are left out of the line.
        loss.push(series(label, &rows, |r| r.wall_s, |r| r.train_loss.log10()));
    }
    draw(
        png,
        &[
            Panel {
                title: "validation accuracy".into(),
                x_label: "wall time (s)".into(),
                series: score,
                reference: Some((target, format!("target {:.0}%", 100.0 * target))),
            },
            Panel {
                title: "training loss (log10)".into(),
                x_label: "wall time (s)".into(),
                series: loss,
                reference: None,
            },
        ],
    )
}
