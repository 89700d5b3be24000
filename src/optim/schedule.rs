//! Learning-rate schedules.

/// Cosine annealing from `base` to `min` over `total` steps (PyTorch's
/// `CosineAnnealingLR` with `T_max = total`, `eta_min = min`).
#[derive(Clone, Copy, Debug)]
pub struct CosineSchedule {
    pub base: f32,
    pub min: f32,
    pub total: usize,
}

impl CosineSchedule {
    pub fn lr_at(&self, step: usize) -> f32 {
        let t = (step.min(self.total) as f32) / (self.total.max(1) as f32);
        self.min + (self.base - self.min) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cosine_endpoints() {
        let s = super::CosineSchedule { base: 0.1, min: 0.0, total: 100 };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-7);
        assert!((s.lr_at(50) - 0.05).abs() < 1e-6);
        assert!(s.lr_at(100).abs() < 1e-7);
    }
}
