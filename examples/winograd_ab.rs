//! Diagnostic: each stride-1 3x3 convolution of the CPU demo and of ResNet-18's training
//! with Winograd F(2x2, 3x3) and without (the direct kernel, or the GEMM where that does
//! not apply), forward and input gradient. The two alternate in short runs and each
//! keeps its fastest: this machine's speed wanders by up to 2x within seconds, so
//! timing one path and then the other compares two machines.
//!
//!     cargo run --release --example winograd_ab -- [ROUNDS [FILTER]]
//!
//! FILTER picks the shapes whose name (`b64_16-16_32x32`: batch, channels in and out,
//! plane) contains it.

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use dfkd::backend::{cpu::set_winograd, Conv2dParams};
use dfkd::rng::Rng;
use dfkd::{ConvOpts, Device, Tensor};
use std::time::Instant;

/// (batch, c_in, c_out, plane side)
const SHAPES: &[(usize, usize, usize, usize)] = &[
    // resnet20 / resnet8 layers, the generator's last convolution (and its first, where
    // Winograd does not apply: 3 input channels)
    (64, 16, 16, 32),
    (64, 32, 32, 16),
    (64, 64, 64, 8),
    (64, 16, 3, 32),
    (64, 3, 16, 32),
    // ResNet-18 at 64 px, batch 32: layer1, layer2
    (32, 64, 64, 16),
    (32, 128, 128, 8),
    // ResNet-18 inference at 224 px, batch 1 (Winograd runs there on one thread only)
    (1, 64, 64, 56),
    (1, 128, 128, 28),
];

fn ms(f: impl Fn()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> dfkd::Result<()> {
    dfkd::allocator::keep_freed_pages();
    let rounds: usize = std::env::args().nth(1).map_or(12, |s| s.parse().expect("ROUNDS is a number"));
    let filter = std::env::args().nth(2).unwrap_or_default();
    let mut rng = Rng::new(0);
    for &(batch, c_in, c_out, side) in SHAPES.iter().filter(|&&(b, i, o, s)| format!("b{b}_{i}-{o}_{s}x{s}").contains(&filter)) {
        let x = Tensor::randn(&[batch, c_in, side, side], 0.0, 1.0, &mut rng, Device::Cpu)?;
        let w = Tensor::randn(&[c_out, c_in, 3, 3], 0.0, 0.1, &mut rng, Device::Cpu)?;
        let p = Conv2dParams { batch, c_in, h_in: side, w_in: side, c_out, kh: 3, kw: 3, stride: (1, 1), padding: (1, 1), dilation: (1, 1), groups: 1 };
        let gy = Tensor::randn(&p.output_shape(), 0.0, 1.0, &mut rng, Device::Cpu)?;
        // [without, with][forward, input gradient]: the fastest run
        let mut best = [[f64::MAX; 2]; 2];
        for _ in 0..rounds {
            for (k, on) in [(0, false), (1, true)] {
                set_winograd(on);
                for _ in 0..3 {
                    best[k][0] = best[k][0].min(ms(|| drop(dfkd::no_grad(|| x.conv2d(&w, None, ConvOpts::default().padding(1))).unwrap())));
                    best[k][1] = best[k][1].min(ms(|| drop(gy.storage().conv2d_backward_input(gy.layout(), &w.storage(), w.layout(), &p).unwrap())));
                }
            }
        }
        set_winograd(true);
        let change = |k: usize| 100.0 * (best[1][k] / best[0][k] - 1.0);
        println!(
            "b{batch} {c_in:>3} -> {c_out:<3} {side:>2}x{side:<2}  forward {:7.3} -> {:7.3} ms ({:+4.0}%)   input gradient {:7.3} -> {:7.3} ms ({:+4.0}%)",
            best[0][0],
            best[1][0],
            change(0),
            best[0][1],
            best[1][1],
            change(1)
        );
    }
    Ok(())
}
