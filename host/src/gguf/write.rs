//! Writing GGUF files: the [`header`] (magic, version, metadata, tensor index) in the numbers of
//! [`super::format`] that the reader uses too, with metadata as the reader's own [`MetaValue`]s
//! ([`put_value`] picks the width). `host synth` streams the tensor data after it.

use plugin_api::{GgmlType, MetaValue};

use super::format::{ValueType, ALIGNMENT, MAGIC, VERSIONS};

/// Appends `value` with its GGUF type id, in the narrowest of the types llama.cpp writes for it
/// (integers as 32 bits where every one fits, floats as f32): [`MetaValue`], the values the
/// reader gives variants, keeps no width, so the writer chooses.
pub fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
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
    let tag = |out: &mut Vec<u8>, ty: ValueType| out.extend(ty.id().to_le_bytes());
    let all_u32 = |v: &[u64]| v.iter().all(|&x| u32::try_from(x).is_ok());
    let all_i32 = |v: &[i64]| v.iter().all(|&x| i32::try_from(x).is_ok());
    match value {
        MetaValue::Uint(x) => match u32::try_from(*x) {
            Ok(x) => {
                tag(out, ValueType::U32);
                out.extend(x.to_le_bytes());
            }
            Err(_) => {
                tag(out, ValueType::U64);
                out.extend(x.to_le_bytes());
            }
        },
        MetaValue::Int(x) => match i32::try_from(*x) {
            Ok(x) => {
                tag(out, ValueType::I32);
                out.extend(x.to_le_bytes());
            }
            Err(_) => {
                tag(out, ValueType::I64);
                out.extend(x.to_le_bytes());
            }
        },
        MetaValue::Float(x) => {
            tag(out, ValueType::F32);
            out.extend((*x as f32).to_le_bytes());
        }
        MetaValue::Bool(b) => {
            tag(out, ValueType::Bool);
            out.push(u8::from(*b));
        }
        MetaValue::Str(s) => {
            tag(out, ValueType::Str);
            put_str(out, s);
        }
        MetaValue::UintArray(v) if all_u32(v) => array(out, ValueType::U32, v, |o, &x| {
            o.extend((x as u32).to_le_bytes())
        }),
        MetaValue::UintArray(v) => array(out, ValueType::U64, v, |o, x| o.extend(x.to_le_bytes())),
        MetaValue::IntArray(v) if all_i32(v) => array(out, ValueType::I32, v, |o, &x| {
            o.extend((x as i32).to_le_bytes())
        }),
        MetaValue::IntArray(v) => array(out, ValueType::I64, v, |o, x| o.extend(x.to_le_bytes())),
        MetaValue::FloatArray(v) => array(out, ValueType::F32, v, |o, &x| {
            o.extend((x as f32).to_le_bytes())
        }),
        MetaValue::BoolArray(v) => array(out, ValueType::Bool, v, |o, b| o.push(u8::from(*b))),
        MetaValue::StrArray(v) => array(out, ValueType::Str, v, |o, s| put_str(o, s)),
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
pub fn header(metadata: &[(String, MetaValue)], tensors: &[TensorEntry]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend(VERSIONS.end().to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        put_value(&mut out, value);
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

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::RString;

    /// Every value the writer writes, the reader reads back as the same value.
    #[test]
    fn metadata_round_trips_through_the_reader() {
        let values = [
            MetaValue::Uint(7),
            MetaValue::Uint(u64::MAX),
            MetaValue::Int(-7),
            MetaValue::Int(i64::MIN),
            MetaValue::Float(0.5),
            MetaValue::Bool(true),
            MetaValue::Str("llama".into()),
            MetaValue::UintArray(vec![1, 2, 3].into()),
            MetaValue::UintArray(vec![1, u64::MAX].into()),
            MetaValue::IntArray(vec![-1, 4].into()),
            MetaValue::IntArray(vec![i64::MAX].into()),
            MetaValue::FloatArray(vec![0.25, -2.0].into()),
            MetaValue::BoolArray(vec![true, false].into()),
            MetaValue::StrArray(vec![RString::from("a"), RString::from("bc")].into()),
        ];
        let metadata: Vec<(String, MetaValue)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("k{i}"), v.clone()))
            .collect();
        let tensor = TensorEntry {
            name: "w",
            dims: &[4],
            ggml_type: GgmlType::F32,
            offset: 0,
        };
        let mut bytes = header(&metadata, &[tensor]);
        bytes.resize(aligned(bytes.len() as u64) as usize, 0);
        bytes.extend([0u8; 16]);
        let view = super::super::parse(Box::leak(bytes.into_boxed_slice())).unwrap();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(view.meta(&format!("k{i}")), Some(v), "k{i}");
        }
        assert_eq!(view.tensors[0].ggml_type, GgmlType::F32.id());
    }
}
