//! The variant's global allocator: [`CacheLineAlloc`], the system's, with every block of at
//! least [`ALIGNED_FROM`] bytes starting on a cache line.
//!
//! The kernels read activations, dequantized rows and the KV cache in 64-byte vectors; in a
//! buffer that starts 16 bytes into a line, every such load spans two lines. Where the
//! system's allocator put a buffer depended on what the process had allocated before (an A/A
//! comparison whose two workers differed only in a path's length read prefill 7.5% apart), so
//! the buffers are placed on line boundaries here, whatever came before.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks this large or larger are aligned to [`LINE`].
pub const ALIGNED_FROM: usize = 256;
/// A cache line, and the widest vector the kernels load.
pub const LINE: usize = 64;

/// The system allocator, with blocks of [`ALIGNED_FROM`] bytes or more aligned to [`LINE`].
///
/// A placed block is the system's block of [`LINE`] bytes more, the caller's part starting at
/// the first line boundary past 8 bytes in, with the system's pointer kept in the 8 bytes
/// before it. Asking the system for `posix_memalign` blocks instead (Rust's way for a large
/// alignment) cost 10.6% of peak memory: a zeroed block is then written with zeros, every page
/// of it made resident, where `calloc`'s fresh pages stay untouched until used, and a block
/// grows by a copy instead of in place.
pub struct CacheLineAlloc;

/// Whether a block of `layout` is placed on a line (large enough to hold vectors, and not
/// asking for more than a line already).
fn placed(layout: Layout) -> bool {
    layout.size() >= ALIGNED_FROM && layout.align() <= LINE
}

/// The system's layout for a placed block of `size` bytes: [`LINE`] bytes more, at the
/// system's own alignment (16), so that it is `malloc`, `calloc` and `realloc` that serve it.
fn outer(size: usize) -> Layout {
    // `size` came from a valid layout, so it is below isize::MAX - LINE.
    Layout::from_size_align(size + LINE, 16).unwrap_or(Layout::new::<[u8; LINE]>())
}

/// The caller's part of the system's block at `raw`, with `raw` recorded before it.
///
/// # Safety
/// `raw` is a live block of [`outer`] of some size, 16-aligned.
unsafe fn inner(raw: *mut u8) -> *mut u8 {
    // `raw + 8` is 8 past a 16-byte boundary, so the next line starts at most 56 bytes on,
    // and the caller's part ends within the block's LINE extra bytes.
    let at = (raw as usize + 8).next_multiple_of(LINE) - raw as usize;
    // SAFETY: `at` <= 56 < LINE, inside the block; the 8 bytes before it are too (at >= 8),
    // and aligned for a pointer (at is a multiple of 8 past a 16-byte boundary).
    unsafe {
        let ptr = raw.add(at);
        (ptr as *mut *mut u8).sub(1).write(raw);
        ptr
    }
}

/// The system's block behind a placed pointer.
///
/// # Safety
/// `ptr` came from [`inner`].
unsafe fn raw_of(ptr: *mut u8) -> *mut u8 {
    // SAFETY: `inner` wrote the system's pointer just before `ptr`.
    unsafe { (ptr as *mut *mut u8).sub(1).read() }
}

/// A block of `layout` from `system` (the system's `alloc` or `alloc_zeroed`): the caller's
/// layout as it is, or placed on a line inside a block of [`outer`].
///
/// # Safety
/// `layout` is valid with a non-zero size, and `system` allocates as `GlobalAlloc` does.
unsafe fn allocate(layout: Layout, system: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
    if !placed(layout) {
        return system(layout);
    }
    let raw = system(outer(layout.size()));
    if raw.is_null() {
        raw
    } else {
        // SAFETY: `raw` is a live block of `outer`, 16-aligned (the system's alignment).
        unsafe { inner(raw) }
    }
}

// SAFETY: a block that is not placed is the system's, with the caller's layout. A placed
// block is the system's block of `outer(size)`, of which the caller gets `size` bytes starting
// on a line (see `inner`); it is released and resized through the pointer recorded before it,
// and `placed` depends only on the size and alignment that the caller passes again.
unsafe impl GlobalAlloc for CacheLineAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's valid, non-zero layout, passed on.
        unsafe { allocate(layout, |l| System.alloc(l)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`; `inner` writes only into the bytes before the caller's part.
        unsafe { allocate(layout, |l| System.alloc_zeroed(l)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe {
            if placed(layout) {
                System.dealloc(raw_of(ptr), outer(layout.size()));
            } else {
                System.dealloc(ptr, layout);
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (placed(layout), placed(new_layout)) {
            // SAFETY: the system's block of `layout`, resized by the system.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => {
                // SAFETY: `ptr` is placed, so `raw` is the system's block of `outer(size)`;
                // after `realloc` the contents sit at the old offset of the new block, and
                // are moved (overlapping, within the block) to the new block's line.
                unsafe {
                    let raw = raw_of(ptr);
                    let offset = ptr as usize - raw as usize;
                    let grown = System.realloc(raw, outer(layout.size()), new_size + LINE);
                    if grown.is_null() {
                        return grown;
                    }
                    let at = (grown as usize + 8).next_multiple_of(LINE) - grown as usize;
                    if at != offset {
                        let keep = layout.size().min(new_size);
                        std::ptr::copy(grown.add(offset), grown.add(at), keep);
                    }
                    inner(grown)
                }
            }
            _ => {
                // Across `ALIGNED_FROM`: a new block of the new kind, the contents copied,
                // the old one released.
                // SAFETY: a valid non-zero layout; both blocks hold the smaller size and do
                // not overlap; the old block is released with the layout it has.
                unsafe {
                    let fresh = self.alloc(new_layout);
                    if !fresh.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    fresh
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_cache_line_and_small_blocks_keep_their_alignment() {
        for n in [64usize, 100, 576, 1536, 100_000] {
            let v = vec![1f32; n];
            assert_eq!(v.as_ptr() as usize % LINE, 0, "{n} floats");
        }
        assert!(!placed(Layout::new::<[u8; 16]>()));
        assert!(!placed(Layout::from_size_align(4096, 128).unwrap()));
        let wide = vec![[0u128; 8]; 100];
        assert_eq!(wide.as_ptr() as usize % 16, 0);
    }

    #[test]
    fn growing_past_the_threshold_moves_the_contents_onto_a_line() {
        let mut v: Vec<u32> = (0..10).collect();
        for i in 10..10_000 {
            v.push(i);
            if v.capacity() * 4 >= ALIGNED_FROM {
                assert_eq!(v.as_ptr() as usize % LINE, 0, "capacity {}", v.capacity());
            }
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        v.truncate(3);
        v.shrink_to_fit();
        assert_eq!(v, [0, 1, 2]);
        let mut z = vec![0u8; 300];
        assert!(z.iter().all(|&b| b == 0) && (z.as_ptr() as usize).is_multiple_of(LINE));
        z.resize(1 << 20, 7);
        assert_eq!(z.as_ptr() as usize % LINE, 0);
        assert!(z[..300].iter().all(|&b| b == 0) && z[300..].iter().all(|&b| b == 7));
    }
}
