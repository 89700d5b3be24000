//! Parity of every CUDA kernel with the CPU reference (the fused attention kernels:
//! tests/attention_parity.rs). Each test body runs on every
//! CUDA device present against `Device::Cpu`: always `CudaEmu` (the same kernels
//! compiled as C++ and run by the kernel emulator, so CI without a GPU checks them),
//! and `Cuda(0)` when a GPU opens (skipped with a note otherwise; `DFKD_TEST_DEVICE`
//! picks one device, see `common::cuda_devices`).
//!
//! Inputs are random and non-zero, at odd sizes (never a multiple of the 256-thread
//! block or of a warp), on strided views (transposed, broadcast, offset) wherever the
//! backend accepts them. Each kernel states its tolerance `abs + rel * |cpu|`: exact
//! for kernels that do the same IEEE operations as the CPU, a few ulps where a GPU's
//! math library or FMA contraction may round differently, and a sum-length-scaled
//! bound where the reduction order differs from the CPU's f64 accumulation.

mod common;
use common::assert_close;

use dfkd::backend::{cuda, BackendStorage, BinaryOp, CpuStorage, ReduceOp, Storage, UnaryOp, UpdateRule};
use dfkd::fused::channel_stats::ChannelStats;
use dfkd::fused::{whole, FusedOp};
use dfkd::rng::Rng;
use dfkd::{DType, Device, Layout, Tensor};

/// The CUDA devices to compare with the CPU.
fn devices() -> Vec<Device> {
    common::cuda_devices()
}

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn on(dev: Device, v: &[f32]) -> Storage {
    Storage::from_cpu(CpuStorage::F32(v.to_vec()), dev).unwrap()
}

/// The elements of a contiguous result as f32.
fn values(s: &Storage) -> Vec<f32> {
    let c = s.to_cpu().unwrap();
    c.to_f32_vec(&Layout::contiguous(&[c.len()]))
}

/// Views of a 37 x 29 buffer (1073 elements, odd): contiguous, transposed, narrowed
/// with an offset, and a broadcast of one row. Each with its buffer length.
fn views() -> Vec<(&'static str, Layout)> {
    let base = Layout::contiguous(&[37, 29]);
    vec![
        ("contiguous", base.clone()),
        ("transposed", base.permute(&[1, 0]).unwrap()),
        ("narrowed", base.narrow(0, 3, 31).unwrap().narrow(1, 2, 25).unwrap()),
        ("broadcast", base.narrow(0, 5, 1).unwrap().broadcast_as(&[3, 37, 29]).unwrap()),
    ]
}

#[test]
fn emulator_semantics_and_launch_cost() {
    let (failures, ms) = cuda::emulator_selftest();
    eprintln!("emulator: one launch of 64 blocks x 256 threads with 2 barriers and a warp reduction: {ms:.2} ms");
    assert_eq!(failures, 0, "emulator self-test failures (printed above)");
    assert!(ms < 50.0, "emulated launch took {ms} ms");
}

#[test]
fn unary_kernels() {
    use UnaryOp::*;
    // (abs, rel) per op: exact where GPU and CPU do one correctly rounded IEEE
    // operation; a few ulps for the transcendental functions (CUDA's expf/logf/tanhf/powf
    // are within 2 ulps) and where nvcc may fuse a multiply-add.
    let tolerance = |op: UnaryOp| match op {
        Neg | Recip | Sqrt | Sqr | Abs | Sign | Relu | LeakyRelu(_) | LeakyStep(_) | Clamp(..) | InRange(..) => (0.0, 0.0),
        Exp => (0.0, 1e-6),
        Log | Sigmoid | Tanh | Powf(_) | Affine(..) => (1e-7, 1e-6),
    };
    let x = randn(37 * 29, 1);
    // log, sqrt and powf of negatives are NaN on both sides; test them on |x| + 0.1 too
    let pos: Vec<f32> = x.iter().map(|v| v.abs() + 0.1).collect();
    for dev in devices() {
        for op in UnaryOp::ALL {
            let (abs, rel) = tolerance(op);
            for input in [&x, &pos] {
                let (cpu, gpu) = (on(Device::Cpu, input), on(dev, input));
                for (name, l) in views() {
                    let want = values(&cpu.unary(&l, op).unwrap());
                    let got = values(&gpu.unary(&l, op).unwrap());
                    assert_close(&got, &want, abs, rel, &format!("{dev} {op:?} {name}"));
                }
            }
        }
    }
}

#[test]
fn binary_kernels() {
    // all exact: one IEEE operation (or comparison) per element on both sides
    let ops = BinaryOp::ALL;
    // values on a coarse grid so that Eq and Max/Min see ties
    let a: Vec<f32> = randn(37 * 29, 2).iter().map(|v| (v * 2.0).round() / 2.0 + 0.25).collect();
    let b: Vec<f32> = randn(37 * 29, 3).iter().map(|v| (v * 2.0).round() / 2.0 + 0.25).collect();
    let base = Layout::contiguous(&[37, 29]);
    let row = Layout::new(vec![37, 29], vec![0, 1], 29); // row 1 broadcast down
    let col = Layout::new(vec![37, 29], vec![29, 0], 3); // column 3 broadcast across
    let t = Layout::contiguous(&[29, 37]).permute(&[1, 0]).unwrap();
    let pairs =
        [("contiguous", &base, &base), ("row-broadcast", &base, &row), ("col-broadcast", &col, &base), ("transposed", &t, &base), ("both-strided", &t, &row)];
    for dev in devices() {
        let (ca, cb, ga, gb) = (on(Device::Cpu, &a), on(Device::Cpu, &b), on(dev, &a), on(dev, &b));
        for op in ops {
            for (name, la, lb) in pairs {
                let want = values(&ca.binary(la, &cb, lb, op).unwrap());
                let got = values(&ga.binary(la, &gb, lb, op).unwrap());
                assert_close(&got, &want, 0.0, 0.0, &format!("{dev} {op:?} {name}"));
            }
        }
    }
}

#[test]
fn copy_kernels() {
    // exact: bits are moved, for 32-bit (f32, u32) and 16-bit (f16, bf16) elements
    let x = randn(37 * 29, 4);
    let srcs = [
        CpuStorage::F32(x.clone()),
        CpuStorage::U32(x.iter().map(|v| v.to_bits()).collect()),
        CpuStorage::F16(x.iter().map(|&v| half::f16::from_f32(v)).collect()),
        CpuStorage::BF16(x.iter().map(|&v| half::bf16::from_f32(v)).collect()),
    ];
    for dev in devices() {
        for src in &srcs {
            let (cpu, gpu) = (Storage::from_cpu(src.clone(), Device::Cpu).unwrap(), Storage::from_cpu(src.clone(), dev).unwrap());
            for (name, l) in views() {
                let (want, got) = (cpu.copy_strided(&l).unwrap().to_cpu().unwrap(), gpu.copy_strided(&l).unwrap().to_cpu().unwrap());
                assert_eq!(format!("{got:?}"), format!("{want:?}"), "{dev} copy_strided {:?} {name}", src.dtype());
                assert_eq!(gpu.copy_strided(&l).unwrap().device(), dev);
            }
            // copy_into a transposed window of a larger destination
            let src_l = Layout::contiguous(&[37, 29]).narrow(0, 1, 20).unwrap();
            let dst_l = Layout::contiguous(&[29, 41]).permute(&[1, 0]).unwrap().narrow(0, 7, 20).unwrap();
            let zeros = |d| Storage::zeros(29 * 41, src.dtype(), d).unwrap();
            let (mut want, mut got) = (zeros(Device::Cpu), zeros(dev));
            cpu.copy_into(&src_l, &mut want, &dst_l).unwrap();
            gpu.copy_into(&src_l, &mut got, &dst_l).unwrap();
            assert_eq!(format!("{:?}", got.to_cpu().unwrap()), format!("{:?}", want.to_cpu().unwrap()), "{dev} copy_into {:?}", src.dtype());
        }
    }
}

#[test]
fn reduce_kernels() {
    // Max/Min are exact. Sum: the CPU accumulates runs in f64, the kernel a float tree;
    // for n_red terms of N(0,1) the float error stays far below 1e-6 * n_red.
    let shape = [7, 33, 45];
    let n = 7 * 33 * 45;
    let x = randn(n, 5);
    let base = Layout::contiguous(&shape);
    let layouts = [("contiguous", base.clone()), ("permuted", base.permute(&[2, 0, 1]).unwrap()), ("narrowed", base.narrow(1, 4, 27).unwrap())];
    let dim_sets: [&[usize]; 6] = [&[0], &[1], &[2], &[0, 2], &[1, 2], &[0, 1, 2]];
    for dev in devices() {
        let (cpu, gpu) = (on(Device::Cpu, &x), on(dev, &x));
        for op in ReduceOp::ALL {
            for (name, l) in &layouts {
                for dims in dim_sets {
                    let n_red: usize = dims.iter().map(|&d| l.shape()[d]).product();
                    let abs = if op == ReduceOp::Sum { 1e-6 * n_red as f32 } else { 0.0 };
                    let want = values(&cpu.reduce(l, op, dims).unwrap());
                    let got = values(&gpu.reduce(l, op, dims).unwrap());
                    assert_close(&got, &want, abs, 1e-6, &format!("{dev} {op:?} {name} over {dims:?}"));
                }
            }
        }
        // max and min propagate NaN, as the CPU reference (and PyTorch) do
        let mut y = x.clone();
        y[100] = f32::NAN;
        let l = Layout::contiguous(&shape);
        for op in [ReduceOp::Max, ReduceOp::Min] {
            let want = values(&on(Device::Cpu, &y).reduce(&l, op, &[2]).unwrap());
            let got = values(&on(dev, &y).reduce(&l, op, &[2]).unwrap());
            assert!(got[2].is_nan() && want[2].is_nan());
            assert_close(&got, &want, 0.0, 0.0, &format!("{dev} {op:?} with a NaN"));
        }
    }
}

#[test]
fn softmax_kernels() {
    // float sums against the CPU's f64 ones, and expf/logf within 2 ulps
    for dev in devices() {
        for d in [1usize, 5, 300, 1001] {
            let rows = 37;
            let x: Vec<f32> = randn(rows * d + 3, 6).iter().map(|v| 4.0 * v).collect();
            // an offset view: the kernel gets a pointer advanced to the view's start
            let l = Layout::new(vec![rows, d], vec![d, 1], 3);
            for log in [false, true] {
                let want = values(&on(Device::Cpu, &x).softmax_last(&l, log).unwrap());
                let got = values(&on(dev, &x).softmax_last(&l, log).unwrap());
                assert_close(&got, &want, 1e-6, 1e-5, &format!("{dev} softmax log={log} d={d}"));
            }
        }
    }
}

#[test]
fn optimizer_kernels() {
    // Same f32 operations in the same order; nvcc may fuse multiply-adds: 1e-6 relative.
    let n = 1000 + 37;
    let rules = [
        UpdateRule::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 5e-4, nesterov: false },
        UpdateRule::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.0, nesterov: true },
        UpdateRule::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-4, step: 1 },
    ];
    for dev in devices() {
        for rule in rules {
            let n_state = if matches!(rule, UpdateRule::Sgd { .. }) { 1 } else { 2 };
            let run = |d: Device| {
                let mut p = on(d, &randn(n, 7));
                let mut state: Vec<Storage> = (0..n_state).map(|k| on(d, &randn(n, 20 + k as u64).iter().map(|v| v.abs()).collect::<Vec<_>>())).collect();
                for step in 1..=3 {
                    let rule = match rule {
                        UpdateRule::Adam { lr, beta1, beta2, eps, weight_decay, .. } => UpdateRule::Adam { lr, beta1, beta2, eps, weight_decay, step },
                        r => r,
                    };
                    let g = on(d, &randn(n, 10 + step as u64));
                    let mut refs: Vec<&mut Storage> = state.iter_mut().collect();
                    p.optimizer_update(&g, &mut refs, rule).unwrap();
                }
                let mut out = values(&p);
                state.iter().for_each(|s| out.extend(values(s)));
                out
            };
            // abs 1e-6: nvcc fuses `wd * p + g` and `momentum * buf + d` into FMAs (one
            // rounding fewer than the CPU), which shows where the two terms cancel; the
            // emulator (g++, no FMA) matches the CPU exactly.
            assert_close(&run(dev), &run(Device::Cpu), 1e-6, 1e-6, &format!("{dev} {rule:?}"));
        }
    }
}

/// The whole stack on a CUDA device: tensors, autograd's backward ops (derivative
/// unary kernels, broadcast reductions), forward and gradients against the CPU.
#[test]
fn tensor_forward_and_backward() {
    let run = |dev: Device| {
        let x = Tensor::from_vec(randn(5 * 37, 8), &[5, 37], dev).unwrap().to_var().unwrap();
        let w = Tensor::from_vec(randn(37, 9), &[37], dev).unwrap().to_var().unwrap();
        let h = x.mul(&w).unwrap().tanh().unwrap().leaky_relu(0.1).unwrap();
        let y = h.log_softmax(1).unwrap().mul(&h.transpose(0, 1).unwrap().transpose(0, 1).unwrap().sigmoid().unwrap()).unwrap();
        let loss = y.sum(&[0], false).unwrap().max(&[0], false).unwrap();
        let g = loss.backward().unwrap();
        let mut out = y.to_vec_f32().unwrap();
        out.extend(g.get(&x).unwrap().to_vec_f32().unwrap());
        out.extend(g.get(&w).unwrap().to_vec_f32().unwrap());
        assert_eq!(y.device(), dev);
        out
    };
    for dev in devices() {
        assert_close(&run(dev), &run(Device::Cpu), 1e-5, 1e-4, &format!("{dev} forward and gradients"));
    }
}

#[test]
fn device_parsing() {
    assert_eq!("cuda-emu".parse::<Device>().unwrap(), Device::CudaEmu);
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!(Device::CudaEmu.to_string(), "cuda-emu");
    assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    let gpu = cuda::probe(0).is_ok_and(|d| d.is_some());
    if cuda::cuda_driver_present() {
        assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
        // parse_user opens the device: an ordinal past the last GPU is an error naming it
        let e = Device::parse_user("cuda:4096").unwrap_err().to_string();
        assert!(e.starts_with("cuda:4096: "), "{e}");
    } else {
        let e = "cuda".parse::<Device>().unwrap_err().to_string();
        assert!(e.contains("no CUDA driver found (libcuda.so); use --device cpu"), "{e}");
        assert!("cuda:0".parse::<Device>().is_err());
        let e = dfkd::Tensor::zeros(&[2], Device::Cuda(0)).unwrap_err().to_string();
        assert!(e.starts_with("cuda:0: no CUDA driver found"), "{e}");
    }
    let auto = if gpu { Device::Cuda(0) } else { Device::Cpu };
    assert_eq!("auto".parse::<Device>().unwrap(), auto, "auto picks cuda:0 exactly when it opens");
    assert!("cuda:x".parse::<Device>().is_err());
    // a U32 storage moves to the emulated device and back unchanged
    let s = Storage::from_cpu(CpuStorage::U32(vec![1, 2, 3]), Device::CudaEmu).unwrap();
    assert_eq!(s.dtype(), DType::U32);
    assert_eq!(format!("{:?}", s.to_cpu().unwrap()), "U32([1, 2, 3])");
}

/// Ops refuse operands on different devices instead of copying one across; moving a
/// tensor in place keeps its id and moves every view of its storage.
#[test]
fn devices_do_not_mix_and_move_in_place() {
    for dev in devices() {
        let a = Tensor::from_vec(randn(6, 60), &[2, 3], Device::Cpu).unwrap();
        let b = Tensor::from_vec(randn(6, 61), &[2, 3], dev).unwrap();
        let e = a.add(&b).unwrap_err().to_string();
        assert!(e.contains("different devices"), "{dev}: {e}");
        let view = a.transpose(0, 1).unwrap();
        let id = a.id();
        a.move_to(dev).unwrap();
        assert_eq!((a.id(), a.device(), view.device()), (id, dev, dev));
        assert_eq!(view.to_vec_f32().unwrap(), Tensor::from_vec(randn(6, 60), &[2, 3], Device::Cpu).unwrap().t().unwrap().to_vec_f32().unwrap());
        assert_eq!(a.add(&b).unwrap().device(), dev);
        a.move_to(Device::Cpu).unwrap();
        assert_eq!(a.device(), Device::Cpu);
        // f16 storage converts through the host (a listed fallback) and stays on the device
        let h = b.to_dtype(DType::F16).unwrap();
        assert_eq!((h.device(), h.dtype()), (dev, DType::F16));
        let back = h.to_dtype(DType::F32).unwrap().to_vec_f32().unwrap();
        assert!(back.iter().zip(randn(6, 61)).all(|(x, y)| (x - y).abs() <= 1e-3 * y.abs().max(1.0)), "{dev} f16 round trip");
    }
}

/// Every GEMM layout the convolutions and `matmul` use: plain, transposed, broadcast
/// batch, and a view with no unit stride (copied first), against the CPU GEMM.
#[test]
fn matmul_views() {
    // sums of k products of N(0,1) values in another order: 1e-5 + 1e-5 * |cpu| * k
    let (b, m, k, n) = (3, 37, 29, 19);
    let x = randn(4 * b * m * k + 7, 70);
    let y = randn(4 * b * k * n + 5, 71);
    let lhs = [
        ("contiguous", Layout::new(vec![b, m, k], vec![m * k, k, 1], 0)),
        ("transposed", Layout::new(vec![b, m, k], vec![m * k, 1, m], 3)),
        ("broadcast", Layout::new(vec![b, m, k], vec![0, k, 1], 7)),
        ("strided", Layout::new(vec![b, m, k], vec![2 * m * k, 2 * k, 2], 1)),
    ];
    let rhs = [
        ("contiguous", Layout::new(vec![b, k, n], vec![k * n, n, 1], 0)),
        ("transposed", Layout::new(vec![b, k, n], vec![k * n, 1, k], 5)),
        ("strided", Layout::new(vec![b, k, n], vec![3 * k * n, 3 * n, 3], 2)),
    ];
    for dev in devices() {
        let (cx, cy, gx, gy) = (on(Device::Cpu, &x), on(Device::Cpu, &y), on(dev, &x), on(dev, &y));
        for (ln, la) in &lhs {
            for (rn, lb) in &rhs {
                let want = values(&cx.matmul(la, &cy, lb).unwrap());
                let got = values(&gx.matmul(la, &gy, lb).unwrap());
                assert_close(&got, &want, 1e-5, 1e-5 * k as f32, &format!("{dev} matmul {ln} x {rn}"));
            }
        }
    }
}

/// Every kernel source, as embedded for the runtime, compiles with NVRTC for sm_80 and
/// sm_90. Needs libnvrtc.so.13 (scripts/check-kernels.sh puts the pinned wheel's on
/// LD_LIBRARY_PATH and sets DFKD_REQUIRE_NVRTC=1); skipped with a note without it.
#[test]
fn nvrtc_compiles_every_kernel() {
    if !cuda::nvrtc_present() {
        assert!(std::env::var_os("DFKD_REQUIRE_NVRTC").is_none(), "DFKD_REQUIRE_NVRTC is set but libnvrtc was not found");
        eprintln!("note: libnvrtc not found: NVRTC compile check skipped (run scripts/check-kernels.sh)");
        return;
    }
    let (fatbins, files) = cuda::embedded_fatbins();
    eprintln!("kernel files with an embedded nvcc fatbin: {fatbins} of {files}");
    for arch in ["sm_80", "sm_90"] {
        let modules = cuda::nvrtc_compile_all(arch).unwrap();
        eprintln!("NVRTC {arch}: compiled {}", modules.join(", "));
    }
}

fn pool_params(shape: [usize; 4], k: (usize, usize), stride: (usize, usize), padding: (usize, usize)) -> dfkd::backend::Pool2dParams {
    let [batch, channels, h_in, w_in] = shape;
    dfkd::backend::Pool2dParams { batch, channels, h_in, w_in, kh: k.0, kw: k.1, stride, padding }
}

#[test]
fn pooling_kernels() {
    // Max pooling, its gather and the average pooling forward and backward, and
    // upsampling both ways do the CPU's operations in the CPU's order: exact on the
    // emulator; 1e-6 relative on a GPU for fused multiply-adds. scatter_add_planes adds
    // with atomics in no fixed order where windows overlap: 1e-6 + 1e-6 * |cpu|.
    let shape = [3, 5, 17, 13];
    let n: usize = shape.iter().product();
    // a coarse grid of values so that windows have ties, and a NaN
    let mut x: Vec<f32> = randn(n, 30).iter().map(|v| (v * 2.0).round()).collect();
    x[77] = f32::NAN;
    let l = Layout::contiguous(&shape);
    let geoms = [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 0))];
    for dev in devices() {
        let (cpu, gpu) = (on(Device::Cpu, &x), on(dev, &x));
        for (k, s, p) in geoms {
            let pp = pool_params(shape, k, s, p);
            let what = format!("{dev} k={k:?} s={s:?} p={p:?}");
            let ((cy, ci), (gy, gi)) = (cpu.max_pool2d(&l, &pp).unwrap(), gpu.max_pool2d(&l, &pp).unwrap());
            assert_close(&values(&gy), &values(&cy), 0.0, 0.0, &format!("{what} max_pool2d"));
            assert_eq!(format!("{:?}", gi.to_cpu().unwrap()), format!("{:?}", ci.to_cpu().unwrap()), "{what} max_pool2d indices");
            let out_l = Layout::contiguous(&pp.output_shape());
            let g = randn(out_l.elem_count(), 31);
            let (cg, gg) = (on(Device::Cpu, &g), on(dev, &g));
            let plane = shape[2] * shape[3];
            let want = values(&cg.scatter_add_planes(&out_l, &ci, &out_l, plane).unwrap());
            assert_close(&values(&gg.scatter_add_planes(&out_l, &gi, &out_l, plane).unwrap()), &want, 1e-6, 1e-6, &format!("{what} scatter_add_planes"));
            let want = values(&cpu.gather_planes(&l, &ci, &out_l).unwrap());
            assert_close(&values(&gpu.gather_planes(&l, &gi, &out_l).unwrap()), &want, 0.0, 0.0, &format!("{what} gather_planes"));
            let xf: Vec<f32> = randn(n, 32);
            let want = values(&on(Device::Cpu, &xf).avg_pool2d(&l, &pp).unwrap());
            assert_close(&values(&on(dev, &xf).avg_pool2d(&l, &pp).unwrap()), &want, 0.0, 1e-6, &format!("{what} avg_pool2d"));
            let want = values(&cg.avg_pool2d_backward(&out_l, &pp).unwrap());
            assert_close(&values(&gg.avg_pool2d_backward(&out_l, &pp).unwrap()), &want, 0.0, 1e-6, &format!("{what} avg_pool2d_backward"));
        }
        for scale in [(2, 2), (3, 1)] {
            let want = values(&cpu.upsample_nearest2d(&l, scale).unwrap());
            assert_close(&values(&gpu.upsample_nearest2d(&l, scale).unwrap()), &want, 0.0, 0.0, &format!("{dev} upsample {scale:?}"));
            let up = [shape[0], shape[1], shape[2] * scale.0, shape[3] * scale.1];
            let g = randn(up.iter().product(), 33);
            let ul = Layout::contiguous(&up);
            let want = values(&on(Device::Cpu, &g).upsample_nearest2d_backward(&ul, scale).unwrap());
            let got = values(&on(dev, &g).upsample_nearest2d_backward(&ul, scale).unwrap());
            assert_close(&got, &want, 0.0, 1e-6, &format!("{dev} upsample backward {scale:?}"));
        }
    }
}

#[test]
fn batch_norm_kernels() {
    // Statistics are float block reductions where the CPU sums in f64 (over 6 * 99
    // values per channel here), so results agree to a few float roundings.
    let shape = [6, 7, 9, 11];
    let n: usize = shape.iter().product();
    let x: Vec<f32> = randn(n, 40).iter().map(|v| 3.0 + 2.0 * v).collect(); // a mean to subtract
    let dy = randn(n, 41);
    let (gamma, beta) = (randn(7, 42), randn(7, 43));
    let l = Layout::contiguous(&shape);
    for dev in devices() {
        let run = |d: Device| {
            let (x, dy, gamma, beta) = (on(d, &x), on(d, &dy), on(d, &gamma), on(d, &beta));
            let (y, mean, invstd) = x.batch_norm_train(&l, &gamma, &beta, 1e-5).unwrap();
            let (dx, dgamma, dbeta) = x.batch_norm_backward(&l, &dy, &mean, &invstd, &gamma).unwrap();
            [y, mean, invstd, dx, dgamma, dbeta].map(|s| values(&s))
        };
        let (got, want) = (run(dev), run(Device::Cpu));
        for (k, name) in ["y", "mean", "invstd", "dx", "dgamma", "dbeta"].iter().enumerate() {
            assert_close(&got[k], &want[k], 1e-5, 1e-5, &format!("{dev} batch_norm {name}"));
        }
    }
}

#[test]
fn channel_stats_kernels() {
    // the BN-statistics loss's mean and biased variance per channel, and their gradient
    // (float block reductions against the CPU's f64 sums, as batch_norm_kernels); and
    // evaluation-mode batch norm's affine map
    let shape = [6, 7, 9, 11];
    let n: usize = shape.iter().product();
    let x: Vec<f32> = randn(n, 44).iter().map(|v| 3.0 + 2.0 * v).collect();
    let dstats = randn(2 * 7, 45);
    let l = Layout::contiguous(&shape);
    for dev in devices() {
        let run = |d: Device| {
            let (x, ds) = (on(d, &x), on(d, &dstats));
            let [stats] = ChannelStats.forward(&[(&x, &l)]).unwrap();
            let [dx] = ChannelStats.backward(&[(&x, &l), (&stats, &whole(&stats)), (&ds, &whole(&ds))]).unwrap();
            // batch norm in evaluation mode: a scale and a shift per channel
            let y = x.channel_affine(&l, &on(d, &dstats[..7]), &on(d, &dstats[7..])).unwrap();
            [stats, dx, y].map(|s| values(&s))
        };
        let (got, want) = (run(dev), run(Device::Cpu));
        for (k, name) in ["stats", "dx", "affine"].iter().enumerate() {
            assert_close(&got[k], &want[k], 1e-5, 1e-5, &format!("{dev} channel_stats {name}"));
        }
    }
}

#[test]
fn conv_kernels() {
    // im2col/col2im are exact copies and gathers; the GEMMs are the CPU GEMM on the
    // emulator (cuBLAS on a GPU) but tile and sum in another order than the CPU
    // convolution, and col2im adds the overlapping taps in its own order:
    // 1e-5 + 1e-4 * |cpu| for sums of up to a few hundred products of N(0,1) values.
    use dfkd::backend::Conv2dParams;
    let cases = [
        // (batch, c_in, h, w, c_out, k, stride, padding, dilation, groups)
        (2, 3, 11, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),
        (3, 4, 13, 7, 6, (3, 2), (2, 1), (1, 0), (1, 1), 2),
        (1, 6, 9, 9, 6, (3, 3), (2, 2), (2, 2), (2, 2), 6),
        (2, 5, 7, 5, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    ];
    for dev in devices() {
        for (batch, c_in, h_in, w_in, c_out, (kh, kw), stride, padding, dilation, groups) in cases {
            let p = Conv2dParams { batch, c_in, h_in, w_in, c_out, kh, kw, stride, padding, dilation, groups };
            let (lx, lw, lo) = (Layout::contiguous(&p.input_shape()), Layout::contiguous(&p.weight_shape()), Layout::contiguous(&p.output_shape()));
            let (x, w, g) = (randn(lx.elem_count(), 50), randn(lw.elem_count(), 51), randn(lo.elem_count(), 52));
            let run = |d: Device| {
                let (x, w, g) = (on(d, &x), on(d, &w), on(d, &g));
                [x.conv2d(&lx, &w, &lw, &p).unwrap(), g.conv2d_backward_input(&lo, &w, &lw, &p).unwrap(), x.conv2d_backward_weight(&lx, &g, &lo, &p).unwrap()]
                    .map(|s| values(&s))
            };
            let (got, want) = (run(dev), run(Device::Cpu));
            for (k, name) in ["forward", "input gradient", "weight gradient"].iter().enumerate() {
                assert_close(&got[k], &want[k], 1e-5, 1e-4, &format!("{dev} conv2d {name} {p:?}"));
            }
        }
    }
}
