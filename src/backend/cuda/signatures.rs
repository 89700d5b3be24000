//! Tests that the Rust side of the CUDA backend and the kernel sources agree on what
//! each writes down separately: the `#[repr(C)]` twins' layouts, the kernels a GPU
//! loads, and the versions of the fused kernels.

use super::kernels::{emu_params, EMU_KERNELS, MODULES};
use super::launch::{check_signature, Arg, KernelLayout};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// (field or "sizeof" -> bytes) per struct, from the C++ side's asserts:
/// `static_assert(sizeof(T) == N, ..)`, `DFKD_ASSERT_OFFSET(T, f, N);` and, in the
/// emulator header, `static_assert(__builtin_offsetof(T, f) == N, ..)`.
fn cxx_layouts(text: &str) -> BTreeMap<String, BTreeMap<String, usize>> {
    let number = |s: &str| -> usize { s.trim().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap() };
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        let (t, f, n) = if let Some(rest) = line.strip_prefix("static_assert(sizeof(") {
            // (other static_asserts, such as `sizeof(T) <= 8`, are not layouts)
            let Some((t, n)) = rest.split_once(") == ") else { continue };
            (t, "sizeof", number(n))
        } else if let Some(rest) = line.strip_prefix("static_assert(__builtin_offsetof(") {
            let (tf, n) = rest.split_once(") == ").unwrap();
            let (t, f) = tf.split_once(", ").unwrap();
            (t, f, number(n))
        } else if let Some(rest) = line.strip_prefix("DFKD_ASSERT_OFFSET(").and_then(|r| r.strip_suffix(");")) {
            let v: Vec<&str> = rest.split(", ").collect();
            (v[0], v[1], number(v[2]))
        } else {
            continue;
        };
        out.entry(t.into()).or_default().insert(f.into(), n);
    }
    out
}

/// The Rust twins' `assert_twin!` lists, keyed by the C++ struct's name.
fn rust_layouts() -> BTreeMap<String, BTreeMap<String, usize>> {
    let cxx_name = |rust: &str| match rust {
        "KernelLayout" => "Strided".to_string(),
        "EmuConfig" => "Config".to_string(),
        n => n.to_string(),
    };
    let mut out = BTreeMap::new();
    for file in ["src/backend/cuda/launch.rs", "src/backend/cuda/kernels.rs"] {
        for line in read(file).lines() {
            let Some(rest) = line.trim().split_once("assert_twin!(").map(|(_, r)| r) else { continue };
            let Some(rest) = rest.strip_suffix(");") else { continue };
            let mut parts = rest.split(", ");
            let t = parts.next().unwrap();
            let size = parts.next().unwrap().strip_prefix("size ").unwrap().parse().unwrap();
            let mut fields: BTreeMap<String, usize> = parts.map(|p| p.split_once(" @ ").unwrap()).map(|(f, o)| (f.to_string(), o.parse().unwrap())).collect();
            fields.insert("sizeof".into(), size);
            out.insert(cxx_name(t), fields);
        }
    }
    out
}

#[test]
fn twins_agree_with_the_kernels() {
    let cxx: String = ["kernels/common.cuh", "kernels/conv.cu", "kernels/pool.cu", "kernels/emu/cuda_emu.h"].map(read).join("\n");
    let cxx = cxx_layouts(&cxx);
    let rust = rust_layouts();
    assert_eq!(rust.keys().collect::<Vec<_>>(), ["Config", "ConvGeom", "PoolGeom", "Strided"], "the twins assert_twin! lists");
    assert_eq!(rust, cxx, "Rust twins (assert_twin!) and C++ static_asserts differ");
}

/// Every kernel loads on a GPU from the module build.rs put it in. Launches cannot name
/// a missing kernel: the typed launchers (`launchers::k`) are generated from the
/// compiled kernels, and `Gpu::launch` takes only their `KernelName`s.
#[test]
fn every_kernel_loads_on_a_gpu() {
    let Some(dev) = super::device::is_open(0).or_else(|| super::device::get(0).ok()) else { return };
    for name in MODULES.iter().flat_map(|m| m.kernels) {
        dev.function(name).unwrap_or_else(|e| panic!("cuda:0 has no kernel `{name}`: {e}"));
    }
}

#[test]
fn versions_table_lists_exactly_the_kernels_versions() {
    // `<family>_v<N>_<dtype>` in the compiled kernels
    let mut defined: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (name, _) in EMU_KERNELS {
        let Some((family, rest)) = name.rsplit_once("_v") else { continue };
        let Some((v, _dtype)) = rest.split_once('_') else { continue };
        if let Ok(v) = v.parse() {
            defined.entry(family.to_string()).or_default().insert(v);
        }
    }
    let listed: BTreeMap<String, BTreeSet<u32>> = crate::fused::families().map(|(f, vs)| (f.to_string(), vs.iter().copied().collect())).collect();
    assert_eq!(listed, defined, "the registered fused ops' VERSIONS (fused::OPS) and the versioned kernels of kernels/*.cu differ");
}

#[test]
fn launches_are_checked_against_the_kernel_parameters() {
    // every kernel's parameters are of kinds an `Arg` can be
    for (name, _) in EMU_KERNELS {
        let params = emu_params(name).unwrap();
        for code in params.split(',').filter(|c| !c.is_empty()) {
            assert!(["p", "u4", "i4", "f4", "s72", "s40", "s52"].contains(&code), "{name}: parameter kind {code} in ({params})");
        }
    }
    assert_eq!(emu_params("uneg_f32"), Some("u4,s72,p,p,f4,f4"));
    let l = Arg::Layout(KernelLayout::contiguous(0));
    let good = [Arg::U32(4), l, Arg::Ptr(0), Arg::Ptr(0), Arg::F32(0.0), Arg::F32(0.0)];
    check_signature("uneg_f32", "u4,s72,p,p,f4,f4", &good).unwrap();
    // a float where the kernel takes an unsigned, and one argument short
    let swapped = [Arg::F32(4.0), l, Arg::Ptr(0), Arg::Ptr(0), Arg::F32(0.0), Arg::F32(0.0)];
    let err = check_signature("uneg_f32", "u4,s72,p,p,f4,f4", &swapped).unwrap_err().to_string();
    assert!(err.contains("takes (u4,s72,p,p,f4,f4)"), "{err}");
    assert!(check_signature("uneg_f32", "u4,s72,p,p,f4,f4", &good[..5]).is_err());
}
