//! conv2d forward and backward at ResNet-18 shapes (batch 32, 64 px input with the
//! ImageNet stem) and at the CPU demo's resnet20/resnet8 shapes (batch 64, 32 px),
//! reported as FLOP/s (2 * multiply-adds).

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfkd::backend::Conv2dParams;
use dfkd::rng::Rng;
use dfkd::{ConvOpts, Device, Tensor};

/// (name, batch, c_in, c_out, plane side, kernel, stride, padding, groups)
type Shape = (&'static str, usize, usize, usize, usize, usize, usize, usize, usize);

const SHAPES: &[Shape] = &[
    ("stem_7x7_s2", 32, 3, 64, 64, 7, 2, 3, 1),
    ("layer1_3x3", 32, 64, 64, 16, 3, 1, 1, 1),
    ("layer2_3x3_s2", 32, 64, 128, 16, 3, 2, 1, 1),
    ("layer2_3x3", 32, 128, 128, 8, 3, 1, 1, 1),
    ("layer3_3x3", 32, 256, 256, 4, 3, 1, 1, 1),
    ("layer4_3x3", 32, 512, 512, 2, 3, 1, 1, 1),
    ("down_1x1_s2", 32, 128, 256, 8, 1, 2, 0, 1),
    ("demo_16x32x32_3x3", 64, 16, 16, 32, 3, 1, 1, 1),
    ("demo_32x16x16_3x3", 64, 32, 32, 16, 3, 1, 1, 1),
    ("demo_64x8x8_3x3", 64, 64, 64, 8, 3, 1, 1, 1),
    // the demo's other convolutions: the stride-2 3x3s and 1x1 shortcuts of resnet20 and
    // resnet8, and the 1x1s of the high-order attention (grouped: 3 orders)
    ("demo_16x32x32_3x3_s2", 64, 16, 32, 32, 3, 2, 1, 1),
    ("demo_32x16x16_3x3_s2", 64, 32, 64, 16, 3, 2, 1, 1),
    ("demo_16x32x32_1x1_s2", 64, 16, 32, 32, 1, 2, 0, 1),
    ("demo_16x32x32_1x1", 64, 16, 24, 32, 1, 1, 0, 1),
    ("demo_64x8x8_1x1", 64, 64, 96, 8, 1, 1, 0, 1),
    ("demo_12x32x32_1x1_g3", 64, 12, 48, 32, 1, 1, 0, 3),
];

fn bench(c: &mut Criterion) {
    dfkd::allocator::keep_freed_pages();
    let mut rng = Rng::new(0);
    let mut group = c.benchmark_group("conv2d");
    group.sample_size(10);
    for &(name, batch, ci, co, hw, k, s, p, groups) in SHAPES {
        let x = Tensor::randn(&[batch, ci, hw, hw], 0.0, 1.0, &mut rng, Device::Cpu).unwrap();
        let w = Tensor::randn(&[co, ci / groups, k, k], 0.0, 0.1, &mut rng, Device::Cpu).unwrap();
        let opts = ConvOpts::default().stride(s).padding(p).groups(groups);
        let params = Conv2dParams { batch, c_in: ci, h_in: hw, w_in: hw, c_out: co, kh: k, kw: k, stride: (s, s), padding: (p, p), dilation: (1, 1), groups };
        let flops = 2 * params.macs() as u64;
        group.throughput(Throughput::Elements(flops));
        group.bench_function(format!("forward/{name}"), |b| b.iter(|| dfkd::no_grad(|| x.conv2d(&w, None, opts).unwrap())));
        // backward = input gradient + weight gradient: twice the forward's work
        group.throughput(Throughput::Elements(2 * flops));
        let (xv, wv) = (x.to_var().unwrap(), w.to_var().unwrap());
        let gy = Tensor::randn(&params.output_shape(), 0.0, 1.0, &mut rng, Device::Cpu).unwrap();
        group.bench_function(format!("backward/{name}"), |b| {
            b.iter_batched(
                || xv.conv2d(&wv, None, opts).unwrap().mul(&gy).unwrap().sum_all().unwrap(),
                |loss| loss.backward().unwrap(),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
