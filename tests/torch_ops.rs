//! Forward results of conv2d, conv_transpose2d, batch_norm and the pools against
//! PyTorch (`scripts/make_op_fixtures.py` writes tests/fixtures/ops.safetensors).
//! Tolerance: abs 1e-4 + rel 1e-4 (f32, different summation orders).

use dfkd::checkpoint::load_tensors;
use dfkd::{ConvOpts, Tensor};
use std::collections::HashMap;

fn fixtures() -> HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops.safetensors");
    load_tensors(path).unwrap().into_iter().collect()
}

fn close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= 1e-4 + 1e-4 * b.abs(), "{what}[{i}]: got {a}, PyTorch {b}");
    }
}

#[test]
fn convolutions_match_pytorch() {
    let f = fixtures();
    let x = &f["conv.x"];
    let cases = [
        ("conv_s2p1", ConvOpts::default().stride(2).padding(1)),
        ("conv_d2p2", ConvOpts::default().padding(2).dilation(2)),
        ("conv_g2", ConvOpts { padding: (1, 0), groups: 2, ..ConvOpts::default() }),
        ("conv_dw", ConvOpts::default().padding(2).groups(4)),
        ("conv_1x1", ConvOpts::default()),
    ];
    for (name, o) in cases {
        let y = x.conv2d(&f[&format!("{name}.w")], Some(&f[&format!("{name}.b")]), o).unwrap();
        close(&y, &f[&format!("{name}.y")], name);
    }
    let xt = &f["convt.x"];
    let cases = [
        ("convt_p1", ConvOpts::default().padding(1), (0, 0)),
        ("convt_s2op1", ConvOpts::default().stride(2).padding(1), (1, 1)),
        ("convt_g2", ConvOpts::default().stride(2).groups(2), (0, 0)),
    ];
    for (name, o, op) in cases {
        let y = xt.conv_transpose2d(&f[&format!("{name}.w")], None, o, op).unwrap();
        close(&y, &f[&format!("{name}.y")], name);
    }
}

#[test]
fn batch_norm_matches_pytorch_in_both_modes() {
    let f = fixtures();
    let (x, g, b) = (&f["bn.x"], &f["bn.gamma"], &f["bn.beta"]);
    let (rm, rv) = (f["bn.rm"].deep_copy().unwrap(), f["bn.rv"].deep_copy().unwrap());
    close(&x.batch_norm(g, b, &rm, &rv, false, 0.1, 1e-5).unwrap(), &f["bn.y_eval"], "bn eval");
    close(&x.batch_norm(g, b, &rm, &rv, true, 0.1, 1e-5).unwrap(), &f["bn.y_train"], "bn train");
    close(&rm, &f["bn.rm_after"], "running mean");
    close(&rv, &f["bn.rv_after"], "running var");
}

#[test]
fn pools_match_pytorch() {
    let f = fixtures();
    let x = &f["pool.x"];
    let (y, idx) = x.max_pool2d_with_indices(3, 2, 1).unwrap();
    close(&y, &f["maxpool_k3s2p1.y"], "max_pool2d");
    close(&idx.to_dtype(dfkd::DType::F32).unwrap(), &f["maxpool_k3s2p1.idx"], "max_pool2d indices");
    let x68 = x.narrow(2, 0, 6).unwrap().narrow(3, 0, 8).unwrap();
    let (y2, idx2) = x68.max_pool2d_with_indices(2, 2, 0).unwrap();
    close(&y2, &f["maxpool_k2.y"], "max_pool2d k2");
    close(&idx2.to_dtype(dfkd::DType::F32).unwrap(), &f["maxpool_k2.idx"], "max_pool2d k2 indices");
    close(&y2.max_unpool2d(&idx2, (6, 8)).unwrap(), &f["unpool.y"], "max_unpool2d");
    close(&x.avg_pool2d(3, 2, 1).unwrap(), &f["avgpool_k3s2p1.y"], "avg_pool2d");
    close(&x.adaptive_avg_pool2d(1).unwrap(), &f["adaptive1.y"], "adaptive_avg_pool2d");
    close(&x.upsample_nearest2d(2).unwrap(), &f["upsample2.y"], "upsample_nearest2d");
}
