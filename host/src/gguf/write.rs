//! Writing GGUF files: metadata [`Value`]s with the width they are written in, and the
//! [`header`] (magic, version, metadata, tensor index) in the numbers of [`super::format`] that
//! the reader uses too. `host synth` streams the tensor data after it.

use plugin_api::{GgmlType, MetaValue};

use super::format::{ValueType, ALIGNMENT, MAGIC, VERSIONS};

/// A GGUF metadata value, as the writer emits it (with the width it is written in).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 8.
    Str(String),
    /// An array of u32.
    U32s(Vec<u32>),
    /// An array of u64.
    U64s(Vec<u64>),
    /// An array of i32.
    I32s(Vec<i32>),
    /// An array of i64.
    I64s(Vec<i64>),
    /// An array of f32.
    F32s(Vec<f32>),
    /// An array of bools.
    Bools(Vec<bool>),
    /// An array of strings.
    Strs(Vec<String>),
}

impl Value {
    /// The value of a parsed entry, in the narrowest of the types llama.cpp writes for it
    /// (integers as 32 bits where they fit, floats as f32): the parser keeps no width.
    pub fn from_meta(v: &MetaValue) -> Value {
        let all_u32 = |v: &[u64]| v.iter().all(|&x| u32::try_from(x).is_ok());
        let all_i32 = |v: &[i64]| v.iter().all(|&x| i32::try_from(x).is_ok());
        match v {
            MetaValue::Uint(x) => u32::try_from(*x).map_or(Value::U64(*x), Value::U32),
            MetaValue::Int(x) => i32::try_from(*x).map_or(Value::I64(*x), Value::I32),
            MetaValue::Float(x) => Value::F32(*x as f32),
            MetaValue::Bool(b) => Value::Bool(*b),
            MetaValue::Str(s) => Value::Str(s.to_string()),
            MetaValue::UintArray(v) if all_u32(v) => {
                Value::U32s(v.iter().map(|&x| x as u32).collect())
            }
            MetaValue::UintArray(v) => Value::U64s(v.to_vec()),
            MetaValue::IntArray(v) if all_i32(v) => {
                Value::I32s(v.iter().map(|&x| x as i32).collect())
            }
            MetaValue::IntArray(v) => Value::I64s(v.to_vec()),
            MetaValue::FloatArray(v) => Value::F32s(v.iter().map(|&x| x as f32).collect()),
            MetaValue::BoolArray(v) => Value::Bools(v.to_vec()),
            MetaValue::StrArray(v) => Value::Strs(v.iter().map(|s| s.to_string()).collect()),
        }
    }

    /// Appends the GGUF type id and the value.
    pub fn write(&self, out: &mut Vec<u8>) {
        fn array<T>(
            out: &mut Vec<u8>,
            ty: ValueType,
            items: &[T],
            mut put: impl FnMut(&mut Vec<u8>, &T),
        ) {
            out.extend(ValueType::Array.id().to_le_bytes());
            out.extend(ty.id().to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put(out, item);
            }
        }
        match self {
            Value::U32(x) => {
                out.extend(ValueType::U32.id().to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Value::U64(x) => {
                out.extend(ValueType::U64.id().to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Value::I32(x) => {
                out.extend(ValueType::I32.id().to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Value::I64(x) => {
                out.extend(ValueType::I64.id().to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Value::F32(x) => {
                out.extend(ValueType::F32.id().to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Value::Bool(b) => {
                out.extend(ValueType::Bool.id().to_le_bytes());
                out.push(u8::from(*b));
            }
            Value::Str(s) => {
                out.extend(ValueType::Str.id().to_le_bytes());
                put_str(out, s);
            }
            Value::U32s(v) => array(out, ValueType::U32, v, |o, x| o.extend(x.to_le_bytes())),
            Value::U64s(v) => array(out, ValueType::U64, v, |o, x| o.extend(x.to_le_bytes())),
            Value::I32s(v) => array(out, ValueType::I32, v, |o, x| o.extend(x.to_le_bytes())),
            Value::I64s(v) => array(out, ValueType::I64, v, |o, x| o.extend(x.to_le_bytes())),
            Value::F32s(v) => array(out, ValueType::F32, v, |o, x| o.extend(x.to_le_bytes())),
            Value::Bools(v) => array(out, ValueType::Bool, v, |o, b| o.push(u8::from(*b))),
            Value::Strs(v) => array(out, ValueType::Str, v, |o, s| put_str(o, s)),
        }
    }
}

/// Appends a GGUF string: its length as u64, then its bytes.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// One entry of the tensor index.
pub struct TensorEntry<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Dimensions, innermost first.
    pub dims: &'a [u64],
    /// Its type.
    pub ggml_type: GgmlType,
    /// Offset of its data from the start of the (aligned) data section.
    pub offset: u64,
}

/// The header of a GGUF file of the newest version: magic, version, counts, `metadata` in
/// order and the tensor index; without the padding to [`ALIGNMENT`] that precedes the data.
pub fn header(metadata: &[(String, Value)], tensors: &[TensorEntry]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend(VERSIONS.end().to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        value.write(&mut out);
    }
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ggml_type.id().to_le_bytes());
        out.extend(t.offset.to_le_bytes());
    }
    out
}

/// `n` rounded up to the data alignment.
pub fn aligned(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}
