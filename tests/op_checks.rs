//! Every backend refuses the same convolution and pooling geometries with the same
//! message: the checks live once, in `Conv2dParams::check` and `Pool2dParams::check`,
//! which `Storage` runs before any backend. Dilation 0 is the case that once drifted
//! (the CPU refused it, the CUDA backend computed a result).

mod common;

use dfkd::backend::{Conv2dParams, Pool2dParams};
use dfkd::{ConvOpts, Device, Tensor};

fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(common::cuda_devices());
    d
}

fn zeros(shape: &[usize], device: Device) -> Tensor {
    Tensor::from_vec(vec![0f32; shape.iter().product()], shape, device).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn conv(batch: usize, c: usize, hw: (usize, usize), c_out: usize, k: (usize, usize), stride: usize, pad: usize, dil: usize, groups: usize) -> Conv2dParams {
    Conv2dParams {
        batch,
        c_in: c,
        h_in: hw.0,
        w_in: hw.1,
        c_out,
        kh: k.0,
        kw: k.1,
        stride: (stride, stride),
        padding: (pad, pad),
        dilation: (dil, dil),
        groups,
    }
}

fn pool(hw: (usize, usize), k: usize, stride: usize, pad: usize) -> Pool2dParams {
    Pool2dParams { batch: 1, channels: 2, h_in: hw.0, w_in: hw.1, kh: k, kw: k, stride: (stride, stride), padding: (pad, pad) }
}

/// Runs `f` on every device and checks that each one refuses with the CPU's message,
/// which must contain `want`.
fn refused_alike(what: &str, want: &str, f: impl Fn(Device) -> dfkd::Result<()>) {
    let mut first: Option<String> = None;
    for device in devices() {
        let msg = match f(device) {
            Ok(()) => panic!("{what}: {device} accepted it"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(want), "{what}: {device} says {msg:?}, expected {want:?} in it");
        match &first {
            None => first = Some(msg),
            Some(cpu) => assert_eq!(&msg, cpu, "{what}: {device} and the CPU refuse differently"),
        }
    }
}

#[test]
fn conv_geometry_is_refused_alike() {
    // (what, params, input, weight, grad shapes, the message's gist)
    type Case = (&'static str, Conv2dParams, [usize; 4], [usize; 4], [usize; 4], &'static str);
    let cases: [Case; 6] = [
        ("dilation 0", conv(1, 2, (5, 5), 2, (3, 3), 1, 0, 0, 1), [1, 2, 5, 5], [2, 2, 3, 3], [1, 2, 3, 3], "must be positive"),
        ("stride 0", conv(1, 2, (5, 5), 2, (3, 3), 0, 0, 1, 1), [1, 2, 5, 5], [2, 2, 3, 3], [1, 2, 3, 3], "must be positive"),
        ("groups 0", conv(1, 2, (5, 5), 2, (3, 3), 1, 0, 1, 0), [1, 2, 5, 5], [2, 2, 3, 3], [1, 2, 3, 3], "must divide"),
        ("groups do not divide c_in", conv(1, 3, (4, 4), 4, (3, 3), 1, 0, 1, 2), [1, 3, 4, 4], [4, 1, 3, 3], [1, 4, 2, 2], "must divide"),
        ("kernel larger than the input", conv(1, 2, (2, 2), 2, (3, 3), 1, 0, 1, 1), [1, 2, 2, 2], [2, 2, 3, 3], [1, 2, 1, 1], "larger than the padded input"),
        ("wrong input shape", conv(1, 2, (4, 4), 2, (3, 3), 1, 1, 1, 1), [1, 2, 4, 3], [2, 2, 3, 3], [1, 2, 3, 4], "has shape"),
    ];
    for (what, p, xs, ws, gs, want) in cases {
        refused_alike(&format!("conv2d, {what}"), want, |d| {
            let (x, w) = (zeros(&xs, d), zeros(&ws, d));
            let r = x.storage().conv2d(x.layout(), &w.storage(), w.layout(), &p).map(drop);
            r
        });
        refused_alike(&format!("conv2d_backward_input, {what}"), want, |d| {
            let (g, w) = (zeros(&gs, d), zeros(&ws, d));
            let r = g.storage().conv2d_backward_input(g.layout(), &w.storage(), w.layout(), &p).map(drop);
            r
        });
        refused_alike(&format!("conv2d_backward_weight, {what}"), want, |d| {
            let (x, g) = (zeros(&xs, d), zeros(&gs, d));
            let r = x.storage().conv2d_backward_weight(x.layout(), &g.storage(), g.layout(), &p).map(drop);
            r
        });
    }
    // and through the tensor API, where the drift was seen
    refused_alike("Tensor::conv2d, dilation 0", "must be positive", |d| {
        zeros(&[1, 2, 5, 5], d).conv2d(&zeros(&[2, 2, 3, 3], d), None, ConvOpts::default().dilation(0)).map(drop)
    });
}

#[test]
fn pool_geometry_is_refused_alike() {
    // (what, params, input, grad shapes, the message's gist)
    type Case = (&'static str, Pool2dParams, [usize; 4], [usize; 4], &'static str);
    let cases: [Case; 5] = [
        ("kernel 0", pool((4, 4), 0, 1, 0), [1, 2, 4, 4], [1, 2, 1, 1], "must be positive"),
        ("stride 0", pool((4, 4), 2, 0, 0), [1, 2, 4, 4], [1, 2, 1, 1], "must be positive"),
        ("kernel larger than the input", pool((2, 2), 3, 1, 0), [1, 2, 2, 2], [1, 2, 1, 1], "larger than the padded input"),
        // a window could lie entirely in the padding
        ("padding over half the kernel", pool((3, 3), 2, 2, 2), [1, 2, 3, 3], [1, 2, 3, 3], "at most half the kernel"),
        ("wrong input shape", pool((4, 4), 2, 2, 0), [1, 2, 4, 5], [1, 2, 2, 3], "has shape"),
    ];
    for (what, p, xs, gs, want) in cases {
        refused_alike(&format!("max_pool2d, {what}"), want, |d| {
            let x = zeros(&xs, d);
            let r = x.storage().max_pool2d(x.layout(), &p).map(drop);
            r
        });
        refused_alike(&format!("avg_pool2d, {what}"), want, |d| {
            let x = zeros(&xs, d);
            let r = x.storage().avg_pool2d(x.layout(), &p).map(drop);
            r
        });
        refused_alike(&format!("avg_pool2d_backward, {what}"), want, |d| {
            let g = zeros(&gs, d);
            let r = g.storage().avg_pool2d_backward(g.layout(), &p).map(drop);
            r
        });
    }
    refused_alike("Tensor::max_pool2d, padding over half the kernel", "at most half the kernel", |d| zeros(&[1, 2, 3, 3], d).max_pool2d(2, 2, 2).map(drop));
}
