//! Safetensors checkpoints with PyTorch's state_dict names, so that
//! `safetensors.torch.save_file(model.state_dict(), path)` of a torchvision model loads
//! here as is, and our files load in PyTorch.
//!
//! - Model loads are strict (every key present, no extra key, same shapes) and all-or-
//!   nothing: the file is fully checked before any tensor of the model is written.
//! - F32, F16 and BF16 tensors are read as f32; counters (BatchNorm's
//!   `num_batches_tracked`) are int64 scalars, as PyTorch writes them.
//! - Saves write `<path>.tmp` then rename it, so a crash never leaves a torn file.
//! - Every error names the file, and the key when there is one.

use crate::nn::{Module, Slot};
use crate::{bail, DType, Device, Error, Result, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// A tensor's bytes as they go into the file.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn tensor_entry(t: &Tensor) -> Result<Entry> {
    let (dtype, bytes): (Dtype, Vec<u8>) = match t.dtype() {
        DType::F32 => (Dtype::F32, t.to_vec_f32()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::F16 => (Dtype::F16, t.to_vec_f32()?.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()),
        DType::BF16 => (Dtype::BF16, t.to_vec_f32()?.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()),
        DType::U32 => (Dtype::U32, t.to_vec_u32()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    Ok(Entry { dtype, shape: t.dims().to_vec(), bytes })
}

fn counter_entry(v: u64) -> Entry {
    Entry { dtype: Dtype::I64, shape: vec![], bytes: (v as i64).to_le_bytes().to_vec() }
}

/// Writes `entries` to `<path>.tmp`, flushes it to disk, and renames it over `path`.
fn write_atomic(path: &Path, entries: &BTreeMap<String, Entry>) -> Result<()> {
    let bytes = safetensors::serialize(entries.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| Error::Msg(format!("{}: cannot serialise checkpoint: {e}", path.display())))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn insert_unique(entries: &mut BTreeMap<String, Entry>, path: &Path, name: &str, entry: Entry) -> Result<()> {
    if entries.insert(name.to_string(), entry).is_some() {
        bail!("{}: key `{name}` appears twice", path.display());
    }
    Ok(())
}

/// Saves every parameter, buffer and counter of `model` under its state_dict name.
pub fn save_model<M: Module + ?Sized>(model: &M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let mut entries = BTreeMap::new();
    let mut result = Ok(());
    model.visit("", &mut |name, slot| {
        if result.is_err() {
            return;
        }
        let entry = match slot {
            Slot::Parameter(t) | Slot::Buffer(t) => tensor_entry(t),
            Slot::Counter(c) => Ok(counter_entry(c.get())),
        };
        result = entry.and_then(|e| insert_unique(&mut entries, path, name, e));
    });
    result?;
    write_atomic(path, &entries)
}

/// Saves named tensors (optimiser state, generator checkpoints) in their own dtypes.
pub fn save_tensors<S: AsRef<str>>(path: impl AsRef<Path>, tensors: &[(S, &Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let mut entries = BTreeMap::new();
    for (name, t) in tensors {
        insert_unique(&mut entries, path, name.as_ref(), tensor_entry(t)?)?;
    }
    write_atomic(path, &entries)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Msg(format!("{}: not a valid safetensors file (truncated or corrupt?): {e}", path.display())))
}

/// A float tensor's values as f32, or an error naming the key.
fn floats(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let b = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        d => bail!("{}: `{name}` has dtype {d:?}, expected F32, F16 or BF16", path.display()),
    };
    // a NaN or Inf weight would only show up as "NaN%" predictions, much later
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!("{}: `{name}` holds {} at element {i} (of {}); the weights are corrupt or diverged", path.display(), values[i], values.len());
    }
    Ok(values)
}

/// An integer scalar counter, or an error naming the key.
fn counter_value(path: &Path, name: &str, view: &TensorView<'_>) -> Result<u64> {
    let b = view.data();
    if view.dtype() != Dtype::I64 || view.shape().iter().product::<usize>() != 1 {
        bail!("{}: `{name}` has dtype {:?} and shape {:?}, expected an I64 scalar", path.display(), view.dtype(), view.shape());
    }
    let v = i64::from_le_bytes(b[..8].try_into().unwrap());
    u64::try_from(v).map_err(|_| Error::Msg(format!("{}: `{name}` is negative ({v})", path.display())))
}

/// Loads a checkpoint into `model` (strict, all-or-nothing; see the module docs).
pub fn load_model<M: Module + ?Sized>(model: &M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let file = parse(path, &bytes)?;
    let shown = path.display();

    // Pass 1: check every key and decode its values, touching nothing.
    enum Value {
        Floats(Vec<f32>),
        Count(u64),
    }
    let mut decoded: Vec<(String, Value)> = vec![];
    let mut seen = HashSet::new();
    let mut missing = vec![];
    let mut first_error: Option<Error> = None;
    model.visit("", &mut |name, slot| {
        if first_error.is_some() {
            return;
        }
        seen.insert(name.to_string());
        let Ok(view) = file.tensor(name) else {
            missing.push(name.to_string());
            return;
        };
        let value = match slot {
            Slot::Parameter(t) | Slot::Buffer(t) => {
                if view.shape() != t.dims() {
                    first_error = Some(Error::Msg(format!("{shown}: `{name}` has shape {:?} in the file but {:?} in the model", view.shape(), t.dims())));
                    return;
                }
                floats(path, name, &view).map(Value::Floats)
            }
            Slot::Counter(_) => counter_value(path, name, &view).map(Value::Count),
        };
        match value {
            Ok(v) => decoded.push((name.to_string(), v)),
            Err(e) => first_error = Some(e),
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    if !missing.is_empty() {
        bail!("{shown}: missing {} key(s) the model needs: {}", missing.len(), list(&missing));
    }
    let mut unexpected: Vec<String> = file.names().into_iter().filter(|n| !seen.contains(*n)).map(String::from).collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        bail!("{shown}: {} unexpected key(s) the model does not have: {}", unexpected.len(), list(&unexpected));
    }

    // Pass 2: write.
    let mut values: HashMap<String, Value> = decoded.into_iter().collect();
    let mut result = Ok(());
    model.visit("", &mut |name, slot| {
        if result.is_err() {
            return;
        }
        let value = values.remove(name);
        result = match (slot, value) {
            (Slot::Parameter(t) | Slot::Buffer(t), Some(Value::Floats(v))) => Tensor::from_vec(v, t.dims(), t.device()).and_then(|src| t.assign(&src)),
            (Slot::Counter(c), Some(Value::Count(v))) => {
                c.set(v);
                Ok(())
            }
            _ => Err(Error::Msg(format!("{shown}: `{name}` changed kind between two visits of the model"))),
        };
    });
    result
}

/// At most 8 keys, then a count: a model with the wrong architecture misses hundreds.
fn list(keys: &[String]) -> String {
    let mut s = keys.iter().take(8).map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
    if keys.len() > 8 {
        s.push_str(&format!(" and {} more", keys.len() - 8));
    }
    s
}

/// Loads every tensor of a file: floats as f32, U32 as U32, in the file's key order
/// (sorted by name, as safetensors stores them).
pub fn load_tensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let file = parse(path, &bytes)?;
    let mut names: Vec<&str> = file.names();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let view = file.tensor(name).map_err(|e| Error::Msg(format!("{}: `{name}`: {e}", path.display())))?;
            let t = if view.dtype() == Dtype::U32 {
                let v: Vec<u32> = view.data().chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                Tensor::from_vec(v, view.shape(), Device::Cpu)?
            } else {
                Tensor::from_vec(floats(path, name, &view)?, view.shape(), Device::Cpu)?
            };
            Ok((name.to_string(), t))
        })
        .collect()
}
