//! Forward results of conv2d, conv_transpose2d, batch_norm and the pools against
//! PyTorch (`scripts/make_op_fixtures.py` writes tests/fixtures/ops.safetensors).
//! On every device of `common::for_each_device`. Tolerance: abs 1e-4 + rel 1e-4 (f32,
//! different summation orders).

mod common;
use common::for_each_device;
use dfkd::checkpoint::load_tensors;
use dfkd::{ConvOpts, Device, Tensor};
use std::collections::HashMap;

/// The fixtures, on `device`.
fn fixtures(device: Device) -> HashMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops.safetensors");
    load_tensors(path).unwrap().into_iter().map(|(k, t)| (k, t.to_device(device).unwrap())).collect()
}

/// Against PyTorch's result, at the tolerance stated above.
fn close(device: Device, got: &Tensor, want: &Tensor, what: &str) {
    common::assert_tensors_close(got, want, 1e-4, 1e-4, &format!("{device} {what}"));
}

#[test]
fn convolutions_match_pytorch() {
    for_each_device(|d| {
        let f = fixtures(d);
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
            close(d, &y, &f[&format!("{name}.y")], name);
        }
        let xt = &f["convt.x"];
        let cases = [
            ("convt_p1", ConvOpts::default().padding(1), (0, 0)),
            ("convt_s2op1", ConvOpts::default().stride(2).padding(1), (1, 1)),
            ("convt_g2", ConvOpts::default().stride(2).groups(2), (0, 0)),
        ];
        for (name, o, op) in cases {
            let y = xt.conv_transpose2d(&f[&format!("{name}.w")], None, o, op).unwrap();
            close(d, &y, &f[&format!("{name}.y")], name);
        }
    });
}

#[test]
fn batch_norm_matches_pytorch_in_both_modes() {
    for_each_device(|d| {
        let f = fixtures(d);
        let (x, g, b) = (&f["bn.x"], &f["bn.gamma"], &f["bn.beta"]);
        let (rm, rv) = (f["bn.rm"].deep_copy().unwrap(), f["bn.rv"].deep_copy().unwrap());
        close(d, &x.batch_norm(g, b, &rm, &rv, false, 0.1, 1e-5).unwrap(), &f["bn.y_eval"], "bn eval");
        close(d, &x.batch_norm(g, b, &rm, &rv, true, 0.1, 1e-5).unwrap(), &f["bn.y_train"], "bn train");
        close(d, &rm, &f["bn.rm_after"], "running mean");
        close(d, &rv, &f["bn.rv_after"], "running var");
    });
}

#[test]
fn pools_match_pytorch() {
    for_each_device(|d| {
        let f = fixtures(d);
        let x = &f["pool.x"];
        let (y, idx) = x.max_pool2d_with_indices(3, 2, 1).unwrap();
        close(d, &y, &f["maxpool_k3s2p1.y"], "max_pool2d");
        close(d, &idx.to_dtype(dfkd::DType::F32).unwrap(), &f["maxpool_k3s2p1.idx"], "max_pool2d indices");
        let x68 = x.narrow(2, 0, 6).unwrap().narrow(3, 0, 8).unwrap();
        let (y2, idx2) = x68.max_pool2d_with_indices(2, 2, 0).unwrap();
        close(d, &y2, &f["maxpool_k2.y"], "max_pool2d k2");
        close(d, &idx2.to_dtype(dfkd::DType::F32).unwrap(), &f["maxpool_k2.idx"], "max_pool2d k2 indices");
        close(d, &y2.max_unpool2d(&idx2, (6, 8)).unwrap(), &f["unpool.y"], "max_unpool2d");
        close(d, &x.avg_pool2d(3, 2, 1).unwrap(), &f["avgpool_k3s2p1.y"], "avg_pool2d");
        close(d, &x.adaptive_avg_pool2d(1).unwrap(), &f["adaptive1.y"], "adaptive_avg_pool2d");
        close(d, &x.upsample_nearest2d(2).unwrap(), &f["upsample2.y"], "upsample_nearest2d");
    });
}
