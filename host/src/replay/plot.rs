//! `--plot`: hit rate against capacity, one panel per trace, one line per policy and Belady
//! (plotters). `.svg` or `.png` (encoded here: plotters renders into an RGB buffer).
//!
//! Text needs a TrueType font, read at run time: `MOEHOST_PLOT_FONT`, else DejaVu Sans or
//! Liberation Sans from the usual system folders (Debian's fonts-dejavu-core).

use anyhow::{bail, Context, Result};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

use super::sweep::Row;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font for plotters' text, once.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("MOEHOST_PLOT_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .collect();
        for p in &candidates {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no TrueType font found for the plot's text (tried {}); set MOEHOST_PLOT_FONT=/path/to/font.ttf",
            candidates.join(", ")
        ))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// Pixels reserved right of each chart for its legend.
const LEGEND_WIDTH: u32 = 250;

/// Colours of the eviction policies, in order of appearance.
const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Writes the plot of `rows` to `path` (`.svg` or `.png`).
pub fn plot(rows: &[Row], path: &Path) -> Result<()> {
    anyhow::ensure!(!rows.is_empty(), "nothing to plot");
    ensure_font()?;
    let mut traces: Vec<&str> = Vec::new();
    for r in rows {
        if !traces.contains(&r.trace.as_str()) {
            traces.push(&r.trace);
        }
    }
    let (w, h) = (1100u32, 460 * traces.len() as u32);
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "svg" => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
                draw(&root, rows, &traces)?;
                root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
        }
        "png" => {
            let mut buf = vec![0u8; (w * h * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
                draw(&root, rows, &traces)?;
                root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            std::fs::write(path, encode_png(&buf, w, h))
                .with_context(|| format!("cannot write {}", path.display()))
        }
        _ => bail!(
            "--plot {}: the file name must end in .svg or .png",
            path.display()
        ),
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
    traces: &[&str],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((traces.len(), 1));
    for (panel, trace) in panels.iter().zip(traces) {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.trace == *trace).collect();
        let x_max = rs
            .iter()
            .map(|r| r.resident_fraction * 100.0)
            .fold(0.0f64, f64::max)
            .max(1.0);
        let per_layer = rs.first().is_some_and(|r| r.per_layer);
        // The chart on the left, its legend on the right.
        let (w, _) = panel.dim_in_pixel();
        let (area, legend_area) = panel.split_horizontally(w.saturating_sub(LEGEND_WIDTH));
        let mut legend: Vec<(String, ShapeStyle, (u32, u32))> = Vec::new();
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("{trace}: hit rate vs cache size"),
                ("sans-serif", 22),
            )
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max * 1.04, 0.0..1.0f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(if per_layer {
                "experts resident per layer (% of the layer's experts)"
            } else {
                "experts resident (% of all routed experts)"
            })
            .y_desc("hit rate")
            .light_line_style(RGBColor(235, 235, 235))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        let mut policies: Vec<&str> = Vec::new();
        for r in &rs {
            if !policies.contains(&r.policy.as_str()) {
                policies.push(&r.policy);
            }
        }
        // Colour by eviction policy, dash pattern by prefetch policy.
        let mut evictions: Vec<&str> = Vec::new();
        let mut prefetches: Vec<&str> = vec!["none"];
        for r in &rs {
            if r.policy != "belady" && r.policy != "oracle-prefetch" {
                if !evictions.contains(&r.eviction.as_str()) {
                    evictions.push(&r.eviction);
                }
                if !prefetches.contains(&r.prefetch.as_str()) {
                    prefetches.push(&r.prefetch);
                }
            }
        }
        for policy in policies {
            let row = rs.iter().find(|r| r.policy == policy).expect("a row");
            let mut pts: Vec<(f64, f64)> = rs
                .iter()
                .filter(|r| r.policy == policy)
                .map(|r| (r.resident_fraction * 100.0, r.hit_rate))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (color, width, dash) = match policy {
                "belady" => (BLACK, 3, 0),
                "oracle-prefetch" => (RGBColor(110, 110, 110), 2, 1),
                _ => {
                    let c = evictions
                        .iter()
                        .position(|e| *e == row.eviction)
                        .unwrap_or(0);
                    let d = prefetches
                        .iter()
                        .position(|p| *p == row.prefetch)
                        .unwrap_or(0);
                    (COLORS[c % COLORS.len()], 2, d)
                }
            };
            let style = color.stroke_width(width);
            let label = match policy {
                "belady" => "Belady (bound)".to_owned(),
                p => p.to_owned(),
            };
            // (dash, gap) in pixels; 0 = solid.
            let pattern = [(0, 0), (10, 6), (3, 4), (14, 4), (6, 3)][dash % 5];
            let series = if pattern.0 == 0 {
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), style))
                    .map_err(err)?
            } else {
                chart
                    .draw_series(DashedLineSeries::new(
                        pts.iter().copied(),
                        pattern.0,
                        pattern.1,
                        style,
                    ))
                    .map_err(err)?
            };
            let _ = series;
            legend.push((label, style, pattern));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        for (i, (label, style, (dash, gap))) in legend.iter().enumerate() {
            let y = 70 + 22 * i as i32;
            let line = vec![(8, y), (40, y)];
            if *dash == 0 {
                legend_area
                    .draw(&PathElement::new(line, *style))
                    .map_err(err)?;
            } else {
                legend_area
                    .draw(&DashedPathElement::new(line, *dash, *gap, *style))
                    .map_err(err)?;
            }
            legend_area
                .draw(&Text::new(
                    label.clone(),
                    (48, y - 8),
                    ("sans-serif", 14).into_font().color(&BLACK),
                ))
                .map_err(err)?;
        }
    }
    Ok(())
}

/// An 8-bit RGB PNG of `rgb` (`w x h x 3`).
pub fn encode_png(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut raw = Vec::with_capacity((w as usize * 3 + 1) * h as usize);
    for row in rgb.chunks_exact(w as usize * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let idat = miniz_oxide::deflate::compress_to_vec_zlib(&raw, 9);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, truecolour, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (n, slot) in t.iter_mut().enumerate() {
            let mut c = n as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c = table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    c ^ 0xffff_ffff
}
