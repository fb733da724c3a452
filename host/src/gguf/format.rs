//! The numbers of the GGUF format that the reader ([`super::Model`]) and the writer
//! ([`super::write`]) share: the magic, the versions, the alignment and the metadata value
//! types. The tensor type ids are plugin-api's [`plugin_api::GgmlType`] (`from_id`, `id`),
//! which variants read too.

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// The versions the reader accepts; the writer writes the last.
pub const VERSIONS: std::ops::RangeInclusive<u32> = 2..=3;

/// The alignment of tensor data when `general.alignment` does not say otherwise, and the one the
/// writer uses.
pub const ALIGNMENT: u64 = 32;

/// The type of a metadata value, by its id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 32-bit integer.
    I32,
    /// 32-bit float.
    F32,
    /// One byte, 0 or 1.
    Bool,
    /// A length-prefixed UTF-8 string.
    Str,
    /// An element type, a count and the elements.
    Array,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
}

impl ValueType {
    /// Every type, in the order of their ids (0 to 12).
    const ALL: [ValueType; 13] = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::Str,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ];

    /// The type with id `id`, if the format has one.
    pub fn from_id(id: u32) -> Option<ValueType> {
        Self::ALL.get(id as usize).copied()
    }

    /// The id written in the file.
    pub fn id(self) -> u32 {
        Self::ALL
            .iter()
            .position(|&t| t == self)
            .expect("every type is in ALL") as u32
    }

    /// The size in bytes of one value of a fixed-width type (`None` for strings and arrays).
    pub fn width(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            Str | Array => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_type_ids_are_the_formats() {
        for (id, ty) in [
            (0, ValueType::U8),
            (4, ValueType::U32),
            (7, ValueType::Bool),
            (8, ValueType::Str),
            (9, ValueType::Array),
            (10, ValueType::U64),
            (12, ValueType::F64),
        ] {
            assert_eq!(ValueType::from_id(id), Some(ty));
            assert_eq!(ty.id(), id);
        }
        assert_eq!(ValueType::from_id(13), None);
        assert_eq!(ValueType::F32.width(), Some(4));
        assert_eq!(ValueType::Str.width(), None);
    }
}
