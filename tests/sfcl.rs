//! SFCL must learn, not collapse: on a toy problem whose teacher features are distinct
//! but alike (positive, as pooled post-ReLU features are), the shared projection head
//! trained as docs/METHOD.md says (teacher features detached, head learning from both sides)
//! drives NT-Xent far below its no-learning value log(2N-1) and keeps the projections
//! apart; and the teacher side's gradient reaches the head, which the superseded head
//! (teacher projection detached, `distill.sfcl_detach_projection`) drops. In the full
//! pipeline that head collapsed (L_SFCL 4.5-4.8 against log(2N-1) = 4.84; docs/RESULTS.md).

use dfkd::models::Features;
use dfkd::nn::Module;
use dfkd::optim::{Optimizer, ParamGroup};
use dfkd::pipeline::losses::ProjectionHead;
use dfkd::rng::Rng;
use dfkd::{Device, Tensor};

const N: usize = 32;
const D: usize = 24;

fn features(penultimate: Tensor) -> Features {
    let logits = Tensor::zeros(&[N, 4], Device::Cpu).unwrap();
    Features { logits, stages: vec![], penultimate, bn_inputs: vec![], bn_running: vec![] }
}

/// Trains head (and a student that starts as a noisy copy of the teacher's features)
/// for `steps` SGD steps; returns the final loss and the mean pairwise cosine of the
/// teacher's projections.
fn train(detach_projection: bool, steps: usize) -> (f32, f32) {
    let mut rng = Rng::new(7);
    // teacher: a shared positive base plus a small distinct part per sample
    let base = Tensor::rand(&[1, D], 0.5, 1.5, &mut rng, Device::Cpu).unwrap();
    let own = Tensor::randn(&[N, D], 0.0, 0.15, &mut rng, Device::Cpu).unwrap();
    let teacher = own.add(&base).unwrap().relu().unwrap();
    let student = teacher.add(&Tensor::randn(&[N, D], 0.0, 0.3, &mut rng, Device::Cpu).unwrap()).unwrap().to_var().unwrap();
    let head = ProjectionHead::new(D, D, 32, 16, true, 0.1, true, &mut rng).unwrap().detach_projection(detach_projection);
    let mut params = head.parameters();
    params.push(student.clone());
    let mut opt = Optimizer::sgd(vec![ParamGroup::new(params, 5e-4)], 0.05, 0.9, false);
    let t = features(teacher.clone());
    let mut last = f32::NAN;
    for _ in 0..steps {
        let loss = head.loss(&t, &features(student.clone())).unwrap();
        last = loss.to_scalar().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    let z = head.project_teacher(&t).unwrap().l2_normalize(1, 1e-12).unwrap().to_vec_f32().unwrap();
    let mut cos = 0.0;
    for i in 0..N {
        for j in 0..N {
            if i != j {
                cos += (0..16).map(|k| z[i * 16 + k] * z[j * 16 + k]).sum::<f32>();
            }
        }
    }
    (last, cos / (N * (N - 1)) as f32)
}

#[test]
fn the_shared_head_learns_from_both_sides_and_does_not_collapse() {
    let chance = ((2 * N - 1) as f32).ln();
    let (loss, cos) = train(false, 300);
    assert!(loss < 0.5 * chance, "L_SFCL {loss} after 300 steps, log(2N-1) = {chance}");
    assert!(cos < 0.5, "mean pairwise cosine of the teacher projections {cos}: the head collapsed");
}

#[test]
fn the_teacher_side_reaches_the_head_unless_the_projection_is_detached() {
    // The same batch through two heads with identical weights: the head's gradient
    // differs only by the teacher side's share, which the superseded head drops.
    let grads_of = |detach: bool| -> Vec<f32> {
        let mut rng = Rng::new(3);
        let t = features(Tensor::rand(&[N, D], 0.0, 1.0, &mut rng, Device::Cpu).unwrap());
        let s = features(Tensor::rand(&[N, D], 0.0, 1.0, &mut rng, Device::Cpu).unwrap());
        let head = ProjectionHead::new(D, D, 32, 16, true, 0.1, true, &mut rng).unwrap().detach_projection(detach);
        let g = head.loss(&t, &s).unwrap().backward().unwrap();
        head.parameters().iter().flat_map(|p| g.get(p).map(|x| x.to_vec_f32().unwrap()).unwrap_or_default()).collect()
    };
    let (both, student_only) = (grads_of(false), grads_of(true));
    assert_eq!(both.len(), student_only.len());
    let diff: f32 = both.iter().zip(&student_only).map(|(a, b)| (a - b).abs()).sum();
    let size: f32 = both.iter().map(|a| a.abs()).sum();
    assert!(diff > 0.05 * size, "the teacher side adds {diff} to a gradient of size {size}");
}
