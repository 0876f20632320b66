//! Safetensors read tensor by tensor with positioned reads instead of a memory map: a mapped
//! file's touched pages count in the resident set until unmapped, so mmap-and-copy loading
//! peaks at twice the weights; this peaks at the weights plus one tensor.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::error::{ModelError, Result};

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

pub struct SafetensorsFiles {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl SafetensorsFiles {
    /// Reads and checks the headers of `paths`: every tensor must lie inside its file.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let err = |m: String| ModelError::File {
                path: path.clone(),
                message: m,
            };
            let file = File::open(path).map_err(|e| err(e.to_string()))?;
            let file_len = file.metadata().map_err(|e| err(e.to_string()))?.len();
            let mut len_bytes = [0u8; 8];
            file.read_exact_at(&mut len_bytes, 0)
                .map_err(|_| err("not a safetensors file (too short)".into()))?;
            let header_len = u64::from_le_bytes(len_bytes);
            if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
                return Err(err(format!(
                    "invalid safetensors header length {header_len}"
                )));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| err(e.to_string()))?;
            let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| err(format!("invalid safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in json {
                if name == "__metadata__" {
                    continue;
                }
                let bad = |m: &str| err(format!("tensor `{name}`: {m}"));
                let dtype_s = info["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
                let dtype = parse_dtype(dtype_s)
                    .ok_or_else(|| bad(&format!("unsupported dtype {dtype_s}")))?;
                let shape: Vec<usize> = info["shape"]
                    .as_array()
                    .ok_or_else(|| bad("no shape"))?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("bad shape"))?;
                let offsets = info["data_offsets"]
                    .as_array()
                    .ok_or_else(|| bad("no data_offsets"))?;
                let (start, end) = match (
                    offsets.first().and_then(|v| v.as_u64()),
                    offsets.get(1).and_then(|v| v.as_u64()),
                ) {
                    (Some(a), Some(b)) if a <= b => (data_start + a, data_start + b),
                    _ => return Err(bad("bad data_offsets")),
                };
                let expected =
                    shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
                if end - start != expected {
                    return Err(bad(&format!(
                        "{} bytes stored for shape {shape:?} of {dtype_s}",
                        end - start
                    )));
                }
                if end > file_len {
                    return Err(err(format!(
                        "truncated: tensor `{name}` ends at byte {end} but the file has {file_len}"
                    )));
                }
                entries.insert(
                    name,
                    Entry {
                        file: index,
                        dtype,
                        shape,
                        start,
                        end,
                    },
                );
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, entries })
    }

    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let (path, file) = &self.files[e.file];
        let read = |buf: &mut [u8]| {
            file.read_exact_at(buf, e.start)
                .map_err(|err| candle_core::Error::Msg(format!("{}: {err}", path.display())))
        };
        let t = match e.dtype {
            // Read straight into the tensor's own buffer: no second copy of big matrices.
            DType::F32 => Tensor::from_vec(read_typed::<f32>(e, read)?, e.shape.as_slice(), dev)?,
            DType::F16 => {
                Tensor::from_vec(read_typed::<half::f16>(e, read)?, e.shape.as_slice(), dev)?
            }
            DType::BF16 => {
                Tensor::from_vec(read_typed::<half::bf16>(e, read)?, e.shape.as_slice(), dev)?
            }
            _ => {
                let mut bytes = vec![0u8; (e.end - e.start) as usize];
                read(&mut bytes)?;
                Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, dev)?
            }
        };
        t.to_dtype(dtype)
    }
}

/// Reads an entry's bytes into a `Vec<T>` (little-endian files, as safetensors are).
fn read_typed<T: bytemuck::Pod>(
    e: &Entry,
    read: impl Fn(&mut [u8]) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<T>> {
    let len = (e.end - e.start) as usize / std::mem::size_of::<T>();
    let mut v = vec![T::zeroed(); len];
    read(bytemuck::cast_slice_mut(&mut v))?;
    Ok(v)
}

impl SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(e) = self.entries.get(name) {
            if e.shape.as_slice() != s.dims() {
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got: e.shape.clone().into(),
                });
            }
        }
        self.read(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}
