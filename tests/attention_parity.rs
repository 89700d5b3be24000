//! Parity of the fused attention kernels (kernels/spatial_attention.cu,
//! high_order_attention.cu, contrastive.cu, normalized_distance.cu) with the CPU
//! backend's fused loops, which tests/attention_fused.rs checks against the
//! compositions of engine ops. Every numbered version of every kernel runs
//! (`fused::force_version`), forward and backward, in f32 and bf16, on random non-zero
//! inputs at odd sizes, from views with an offset of 3 elements (which rules out the
//! 4-wide paths) and of 4 (which allows them where the size does). Runs on `CudaEmu`
//! (the kernels compiled as C++, so CI without a GPU runs them); `Cuda` joins once its
//! storage exists.
//!
//! Tolerances, `abs + rel * |cpu|`:
//! - f32: 1e-6 + 1e-5. Both sides compute in f32 from the same inputs; they differ in
//!   exp (CUDA's expf vs the CPU's vectorised one, each within 2e-7) and in the order
//!   of the plane and row sums (tree vs 16 lanes).
//! - bf16: 1e-5 + 1e-2. Inputs are the same bf16 values on both sides and the f32
//!   results differ as above, so outputs are equal unless an f32 result sits at a
//!   bf16 rounding boundary: then they differ by one bf16 ulp (at most 2^-7 relative).

mod common;
use common::assert_close;
use dfkd::backend::{BackendStorage, CpuStorage, Storage};
use dfkd::fused::high_order_attention::{HoaCombine, HoaProducts};
use dfkd::fused::normalized_distance::NormalizedDistance;
use dfkd::fused::nt_xent::{ContrastiveNormalize, ContrastiveRows};
use dfkd::fused::spatial_attention::SpatialAttention;
use dfkd::fused::{self, whole, FusedOp};
use dfkd::rng::Rng;
use dfkd::{DType, Device, Layout};
use half::bf16;

/// Leading elements before each input view: misaligned for 4-wide access, aligned.
const OFFSETS: [usize; 2] = [3, 4];

thread_local! {
    static OFFSET: std::cell::Cell<usize> = const { std::cell::Cell::new(3) };
}

/// The emulator, and `cuda:0` when one opens (or the one `DFKD_TEST_DEVICE` names).
fn devices() -> Vec<Device> {
    common::cuda_devices()
}

fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| scale * r.normal()).collect()
}

/// `v` after `OFFSET` leading values, in `dtype`, on `dev`; and its layout of `shape`.
fn input(dev: Device, v: &[f32], shape: &[usize], dtype: DType) -> (Storage, Layout) {
    let offset = OFFSET.get();
    let mut all = randn(offset, 999, 1.0);
    all.extend_from_slice(v);
    let cpu = match dtype {
        DType::BF16 => CpuStorage::BF16(all.iter().map(|&x| bf16::from_f32(x)).collect()),
        _ => CpuStorage::F32(all),
    };
    let s = Storage::from_cpu(cpu, dev).unwrap();
    (s, Layout::new(shape.to_vec(), Layout::contiguous(shape).strides().to_vec(), offset))
}

fn values(s: &Storage) -> Vec<f32> {
    let c = s.to_cpu().unwrap();
    c.to_f32_vec(&Layout::contiguous(&[c.len()]))
}

/// Tolerance `abs + rel * |want|` of results in `dtype` (bf16 keeps 8 bits).
fn abs_tol(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        1e-5
    } else {
        1e-6
    }
}
fn rel_tol(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        1e-2
    } else {
        1e-5
    }
}

/// Runs `f` once per version of `family` (and once with the default), comparing the
/// device's outputs with the CPU's.
fn each_version(family: &str, mut f: impl FnMut(&str)) {
    let versions = fused::versions(family).unwrap();
    for &v in versions.iter() {
        fused::force_version(family, Some(v)).unwrap();
        f(&format!("{family} v{v}"));
    }
    fused::force_version(family, None).unwrap();
    f(&format!("{family} default"));
}

#[test]
fn spatial_attention_kernels() {
    // hw = 63 (scalar), 64 (4-wide), 1517 (long planes), and 4x4 planes
    let shapes: [[usize; 4]; 4] = [[3, 5, 7, 9], [2, 3, 8, 8], [1, 3, 37, 41], [2, 33, 4, 4]];
    for (dev, offset) in devices().into_iter().flat_map(|d| OFFSETS.map(|o| (d, o))) {
        OFFSET.set(offset);
        for dtype in [DType::F32, DType::BF16] {
            for shape in shapes {
                let n: usize = shape.iter().product();
                let k = 0.05 * (shape[2] * shape[3]) as f32;
                let (a, f, dy) = (randn(n, 1, 3.0), randn(n, 2, 1.0), randn(n, 3, 1.0));
                let run = |d: Device| {
                    let ((a, la), (f, lf), (dy, ld)) = (input(d, &a, &shape, dtype), input(d, &f, &shape, dtype), input(d, &dy, &shape, dtype));
                    let [y, stats] = SpatialAttention { k }.forward(&[(&a, &la), (&f, &lf)]).unwrap();
                    (y, stats, a, la, f, lf, dy, ld)
                };
                let cpu = run(Device::Cpu);
                let [cda, cdf] = SpatialAttention { k }.backward(&[(&cpu.2, &cpu.3), (&cpu.4, &cpu.5), (&cpu.6, &cpu.7), (&cpu.1, &whole(&cpu.1))]).unwrap();
                let gpu = run(dev);
                let what = format!("{dev} {dtype:?} {shape:?} offset {offset}");
                each_version("spatial_attention_fwd", |v| {
                    let [y, stats] = SpatialAttention { k }.forward(&[(&gpu.2, &gpu.3), (&gpu.4, &gpu.5)]).unwrap();
                    assert_eq!(y.dtype(), dtype);
                    assert_close(&values(&y), &values(&cpu.0), abs_tol(dtype), rel_tol(dtype), &format!("{what} {v} y"));
                    assert_close(&values(&stats), &values(&cpu.1), abs_tol(DType::F32), rel_tol(DType::F32), &format!("{what} {v} stats"));
                });
                each_version("spatial_attention_bwd", |v| {
                    // the device's own stats, as in training
                    let [da, df] = SpatialAttention { k }.backward(&[(&gpu.2, &gpu.3), (&gpu.4, &gpu.5), (&gpu.6, &gpu.7), (&gpu.1, &whole(&gpu.1))]).unwrap();
                    assert_close(&values(&da), &values(&cda), abs_tol(dtype), rel_tol(dtype), &format!("{what} {v} da"));
                    assert_close(&values(&df), &values(&cdf), abs_tol(dtype), rel_tol(dtype), &format!("{what} {v} df"));
                });
            }
        }
    }
}

#[test]
fn high_order_attention_kernels() {
    // (order, n, c/4, h, w): odd planes, 4-aligned ones, orders 1..4
    let cases = [(3, 3, 5, 3, 7), (3, 2, 4, 4, 4), (2, 3, 3, 5, 5), (4, 2, 2, 3, 3), (1, 5, 3, 1, 1)];
    for (dev, offset) in devices().into_iter().flat_map(|d| OFFSETS.map(|o| (d, o))) {
        OFFSET.set(offset);
        for dtype in [DType::F32, DType::BF16] {
            for (order, n, c, h, w) in cases {
                let what = format!("{dev} {dtype:?} order {order} [{n}, {c}, {h}, {w}] offset {offset}");
                let slices = order * (order + 1) / 2;
                let (zs, hs) = ([n, slices * c, h, w], [n, order * c, h, w]);
                let (z, dh) = (randn(zs.iter().product(), 4, 1.0), randn(hs.iter().product(), 5, 1.0));
                let products = |d: Device| {
                    let ((z, lz), (dh, lh)) = (input(d, &z, &zs, dtype), input(d, &dh, &hs, dtype));
                    let [out] = HoaProducts { order }.forward(&[(&z, &lz)]).unwrap();
                    let [dz] = HoaProducts { order }.backward(&[(&z, &lz), (&dh, &lh)]).unwrap();
                    (values(&out), values(&dz))
                };
                let want = products(Device::Cpu);
                each_version("hoa_products_fwd", |v| assert_close(&products(dev).0, &want.0, abs_tol(dtype), rel_tol(dtype), &format!("{what} {v}")));
                each_version("hoa_products_bwd", |v| assert_close(&products(dev).1, &want.1, abs_tol(dtype), rel_tol(dtype), &format!("{what} {v}")));

                let (us, fs) = ([n, order * 4 * c, h, w], [n, 4 * c, h, w]);
                let (u, f, dy) = (randn(us.iter().product(), 6, 2.0), randn(fs.iter().product(), 7, 1.0), randn(fs.iter().product(), 8, 1.0));
                let combine = |d: Device| {
                    let ((u, lu), (f, lf), (dy, ld)) = (input(d, &u, &us, dtype), input(d, &f, &fs, dtype), input(d, &dy, &fs, dtype));
                    let [y] = HoaCombine { order }.forward(&[(&u, &lu), (&f, &lf)]).unwrap();
                    let [du, df] = HoaCombine { order }.backward(&[(&u, &lu), (&f, &lf), (&dy, &ld)]).unwrap();
                    [values(&y), values(&du), values(&df)]
                };
                let want = combine(Device::Cpu);
                each_version("hoa_combine_fwd", |v| assert_close(&combine(dev)[0], &want[0], abs_tol(dtype), rel_tol(dtype), &format!("{what} {v}")));
                each_version("hoa_combine_bwd", |v| {
                    let got = combine(dev);
                    assert_close(&got[1], &want[1], abs_tol(dtype), rel_tol(dtype), &format!("{what} {v} du"));
                    assert_close(&got[2], &want[2], abs_tol(dtype), rel_tol(dtype), &format!("{what} {v} df"));
                });
            }
        }
    }
}

#[test]
fn contrastive_kernels() {
    // (n, d): odd sizes, the paper's 2n = 128 x d = 128, one pair, and a row of zeros
    // (the clamped norm) in the first case
    for (dev, offset) in devices().into_iter().flat_map(|d| OFFSETS.map(|o| (d, o))) {
        OFFSET.set(offset);
        for dtype in [DType::F32, DType::BF16] {
            for (n, d, tau) in [(7, 11, 0.1f32), (64, 128, 0.1), (37, 64, 0.5), (1, 5, 0.1)] {
                let what = format!("{dev} {dtype:?} n={n} d={d} offset {offset}");
                let mut t = randn(n * d, 9, 1.0);
                if n == 7 {
                    t[2 * d..3 * d].fill(0.0);
                }
                let (s, dloss) = (randn(n * d, 10, 2.0), randn(n, 11, 1.0));
                let run = |dev: Device| {
                    let ((t, lt), (s, ls)) = (input(dev, &t, &[n, d], dtype), input(dev, &s, &[n, d], dtype));
                    let normalize = ContrastiveNormalize { eps: 1e-12, dtype };
                    let [z, norms] = normalize.forward(&[(&t, &lt), (&s, &ls)]).unwrap();
                    // the similarity GEMM on the CPU, so both sides see the same sim
                    let (zc, _) = input(Device::Cpu, &values(&z), &[2 * n, d], DType::F32);
                    let la = Layout::new(vec![1, n, d], vec![0, d, 1], OFFSET.get());
                    let lb = Layout::new(vec![1, d, 2 * n], vec![0, 1, d], OFFSET.get());
                    let sim = values(&zc.matmul(&la, &zc, &lb).unwrap());
                    let (sim_s, sim_l) = input(dev, &sim, &[n, 2 * n], DType::F32);
                    let [loss, lse] = ContrastiveRows { tau }.forward(&[(&sim_s, &sim_l)]).unwrap();
                    let (g, gl) = input(dev, &dloss, &[n], DType::F32);
                    let [sym] = ContrastiveRows { tau }.backward(&[(&sim_s, &sim_l), (&lse, &whole(&lse)), (&g, &gl)]).unwrap();
                    let dz = Storage::from_cpu(CpuStorage::F32(randn(2 * n * d, 12, 1.0)), dev).unwrap();
                    let zl = Layout::contiguous(&[2 * n, d]);
                    let [dt, ds] = normalize.backward(&[(&z, &zl), (&norms, &whole(&norms)), (&dz, &zl)]).unwrap();
                    assert_eq!((dt.dtype(), ds.dtype()), (dtype, dtype));
                    [z, norms, loss, lse, sym, dt, ds].map(|s| values(&s))
                };
                let want = run(Device::Cpu);
                each_version("contrastive_rows", |v| {
                    let got = run(dev);
                    let names = ["zhat", "norms", "loss", "lse", "sym", "dt", "ds"];
                    for (k, name) in names.iter().enumerate() {
                        // zhat, norms, loss, lse and S are f32 whatever the input dtype
                        let t = if k >= 5 { dtype } else { DType::F32 };
                        assert_close(&got[k], &want[k], abs_tol(t), rel_tol(t), &format!("{what} {v} {name}"));
                    }
                });
            }
        }
    }
}

#[test]
fn normalized_distance_kernels() {
    // (n, d): odd sizes, a demo stage's maps (16 x 32 x 32), short rows, and a
    // row of zeros (the clamped norm) in the first case. The distance is a difference of
    // terms near 1 that the CPU sums in f64 and the kernel in f32: 1e-5 absolute.
    for (dev, offset) in devices().into_iter().flat_map(|d| OFFSETS.map(|o| (d, o))) {
        OFFSET.set(offset);
        for dtype in [DType::F32, DType::BF16] {
            for (n, d) in [(5, 37), (3, 16 * 32 * 32), (4, 3)] {
                let what = format!("{dev} {dtype:?} n={n} d={d} offset {offset}");
                let mut a = randn(n * d, 20, 1.0);
                if n == 5 {
                    a[d..2 * d].fill(0.0);
                }
                let (b, g) = (randn(n * d, 21, 2.0), randn(n, 22, 1.0));
                let run = |dev: Device| {
                    let ((a, la), (b, lb), (g, lg)) = (input(dev, &a, &[n, d], dtype), input(dev, &b, &[n, d], dtype), input(dev, &g, &[n], dtype));
                    let op = NormalizedDistance { eps: 1e-12 };
                    let [dist, stats] = op.forward(&[(&a, &la), (&b, &lb)]).unwrap();
                    let [da, db] = op.backward(&[(&a, &la), (&b, &lb), (&stats, &whole(&stats)), (&g, &lg)]).unwrap();
                    assert_eq!((dist.dtype(), da.dtype(), db.dtype()), (dtype, dtype, dtype));
                    [dist, stats, da, db].map(|s| values(&s))
                };
                let (want, got) = (run(Device::Cpu), run(dev));
                for (k, name) in ["dist", "stats", "da", "db"].iter().enumerate() {
                    let abs = if k == 0 { 1e-5 } else { abs_tol(dtype) };
                    let t = if k == 1 { DType::F32 } else { dtype };
                    assert_close(&got[k], &want[k], abs, rel_tol(t), &format!("{what} {name}"));
                }
            }
        }
    }
}
