//! PNG charts for `lors-lm sweep`, drawn with plotters into an RGB buffer and encoded with
//! the image crate. Text uses the bundled DejaVu Sans (assets/fonts), so no system font
//! library is needed at build or run time.

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        // The bundled font is known good; a failure would only cost the labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// One named series of (x, y) points with a colour index.
pub struct Series {
    pub name: String,
    pub color: usize,
    pub points: Vec<(f64, f64)>,
}

const W: u32 = 1100;
const H: u32 = 700;

fn color(i: usize) -> RGBColor {
    // Tableau 10, then darker variants: distinguishable for up to 20 series.
    const BASE: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = BASE[i % 10];
    if (i / 10) % 2 == 1 {
        RGBColor(r / 2, g / 2, b / 2)
    } else {
        RGBColor(r, g, b)
    }
}

fn bounds(points: impl Iterator<Item = (f64, f64)>) -> Result<((f64, f64), (f64, f64))> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        return Err(anyhow!("nothing to plot: no finite points"));
    }
    let pad = |a: f64, b: f64| if b > a { (b - a) * 0.05 } else { a.abs().max(1.0) * 0.05 };
    let (px, py) = (pad(x0, x1), pad(y0, y1));
    Ok(((x0 - px, x1 + px), (y0 - py, y1 + py)))
}

fn save_rgb(path: &Path, buf: &[u8]) -> Result<()> {
    image::save_buffer(path, buf, W, H, image::ColorType::Rgb8)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A white canvas with a title, a mesh and axis descriptions over x × y.
fn axes<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Chart<'a, 'b>> {
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// Line chart: one line per series, legend at the upper right.
pub fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> Result<()> {
    register_font();
    let ((x0, x1), (y0, y1)) = bounds(series.iter().flat_map(|s| s.points.iter().copied()))?;
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        let mut chart = axes(&root, title, (x_desc, y_desc), x0..x1, y0..y1)?;
        for s in series {
            let c = color(s.color);
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
                .label(&s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(err)?;
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    save_rgb(path, &buf)
}

/// Scatter chart: every point of every series as a dot, each series' mean as a labelled
/// square, and `front` (points in x order) as a dashed line.
pub fn scatter(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    means: &[(String, usize, (f64, f64))],
    front: &[(f64, f64)],
) -> Result<()> {
    register_font();
    let all = series.iter().flat_map(|s| s.points.iter().copied()).chain(means.iter().map(|m| m.2));
    let ((x0, x1), (y0, y1)) = bounds(all)?;
    // Leave room to the right for the labels.
    let x1 = x1 + (x1 - x0) * 0.12;
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        let mut chart = axes(&root, title, (x_desc, y_desc), x0..x1, y0..y1)?;
        if front.len() > 1 {
            let grey = RGBColor(90, 90, 90);
            for pair in front.windows(2) {
                // Dashes: short segments along the front.
                let (a, b) = (pair[0], pair[1]);
                let n = 24;
                let dashes = (0..n).step_by(2).map(|k| {
                    let t0 = k as f64 / n as f64;
                    let t1 = (k + 1) as f64 / n as f64;
                    let at = |t: f64| (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
                    PathElement::new(vec![at(t0), at(t1)], grey.stroke_width(2))
                });
                chart.draw_series(dashes).map_err(err)?;
            }
        }
        for s in series {
            let c = color(s.color);
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, c.mix(0.6).filled()))).map_err(err)?;
        }
        for (name, ci, (x, y)) in means {
            let c = color(*ci);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (*x - (x1 - x0) * 0.004, *y - (y1 - y0) * 0.006),
                        (*x + (x1 - x0) * 0.004, *y + (y1 - y0) * 0.006),
                    ],
                    c.filled(),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    name.clone(),
                    (*x + (x1 - x0) * 0.008, *y),
                    ("sans-serif", 14).into_font().color(&c),
                )))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    save_rgb(path, &buf)
}
