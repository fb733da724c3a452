//! The model file: a memory-mapped GGUF, parsed into the [`ModelView`] that variants get.
//!
//! [`Model::open`] maps the file, parses the header, metadata and tensor index with a bounds-
//! checked reader (a truncated or foreign file is an error naming the file, never a panic), and
//! checks that every tensor's bytes lie inside the file. The mapping is leaked on purpose: it
//! must outlive every variant loaded in the process, and a worker maps exactly one model.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use abi_stable::std_types::{RSlice, RString, RVec};
use memmap2::Mmap;
use plugin_api::{GgmlType, MetaValue, MetadataEntry, ModelView, TensorInfo};

use crate::hashing::sha256_hex;

pub mod format;
pub mod write;

use format::{ValueType, MAGIC, VERSIONS};

/// The metadata key that marks a synthetic model (a bool, true), written by `host synth`.
pub const SYNTHETIC_KEY: &str = "autoinfer.synthetic";

/// The metadata key (a bool, true) of a synthetic model whose values came from a key drawn when
/// it was written and never stored (`host synth` without `--seed`): a variant can only read its
/// weights, never regenerate them, so runs on it are gated like runs on a real model.
pub const SECRET_WEIGHTS_KEY: &str = "autoinfer.synthetic.secret";

/// The metadata key (a string) holding the seed a synthetic model was written from (`host synth
/// --seed`).
pub const SEED_KEY: &str = "autoinfer.synthetic.seed";

/// Why a model file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path}: cannot open")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model file {path} is not a GGUF file (it starts with {magic:?}, not \"GGUF\")")]
    NotGguf { path: PathBuf, magic: String },
    #[error("model file {path}: GGUF version {version} is not supported (only 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("model file {path} is truncated or corrupt: {what} at byte {offset} runs past the end of the file ({len} bytes)")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        len: u64,
    },
    #[error("model file {path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("model file {path}: general.architecture is {found:?}; autoinfer runs Llama-architecture GGUF models only")]
    Architecture { path: PathBuf, found: String },
}

/// A mapped, parsed, validated GGUF model.
pub struct Model {
    pub path: PathBuf,
    /// The view variants receive; it borrows the leaked mapping.
    pub view: &'static ModelView,
    sha256: OnceLock<String>,
}

impl Model {
    /// Maps and parses `path`, and checks it is a Llama-architecture model.
    pub fn open(path: &Path) -> Result<Model, ModelError> {
        let file = File::open(path).map_err(|source| ModelError::Open {
            path: path.into(),
            source,
        })?;
        // SAFETY: the file is opened read-only and never written by this process; a concurrent
        // writer could change what we read, which is the usual caveat of mapping a file.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Open {
            path: path.into(),
            source,
        })?;
        let bytes: &'static [u8] = Box::leak(Box::new(mmap));
        let view = parse(bytes).map_err(|e| e.at(path))?;
        let arch = view.meta_str("general.architecture").unwrap_or("(missing)");
        if arch != "llama" {
            return Err(ModelError::Architecture {
                path: path.into(),
                found: arch.to_string(),
            });
        }
        Ok(Model {
            path: path.into(),
            view: Box::leak(Box::new(view)),
            sha256: OnceLock::new(),
        })
    }

    /// SHA-256 of the whole file, in hex (hashed on first use only).
    pub fn sha256(&self) -> &str {
        self.sha256
            .get_or_init(|| sha256_hex(self.view.bytes.as_slice()))
    }

    /// The model's shape: the SHA-256 of its tensor index (each tensor's name, type and
    /// dimensions, in file order), not of its bytes. Two synthetic files of one shape written
    /// from different secret keys share it where their file hashes differ, so `host keep` can
    /// tell a comparison drawn again on the same shape from one on another shape.
    pub fn shape_sha256(&self) -> String {
        let mut index = Vec::new();
        for tensor in self.view.tensors.iter() {
            index.extend_from_slice(tensor.name.as_bytes());
            index.push(0);
            index.extend_from_slice(&tensor.ggml_type.to_le_bytes());
            index.extend_from_slice(&(tensor.dims.len() as u64).to_le_bytes());
            for dim in tensor.dims.iter() {
                index.extend_from_slice(&dim.to_le_bytes());
            }
        }
        sha256_hex(&index)
    }

    /// Whether this is a synthetic model (random weights, written by `host synth`): its
    /// metadata has `autoinfer.synthetic` set to the bool true. Its text is noise, and its
    /// figures are comparable only with runs on the same file.
    pub fn is_synthetic(&self) -> bool {
        matches!(self.view.meta(SYNTHETIC_KEY), Some(MetaValue::Bool(true)))
    }

    /// Whether runs on this model can be judged by the quality gates: a real model, or a
    /// synthetic one with secret weights ([`SECRET_WEIGHTS_KEY`]). A synthetic model written
    /// from a seed (or before secret keys existed) could be regenerated by a variant that knows
    /// the generator instead of read, so runs on it measure speed only and are never kept.
    pub fn is_gated(&self) -> bool {
        !self.is_synthetic()
            || matches!(
                self.view.meta(SECRET_WEIGHTS_KEY),
                Some(MetaValue::Bool(true))
            )
    }
}

/// A parse failure before the file's path is attached.
#[derive(Debug)]
enum ParseError {
    NotGguf(String),
    Version(u32),
    Truncated { what: String, offset: u64, len: u64 },
    Corrupt(String),
}

impl ParseError {
    fn at(self, path: &Path) -> ModelError {
        let path = path.to_path_buf();
        match self {
            ParseError::NotGguf(magic) => ModelError::NotGguf { path, magic },
            ParseError::Version(version) => ModelError::Version { path, version },
            ParseError::Truncated { what, offset, len } => ModelError::Truncated {
                path,
                what,
                offset,
                len,
            },
            ParseError::Corrupt(what) => ModelError::Corrupt { path, what },
        }
    }
}

/// A bounds-checked little-endian reader over the file bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ParseError> {
        match self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
        {
            Some(end) => {
                let slice = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(slice)
            }
            None => Err(ParseError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                len: self.bytes.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ParseError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item_bytes` long, refused if the rest of the file
    /// could not possibly hold them (so garbage cannot make us allocate terabytes).
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, ParseError> {
        let offset = self.pos as u64;
        let n = self.u64(what)?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > remaining {
            return Err(ParseError::Truncated {
                what: format!("{what} ({n})"),
                offset,
                len: self.bytes.len() as u64,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        let len = self.count(what, 1)?;
        let offset = self.pos;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| ParseError::Corrupt(format!("{what} at byte {offset} is not UTF-8")))
    }
}

/// Reads one scalar of GGUF value type id `ty`.
fn scalar(r: &mut Reader, ty: u32, what: &str) -> Result<MetaValue, ParseError> {
    use ValueType::*;
    let Some(value_type) = ValueType::from_id(ty).filter(|&t| t != Array) else {
        return Err(ParseError::Corrupt(format!(
            "{what} has unknown value type {ty}"
        )));
    };
    Ok(match value_type {
        U8 => MetaValue::Uint(r.array::<1>(what)?[0] as u64),
        I8 => MetaValue::Int(i8::from_le_bytes(r.array(what)?) as i64),
        U16 => MetaValue::Uint(u16::from_le_bytes(r.array(what)?) as u64),
        I16 => MetaValue::Int(i16::from_le_bytes(r.array(what)?) as i64),
        U32 => MetaValue::Uint(r.u32(what)? as u64),
        I32 => MetaValue::Int(i32::from_le_bytes(r.array(what)?) as i64),
        F32 => MetaValue::Float(f32::from_le_bytes(r.array(what)?) as f64),
        Bool => MetaValue::Bool(r.array::<1>(what)?[0] != 0),
        Str => MetaValue::Str(r.string(what)?.into()),
        U64 => MetaValue::Uint(r.u64(what)?),
        I64 => MetaValue::Int(i64::from_le_bytes(r.array(what)?)),
        F64 => MetaValue::Float(f64::from_le_bytes(r.array(what)?)),
        Array => unreachable!("filtered above"),
    })
}

/// Reads a GGUF array value (element type, count, elements).
fn array(r: &mut Reader, what: &str) -> Result<MetaValue, ParseError> {
    use ValueType::*;
    let ty = r.u32(what)?;
    let element = match ValueType::from_id(ty) {
        Some(Array) => {
            return Err(ParseError::Corrupt(format!(
                "{what}: nested arrays are not supported"
            )))
        }
        Some(t) => t,
        None => {
            return Err(ParseError::Corrupt(format!(
                "{what} has unknown element type {ty}"
            )))
        }
    };
    // A string is at least its 8-byte length.
    let n = r.count(what, element.width().unwrap_or(8))?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        items.push(scalar(r, ty, what)?);
    }
    macro_rules! collect {
        ($variant:ident, $array:ident) => {
            MetaValue::$array(
                items
                    .into_iter()
                    .map(|v| match v {
                        MetaValue::$variant(x) => x,
                        _ => unreachable!("every element was read with one type"),
                    })
                    .collect::<RVec<_>>(),
            )
        };
    }
    Ok(match element {
        U8 | U16 | U32 | U64 => collect!(Uint, UintArray),
        I8 | I16 | I32 | I64 => collect!(Int, IntArray),
        F32 | F64 => collect!(Float, FloatArray),
        Bool => collect!(Bool, BoolArray),
        Str => collect!(Str, StrArray),
        Array => unreachable!("refused above"),
    })
}

/// Parses a whole GGUF file held in `bytes`.
fn parse(bytes: &'static [u8]) -> Result<ModelView, ParseError> {
    let mut r = Reader { bytes, pos: 0 };
    if bytes.len() < 4 || &bytes[..4] != MAGIC {
        let head = &bytes[..bytes.len().min(4)];
        return Err(ParseError::NotGguf(
            String::from_utf8_lossy(head).into_owned(),
        ));
    }
    r.pos = 4;
    let version = r.u32("the GGUF version")?;
    if !VERSIONS.contains(&version) {
        return Err(ParseError::Version(version));
    }
    let n_tensors = r.count("the tensor count", 24)?;
    let n_kv = r.count("the metadata count", 12)?;

    let mut metadata = RVec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("the type of metadata {key:?}"))?;
        let what = format!("metadata {key:?}");
        let value = if ty == ValueType::Array.id() {
            array(&mut r, &what)?
        } else {
            scalar(&mut r, ty, &what)?
        };
        metadata.push(MetadataEntry {
            key: key.into(),
            value,
        });
    }

    let mut raw_tensors = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.string(&format!("the name of tensor #{i}"))?;
        let n_dims = r.u32(&format!("the rank of tensor {name:?}"))?;
        if n_dims > 4 {
            return Err(ParseError::Corrupt(format!(
                "tensor {name:?} has {n_dims} dimensions (at most 4)"
            )));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64(&format!("the dimensions of tensor {name:?}")))
            .collect::<Result<Vec<u64>, _>>()?;
        let ggml_type = r.u32(&format!("the type of tensor {name:?}"))?;
        let offset = r.u64(&format!("the offset of tensor {name:?}"))?;
        raw_tensors.push((name, dims, ggml_type, offset));
    }

    let view_meta = ModelView {
        bytes: RSlice::from_slice(bytes),
        metadata,
        tensors: RVec::new(),
    };
    let alignment = view_meta
        .meta_uint("general.alignment")
        .unwrap_or(format::ALIGNMENT);
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(ParseError::Corrupt(format!(
            "general.alignment is {alignment}, not a power of two"
        )));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;

    let mut tensors = RVec::with_capacity(raw_tensors.len());
    for (name, dims, ggml_type, rel_offset) in raw_tensors {
        let ty = GgmlType::from_id(ggml_type).ok_or_else(|| {
            ParseError::Corrupt(format!("tensor {name:?} has unknown ggml type {ggml_type}"))
        })?;
        let (block_elems, block_bytes) = ty.block_layout();
        let elems = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let size = elems
            .filter(|e| e % block_elems == 0)
            .and_then(|e| (e / block_elems).checked_mul(block_bytes))
            .ok_or_else(|| {
                ParseError::Corrupt(format!(
                    "tensor {name:?} has impossible dimensions {dims:?}"
                ))
            })?;
        let offset = data_start.checked_add(rel_offset).ok_or_else(|| {
            ParseError::Corrupt(format!("tensor {name:?} has offset {rel_offset}"))
        })?;
        if offset
            .checked_add(size)
            .is_none_or(|end| end > bytes.len() as u64)
        {
            return Err(ParseError::Truncated {
                what: format!("the data of tensor {name:?} ({size} bytes)"),
                offset,
                len: bytes.len() as u64,
            });
        }
        tensors.push(TensorInfo {
            name: RString::from(name),
            ggml_type,
            dims: dims.into(),
            offset,
            size,
        });
    }
    Ok(ModelView {
        tensors,
        ..view_meta
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a minimal GGUF: the given metadata strings and one F32 tensor of `n` elements.
    pub(crate) fn tiny_gguf(meta: &[(&str, &str)], n: u64) -> Vec<u8> {
        let metadata: Vec<(String, MetaValue)> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), MetaValue::Str((*v).into())))
            .collect();
        let tensor = write::TensorEntry {
            name: "w",
            dims: &[n],
            ggml_type: GgmlType::F32,
            offset: 0,
        };
        let mut out = write::header(&metadata, &[tensor]);
        out.resize(write::aligned(out.len() as u64) as usize, 0);
        out.extend(std::iter::repeat_n(0u8, 4 * n as usize));
        out
    }

    fn leak(v: Vec<u8>) -> &'static [u8] {
        Box::leak(v.into_boxed_slice())
    }

    #[test]
    fn parses_metadata_and_tensor_index() {
        let view = parse(leak(tiny_gguf(&[("general.architecture", "llama")], 8))).expect("parses");
        assert_eq!(view.meta_str("general.architecture"), Some("llama"));
        let w = view.tensor("w").expect("tensor w");
        assert_eq!(
            (w.offset % 32, w.size, w.dims.as_slice()),
            (0, 32, &[8u64][..])
        );
    }

    #[test]
    fn refuses_foreign_and_truncated_files() {
        assert!(
            matches!(parse(leak(b"hello world".to_vec())), Err(ParseError::NotGguf(m)) if m == "hell")
        );
        let full = tiny_gguf(&[("general.architecture", "llama")], 8);
        for cut in [6, 20, 40, full.len() - 1] {
            let err = parse(leak(full[..cut].to_vec())).expect_err("truncated file must fail");
            assert!(
                matches!(err, ParseError::Truncated { .. }),
                "cut at {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn only_a_bool_true_marks_a_synthetic_model() {
        // A bool true does: host synth's files are checked in synth's tests.
        let dir = std::env::temp_dir().join(format!("autoinfer-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, meta) in [
            ("plain", vec![("general.architecture", "llama")]),
            (
                "string",
                vec![
                    ("general.architecture", "llama"),
                    ("autoinfer.synthetic", "true"),
                ],
            ),
        ] {
            let path = dir.join(format!("{name}.gguf"));
            std::fs::write(&path, tiny_gguf(&meta, 8)).unwrap();
            let model = Model::open(&path).unwrap();
            assert!(!model.is_synthetic(), "{name}");
            assert!(model.is_gated(), "{name}: a real model is gated");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_absurd_counts_without_allocating() {
        let mut bytes = tiny_gguf(&[], 1);
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
        assert!(matches!(
            parse(leak(bytes)),
            Err(ParseError::Truncated { .. })
        ));
    }
}
