//! Gradient averaging in buckets, overlapped with the backward pass (PyTorch DDP's
//! reducer).
//!
//! The parameters are split into buckets of about `bucket_elems` in the reverse of
//! their order (a model's parameters are listed input to output, and the backward pass
//! finishes them output to input). The backward hands over each parameter's gradient
//! as soon as it is final (`autograd::backward_hooked`); a bucket whose gradients are
//! all in starts its all-reduce at once (`Collective::start_all_reduce_sum`) while the
//! backward goes on, and the buckets start in their order, so every rank starts the
//! same calls in the same order. Which parameters share a bucket is fixed up front,
//! never by arrival: two ranks can then never sum different parameters' gradients
//! together.
//!
//! The sums are the same bits as averaging after the backward: each element is the
//! same sum over the ranks, whatever bucket carries it.

use super::{Collective, Pending};
use crate::autograd::{backward_hooked, seed};
use crate::{bail, Gradients, Result, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::Arc;

/// DDP's default bucket: 25 MB of f32 gradients, so a model's hundreds of small
/// tensors cost a few collective calls, not hundreds (`parallel.bucket_mb`).
pub const DEFAULT_BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

struct Bucket {
    params: Vec<Tensor>,
    grads: Vec<Option<Tensor>>,
    /// Parameters whose gradient has not come in yet.
    missing: usize,
    /// Once started: the parameters it carries (those with a gradient, in order) and
    /// the call.
    started: Option<(Vec<Tensor>, Pending)>,
}

/// One backward pass's gradient averaging (see the module doc).
pub struct GradientBuckets<'g> {
    group: &'g Arc<dyn Collective>,
    /// Each parameter's bucket and place in it.
    place: HashMap<TensorId, (usize, usize)>,
    buckets: Vec<Bucket>,
    /// Buckets started so far: always the first ones.
    started: usize,
}

impl<'g> GradientBuckets<'g> {
    /// Buckets for `params`, the same list on every rank (an optimiser's).
    pub fn new<'a>(params: impl IntoIterator<Item = &'a Tensor>, group: &'g Arc<dyn Collective>, bucket_elems: usize) -> Self {
        let params: Vec<&Tensor> = params.into_iter().collect();
        let mut buckets: Vec<Bucket> = vec![];
        let mut place = HashMap::new();
        let mut elems = 0;
        for p in params.into_iter().rev() {
            if place.contains_key(&p.id()) {
                continue;
            }
            if buckets.is_empty() || elems >= bucket_elems {
                buckets.push(Bucket { params: vec![], grads: vec![], missing: 0, started: None });
                elems = 0;
            }
            let at = buckets.len() - 1;
            let b = &mut buckets[at];
            place.insert(p.id(), (at, b.params.len()));
            b.params.push(p.clone());
            b.grads.push(None);
            b.missing += 1;
            elems += p.elem_count();
        }
        GradientBuckets { group, place, buckets, started: 0 }
    }

    /// Takes `grad` if `leaf` is one of the parameters (returning `None`), and starts
    /// every bucket that is then complete and next in line; any other leaf's gradient
    /// is handed back.
    pub fn add(&mut self, leaf: &Tensor, grad: Tensor) -> Result<Option<Tensor>> {
        let Some(&(b, i)) = self.place.get(&leaf.id()) else { return Ok(Some(grad)) };
        let bucket = &mut self.buckets[b];
        if bucket.grads[i].replace(grad).is_some() || bucket.started.is_some() {
            bail!("gradient averaging: a second gradient for a parameter of shape {:?} in one backward pass", leaf.dims());
        }
        bucket.missing -= 1;
        while self.started < self.buckets.len() && self.buckets[self.started].missing == 0 {
            self.start_next()?;
        }
        Ok(None)
    }

    /// Starts the all-reduce of the next bucket in line, over the gradients it has.
    fn start_next(&mut self) -> Result<()> {
        let bucket = &mut self.buckets[self.started];
        self.started += 1;
        let mut carried = vec![];
        let mut flat = vec![];
        for (p, g) in bucket.params.iter().zip(bucket.grads.iter_mut()) {
            if let Some(g) = g.take() {
                flat.push(g.contiguous()?.reshape(&[g.elem_count()])?);
                carried.push(p.clone());
            }
        }
        if !flat.is_empty() {
            let call = self.group.start_all_reduce_sum(&Tensor::cat(&flat.iter().collect::<Vec<_>>(), 0)?);
            bucket.started = Some((carried, call));
        }
        Ok(())
    }

    /// Buckets started so far: before `finish`, those the backward pass started.
    pub fn started_during_backward(&self) -> usize {
        self.started
    }

    /// Starts the buckets still waiting (a parameter without a gradient in this pass
    /// leaves its bucket incomplete until here; it must have none on every rank), waits
    /// for every sum, and puts each parameter's mean over the ranks into `grads`.
    pub fn finish(mut self, grads: &mut Gradients) -> Result<()> {
        while self.started < self.buckets.len() {
            self.start_next()?;
        }
        let inv = 1.0 / self.group.world() as f32;
        for bucket in self.buckets {
            let Some((params, call)) = bucket.started else { continue };
            let mean = call.wait()?.scale(inv)?;
            let mut at = 0;
            for p in params {
                let n = p.elem_count();
                // its own storage: the optimiser updates whole buffers
                grads.insert(&p, mean.narrow(0, at, n)?.deep_copy()?.reshape(p.dims())?);
                at += n;
            }
        }
        Ok(())
    }
}

/// The gradients of the scalar `loss`, with each of `params`' averaged over the ranks
/// in buckets of about `bucket_elems` started during the backward pass.
pub fn backward_averaged<'a>(
    loss: &Tensor,
    params: impl IntoIterator<Item = &'a Tensor>,
    group: &Arc<dyn Collective>,
    bucket_elems: usize,
) -> Result<Gradients> {
    let mut buckets = GradientBuckets::new(params, group, bucket_elems);
    let mut grads = backward_hooked(loss, seed(loss)?, &mut |leaf, g| buckets.add(leaf, g))?;
    buckets.finish(&mut grads)?;
    Ok(grads)
}

/// Replaces each gradient of `params` in `grads` by its mean over the ranks, after the
/// backward pass (the parameters' order decides the buckets, so it must be the same on
/// every rank; a parameter without a gradient is skipped, and must be on every rank).
pub fn average_gradients<'a>(
    grads: &mut Gradients,
    params: impl IntoIterator<Item = &'a Tensor>,
    group: &Arc<dyn Collective>,
    bucket_elems: usize,
) -> Result<()> {
    let params: Vec<&Tensor> = params.into_iter().collect();
    let mut buckets = GradientBuckets::new(params.iter().copied(), group, bucket_elems);
    for p in params {
        if let Some(g) = grads.remove(p) {
            buckets.add(p, g)?;
        }
    }
    buckets.finish(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::{current, run_ranks};
    use crate::rng::Rng;
    use crate::Device;
    use std::time::Duration;

    /// A small network: three matmuls, with a synchronised BatchNorm (collective calls
    /// of its own in the backward) after the first when `bn`.
    struct Net {
        params: Vec<Tensor>,
        running: (Tensor, Tensor),
    }

    impl Net {
        fn new() -> Net {
            let mut rng = Rng::new(7);
            let mut p = |shape: &[usize]| {
                let t = Tensor::randn(shape, 0.0, 0.5, &mut rng, Device::Cpu).unwrap();
                t.set_requires_grad(true).unwrap();
                t
            };
            let params = vec![p(&[8, 16]), p(&[16]), p(&[16]), p(&[16, 16]), p(&[16, 4])];
            Net { params, running: (Tensor::zeros(&[16], Device::Cpu).unwrap(), Tensor::ones(&[16], Device::Cpu).unwrap()) }
        }

        /// The loss on rank `rank`'s batch; with `fail`, the backward fails in the first
        /// layer, once the later layers' buckets have started.
        fn loss(&self, rank: usize, bn: bool, fail: bool) -> Tensor {
            let x = Tensor::randn(&[4, 8], 0.0, 1.0, &mut Rng::new(100 + rank as u64), Device::Cpu).unwrap();
            let [w1, gamma, beta, w2, w3] = &self.params[..] else { unreachable!() };
            let mut h = x.matmul(w1).unwrap();
            if fail {
                h = crate::ops::with_backward(&h, "fail", &[&h], |_, _| Err(crate::Error::Msg("rank one's backward hit a NaN".into())));
            }
            if bn {
                h = h.batch_norm_synced(gamma, beta, &self.running.0, &self.running.1, 0.1, 1e-5, &current().unwrap()).unwrap();
            } else {
                h = h.mul(gamma).unwrap().add(beta).unwrap();
            }
            h.relu().unwrap().matmul(w2).unwrap().relu().unwrap().matmul(w3).unwrap().sqr().unwrap().mean_all().unwrap()
        }
    }

    fn host(grads: &Gradients, params: &[Tensor]) -> Vec<Vec<f32>> {
        params.iter().map(|p| grads.get(p).unwrap().to_vec_f32().unwrap()).collect()
    }

    #[test]
    fn buckets_started_during_the_backward_give_the_bits_of_averaging_after_it() {
        let out = run_ranks(2, |rank| {
            let g = current().unwrap();
            let net = Net::new();
            // 64-element buckets: [w3], [w2], [beta, gamma, w1], in the reverse of the list
            let mut buckets = GradientBuckets::new(&net.params, &g, 64);
            let loss = net.loss(rank, true, false);
            let mut overlapped = backward_hooked(&loss, loss.ones_like()?, &mut |leaf, gr| buckets.add(leaf, gr))?;
            let early = buckets.started_during_backward();
            buckets.finish(&mut overlapped)?;
            let mut after = net.loss(rank, true, false).backward()?;
            average_gradients(&mut after, &net.params, &g, DEFAULT_BUCKET_ELEMS)?;
            Ok((early, host(&overlapped, &net.params), host(&after, &net.params)))
        })
        .unwrap();
        for (early, overlapped, after) in &out {
            assert_eq!(*early, 3, "every bucket starts from the backward pass");
            assert_eq!(overlapped, after, "the same sums, whatever bucket carries them");
            assert_eq!(overlapped, &out[0].1, "every rank applies the same gradients");
        }
        assert!(out[0].1.iter().all(|g| g.iter().any(|v| *v != 0.0)));
    }

    #[test]
    fn a_rank_finishes_its_backward_without_waiting_for_the_others() {
        // rank 1 begins its backward only once rank 0 has finished its own, buckets
        // started: a start that waited for rank 1 would never return
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = std::sync::Mutex::new(rx);
        run_ranks(2, |rank| {
            let g = current().unwrap();
            let net = Net::new();
            if rank == 1 {
                rx.lock().unwrap().recv_timeout(Duration::from_secs(20)).map_err(|_| crate::Error::Msg("rank 0's backward waited for rank 1".into()))?;
            }
            let mut buckets = GradientBuckets::new(&net.params, &g, 64);
            let loss = net.loss(rank, false, false);
            let mut grads = backward_hooked(&loss, loss.ones_like()?, &mut |leaf, gr| buckets.add(leaf, gr))?;
            assert_eq!(buckets.started_during_backward(), 3);
            if rank == 0 {
                tx.send(()).unwrap();
            }
            buckets.finish(&mut grads)
        })
        .unwrap();
    }

    #[test]
    fn a_rank_failing_mid_backward_stops_the_others_waiting_on_buckets() {
        let err = run_ranks(2, |rank| {
            let g = current().unwrap();
            let net = Net::new();
            backward_averaged(&net.loss(rank, false, rank == 1), &net.params, &g, 64).map(|_| ())
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("rank one's backward hit a NaN"), "{err}");
    }

    #[test]
    fn a_parameter_without_a_gradient_is_skipped_on_every_rank() {
        let out = run_ranks(2, |rank| {
            let g = current().unwrap();
            let net = Net::new();
            let unused = Tensor::ones(&[5], Device::Cpu)?;
            unused.set_requires_grad(true)?;
            let mut params = net.params.clone();
            params.insert(2, unused.clone());
            let grads = backward_averaged(&net.loss(rank, false, false), &params, &g, 64)?;
            assert!(grads.get(&unused).is_none());
            Ok(host(&grads, &net.params))
        })
        .unwrap();
        assert_eq!(out[0], out[1]);
    }
}
