//! Exponential moving averages of a module's weights: MAD's momentum generator, and
//! any averaged model (timm's `ModelEmaV2` rule: parameters and buffers alike).

use super::{Module, Slot, TensorKind};
use crate::{bail, no_grad, Result, Tensor};

/// `avg <- momentum * avg + (1 - momentum) * live`, for every parameter and buffer of
/// two modules of the same architecture (matched by state_dict name); counters are
/// copied. `momentum = 0` copies `live` into `avg`. Never recorded by autograd.
pub fn ema_update(avg: &dyn Module, live: &dyn Module, momentum: f32) -> Result<()> {
    if !(0.0..=1.0).contains(&momentum) {
        bail!("ema_update: momentum {momentum} is outside [0, 1]");
    }
    let a = avg.named_tensors();
    let l = live.named_tensors();
    if a.len() != l.len() {
        bail!("ema_update: the average has {} tensors, the live module {}", a.len(), l.len());
    }
    no_grad(|| -> Result<()> {
        for ((na, ta, ka), (nl, tl, kl)) in a.iter().zip(&l) {
            if na != nl || ka != kl || ta.dims() != tl.dims() {
                bail!("ema_update: `{na}` {:?} does not match the live module's `{nl}` {:?}", ta.dims(), tl.dims());
            }
            blend(ta, tl, momentum)?;
        }
        Ok(())
    })?;
    copy_counters(avg, live);
    Ok(())
}

/// `avg <- momentum * avg + (1 - momentum) * live` in place, on `avg`'s device: the one
/// update rule of every moving average here (call it without a graph). Exactly `live`
/// at momentum 0, not `0 * avg + live` (which keeps a NaN).
pub(crate) fn blend(avg: &Tensor, live: &Tensor, momentum: f32) -> Result<()> {
    let next = if momentum == 0.0 { live.clone() } else { avg.scale(momentum)?.add(&live.scale(1.0 - momentum)?)? };
    avg.assign(&next)
}

/// Makes `dst` an exact copy of `src` (same architecture): weights, buffers, counters.
pub fn copy_state(dst: &dyn Module, src: &dyn Module) -> Result<()> {
    ema_update(dst, src, 0.0)
}

fn copy_counters(dst: &dyn Module, src: &dyn Module) {
    let mut values = vec![];
    src.visit("", &mut |_, slot| {
        if let Slot::Counter(c) = slot {
            values.push(c.get());
        }
    });
    let mut i = 0;
    dst.visit("", &mut |_, slot| {
        if let Slot::Counter(c) = slot {
            if let Some(v) = values.get(i) {
                c.set(*v);
            }
            i += 1;
        }
    });
}

/// The tensors of `m` as host vectors, by name (for tests and checks).
pub fn host_state(m: &dyn Module) -> Result<Vec<(String, Vec<f32>)>> {
    m.named_tensors().into_iter().map(|(n, t, _): (String, Tensor, TensorKind)| Ok((n, t.to_vec_f32()?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{BatchNorm2d, Linear};
    use crate::rng::Rng;

    struct Net {
        fc: Linear,
        bn: BatchNorm2d,
    }
    impl Module for Net {
        fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
            self.fc.visit(&crate::nn::join(prefix, "fc"), f);
            self.bn.visit(&crate::nn::join(prefix, "bn"), f);
        }
    }
    fn net(seed: u64) -> Net {
        let mut rng = Rng::new(seed);
        Net { fc: Linear::new(3, 2, true, &mut rng).unwrap(), bn: BatchNorm2d::new(2).unwrap() }
    }

    #[test]
    fn the_average_moves_by_one_minus_momentum_and_copies_exactly_at_zero() {
        let (avg, live) = (net(1), net(2));
        live.bn.running_mean.assign(&Tensor::from_vec(vec![0.5f32, -1.0], &[2], crate::Device::Cpu).unwrap()).unwrap();
        let (a0, l0) = (host_state(&avg).unwrap(), host_state(&live).unwrap());
        ema_update(&avg, &live, 0.9).unwrap();
        for (((name, a), (_, l)), (_, got)) in a0.iter().zip(&l0).zip(host_state(&avg).unwrap()) {
            for ((a, l), g) in a.iter().zip(l).zip(&got) {
                let want = 0.9 * a + 0.1 * l;
                assert!((g - want).abs() <= 1e-6 * want.abs().max(1.0), "{name}: got {g}, want {want}");
            }
        }
        // the average stays a leaf with its own storage: the live module is untouched
        assert_eq!(host_state(&live).unwrap(), l0);
        // still a trainable leaf, with no graph behind it
        assert!(avg.fc.weight.requires_grad());
        live.bn.num_batches_tracked.set(7);
        copy_state(&avg, &live).unwrap();
        assert_eq!(host_state(&avg).unwrap(), host_state(&live).unwrap());
        assert_eq!(avg.bn.num_batches_tracked.get(), 7);
        assert!(ema_update(&avg, &live, 1.5).is_err());
    }
}
