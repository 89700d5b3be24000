//! What a run shows its user: metrics as JSON lines, image grids and loss curves as
//! PNG, and the closing summary table.

use crate::{bail, Error, Result, Tensor};
use image::{Rgb, RgbImage};
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

const PALETTE: [[u8; 3]; 8] =
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127]];

/// Draws named series of (x, y) points as lines on one chart, with a legend, and
/// writes it as PNG. Each series is scaled to the common y range.
pub fn plot_curves(title: &str, series: &[(String, Vec<(f32, f32)>)], path: &Path) -> Result<()> {
    let (w, h, left, right, top, bottom) = (720i32, 420i32, 60i32, 170i32, 28i32, 36i32);
    let mut img = RgbImage::from_pixel(w as u32, h as u32, Rgb([255, 255, 255]));
    let pts: Vec<(f32, f32)> = series.iter().flat_map(|s| s.1.iter().copied()).filter(|p| p.1.is_finite()).collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
    for &(x, y) in &pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 { x1 = x0 + 1.0 }
    if y1 - y0 < 1e-9 { y1 = y0 + 1.0 }
    let (pw, ph) = (w - left - right, h - top - bottom);
    let to_px = |x: f32, y: f32| (left + ((x - x0) / (x1 - x0) * pw as f32) as i32, top + ph - ((y - y0) / (y1 - y0) * ph as f32) as i32);
    let grey = Rgb([90, 90, 90]);
    draw_line(&mut img, (left, top + ph), (left + pw, top + ph), grey);
    draw_line(&mut img, (left, top), (left, top + ph), grey);
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f32 / 4.0;
        let (_, py) = to_px(x0, y);
        draw_line(&mut img, (left - 4, py), (left, py), grey);
        draw_text(&mut img, &fmt_num(y), 4, py - 3, grey);
        let x = x0 + (x1 - x0) * i as f32 / 4.0;
        let (px, _) = to_px(x, y0);
        draw_line(&mut img, (px, top + ph), (px, top + ph + 4), grey);
        draw_text(&mut img, &fmt_num(x), px - 10, top + ph + 8, grey);
    }
    draw_text(&mut img, title, left, 8, Rgb([0, 0, 0]));
    for (k, (name, pts)) in series.iter().enumerate() {
        let color = Rgb(PALETTE[k % PALETTE.len()]);
        for pair in pts.windows(2) {
            if pair[0].1.is_finite() && pair[1].1.is_finite() {
                draw_line(&mut img, to_px(pair[0].0, pair[0].1), to_px(pair[1].0, pair[1].1), color);
            }
        }
        let ly = top + 6 + 14 * k as i32;
        draw_line(&mut img, (w - right + 10, ly + 2), (w - right + 28, ly + 2), color);
        draw_text(&mut img, name, w - right + 34, ly, Rgb([0, 0, 0]));
    }
    save_png(&img, path)
}

fn fmt_num(v: f32) -> String {
    if v.abs() >= 1000.0 { format!("{v:.0}") } else if v.abs() >= 10.0 { format!("{v:.1}") } else { format!("{v:.3}") }
}

fn draw_line(img: &mut RgbImage, (mut x0, mut y0): (i32, i32), (x1, y1): (i32, i32), c: Rgb<u8>) {
    // Bresenham
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        if x0 >= 0 && y0 >= 0 && (x0 as u32) < img.width() && (y0 as u32) < img.height() {
            img.put_pixel(x0 as u32, y0 as u32, c);
        }
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy { err += dy; x0 += sx; }
        if e2 <= dx { err += dx; y0 += sy; }
    }
}

/// A 3x5 pixel font for labels: digits, letters (upper-cased), and a few signs.
fn glyph(ch: char) -> [u8; 5] {
    match ch.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7], '1' => [2, 6, 2, 2, 7], '2' => [7, 1, 7, 4, 7], '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1], '5' => [7, 4, 7, 1, 7], '6' => [7, 4, 7, 5, 7], '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7], '9' => [7, 5, 7, 1, 7], 'A' => [2, 5, 7, 5, 5], 'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3], 'D' => [6, 5, 5, 5, 6], 'E' => [7, 4, 6, 4, 7], 'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3], 'H' => [5, 5, 7, 5, 5], 'I' => [7, 2, 2, 2, 7], 'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5], 'L' => [4, 4, 4, 4, 7], 'M' => [5, 7, 7, 5, 5], 'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2], 'P' => [6, 5, 6, 4, 4], 'Q' => [2, 5, 5, 6, 3], 'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6], 'T' => [7, 2, 2, 2, 2], 'U' => [5, 5, 5, 5, 7], 'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5], 'X' => [5, 5, 2, 5, 5], 'Y' => [5, 5, 2, 2, 2], 'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2], '-' => [0, 0, 7, 0, 0], '_' => [0, 0, 0, 0, 7], '+' => [0, 2, 7, 2, 0],
        '%' => [5, 1, 2, 4, 5], '/' => [1, 1, 2, 4, 4], ':' => [0, 2, 0, 2, 0], '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4], '=' => [0, 7, 0, 7, 0], '*' => [5, 2, 7, 2, 5],
        _ => [0, 0, 0, 0, 0],
    }
}

fn draw_text(img: &mut RgbImage, text: &str, x: i32, y: i32, c: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..3 {
                if bits >> (2 - col) & 1 == 1 {
                    let (px, py) = (x + i as i32 * 4 + col, y + row as i32);
                    if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                        img.put_pixel(px as u32, py as u32, c);
                    }
                }
            }
        }
    }
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
}
