//! How the server's memory is allocated, for a server whose largest buffers are short-lived:
//! every step allocates and frees vocabulary-sized logits (rows x 50257 floats, 0.2-13 MB)
//! and matmul outputs, and a long prompt's step allocates and frees tens of megabytes per
//! layer (activations, the MLP's 4x-wide hidden, attention scores).
//!
//! Two parts:
//! - glibc serves an allocation of at least `M_MMAP_THRESHOLD` with its own `mmap`, returned
//!   to the system on free, but by default it raises that threshold to the size of each such
//!   block freed (up to 32 MiB): after the first big free, these buffers come from the heap,
//!   where they fragment it and the resident floor creeps up with each burst (the soak test
//!   measured +9 to +22 % in a minute, no leak). A fixed threshold keeps them out of the heap
//!   (floor growth 0.7 % in the same soak).
//! - A fresh mapping is filled by page faults, one per 4 KiB page touched: on a 512-token
//!   prefill of GPT-2 medium they were 32 % of the CPU time (`perf`, AMD EPYC Zen 3).
//!   [`HugePageBuffers`], the server binary's global allocator, gives buffers of 1 MiB and
//!   more their own 2 MiB-aligned mapping marked for transparent huge pages (`MADV_HUGEPAGE`:
//!   the kernel's `madvise` mode, its common default), so a fault fills 2 MiB at once; they
//!   are unmapped on free, as before, so the resident floor does not move. Where the kernel
//!   has huge pages off, the mapping is an ordinary one.
//!
//! - Fixing the threshold also turns off glibc's matching rise of `M_TRIM_THRESHOLD`, which
//!   then stays at 128 KiB: every step's free of its heap-sized buffers (a row's logits,
//!   sampling candidates) gave the top of the heap back with `madvise`/`munmap` and the next
//!   step faulted it in again, page by page. Under the soak's load on the tiny fixture that
//!   was 27 % of the server's CPU (`perf`, AMD EPYC Zen 4); a 4 MiB trim threshold keeps that
//!   much free heap top resident: 31k -> 41k tokens generated in 30 s, steps p50 6.7 -> 5.1 ms.
//!   (32 MiB was no faster and let the soak's resident floor climb 7 %; 4 MiB: 2 %.)
//!
//! Measured on that prefill (f32, 512 tokens, 4 runs each, two alternations): 4.8-6.4 s
//! before, 3.8-5.0 s with huge-page buffers; echo scoring of 512 tokens 6.4-7.3 s -> 5.1-5.9 s;
//! peak RSS +0.8 %; the soak's resident floor still flat (0.0 % growth). Hand-written rather
//! than a general-purpose allocator crate: mimalloc was about as fast on the prefill, but it
//! keeps freed memory for reuse, the resident-floor creep the soak test bounds; this changes
//! only the large buffers and still returns them to the system at once.

use std::alloc::{GlobalAlloc, Layout, System};

/// Fixed threshold: buffers of 256 KiB and more get their own mapping.
const MMAP_THRESHOLD: usize = 256 * 1024;

/// Free memory at the top of the heap kept for reuse rather than given back at each free.
const TRIM_THRESHOLD: usize = 4 << 20;

/// Buffers of at least this size get a huge-page mapping of their own.
pub const HUGE_PAGE_BUFFER: usize = 1 << 20;

/// The size of a transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Applies the glibc tuning; a no-op off glibc.
pub fn keep_large_buffers_off_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; any value is valid (it returns 0
        // when it refuses one, which changes nothing).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
        }
    }
}

/// The system allocator, with buffers of [`HUGE_PAGE_BUFFER`] and more on huge pages
/// (Linux; elsewhere the system allocator unchanged).
pub struct HugePageBuffers;

impl HugePageBuffers {
    fn is_huge(layout: &Layout) -> bool {
        cfg!(target_os = "linux")
            && layout.size() >= HUGE_PAGE_BUFFER
            && layout.align() <= HUGE_PAGE
    }
}

// SAFETY: every block comes from `System` or from `map` and goes back the same way: the
// choice depends only on the layout, which the caller passes unchanged to `dealloc`.
unsafe impl GlobalAlloc for HugePageBuffers {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::is_huge(&layout) {
            huge::map(layout.size())
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::is_huge(&layout) {
            // A fresh anonymous mapping reads as zeros.
            huge::map(layout.size())
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::is_huge(&layout) {
            // SAFETY: `ptr` came from `map` with this size (the layout decides, see above).
            unsafe { huge::unmap(ptr, layout.size()) }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size` with this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !Self::is_huge(&layout) && !Self::is_huge(&new_layout) {
            // SAFETY: the caller's contract, passed on.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Into, out of or between huge mappings: move (rare: tensors do not grow).
        // SAFETY: `new_layout` is valid (above); the copy stays within both blocks.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(target_os = "linux")]
mod huge {
    use super::HUGE_PAGE;

    /// A fresh mapping of `size` bytes (rounded up to whole huge pages), aligned to a huge
    /// page and marked for them; null when the system has no memory for it.
    pub fn map(size: usize) -> *mut u8 {
        let len = size.next_multiple_of(HUGE_PAGE);
        // SAFETY: an anonymous private mapping touches no existing memory; the trimming
        // below unmaps only parts of this mapping.
        unsafe {
            // One huge page more than needed, so that an aligned start lies inside.
            let raw = libc::mmap(
                std::ptr::null_mut(),
                len + HUGE_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if raw == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            let start = (raw as usize).next_multiple_of(HUGE_PAGE);
            let head = start - raw as usize;
            if head > 0 {
                libc::munmap(raw, head);
            }
            let tail = HUGE_PAGE - head;
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
            // Advice only: refused (huge pages off), the mapping is an ordinary one.
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            start as *mut u8
        }
    }

    /// Unmaps what `map(size)` returned.
    ///
    /// # Safety
    /// `ptr` came from `map(size)` and is not used after.
    pub unsafe fn unmap(ptr: *mut u8, size: usize) {
        // SAFETY: the caller's contract: the whole mapping `map` made, once.
        unsafe {
            libc::munmap(ptr.cast(), size.next_multiple_of(HUGE_PAGE));
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod huge {
    pub fn map(_: usize) -> *mut u8 {
        unreachable!("huge-page buffers are Linux only (HugePageBuffers::is_huge)")
    }

    pub unsafe fn unmap(_: *mut u8, _: usize) {
        unreachable!("huge-page buffers are Linux only (HugePageBuffers::is_huge)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_buffers_are_aligned_zeroed_writable_and_resizable() {
        let a = HugePageBuffers;
        for size in [HUGE_PAGE_BUFFER, 3 << 20, HUGE_PAGE_BUFFER - 8, 4096] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: a non-zero layout; every access stays within the block, which is
            // freed with the layout it was made with.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                if size >= HUGE_PAGE_BUFFER {
                    assert_eq!(p as usize % HUGE_PAGE, 0, "{size}");
                }
                let s = std::slice::from_raw_parts_mut(p, size);
                assert!(s.iter().all(|&b| b == 0));
                s.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
                // grow across the threshold and back: the contents move with it
                let q = a.realloc(p, layout, 5 << 20);
                let s = std::slice::from_raw_parts(q, size);
                assert!(s.iter().enumerate().all(|(i, &b)| b == i as u8));
                let grown = Layout::from_size_align(5 << 20, 64).unwrap();
                let r = a.realloc(q, grown, 1000);
                let s = std::slice::from_raw_parts(r, 1000.min(size));
                assert!(s.iter().enumerate().all(|(i, &b)| b == i as u8));
                a.dealloc(r, Layout::from_size_align(1000, 64).unwrap());
            }
        }
    }
}
