//! Every config value checked before any work: a bad one is an error that names the
//! key, the value and what is allowed, at start-up rather than as a panic in a loader
//! or a failure after hours of teacher training.

use super::config::Config;
use crate::data::Dataset;
use crate::models::ARCHS;
use crate::{Error, Result};

/// The generator doubles the resolution in each of its 4 blocks.
const IMAGE_SIZE_MULTIPLE: usize = 16;

/// Collects the first problem found, so each check is one line.
struct Checks(Option<Error>);

impl Checks {
    fn check(&mut self, ok: bool, key: &str, value: impl std::fmt::Debug, allowed: &str) {
        if !ok && self.0.is_none() {
            self.0 = Some(Error::Msg(format!("config: {key} = {value:?} is not allowed: expected {allowed}")));
        }
    }
    fn positive(&mut self, key: &str, v: usize) {
        self.check(v > 0, key, v, "at least 1")
    }
    fn finite_positive(&mut self, key: &str, v: f32) {
        self.check(v.is_finite() && v > 0.0, key, v, "a finite number above 0")
    }
    fn finite_non_negative(&mut self, key: &str, v: f32) {
        self.check(v.is_finite() && v >= 0.0, key, v, "a finite number, 0 or more")
    }
    fn unit(&mut self, key: &str, v: f32) {
        self.check((0.0..1.0).contains(&v), key, v, "a number in [0, 1)")
    }
    fn arch(&mut self, key: &str, v: &str) {
        self.check(ARCHS.contains(&v), key, v, &format!("one of {}", ARCHS.join(", ")))
    }
    fn done(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Whether `s` spells a device (`--device`); opening it is left to the commands that
/// compute, so that this check works on any machine.
pub fn is_device_name(s: &str) -> bool {
    matches!(s, "cpu" | "cuda" | "cuda-emu" | "auto") || s.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok())
}

impl Config {
    /// Checks every value that can be checked without the data set.
    pub fn validate(&self) -> Result<()> {
        let mut c = Checks(None);
        c.check(is_device_name(&self.device), "device", &self.device, "cpu, cuda, cuda:N, cuda-emu or auto");
        let d = &self.data;
        c.check(!d.dataset.trim().is_empty(), "data.dataset", &d.dataset, "\"synthetic\" or a data set folder");
        c.check(
            d.image_size >= IMAGE_SIZE_MULTIPLE && d.image_size.is_multiple_of(IMAGE_SIZE_MULTIPLE),
            "data.image_size",
            d.image_size,
            "a multiple of 16 (the generator doubles the size in 4 blocks), at least 16",
        );
        c.check(d.num_classes >= 2, "data.num_classes", d.num_classes, "at least 2");
        if d.dataset == "synthetic" {
            c.check((10..=200).contains(&d.num_classes), "data.num_classes", d.num_classes, "10 to 200 for the synthetic set");
            c.positive("data.train_per_class", d.train_per_class);
            c.positive("data.test_per_class", d.test_per_class);
        }
        let t = &self.teacher;
        c.arch("teacher.arch", &t.arch);
        if t.weights.is_none() {
            c.positive("teacher.epochs", t.epochs);
        }
        c.positive("teacher.batch_size", t.batch_size);
        c.finite_positive("teacher.lr", t.lr);
        c.unit("teacher.momentum", t.momentum);
        c.finite_non_negative("teacher.weight_decay", t.weight_decay);
        c.unit("teacher.label_smoothing", t.label_smoothing);
        c.unit("teacher.ema_decay", t.ema_decay);
        c.check(
            t.extra_train_per_class == 0 || d.dataset == "synthetic" || t.weights.is_some(),
            "teacher.extra_train_per_class",
            t.extra_train_per_class,
            "0 unless data.dataset = \"synthetic\" (extra images are drawn for the synthetic set only)",
        );
        c.check(t.swa_epochs < t.epochs.max(1), "teacher.swa_epochs", t.swa_epochs, "fewer than teacher.epochs");
        c.check(t.swa_epochs == 0 || t.ema_decay == 0.0, "teacher.swa_epochs", t.swa_epochs, "0 while teacher.ema_decay is on (one weight average at a time)");
        c.finite_positive("teacher.swa_lr", t.swa_lr);
        let s = &self.student;
        c.arch("student.arch", &s.arch);
        c.finite_positive("student.lr", s.lr);
        c.unit("student.momentum", s.momentum);
        c.finite_non_negative("student.weight_decay", s.weight_decay);
        let g = &self.generator;
        c.positive("generator.z_dim", g.z_dim);
        c.check(
            g.channels.len() == 5 && g.channels.iter().all(|&n| n > 0),
            "generator.channels",
            &g.channels,
            "5 channel counts above 0 (the first feature map and each of the 4 blocks)",
        );
        c.check(
            g.sam_reduction > 0 && g.channels.iter().skip(1).all(|&n| n >= g.sam_reduction),
            "generator.sam_reduction",
            g.sam_reduction,
            "at least 1 and at most the smallest block's channel count",
        );
        c.finite_non_negative("generator.sam_lambda", g.sam_lambda);
        c.finite_positive("generator.lr", g.lr);
        c.unit("generator.beta1", g.beta1);
        c.unit("generator.beta2", g.beta2);
        let k = &self.distill;
        for (key, v) in [("distill.alpha", k.alpha), ("distill.beta", k.beta), ("distill.gamma", k.gamma)] {
            c.finite_non_negative(key, v);
        }
        for (key, v) in [("distill.tau_kd", k.tau_kd), ("distill.tau_gen", k.tau_gen), ("distill.tau_sfcl", k.tau_sfcl)] {
            c.finite_positive(key, v);
        }
        c.positive("distill.mha_order", k.mha_order);
        c.positive("distill.proj_hidden", k.proj_hidden);
        c.positive("distill.proj_dim", k.proj_dim);
        c.positive("distill.s_steps", k.s_steps);
        c.positive("distill.iterations_per_epoch", k.iterations_per_epoch);
        c.positive("distill.epochs", k.epochs);
        // batch norm in training mode needs two samples to have a variance
        c.check(k.batch_size >= 2, "distill.batch_size", k.batch_size, "at least 2");
        c.positive("distill.checkpoint_every", k.checkpoint_every);
        c.check(k.augment_scale > 0.0 && k.augment_scale <= 1.0, "distill.augment_scale", k.augment_scale, "in (0, 1]: the smallest crop's share of the area");
        c.check(k.pool_batches == 0 || k.g_steps > 0, "distill.pool_batches", k.pool_batches, "0 when distill.g_steps = 0 (nothing fills the pool)");
        for (key, v) in [("distill.gen_target_ce", k.gen_target_ce), ("distill.gen_onehot", k.gen_onehot), ("distill.gen_balance", k.gen_balance)] {
            c.finite_non_negative(key, v);
        }
        c.check(
            k.gen_target_ce == 0.0 || g.conditional,
            "distill.gen_target_ce",
            k.gen_target_ce,
            "0 unless generator.conditional = true (an unconditional generator cannot be asked for a class)",
        );
        let (z, m, cm) = (&k.zskd, &k.mad, &k.cmi);
        c.finite_positive("distill.zskd.temperature", z.temperature);
        c.check(!z.betas.is_empty() && z.betas.iter().all(|b| b.is_finite() && *b > 0.0), "distill.zskd.betas", &z.betas, "one or more finite numbers above 0");
        c.finite_positive("distill.zskd.lr", z.lr);
        c.check((0.0..=1.0).contains(&m.momentum), "distill.mad.momentum", m.momentum, "a number in [0, 1]");
        c.check((0.0..=1.0).contains(&m.ema_share), "distill.mad.ema_share", m.ema_share, "a number in [0, 1]");
        c.finite_non_negative("distill.cmi.contrast_weight", cm.contrast_weight);
        c.finite_positive("distill.cmi.tau", cm.tau);
        c.positive("distill.cmi.bank_size", cm.bank_size);
        c.positive("distill.cmi.head_hidden", cm.head_hidden);
        c.positive("distill.cmi.head_dim", cm.head_dim);
        let p = &self.parallel;
        c.positive("parallel.ranks", p.ranks);
        c.finite_positive("parallel.bucket_mb", p.bucket_mb);
        if p.ranks > 1 {
            c.check(
                k.batch_size.is_multiple_of(p.ranks) && k.batch_size / p.ranks >= 2,
                "parallel.ranks",
                p.ranks,
                &format!("a divisor of distill.batch_size = {} leaving each rank at least 2 samples", k.batch_size),
            );
        }
        c.done()
    }

    /// Checks the config against the opened data set: class count, and splits that
    /// are not empty (a teacher trained on nothing, or an accuracy over no images,
    /// would pass for results).
    pub fn validate_dataset(&self, ds: &Dataset) -> Result<()> {
        let mut c = Checks(None);
        c.check(
            ds.num_classes() == self.data.num_classes,
            "data.num_classes",
            self.data.num_classes,
            &format!("{}, the class count of the data set at {}", ds.num_classes(), ds.root.display()),
        );
        if ds.test.is_empty() {
            return Err(Error::Msg(format!("data set {}: the test split is empty, so nothing could be evaluated", ds.root.display())));
        }
        if self.teacher.weights.is_none() {
            c.check(
                ds.train.len() >= self.teacher.batch_size,
                "teacher.batch_size",
                self.teacher.batch_size,
                &format!("at most the {} training images of {}", ds.train.len(), ds.root.display()),
            );
        }
        c.done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sets: &[&str]) -> String {
        let mut c = Config::cpu_demo();
        // a value no config can hold (an unknown method) is refused as it is read, the rest here
        let checked = c.apply_overrides(&sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).and_then(|_| c.validate());
        checked.err().unwrap_or_else(|| panic!("{sets:?} passed validation")).to_string()
    }

    #[test]
    fn the_presets_are_valid() {
        for p in ["cpu-demo", "paper-cub", "paper-cars", "paper-aircraft"] {
            Config::preset(p).unwrap().validate().unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn class_targets_need_a_conditional_generator() {
        let e = refused(&["generator.conditional=false", "distill.gen_target_ce=4"]);
        assert!(e.contains("distill.gen_target_ce") && e.contains("generator.conditional = true"), "{e}");
    }

    #[test]
    fn each_bad_value_is_refused_naming_key_and_value() {
        for (set, key, value) in [
            ("teacher.batch_size=0", "teacher.batch_size", "0"),
            ("distill.checkpoint_every=0", "distill.checkpoint_every", "0"),
            ("data.image_size=0", "data.image_size", "0"),
            ("data.image_size=30", "data.image_size", "30"),
            ("generator.z_dim=0", "generator.z_dim", "0"),
            ("distill.mha_order=0", "distill.mha_order", "0"),
            ("distill.tau_kd=0", "distill.tau_kd", "0.0"),
            ("student.arch=resnet9", "student.arch", "\"resnet9\""),
            ("teacher.epochs=0", "teacher.epochs", "0"),
            ("teacher.ema_decay=1", "teacher.ema_decay", "1.0"),
            ("teacher.swa_epochs=1000", "teacher.swa_epochs", "1000"),
            ("teacher.swa_lr=0", "teacher.swa_lr", "0.0"),
            ("distill.epochs=0", "distill.epochs", "0"),
            ("distill.method=nope", "distill.method", "\"nope\""),
            ("device=gpu", "device", "\"gpu\""),
            ("generator.channels=[8,8]", "generator.channels", "[8, 8]"),
            ("distill.gen_balance=-1", "distill.gen_balance", "-1.0"),
        ] {
            let e = refused(&[set]);
            assert!(e.contains(&format!("{key} = {value} ")) && e.contains("expected"), "{set}: {e}");
        }
    }

    #[test]
    fn image_pools_run_on_ranks_but_still_need_generator_steps() {
        for method in ["dfkd-fgvc", "deepinversion"] {
            let mut c = Config::cpu_demo();
            c.apply_overrides(&["parallel.ranks=2".into(), "distill.pool_batches=4".into(), format!("distill.method={method}")]).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{method}: {e}"));
        }
        let e = refused(&["parallel.ranks=2", "distill.pool_batches=4", "distill.g_steps=0"]);
        assert!(e.contains("distill.pool_batches = 4") && e.contains("distill.g_steps = 0"), "{e}");
    }

    #[test]
    fn imported_teacher_weights_need_no_teacher_epochs() {
        let mut c = Config::cpu_demo();
        c.teacher.epochs = 0;
        c.teacher.weights = Some("t.safetensors".into());
        c.validate().unwrap();
    }
}
