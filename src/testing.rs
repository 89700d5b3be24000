//! The tests' one `assert_close`, for the library's unit tests and the integration
//! tests (`tests/common`) alike.

/// The tests' one element-wise comparison: `|got - want| <= abs + rel * |want|`, the
/// tolerance stated at each call. NaN matches only NaN and an infinity only itself, so
/// a kernel that turns a NaN into a number, or an overflow into a finite value, fails.
pub fn assert_close(got: &[f32], want: &[f32], abs: f32, rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= abs + rel * w.abs();
        assert!(ok, "{what}: element {i}: got {g}, want {w} (tolerance {abs} + {rel} * |want|)");
    }
}
