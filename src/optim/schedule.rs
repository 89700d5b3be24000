//! Learning-rate schedules.

/// Cosine annealing from `base` to `min` over `total` steps (PyTorch's
/// `CosineAnnealingLR` with `T_max = total`, `eta_min = min`), after `warmup` steps
/// that rise linearly to `base` (the first at `base / warmup`).
#[derive(Clone, Copy, Debug)]
pub struct CosineSchedule {
    pub base: f32,
    pub min: f32,
    pub total: usize,
    pub warmup: usize,
}

impl CosineSchedule {
    pub fn lr_at(&self, step: usize) -> f32 {
        if step < self.warmup {
            return self.base * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup).min(span) as f32) / span as f32;
        self.min + (self.base - self.min) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cosine_endpoints() {
        let s = super::CosineSchedule { base: 0.1, min: 0.0, total: 100, warmup: 0 };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-7);
        assert!((s.lr_at(50) - 0.05).abs() < 1e-6);
        assert!(s.lr_at(100).abs() < 1e-7);
    }

    #[test]
    fn warmup_rises_linearly_then_anneals_over_the_rest() {
        let s = super::CosineSchedule { base: 0.1, min: 0.0, total: 110, warmup: 10 };
        assert!((s.lr_at(0) - 0.01).abs() < 1e-7);
        assert!((s.lr_at(4) - 0.05).abs() < 1e-7);
        assert!((s.lr_at(9) - 0.1).abs() < 1e-7);
        assert!((s.lr_at(10) - 0.1).abs() < 1e-7);
        assert!((s.lr_at(60) - 0.05).abs() < 1e-6);
        assert!(s.lr_at(110).abs() < 1e-7);
    }
}
