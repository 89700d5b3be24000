//! Seeded mutation testing of every parser that reads a user's files: the safetensors
//! header and tensors, the MAT v5 reader (through the Stanford Cars devkit, compressed
//! and inflated), the CUB-200-2011 and FGVC-Aircraft index files, and the TOML config
//! with `--set` overrides. Thousands of mutants of valid files each; none may panic,
//! hang, or ask for an allocation beyond `ALLOC_LIMIT` (which aborts the test binary).
//! A failure names the parser, the seed and the mutant, so it replays exactly.

use dfkd::checkpoint::{load_model, load_tensors, save_model};
use dfkd::data::synthetic::{self, SyntheticSpec};
use dfkd::models::build;
use dfkd::pipeline::config::Config;
use dfkd::rng::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// No user file of these sizes may need more than this in one allocation.
const ALLOC_LIMIT: usize = 512 << 20;

struct Capped;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            std::ptr::null_mut()
        } else {
            unsafe { System.alloc(layout) }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        if new > ALLOC_LIMIT {
            std::ptr::null_mut()
        } else {
            unsafe { System.realloc(ptr, layout, new) }
        }
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// Mutants per parser: a few seconds each on a 2-core machine.
const MUTANTS: usize = 2000;
/// A whole parser's run may take at most this long (a hang fails here).
const DEADLINE: Duration = Duration::from_secs(120);

/// splitmix64: the test's own generator, so mutants do not change with the engine's.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break size and offset arithmetic.
const INTERESTING: [u32; 9] = [0, 1, 7, 8, 0x7f, 0xff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];
/// Tokens that break number and name parsing in text files.
const TOKENS: [&str; 12] = ["0", "-1", "18446744073709551616", "1e308", "nan", "", " ", "\"", "[", "=", "\n", "../../x"];

/// One to four random edits of `b`; `focus` bytes at the start get half of them (the
/// header of a binary file, where the structure is).
fn mutate(b: &[u8], rng: &mut Mix, focus: usize, text: bool) -> Vec<u8> {
    let mut b = b.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len().max(1);
        let at = if focus > 0 && rng.below(2) == 0 { rng.below(focus.min(len)) } else { rng.below(len) };
        let last = b.len().saturating_sub(1);
        match rng.below(if text { 8 } else { 6 }) {
            0 if !b.is_empty() => b[at.min(last)] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at.min(last)] = rng.next() as u8,
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                for (k, byte) in v.iter().enumerate() {
                    if let Some(x) = b.get_mut(at + k) {
                        *x = *byte;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let end = (at + rng.below(64)).min(b.len());
                b.drain(at.min(end)..end);
            }
            5 => {
                let end = (at + rng.below(64)).min(b.len());
                let chunk = b[at.min(end)..end].to_vec();
                let to = rng.below(b.len() + 1);
                b.splice(to..to, chunk);
            }
            6 => {
                // a number or word replaced by a token
                let start = at.min(b.len());
                let end = (start..b.len()).find(|&i| b[i].is_ascii_whitespace()).unwrap_or(b.len());
                b.splice(start..end, TOKENS[rng.below(TOKENS.len())].bytes());
            }
            _ => {
                // a whole line duplicated or removed
                let lines: Vec<&[u8]> = b.split(|&c| c == b'\n').collect();
                let k = rng.below(lines.len());
                let mut out: Vec<Vec<u8>> = lines.iter().map(|l| l.to_vec()).collect();
                if rng.below(2) == 0 {
                    out.insert(k, out[k].clone())
                } else {
                    out.remove(k);
                }
                b = out.join(&b'\n');
            }
        }
    }
    b
}

/// Runs `parse` on `MUTANTS` mutants of `valid` (written to `target`), in a thread
/// watched for a hang; a panic or a hang fails naming the mutant.
fn fuzz(name: &str, seed: u64, valid: Vec<u8>, target: PathBuf, focus: usize, text: bool, parse: impl Fn(&Path) + Send + 'static) {
    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let label = name.to_string();
    let worker = std::thread::spawn(move || {
        let mut rng = Mix(seed);
        for i in 0..MUTANTS {
            let mutant = mutate(&valid, &mut rng, focus, text);
            std::fs::write(&target, &mutant).unwrap();
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&target))).is_err() {
                let keep = target.with_extension("panicked");
                std::fs::write(&keep, &mutant).unwrap();
                panic!("{label}: mutant {i} of seed {seed} panicked (kept at {})", keep.display());
            }
            counter.store(i + 1, Ordering::Relaxed);
        }
        std::fs::write(&target, &valid).unwrap();
    });
    let t0 = Instant::now();
    while !worker.is_finished() {
        assert!(t0.elapsed() < DEADLINE, "{name}: mutant {} of seed {seed} hangs", done.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(p) = worker.join() {
        std::panic::resume_unwind(p);
    }
    assert_eq!(done.load(Ordering::Relaxed), MUTANTS);
    eprintln!("{name}: {MUTANTS} mutants in {:.1}s", t0.elapsed().as_secs_f32());
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfkd-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The 8-byte length and the JSON header of a safetensors file.
fn safetensors_header_len(b: &[u8]) -> usize {
    8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
}

#[test]
fn safetensors_files() {
    let d = tmp("safetensors");
    let valid = d.join("valid.safetensors");
    save_model(build("resnet8", 3, true, &mut Rng::new(0)).unwrap().as_ref(), &valid).unwrap();
    let bytes = std::fs::read(&valid).unwrap();
    let focus = safetensors_header_len(&bytes);
    fuzz("safetensors (load_model)", 1, bytes.clone(), d.join("m.safetensors"), focus, false, |p| {
        // one model for all mutants (building one costs more than the parse)
        thread_local!(static MODEL: Box<dyn dfkd::models::Classifier> = build("resnet8", 3, true, &mut Rng::new(0)).unwrap());
        MODEL.with(|m| {
            let _ = load_model(m.as_ref(), p);
        });
    });
    fuzz("safetensors (load_tensors)", 2, bytes, d.join("t.safetensors"), focus, false, |p| {
        let _ = load_tensors(p);
    });
    std::fs::remove_dir_all(&d).unwrap();
}

/// A MAT v5 file with each compressed element replaced by the element it holds, so that
/// mutants reach the matrix parser instead of failing the zlib checksum.
fn inflated(mat: &[u8]) -> Vec<u8> {
    let mut out = mat[..128].to_vec();
    let mut pos = 128;
    while pos + 8 <= mat.len() {
        let ty = u32::from_le_bytes(mat[pos..pos + 4].try_into().unwrap());
        let n = u32::from_le_bytes(mat[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let data = &mat[pos + 8..pos + 8 + n];
        if ty == 15 {
            let mut raw = vec![];
            flate2::read::ZlibDecoder::new(data).read_to_end(&mut raw).unwrap();
            out.extend_from_slice(&raw);
            pos += 8 + n;
        } else {
            out.extend_from_slice(&mat[pos..pos + 8 + n]);
            pos += 8 + n.div_ceil(8) * 8;
        }
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

#[test]
fn mat_v5_files_of_the_cars_devkit() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cars");
    let d = tmp("mat");
    std::fs::create_dir_all(d.join("devkit")).unwrap();
    let files = ["devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat"];
    for f in files {
        std::fs::copy(fixture.join(f), d.join(f)).unwrap();
    }
    for (k, f) in files.iter().enumerate() {
        let original = std::fs::read(fixture.join(f)).unwrap();
        let plain = inflated(&original);
        // the inflated file is a valid devkit file too
        std::fs::write(d.join(f), &plain).unwrap();
        dfkd::data::cars::open(&d).map(|_| ()).or_else(|e| if e.to_string().contains("does not exist") { Ok(()) } else { Err(e) }).unwrap();
        let root = d.clone();
        for (seed, bytes) in [(10 + k as u64, original.clone()), (20 + k as u64, plain)] {
            let root = root.clone();
            fuzz(&format!("MAT v5 {f}"), seed, bytes, d.join(f), 256, false, move |_| {
                let _ = dfkd::data::cars::open(&root);
            });
        }
        std::fs::write(d.join(f), &original).unwrap();
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn cub_index_files() {
    let d = tmp("cub");
    let spec = SyntheticSpec { num_classes: 10, train_per_class: 2, test_per_class: 1, image_size: 16, seed: 0, image_stream: 1 };
    let root = d.join("cub");
    synthetic::ensure(&spec, &root).unwrap();
    for (k, f) in ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"].iter().enumerate() {
        let valid = std::fs::read(root.join(f)).unwrap();
        let r = root.clone();
        fuzz(&format!("CUB {f}"), 30 + k as u64, valid, root.join(f), 0, true, move |_| {
            let _ = dfkd::data::open(&r);
        });
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn aircraft_index_files() {
    let d = tmp("aircraft");
    let data = d.join("data");
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::write(data.join("variants.txt"), "Falcon 2000\nF-16A/B\nSaab 340\n").unwrap();
    std::fs::write(data.join("images_variant_trainval.txt"), "0034309 Falcon 2000\n0034958 F-16A/B\n1000001 Saab 340\n").unwrap();
    std::fs::write(data.join("images_variant_test.txt"), "0056978 Saab 340\n").unwrap();
    for id in ["0034309", "0034958", "1000001", "0056978"] {
        image::RgbImage::new(4, 4).save(data.join("images").join(format!("{id}.jpg"))).unwrap();
    }
    dfkd::data::open(&d).unwrap();
    for (k, f) in ["variants.txt", "images_variant_trainval.txt", "images_variant_test.txt"].iter().enumerate() {
        let valid = std::fs::read(data.join(f)).unwrap();
        let root = d.clone();
        fuzz(&format!("Aircraft {f}"), 40 + k as u64, valid, data.join(f), 0, true, move |_| {
            let _ = dfkd::data::open(&root);
        });
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn toml_configs_and_overrides() {
    let d = tmp("toml");
    for (seed, preset) in [(50, "cpu-demo"), (51, "paper-aircraft")] {
        let valid = Config::preset(preset).unwrap().to_toml().into_bytes();
        fuzz(&format!("config {preset}"), seed, valid, d.join(format!("{preset}.toml")), 0, true, |p| {
            // a config that loads must validate or be refused, never panic
            if let Ok(c) = Config::load(p) {
                let _ = c.validate();
            }
        });
    }
    let sets = "distill.beta=5\nstudent.arch=wrn40_2\ngenerator.channels=[8,8,8,8,8]\ndata.image_size=32\n".as_bytes().to_vec();
    fuzz("--set overrides", 52, sets, d.join("sets.txt"), 0, true, |p| {
        let sets: Vec<String> = std::fs::read_to_string(p).unwrap_or_default().lines().map(String::from).collect();
        let mut c = Config::cpu_demo();
        if c.apply_overrides(&sets).is_ok() {
            let _ = c.validate();
        }
    });
    std::fs::remove_dir_all(&d).unwrap();
}
