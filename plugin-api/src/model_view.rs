//! The read-only view of the model that the host lends a variant.

use abi_stable::{
    std_types::{RSlice, RString, RVec},
    StableAbi,
};

/// One GGUF metadata value. Integers are widened to 64 bits (signed or unsigned as in the file),
/// floats to `f64`; arrays keep their element kind.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// An unsigned integer of any width.
    Uint(u64),
    /// A signed integer of any width.
    Int(i64),
    /// An `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(RString),
    /// An array of unsigned integers.
    UintArray(RVec<u64>),
    /// An array of signed integers.
    IntArray(RVec<i64>),
    /// An array of floats.
    FloatArray(RVec<f64>),
    /// An array of booleans.
    BoolArray(RVec<bool>),
    /// An array of strings (the tokenizer's vocabulary, say).
    StrArray(RVec<RString>),
}

/// One `key = value` pair of the GGUF header, in file order.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct MetadataEntry {
    /// The key, such as `llama.block_count`.
    pub key: RString,
    /// Its value.
    pub value: MetaValue,
}

/// One entry of the GGUF tensor index.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name, such as `blk.0.attn_q.weight`.
    pub name: RString,
    /// The ggml type id as stored in the file (see [`GgmlType`]).
    pub ggml_type: u32,
    /// Dimensions in GGUF order: `dims[0]` is the innermost (contiguous) one.
    pub dims: RVec<u64>,
    /// Offset of the tensor's first byte from the start of the file.
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub size: u64,
}

/// The model as the host lends it: the file bytes, metadata and tensor index.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct ModelView {
    /// The whole GGUF file, mapped by the host; it outlives every variant.
    pub bytes: RSlice<'static, u8>,
    /// The header's key/value pairs, in file order.
    pub metadata: RVec<MetadataEntry>,
    /// The tensor index, in file order.
    pub tensors: RVec<TensorInfo>,
}

impl ModelView {
    /// The metadata value under `key`, if any.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata
            .iter()
            .find(|entry| entry.key.as_str() == key)
            .map(|entry| &entry.value)
    }

    /// The string under `key`, if it is one.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key)? {
            MetaValue::Str(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// The non-negative integer under `key`, if it is one.
    pub fn meta_uint(&self, key: &str) -> Option<u64> {
        match *self.meta(key)? {
            MetaValue::Uint(v) => Some(v),
            MetaValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The number under `key` as `f64`, if it is a number.
    pub fn meta_float(&self, key: &str) -> Option<f64> {
        match *self.meta(key)? {
            MetaValue::Float(v) => Some(v),
            MetaValue::Uint(v) => Some(v as f64),
            MetaValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The tensor called `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name.as_str() == name)
    }

    /// The bytes of `tensor` (zero-copy). The host has checked they lie inside the file.
    pub fn tensor_data(&self, tensor: &TensorInfo) -> &'static [u8] {
        let bytes: &'static [u8] = self.bytes.as_slice();
        &bytes[tensor.offset as usize..(tensor.offset + tensor.size) as usize]
    }
}

/// The ggml tensor types a GGUF file may hold, with their block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half-precision float.
    F16,
    /// 4-bit blocks of 32 with an f16 scale.
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and minimum.
    Q4_1,
    /// 5-bit blocks of 32 with an f16 scale.
    Q5_0,
    /// 5-bit blocks of 32 with an f16 scale and minimum.
    Q5_1,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// 8-bit blocks of 32 with an f16 scale and sum.
    Q8_1,
    /// 2-bit k-quant super-blocks of 256.
    Q2K,
    /// 3-bit k-quant super-blocks of 256.
    Q3K,
    /// 4-bit k-quant super-blocks of 256.
    Q4K,
    /// 5-bit k-quant super-blocks of 256.
    Q5K,
    /// 6-bit k-quant super-blocks of 256.
    Q6K,
    /// 8-bit k-quant super-blocks of 256.
    Q8K,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// The type for a ggml type id, or `None` for ids this project does not know.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            _ => return None,
        })
    }

    /// The ggml type id written in a file (the inverse of [`GgmlType::from_id`]).
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
        }
    }

    /// `(elements per block, bytes per block)`.
    pub fn block_layout(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
        assert_eq!(GgmlType::Q8_0.id(), 8);
    }

    #[test]
    fn block_layouts_match_ggml() {
        assert_eq!(
            GgmlType::from_id(3).map(GgmlType::block_layout),
            Some((32, 20))
        );
        assert_eq!(
            GgmlType::from_id(8).map(GgmlType::block_layout),
            Some((32, 34))
        );
        assert_eq!(
            GgmlType::from_id(4),
            None,
            "ids 4 and 5 were removed from ggml"
        );
    }

    #[test]
    fn metadata_accessors_convert_and_refuse() {
        static BYTES: [u8; 0] = [];
        let view = ModelView {
            bytes: RSlice::from_slice(&BYTES),
            metadata: vec![
                MetadataEntry {
                    key: "a".into(),
                    value: MetaValue::Int(-1),
                },
                MetadataEntry {
                    key: "b".into(),
                    value: MetaValue::Uint(7),
                },
                MetadataEntry {
                    key: "s".into(),
                    value: MetaValue::Str("llama".into()),
                },
            ]
            .into(),
            tensors: RVec::new(),
        };
        assert_eq!(view.meta_uint("a"), None, "a negative int is not a uint");
        assert_eq!(view.meta_uint("b"), Some(7));
        assert_eq!(view.meta_float("a"), Some(-1.0));
        assert_eq!(view.meta_str("s"), Some("llama"));
        assert_eq!(view.meta_str("b"), None);
        assert!(view.meta("missing").is_none());
    }
}
