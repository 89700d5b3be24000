//! The data layer end to end: every layout parsed from files on disk (and its errors),
//! the synthetic set generated and reopened, transforms checked against PIL's output
//! (tests/fixtures/transforms.json, made by scripts/make_transform_fixture.py), and
//! loader determinism and failure handling.

use dfkd::data::synthetic::{self, SyntheticSpec};
use dfkd::data::transforms::{self, eval_transform, Augment, Pipeline};
use dfkd::data::{cub, open, Dataset, Loader, LoaderConfig, Sample};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("dfkd-data-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn small_image(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9 + seed * 40) as u8, (y * 7) as u8, (x * y + seed) as u8]))
}

fn write_image(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

fn err_of<T: std::fmt::Debug>(r: dfkd::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn tiny_spec(seed: u64) -> SyntheticSpec {
    SyntheticSpec { num_classes: 10, train_per_class: 4, test_per_class: 2, image_size: 32, seed, image_stream: 1 }
}

#[test]
fn synthetic_set_is_generated_once_and_opens_as_cub() {
    let tmp = TempDir::new("synth");
    let dir = tmp.0.join("birds");
    synthetic::generate(&tiny_spec(1), &dir).unwrap();
    let ds = open(&dir).unwrap();
    assert_eq!((ds.name.as_str(), ds.num_classes(), ds.train.len(), ds.test.len()), ("synthetic-birds", 10, 40, 20));
    assert!(!ds.random_resized());
    assert!(ds.classes.iter().enumerate().all(|(i, c)| c.starts_with(&format!("{:03}.", i + 1))));
    for c in 0..10 {
        assert_eq!(ds.train.iter().filter(|s| s.label == c).count(), 4);
        assert_eq!(ds.test.iter().filter(|s| s.label == c).count(), 2);
    }
    assert_eq!(image::open(&ds.train[0].path).unwrap().to_rgb8().dimensions(), (32, 32));

    // Same spec: nothing is rewritten. Another spec: the set is replaced.
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let (before, bytes) = (stamp(&ds.train[0].path), std::fs::read(&ds.train[0].path).unwrap());
    synthetic::generate(&tiny_spec(1), &dir).unwrap();
    assert_eq!(stamp(&ds.train[0].path), before);
    let other = synthetic::ensure(&tiny_spec(2), &dir).unwrap();
    assert_ne!(std::fs::read(&other.train[0].path).unwrap(), bytes);

    synthetic::preview_grid(&other, 3, &tmp.0.join("preview.png")).unwrap();
    assert_eq!(image::open(tmp.0.join("preview.png")).unwrap().width(), 3 * 66 + 2);
    // Only data sets we generated get replaced.
    let foreign = tmp.0.join("foreign");
    std::fs::create_dir_all(foreign.join("x")).unwrap();
    assert!(err_of(synthetic::generate(&tiny_spec(1), &foreign)).contains("not a synthetic data set"));
}

/// The class must not be readable from global colour: a nearest-centroid classifier
/// on mean RGB stays near chance (10%).
#[test]
fn synthetic_classes_are_not_separable_by_mean_colour() {
    let tmp = TempDir::new("colour");
    let spec = SyntheticSpec { num_classes: 10, train_per_class: 40, test_per_class: 20, image_size: 32, seed: 3, image_stream: 1 };
    let ds = synthetic::ensure(&spec, &tmp.0).unwrap();
    let mean = |s: &Sample| {
        let img = image::open(&s.path).unwrap().to_rgb8();
        let mut m = [0f64; 3];
        img.pixels().for_each(|p| (0..3).for_each(|c| m[c] += p[c] as f64 / (32.0 * 32.0)));
        m
    };
    let mut centroids = vec![[0f64; 3]; 10];
    for s in &ds.train {
        let m = mean(s);
        (0..3).for_each(|c| centroids[s.label][c] += m[c] / 40.0);
    }
    let dist = |a: &[f64; 3], b: &[f64; 3]| (0..3).map(|c| (a[c] - b[c]).powi(2)).sum::<f64>();
    let correct = ds.test.iter().filter(|s| {
        let m = mean(s);
        let best = (0..10).min_by(|&a, &b| dist(&m, &centroids[a]).total_cmp(&dist(&m, &centroids[b]))).unwrap();
        best == s.label
    });
    let acc = correct.count() as f64 / ds.test.len() as f64;
    assert!(acc < 0.3, "mean colour predicts the class {:.0}% of the time", acc * 100.0);
}

/// A two-class CUB layout with `n` PNGs, the first `n/2` for training.
fn write_cub(root: &Path, n: usize) -> Vec<cub::Entry> {
    let entries: Vec<cub::Entry> =
        (0..n).map(|i| cub::Entry { rel: PathBuf::from(format!("{:03}.C/{i}.png", i % 2 + 1)), label: i % 2, train: i < n / 2 }).collect();
    for (i, e) in entries.iter().enumerate() {
        write_image(&root.join("images").join(&e.rel), &small_image(8, 8, i as u32));
    }
    cub::write_layout(root, &["001.A".into(), "002.B".into()], &entries).unwrap();
    entries
}

#[test]
fn cub_errors_name_file_and_line() {
    let tmp = TempDir::new("cub");
    let root = &tmp.0;
    write_cub(root, 4);
    let ds = open(root).unwrap();
    assert_eq!((ds.train.len(), ds.test.len(), ds.classes.clone()), (2, 2, vec!["001.A".to_string(), "002.B".to_string()]));
    assert_eq!(ds.train[1].label, 1);
    assert!(ds.name == "cub-200-2011" && ds.random_resized() && ds.bottom_crop == 0);

    let edit = |file: &str, line: usize, new: &str| {
        let p = root.join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let old = std::mem::replace(&mut lines[line - 1], new.to_string());
        std::fs::write(&p, lines.join("\n")).unwrap();
        move || {
            lines[line - 1] = old;
            std::fs::write(&p, lines.join("\n")).unwrap();
        }
    };
    let cases = [
        ("images.txt", 2, "2", "images.txt line 2: expected `<id> <path>`"),
        ("images.txt", 3, "x 003.C/2.png", "images.txt line 3: expected `<id> <path>`"),
        ("image_class_labels.txt", 3, "3 201", "image_class_labels.txt line 3: class 201 out of range 1..=2"),
        ("image_class_labels.txt", 4, "1 1", "image_class_labels.txt line 4: id 1 already given on line 1"),
        ("train_test_split.txt", 1, "1 2", "train_test_split.txt line 1: expected `<id> <0|1>`"),
        ("train_test_split.txt", 2, "9 1", "train_test_split.txt line 2: image id 9 is not in images.txt"),
        ("classes.txt", 2, "3 002.B", "classes.txt line 2: expected class id 2, got 3"),
        ("images.txt", 4, "4 002.C/missing.png", "listed image"),
    ];
    for (file, line, text, want) in cases {
        let restore = edit(file, line, text);
        let e = err_of(open(root));
        assert!(e.contains(want), "{file} line {line} `{text}`: got `{e}`, wanted `{want}`");
        restore();
    }
    open(root).expect("every edit restored");
    let e = err_of(open(&root.join("images")));
    assert!(e.contains("images.txt") && e.contains("variants.txt") && e.contains("cars_meta.mat"), "{e}");
}

#[test]
fn missing_image_is_named() {
    let tmp = TempDir::new("missing");
    let entries = write_cub(&tmp.0, 4);
    let gone = tmp.0.join("images").join(&entries[3].rel);
    std::fs::remove_file(&gone).unwrap();
    let e = err_of(open(&tmp.0));
    assert!(e.contains(&gone.display().to_string()) && e.contains("does not exist"), "{e}");
}

#[test]
fn aircraft_layout_with_banner_crop() {
    let tmp = TempDir::new("aircraft");
    let data = tmp.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let variants = ["Falcon 2000", "F-16A/B", "Saab 340"];
    std::fs::write(data.join("variants.txt"), variants.join("\n") + "\n").unwrap();
    let trainval = "0034309 Falcon 2000\n0034958 F-16A/B\n1000001 Saab 340\n2000002 Falcon 2000\n";
    std::fs::write(data.join("images_variant_trainval.txt"), trainval).unwrap();
    std::fs::write(data.join("images_variant_test.txt"), "0056978 Saab 340\n0100000 F-16A/B\n").unwrap();
    for (i, id) in ["0034309", "0034958", "1000001", "2000002", "0056978", "0100000"].iter().enumerate() {
        write_image(&data.join("images").join(format!("{id}.jpg")), &small_image(40, 50, i as u32));
    }
    let ds = open(&tmp.0).unwrap();
    assert_eq!((ds.name.as_str(), ds.bottom_crop, ds.random_resized()), ("fgvc-aircraft", 20, false));
    assert_eq!(ds.classes, variants.map(String::from).to_vec());
    let labels = |s: &[Sample]| s.iter().map(|s| s.label).collect::<Vec<_>>();
    assert_eq!((labels(&ds.train), labels(&ds.test)), (vec![0, 1, 2, 0], vec![2, 1]));
    assert!(ds.train[1].path.ends_with("data/images/0034958.jpg"));

    // The banner goes before resizing: a 40x50 image becomes 40x30 first.
    let img = image::open(&ds.test[0].path).unwrap().to_rgb8();
    let want = eval_transform(&transforms::crop_bottom(&img, 20), 16);
    let batch = Loader::new(&ds.test, LoaderConfig::eval(&ds, 2, 16)).epoch(0).next().unwrap().unwrap();
    assert_eq!(&batch.images[..3 * 16 * 16], &want[..]);

    std::fs::write(data.join("images_variant_test.txt"), "0056978 Boeing 747\n").unwrap();
    assert!(err_of(open(&tmp.0)).contains("images_variant_test.txt line 1: variant `Boeing 747` is not in variants.txt"));
}

#[test]
fn cars_devkit_from_committed_mat_files() {
    let tmp = TempDir::new("cars");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cars");
    for f in ["devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat"] {
        std::fs::create_dir_all(tmp.0.join(f).parent().unwrap()).unwrap();
        std::fs::copy(fixture.join(f), tmp.0.join(f)).unwrap();
    }
    for (dir, n) in [("cars_train", 6), ("cars_test", 4)] {
        for i in 1..=n {
            write_image(&tmp.0.join(dir).join(format!("{i:05}.jpg")), &small_image(30, 20, i));
        }
    }
    let ds = open(&tmp.0).unwrap();
    assert_eq!(ds.name, "stanford-cars");
    assert_eq!(ds.classes, ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]);
    // Labels as scripts/make_cars_fixture.py writes them, 0-based here.
    assert_eq!(ds.train.iter().map(|s| s.label).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2]);
    assert_eq!(ds.test.iter().map(|s| s.label).collect::<Vec<_>>(), [1, 2, 0, 1]);
    assert!(ds.test[3].path.ends_with("cars_test/00004.jpg"));

    // The same files at the root are found too; a missing image is named.
    std::fs::rename(tmp.0.join("devkit/cars_meta.mat"), tmp.0.join("cars_meta.mat")).unwrap();
    std::fs::remove_file(tmp.0.join("cars_train/00006.jpg")).unwrap();
    assert!(err_of(open(&tmp.0)).contains("cars_train/00006.jpg"));
}

/// The 37x53 image of scripts/make_transform_fixture.py.
fn fixture_image() -> RgbImage {
    RgbImage::from_fn(37, 53, |x, y| image::Rgb([((x * x + 3 * y) % 256) as u8, ((5 * x + 2 * y * y) % 256) as u8, ((x * y + 7) % 256) as u8]))
}

#[test]
fn resize_and_eval_transform_match_pil() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transforms.json");
    let fixture: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let img = fixture_image();
    let nums = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>();
    for r in fixture["resize"].as_array().unwrap() {
        let (w, h) = (r["width"].as_u64().unwrap() as u32, r["height"].as_u64().unwrap() as u32);
        let ours = transforms::resize(&img, w, h);
        let worst = ours.as_raw().iter().zip(nums(&r["hwc"])).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        // Same algorithm, same integer arithmetic: bit-exact, not just within a level.
        assert!(worst == 0.0, "resize to {w}x{h}: off by {worst} levels from Pillow {}", fixture["pil_version"]);
    }
    for e in fixture["eval"].as_array().unwrap() {
        let size = e["size"].as_u64().unwrap() as u32;
        let ours = eval_transform(&img, size);
        let want = nums(&e["chw"]);
        assert_eq!(ours.len(), 3 * (size * size) as usize);
        let plane = (size * size) as usize;
        for (i, (&a, b)) in ours.iter().zip(want).enumerate() {
            let level = 1.0 / 255.0 / transforms::STD[i / plane] as f64;
            assert!((a as f64 - b).abs() <= level + 1e-5, "eval {size}: element {i} is {a}, PIL gives {b}");
        }
    }
}

fn synthetic_for_loader(tmp: &TempDir) -> Dataset {
    synthetic::ensure(&tiny_spec(4), &tmp.0.join("s")).unwrap()
}

#[test]
fn loader_is_deterministic_per_seed_and_epoch() {
    let tmp = TempDir::new("loader");
    let ds = synthetic_for_loader(&tmp);
    let run = |seed: u64, epoch: u64| {
        let loader = Loader::new(&ds.train, LoaderConfig::train(&ds, 8, 24, seed));
        assert_eq!(loader.len(), 5);
        loader.epoch(epoch).map(|b| b.unwrap()).map(|b| (b.images, b.labels)).collect::<Vec<_>>()
    };
    let a = run(7, 0);
    assert_eq!(a.len(), 5);
    assert!(a.iter().all(|(x, l)| x.len() == l.len() * 3 * 24 * 24 && l.len() == 8));
    assert_eq!(a, run(7, 0));
    assert_ne!(a, run(7, 1));
    assert_ne!(a, run(8, 0));

    // Evaluation: listed order, every sample, the last batch partial.
    let eval = Loader::new(&ds.test, LoaderConfig::eval(&ds, 6, 32));
    let batches: Vec<_> = eval.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.n).collect::<Vec<_>>(), [6, 6, 6, 2]);
    let labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, ds.test.iter().map(|s| s.label as u32).collect::<Vec<_>>());
    let first = image::open(&ds.test[0].path).unwrap().to_rgb8();
    assert_eq!(&batches[0].images[..3 * 32 * 32], &eval_transform(&first, 32)[..]);

    // Stopping mid-epoch must not hang or leak the worker.
    let mut early = Loader::new(&ds.train, LoaderConfig::train(&ds, 4, 16, 1)).epoch(0);
    early.next().unwrap().unwrap();
    drop(early);
}

#[test]
fn broken_images_are_skipped_in_training_and_fatal_in_evaluation() {
    let tmp = TempDir::new("broken");
    let ds = synthetic_for_loader(&tmp);
    let garbage = tmp.0.join("garbage.png");
    std::fs::write(&garbage, b"not an image").unwrap();
    let mut samples = ds.train[..6].to_vec();
    samples[1].path = tmp.0.join("missing.png");
    samples[4].path = garbage.clone();

    let cfg = LoaderConfig { drop_last: false, ..LoaderConfig::train(&ds, 3, 16, 0) };
    let train = Loader::new(&samples, cfg);
    let n: usize = train.epoch(0).map(|b| b.unwrap().n).sum();
    assert_eq!(n, 4);
    let w = train.warnings();
    assert_eq!(w.count, 2);
    assert!(w.first.iter().any(|m| m.contains("missing.png")) && w.first.iter().any(|m| m.contains("garbage.png")), "{w:?}");

    let eval = Loader::new(&samples, LoaderConfig::eval(&ds, 3, 16));
    let results: Vec<_> = eval.epoch(0).collect();
    let e = results.into_iter().find_map(|r| r.err()).expect("strict loader must fail").to_string();
    assert!(e.contains("missing.png"), "{e}");
}

#[test]
fn train_pipelines_produce_the_requested_size() {
    let img = fixture_image();
    let mut rng = dfkd::rng::Rng::new(0);
    for augment in [Augment::None, Augment::RandomResizedCrop, Augment::RandomCrop] {
        for bottom_crop in [0, 20] {
            let x = Pipeline { size: 24, bottom_crop, augment }.apply(&img, &mut rng);
            assert_eq!(x.len(), 3 * 24 * 24, "{augment:?}");
            assert!(x.iter().all(|v| v.is_finite() && v.abs() < 3.0));
        }
    }
}

/// Generation time and a preview of the default set:
/// `cargo test --release --test data -- --ignored --nocapture`; DFKD_SYNTH_DIR keeps the
/// set (e.g. to train on it elsewhere), DFKD_PREVIEW keeps the contact sheet.
#[test]
#[ignore]
fn default_synthetic_set_timing() {
    let tmp = TempDir::new("default");
    let t = std::time::Instant::now();
    let dir = std::env::var("DFKD_SYNTH_DIR").map(PathBuf::from).unwrap_or(tmp.0.join("s"));
    let ds = synthetic::ensure(&SyntheticSpec::default(), &dir).unwrap();
    println!("default set ({} train, {} test) generated in {:.2?}", ds.train.len(), ds.test.len(), t.elapsed());
    let out = std::env::var("DFKD_PREVIEW").map(PathBuf::from).unwrap_or(tmp.0.join("preview.png"));
    synthetic::preview_grid(&ds, 10, &out).unwrap();
    println!("{}", ds.classes.join("\n"));
}
