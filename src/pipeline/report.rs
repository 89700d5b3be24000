//! What a run shows its user: metrics as JSON lines, image grids and loss curves as
//! PNG, and the closing summary table.

use crate::{bail, Error, Result, Tensor};
use image::{Rgb, RgbImage};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use crate::data::transforms::{MEAN, STD};

/// Appends one JSON object per line to `metrics.jsonl`. Each record goes out in one
/// `write` call, so a killed run leaves whole lines (never a partial one that the next
/// record would be glued to), and everything it reported is kept.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    pub fn open(path: &Path) -> Result<MetricsLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }
    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        // one buffer, one write: `writeln!` on the file would issue a write per token
        let line = format!("{value}\n");
        if crate::failpoint::hit("metrics-write") {
            // what a kill inside a write can leave at worst: part of the line
            let _ = self.file.write_all(&line.as_bytes()[..line.len() / 2]);
            crate::failpoint::crash("metrics-write");
        }
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))
    }

    /// For a resumed run: rewrites the file without the records the run will write
    /// again, those of distillation iterations after `iteration` (the checkpoint's)
    /// and the final summary, then appends after what is kept. The rewrite is atomic
    /// (temp file, then rename). Malformed lines are dropped and reported.
    pub fn resume_after(&mut self, iteration: usize) -> Result<()> {
        let records = MetricsLog::read_all(&self.path)?;
        let later = |r: &serde_json::Value| match r["phase"].as_str() {
            Some("distill") => r["iteration"].as_u64().is_none_or(|i| i > iteration as u64),
            Some("final") => true,
            _ => false,
        };
        let kept: Vec<&serde_json::Value> = records.iter().filter(|r| !later(r)).collect();
        if kept.len() < records.len() {
            eprintln!("{}: dropped {} record(s) written after the checkpoint (iteration {iteration})", self.path.display(), records.len() - kept.len());
        }
        let text: String = kept.iter().map(|r| format!("{r}\n")).collect();
        write_atomic(&self.path, text.as_bytes())?;
        *self = MetricsLog::open(&self.path)?;
        Ok(())
    }

    /// Every record of a metrics file (used to redraw curves after a resume). A line
    /// that is not a JSON object is reported on stderr with its number and skipped.
    pub fn read_all(path: &Path) -> Result<Vec<serde_json::Value>> {
        let text = match std::fs::read(path) {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(Error::io(path, e)),
        };
        let mut records = vec![];
        for (i, line) in text.lines().enumerate() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) if v.is_object() => records.push(v),
                Ok(_) | Err(_) => eprintln!("warning: {} line {}: not a JSON object record, skipped: {:.80}", path.display(), i + 1, line),
            }
        }
        Ok(records)
    }
}

/// Saves a batch of normalised images `[n, 3, h, w]` as one PNG grid.
pub fn save_image_grid(images: &Tensor, cols: usize, path: &Path) -> Result<()> {
    let [n, c, h, w] = images.dims4("save_image_grid")?;
    if c != 3 {
        bail!("save_image_grid: expected 3 channels, got {c}");
    }
    let data = images.to_vec_f32()?;
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let pad = 2;
    let mut img = RgbImage::from_pixel((cols * (w + pad) + pad) as u32, (rows * (h + pad) + pad) as u32, Rgb([255, 255, 255]));
    for i in 0..n {
        let (ox, oy) = (pad + (i % cols) * (w + pad), pad + (i / cols) * (h + pad));
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| {
                    let v = data[((i * 3 + ch) * h + y) * w + x] * STD[ch] + MEAN[ch];
                    (v.clamp(0.0, 1.0) * 255.0).round() as u8
                };
                img.put_pixel((ox + x) as u32, (oy + y) as u32, Rgb([px(0), px(1), px(2)]));
            }
        }
    }
    save_png(&img, path)
}

/// Writes a file atomically (temp file beside it, then rename): a kill leaves the old
/// contents or the new ones.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes a PNG atomically (temp file, then rename).
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png).map_err(|e| Error::Msg(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
/// Every label is set in this font: DejaVu Sans cut down to printable ASCII (10 KB;
/// licence in assets/fonts/LICENSE), so no system font is looked up.
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-ascii.ttf");
const FAMILY: &str = "dfkd-sans";

/// One panel of a figure: curves that share a y scale, and horizontal reference lines
/// (a teacher's accuracy, chance) drawn dashed across it.
pub struct Panel {
    pub title: String,
    pub series: Vec<(String, Vec<(f32, f32)>)>,
    pub references: Vec<(String, f32)>,
}

impl Panel {
    /// A panel of one curve, titled with its name.
    pub fn single(name: &str, points: Vec<(f32, f32)>) -> Panel {
        Panel { title: name.into(), series: vec![(name.into(), points)], references: vec![] }
    }
}

/// Draws `panels` stacked in one PNG, each with its own y scale (losses that differ by
/// orders of magnitude stay readable), a legend, and integer ticks on the x axis
/// (`x_label`: iterations or epochs, whole numbers). Non-finite points are skipped.
pub fn plot_panels(title: &str, x_label: &str, panels: &[Panel], path: &Path) -> Result<()> {
    static FONT_ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*FONT_ONCE.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        bail!("the embedded plot font does not load");
    }
    let (w, panel_h) = (800u32, 300u32);
    let h = 40 + panel_h * panels.len().max(1) as u32;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let err = |e: &dyn std::fmt::Display| Error::Msg(format!("{}: drawing the plot: {e}", path.display()));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let root = root.titled(title, (FAMILY, 22)).map_err(|e| err(&e))?;
        for (panel, area) in panels.iter().zip(root.split_evenly((panels.len().max(1), 1))) {
            draw_panel(panel, x_label, &area).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    let img = RgbImage::from_raw(w, h, buf).expect("the buffer is w * h RGB pixels");
    save_png(&img, path)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(panel: &Panel, x_label: &str, area: &Area) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let pts = || panel.series.iter().flat_map(|s| s.1.iter()).filter(|p| p.1.is_finite());
    let (mut x0, mut x1) = pts().fold((i64::MAX, i64::MIN), |(a, b), p| (a.min(p.0.round() as i64), b.max(p.0.round() as i64)));
    let ys = pts().map(|p| p.1).chain(panel.references.iter().map(|r| r.1));
    let (mut y0, mut y1) = ys.fold((f32::MAX, f32::MIN), |(a, b), y| (a.min(y), b.max(y)));
    if x0 > x1 {
        (x0, x1, y0, y1) = (0, 1, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1;
    }
    // a margin so that curves do not run along the frame; a flat curve gets 5% of its
    // value each side
    let pad = if y1 - y0 > y1.abs().max(1.0) * 1e-6 { (y1 - y0) * 0.05 } else { (y1.abs() * 0.05).max(1e-3) };
    // as many decimals as the ticks (about a fifth of the range apart) need: "1200",
    // "35", "0.35"
    let step = (y1 - y0 + 2.0 * pad) / 5.0;
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 16))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_labels(10)
        .y_labels(6)
        .y_label_formatter(&|y| format!("{y:.decimals$}"))
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (k, (name, points)) in panel.series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let line = points.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| (x.round() as i64, y));
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    for (k, (name, y)) in panel.references.iter().enumerate() {
        let color = if k == 0 { BLACK } else { RGBColor(150, 150, 150) };
        let dashed = DashedLineSeries::new([(x0, *y), (x1, *y)], 8, 5, color.stroke_width(2));
        chart.draw_series(dashed)?.label(format!("{name} {y:.1}")).legend(move |(x, y)| PathElement::new([(x, y), (x + 8, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}

/// Prints rows of cells as an aligned table.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("| {} |", parts.join(" | "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
    rows.iter().for_each(|r| line(r.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Write system calls this thread has made (Linux).
    fn writes() -> Option<u64> {
        let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
        io.lines().find_map(|l| l.strip_prefix("syscw: "))?.trim().parse().ok()
    }

    /// A record goes out in one write(), so a kill cannot cut it at a token boundary
    /// and glue the next record onto the piece (`writeln!` on the file made ~50).
    #[test]
    fn a_record_is_one_write() {
        let Some(_) = writes() else {
            eprintln!("skipped: no /proc/thread-self/io to count write calls");
            return;
        };
        let path = std::env::temp_dir().join(format!("dfkd-metrics-writes-{}.jsonl", std::process::id()));
        let mut log = MetricsLog::open(&path).unwrap();
        let record = json!({"phase": "distill", "iteration": 7, "s_kd": 0.25, "s_mhad": 1.5, "per_class": [1.0, 2.0, 3.0, 4.0, 5.0]});
        let before = writes().unwrap();
        log.write(&record).unwrap();
        assert_eq!(writes().unwrap() - before, 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_resumed_log_drops_what_follows_the_checkpoint_and_malformed_lines() {
        let dir = std::env::temp_dir().join(format!("dfkd-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut log = MetricsLog::open(&path).unwrap();
        log.write(&json!({"phase": "teacher", "epoch": 1})).unwrap();
        for it in 1..=5 {
            log.write(&json!({"phase": "distill", "iteration": it})).unwrap();
        }
        // a record cut by a crash, then one glued to it
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"phase\": \"dist{\"phase\":\"final\"}\n").unwrap();
        log.resume_after(4).unwrap();
        log.write(&json!({"phase": "distill", "iteration": 5})).unwrap();
        let its: Vec<String> = MetricsLog::read_all(&path).unwrap().iter().map(|r| format!("{}{}", r["phase"], r["iteration"])).collect();
        assert_eq!(its, ["\"teacher\"null", "\"distill\"1", "\"distill\"2", "\"distill\"3", "\"distill\"4", "\"distill\"5"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two panels, each with its own curve; the second with a reference line. Every
    /// panel gets its curve's colour, the reference its black dashes, and labels text.
    #[test]
    fn panels_are_drawn_with_their_curves_and_references() {
        let dir = std::env::temp_dir().join(format!("dfkd-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("panels.png");
        let loss: Vec<(f32, f32)> = (0..50).map(|i| (i as f32, 1000.0 / (1.0 + i as f32))).collect();
        let acc = Panel {
            title: "top-1".into(),
            series: vec![("student".into(), (1..=7).map(|e| (e as f32, 10.0 * e as f32)).collect())],
            references: vec![("teacher".into(), 85.0), ("chance".into(), 1.0)],
        };
        plot_panels("a figure", "iteration", &[Panel::single("g_bn", loss), acc], &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 640));
        let count = |y0: u32, y1: u32, c: [u8; 3]| (y0..y1).flat_map(|y| (0..800).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0 == c).count();
        let blue = [31, 119, 180];
        assert!(count(40, 340, blue) > 300, "the first panel's curve");
        assert!(count(340, 640, blue) > 300, "the second panel's curve");
        // text (anti-aliased grey levels) and the black reference dashes
        assert!(count(340, 640, [0, 0, 0]) > 100, "the reference lines and labels");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
