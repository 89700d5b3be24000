//! Diagnostic: the fastest of 25 runs of each pass of the CPU demo's convolutions,
//! which `cargo bench --bench conv` times only together (its backward is both gradients
//! and the loss around them): forward, input gradient and weight gradient, the last two
//! straight on the storage.
//!
//!     cargo run --release --example conv_pass_time -- [NAME_FILTER]

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use dfkd::backend::Conv2dParams;
use dfkd::rng::Rng;
use dfkd::{ConvOpts, Device, Tensor};
use std::time::Instant;

/// (name, batch, c_in, c_out, plane side, kernel, stride, padding, groups)
type Shape = (&'static str, usize, usize, usize, usize, usize, usize, usize, usize);

/// resnet20's and resnet8's convolutions, the high-order attention's 1x1s (3 orders,
/// grouped), and some of ResNet-18's.
const SHAPES: &[Shape] = &[
    ("16x32x32_3x3", 64, 16, 16, 32, 3, 1, 1, 1),
    ("32x16x16_3x3", 64, 32, 32, 16, 3, 1, 1, 1),
    ("64x8x8_3x3", 64, 64, 64, 8, 3, 1, 1, 1),
    ("16x32x32_3x3_s2", 64, 16, 32, 32, 3, 2, 1, 1),
    ("32x16x16_3x3_s2", 64, 32, 64, 16, 3, 2, 1, 1),
    ("16x32x32_1x1_s2", 64, 16, 32, 32, 1, 2, 0, 1),
    ("16x32x32_1x1", 64, 16, 24, 32, 1, 1, 0, 1),
    ("64x8x8_1x1", 64, 64, 96, 8, 1, 1, 0, 1),
    ("12x32x32_1x1_g3", 64, 12, 48, 32, 1, 1, 0, 3),
    ("24x16x16_1x1_g3", 64, 24, 96, 16, 1, 1, 0, 3),
    // ResNet-18's: training (batch 32, 64 px) and inference (batch 1, 224 px)
    ("r18_layer2_3x3_s2", 32, 64, 128, 16, 3, 2, 1, 1),
    ("r18_layer3_3x3_s2", 32, 128, 256, 8, 3, 2, 1, 1),
    ("r18_layer1_3x3", 32, 64, 64, 16, 3, 1, 1, 1),
    ("r18_b1_224px_layer2_3x3_s2", 1, 64, 128, 56, 3, 2, 1, 1),
    ("r18_b1_224px_layer1_3x3", 1, 64, 64, 56, 3, 1, 1, 1),
];

/// Milliseconds of the fastest of 25 runs.
fn fastest(f: impl Fn()) -> f64 {
    (0..25)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}

fn main() -> dfkd::Result<()> {
    dfkd::allocator::keep_freed_pages();
    let filter = std::env::args().nth(1).unwrap_or_default();
    let mut rng = Rng::new(0);
    for &(name, batch, c_in, c_out, side, k, s, pad, groups) in SHAPES.iter().filter(|s| s.0.contains(&filter)) {
        let x = Tensor::randn(&[batch, c_in, side, side], 0.0, 1.0, &mut rng, Device::Cpu)?;
        let w = Tensor::randn(&[c_out, c_in / groups, k, k], 0.0, 0.1, &mut rng, Device::Cpu)?;
        let opts = ConvOpts::default().stride(s).padding(pad).groups(groups);
        let p = Conv2dParams { batch, c_in, h_in: side, w_in: side, c_out, kh: k, kw: k, stride: (s, s), padding: (pad, pad), dilation: (1, 1), groups };
        let gy = Tensor::randn(&p.output_shape(), 0.0, 1.0, &mut rng, Device::Cpu)?;
        let forward = fastest(|| drop(dfkd::no_grad(|| x.conv2d(&w, None, opts)).unwrap()));
        let input = fastest(|| drop(gy.storage().conv2d_backward_input(gy.layout(), &w.storage(), w.layout(), &p).unwrap()));
        let weight = fastest(|| drop(x.storage().conv2d_backward_weight(x.layout(), &gy.storage(), gy.layout(), &p).unwrap()));
        let gflops = |ms: f64| 2.0 * p.macs() as f64 / ms / 1e6;
        println!(
            "{name:16} forward {forward:6.3} ms ({:5.1} GFLOP/s)   input gradient {input:6.3} ms ({:5.1})   weight gradient {weight:6.3} ms ({:5.1})",
            gflops(forward),
            gflops(input),
            gflops(weight)
        );
    }
    Ok(())
}
