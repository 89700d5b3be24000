//! A minimal MATLAB v5 MAT-file reader: exactly what the Stanford Cars devkit needs
//! (numeric scalars, char arrays, cell arrays, struct arrays, zlib-compressed elements).
//! Own code because no crates.io reader handled it: `matfile` 0.5 has no cells,
//! structs or chars, and `matrw` 0.1 rejects v5 files whose free-text header lacks
//! MATLAB's exact wording (scipy's, for one) and panics on some malformed input.
//! Format: MathWorks, "MAT-File Format" (matfile_format.pdf), chapter 1.

use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

// Data types (tag type field) and array classes (array-flags class byte) we handle.
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_CHAR: u8 = 4;
const MX_NUMERIC: std::ops::RangeInclusive<u8> = 6..=15;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any numeric class, widened to f64 (column-major).
    Num(Vec<f64>),
    Char(String),
    /// Elements in column-major order.
    Cell(Vec<Value>),
    /// `elems[i][f]` is field `fields[f]` of element i (column-major).
    Struct {
        fields: Vec<String>,
        elems: Vec<Vec<Value>>,
    },
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Char(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_scalar(&self) -> Option<f64> {
        match self {
            Value::Num(v) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }

    pub fn field(&self, elem: usize, name: &str) -> Option<&Value> {
        let Value::Struct { fields, elems } = self else { return None };
        let f = fields.iter().position(|n| n == name)?;
        elems.get(elem)?.get(f)
    }
}

/// The most a file's compressed elements may expand to, all together.
const MAX_INFLATED: u64 = 64 << 20;

/// Reads every variable of a MAT v5 file as (name, value), in file order.
pub fn read(path: &Path) -> Result<Vec<(String, Value)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_file(&bytes).map_err(|m| Error::Msg(format!("{}: {m}", path.display())))
}

/// Errors here are plain strings; `read` prefixes the file name.
type Res<T> = std::result::Result<T, String>;

fn parse_file(bytes: &[u8]) -> Res<Vec<(String, Value)>> {
    if bytes.len() < 128 {
        return Err("shorter than the 128-byte MAT header".into());
    }
    if bytes.starts_with(b"MATLAB 7.3") {
        return Err("MAT v7.3 (HDF5) is not supported; re-save it with `save -v7`".into());
    }
    let big = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        _ => return Err("not a MAT v5 file (no endian indicator at byte 126)".into()),
    };
    let mut r = Reader { b: bytes, pos: 128, big };
    let mut vars = Vec::new();
    let mut inflated = 0u64;
    while r.pos + 8 <= bytes.len() {
        let (ty, data) = r.element()?;
        let var = match ty {
            MI_MATRIX => matrix(data, big)?,
            MI_COMPRESSED => {
                // zlib expands up to ~1000x: a small file must not ask for gigabytes
                let budget = MAX_INFLATED - inflated;
                let mut raw = Vec::new();
                flate2::read::ZlibDecoder::new(data).take(budget + 1).read_to_end(&mut raw).map_err(|e| format!("bad zlib stream: {e}"))?;
                if raw.len() as u64 > budget {
                    return Err(format!(
                        "compressed data expands beyond {} MiB, more than any annotation file needs (the largest, Stanford Cars', holds under 2 MiB)",
                        MAX_INFLATED >> 20
                    ));
                }
                inflated += raw.len() as u64;
                let mut inner = Reader { b: &raw, pos: 0, big };
                match inner.element()? {
                    (MI_MATRIX, d) => matrix(d, big)?,
                    (t, _) => return Err(format!("compressed element holds type {t}, expected miMATRIX")),
                }
            }
            _ => continue, // Other top-level elements carry no variables.
        };
        if let Some(v) = var {
            vars.push(v);
        }
    }
    Ok(vars)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    big: bool,
}

impl<'a> Reader<'a> {
    fn u32_at(&self, at: usize) -> Res<u32> {
        let s: [u8; 4] = self.b.get(at..at + 4).ok_or_else(|| format!("truncated at byte {at}"))?.try_into().unwrap();
        Ok(if self.big { u32::from_be_bytes(s) } else { u32::from_le_bytes(s) })
    }

    /// Like `element`, but an array with no data may also omit the element entirely.
    fn element_or_empty(&mut self) -> Res<(u32, &'a [u8])> {
        if self.pos >= self.b.len() {
            Ok((MI_UINT8, &[]))
        } else {
            self.element()
        }
    }

    /// Next data element as (type, payload). Handles the 4-byte "small element" form
    /// and the padding of every element to a multiple of 8 bytes.
    fn element(&mut self) -> Res<(u32, &'a [u8])> {
        let first = self.u32_at(self.pos)?;
        let (ty, n, start, padded) = if first >> 16 != 0 {
            (first & 0xffff, (first >> 16) as usize, self.pos + 4, 8)
        } else {
            let n = self.u32_at(self.pos + 4)? as usize;
            (first, n, self.pos + 8, 8 + n.div_ceil(8) * 8)
        };
        let data = self.b.get(start..start + n).ok_or_else(|| format!("element at byte {} overruns the data", self.pos))?;
        // A compressed element is not padded.
        self.pos += if ty == MI_COMPRESSED { 8 + n } else { padded };
        Ok((ty, data))
    }
}

/// Decodes a numeric payload of any mi type to f64.
fn numbers(ty: u32, d: &[u8], big: bool) -> Res<Vec<f64>> {
    macro_rules! conv {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            d.chunks_exact(N)
                .map(|c| {
                    let a: [u8; N] = c.try_into().unwrap();
                    (if big { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) }) as f64
                })
                .collect()
        }};
    }
    Ok(match ty {
        MI_INT8 => conv!(i8),
        MI_UINT8 | MI_UTF8 => conv!(u8),
        MI_INT16 => conv!(i16),
        MI_UINT16 | MI_UTF16 => conv!(u16),
        MI_INT32 => conv!(i32),
        MI_UINT32 => conv!(u32),
        MI_SINGLE => conv!(f32),
        MI_DOUBLE => conv!(f64),
        MI_INT64 => conv!(i64),
        MI_UINT64 => conv!(u64),
        _ => return Err(format!("unsupported numeric data type {ty}")),
    })
}

/// Parses an miMATRIX payload into (name, value); None for classes we skip (objects,
/// sparse, function handles), which the devkit files do not use.
fn matrix(d: &[u8], big: bool) -> Res<Option<(String, Value)>> {
    if d.is_empty() {
        return Ok(None); // An empty miMATRIX stands for an empty array in cells/structs.
    }
    let mut r = Reader { b: d, pos: 0, big };
    let (fty, flags) = r.element()?;
    let class = *numbers(fty, flags, big)?.first().ok_or("empty array flags")? as u32 as u8; // low byte
    let (dty, dims) = r.element()?;
    let count: usize = numbers(dty, dims, big)?.iter().map(|&x| x as usize).product();
    let (_, name) = r.element()?;
    let name = String::from_utf8_lossy(name).into_owned();
    let value = match class {
        MX_CELL => Value::Cell((0..count).map(|_| sub_matrix(&mut r)).collect::<Res<_>>()?),
        MX_STRUCT => {
            let (_, len) = r.element()?;
            let len = *numbers(MI_INT32, len, big)?.first().ok_or("missing field name length")? as usize;
            let (_, names) = r.element()?;
            let fields: Vec<String> = names.chunks(len.max(1)).map(|c| String::from_utf8_lossy(c).trim_end_matches('\0').to_string()).collect();
            let elems = (0..count).map(|_| fields.iter().map(|_| sub_matrix(&mut r)).collect::<Res<Vec<_>>>()).collect::<Res<_>>()?;
            Value::Struct { fields, elems }
        }
        MX_CHAR => {
            let (ty, data) = r.element_or_empty()?;
            Value::Char(match ty {
                MI_UINT8 | MI_UTF8 | MI_INT8 => String::from_utf8_lossy(data).into_owned(),
                _ => {
                    let units: Vec<u16> = numbers(ty, data, big)?.iter().map(|&u| u as u16).collect();
                    String::from_utf16_lossy(&units)
                }
            })
        }
        c if MX_NUMERIC.contains(&c) => {
            let (ty, data) = r.element_or_empty()?;
            Value::Num(numbers(ty, data, big)?)
        }
        _ => return Ok(None),
    };
    Ok(Some((name, value)))
}

/// A cell or field value: an miMATRIX element nested in its parent's payload.
fn sub_matrix(r: &mut Reader) -> Res<Value> {
    let at = r.pos;
    match r.element()? {
        (MI_MATRIX, d) => Ok(matrix(d, r.big)?.map(|(_, v)| v).unwrap_or(Value::Num(Vec::new()))),
        (t, _) => Err(format!("element at byte {at} has type {t}, expected miMATRIX")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-assembled little-endian file: x = [1 2] as uint8 in a 1x2 double array.
    #[test]
    fn reads_a_small_numeric_array() {
        let mut f = vec![b' '; 116];
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[0x00, 0x01, b'I', b'M']);
        let mut m = Vec::new();
        m.extend_from_slice(&[6, 0, 0, 0, 8, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]); // flags: mxDOUBLE
        m.extend_from_slice(&[5, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0]); // dims 1x2
        m.extend_from_slice(&[1, 0, 1, 0, b'x', 0, 0, 0]); // small element: name "x"
        m.extend_from_slice(&[2, 0, 2, 0, 1, 2, 0, 0]); // small miUINT8 data [1, 2]
        f.extend_from_slice(&(MI_MATRIX).to_le_bytes());
        f.extend_from_slice(&(m.len() as u32).to_le_bytes());
        f.extend_from_slice(&m);
        let vars = parse_file(&f).unwrap();
        assert_eq!(vars, vec![("x".to_string(), Value::Num(vec![1.0, 2.0]))]);
    }

    /// A 65 KiB file whose zlib element expands to 65 MiB is refused before it is all
    /// inflated.
    #[test]
    fn caps_what_compressed_elements_expand_to() {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; (MAX_INFLATED + (1 << 20)) as usize]).unwrap();
        let packed = z.finish().unwrap();
        let mut f = vec![b' '; 124];
        f.extend_from_slice(&[0x00, 0x01, b'I', b'M']);
        f.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
        f.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        f.extend_from_slice(&packed);
        let e = parse_file(&f).unwrap_err();
        assert!(e.contains("expands beyond 64 MiB"), "{e}");
    }

    #[test]
    fn rejects_v73_and_garbage() {
        let mut f = b"MATLAB 7.3 MAT-file".to_vec();
        f.resize(128, 0);
        assert!(parse_file(&f).unwrap_err().contains("v7.3"));
        assert!(parse_file(&[0; 10]).is_err());
    }
}
