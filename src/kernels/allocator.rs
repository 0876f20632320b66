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
//! peak RSS +0.8 %; the soak's resident floor still flat (0.0 % growth).
//!
//! Hand-written rather than a general-purpose allocator crate: mimalloc was about as fast on
//! the prefill, but it keeps freed memory for reuse without bound, the resident-floor creep the
//! soak test bounds; this changes only the large buffers, keeps a bounded few of them for a
//! moment, and returns the rest to the system at once:
//!
//! - A freed huge-page buffer is kept, briefly, for the next allocation of its size (every
//!   layer of a prompt allocates the same activations its predecessor freed): reused, its
//!   pages are neither faulted nor zeroed again. A fresh buffer's faults, the kernel zeroing
//!   each page, were 14-19 % of a 512-token bf16 prefill of GPT-Neo-125M's shape (`perf`, Intel
//!   Xeon with AMX, 2 cores). What is kept is bounded in bytes ([`SPARE_BYTES`]) and in time
//!   ([`SPARE_TTL`]: unmapped at the next allocation or free after that), so the resident
//!   floor of a loaded server does not creep (the soak's: +0.5-1.0 %), and a burst's buffers
//!   go back soon after it. 512-token prefills 10-30 % faster (`docs/benchmarks.md`).

use std::alloc::{GlobalAlloc, Layout, System};

/// Fixed threshold: buffers of 256 KiB and more get their own mapping.
const MMAP_THRESHOLD: usize = 256 * 1024;

/// Free memory at the top of the heap kept for reuse rather than given back at each free.
const TRIM_THRESHOLD: usize = 4 << 20;

/// Buffers of at least this size get a huge-page mapping of their own.
pub const HUGE_PAGE_BUFFER: usize = 1 << 20;

/// The size of a transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Freed huge-page buffers kept for reuse, in bytes at most (the largest single buffer kept
/// is a quarter of it: rarer giants, such as an inspection's logits, go back at once).
pub const SPARE_BYTES: usize = 64 << 20;

/// How long a freed buffer is kept for reuse.
pub const SPARE_TTL: std::time::Duration = std::time::Duration::from_millis(250);

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
            huge::take(layout.size()).unwrap_or_else(|| huge::map(layout.size()))
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::is_huge(&layout) {
            if let Some(p) = huge::take(layout.size()) {
                // SAFETY: a kept mapping of at least this size, owned by nobody else now.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                return p;
            }
            // A fresh anonymous mapping reads as zeros.
            huge::map(layout.size())
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::is_huge(&layout) {
            // SAFETY: `ptr` came from `map` (or `take`) with this size (the layout decides,
            // see above).
            unsafe { huge::free(ptr, layout.size()) }
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
    use std::sync::Mutex;
    use std::time::Instant;

    use super::{HUGE_PAGE, SPARE_BYTES, SPARE_TTL};

    /// A freed mapping kept for reuse.
    #[derive(Clone, Copy)]
    struct Spare {
        start: usize,
        len: usize,
        freed: Instant,
    }

    const SLOTS: usize = 32;

    /// The kept mappings. A fixed array: the allocator must not allocate under its own lock.
    static SPARES: Mutex<[Option<Spare>; SLOTS]> = Mutex::new([None; SLOTS]);

    /// Mappings taken out of the spares to unmap once the lock is released.
    struct Doomed {
        list: [(usize, usize); SLOTS],
        count: usize,
    }

    impl Doomed {
        fn new() -> Self {
            Doomed {
                list: [(0, 0); SLOTS],
                count: 0,
            }
        }

        fn push(&mut self, s: Spare) {
            self.list[self.count] = (s.start, s.len);
            self.count += 1;
        }

        fn unmap(&self) {
            for &(start, len) in &self.list[..self.count] {
                // SAFETY: a whole mapping `map` made, taken out of the spares: nobody holds it.
                unsafe { libc::munmap(start as *mut libc::c_void, len) };
            }
        }
    }

    /// Takes out the spares older than the time they may be kept.
    fn expire(spares: &mut [Option<Spare>; SLOTS], now: Instant, doomed: &mut Doomed) {
        for slot in spares.iter_mut() {
            if slot.is_some_and(|s| now.duration_since(s.freed) >= SPARE_TTL) {
                doomed.push(slot.take().expect("checked"));
            }
        }
    }

    /// A kept mapping for `size` bytes (the same whole huge pages), if one is.
    pub fn take(size: usize) -> Option<*mut u8> {
        let len = size.next_multiple_of(HUGE_PAGE);
        let mut doomed = Doomed::new();
        let found = {
            let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
            expire(&mut spares, Instant::now(), &mut doomed);
            // the most recently freed: the likeliest to be in a cache still
            let best = (0..SLOTS)
                .filter(|&i| spares[i].is_some_and(|s| s.len == len))
                .max_by_key(|&i| spares[i].map(|s| s.freed));
            best.and_then(|i| spares[i].take())
        };
        doomed.unmap();
        found.map(|s| s.start as *mut u8)
    }

    /// Frees what `map(size)` or `take(size)` returned: kept for reuse while there is room,
    /// the oldest kept going back first, else unmapped.
    ///
    /// # Safety
    /// `ptr` came from `map(size)` or `take(size)` and is not used after.
    pub unsafe fn free(ptr: *mut u8, size: usize) {
        let len = size.next_multiple_of(HUGE_PAGE);
        let mut doomed = Doomed::new();
        if len <= SPARE_BYTES / 4 {
            let now = Instant::now();
            let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
            expire(&mut spares, now, &mut doomed);
            let kept = |spares: &[Option<Spare>; SLOTS]| {
                spares.iter().flatten().map(|s| s.len).sum::<usize>()
            };
            loop {
                let room = kept(&spares) + len <= SPARE_BYTES;
                let free_slot = spares.iter().position(Option::is_none);
                if let (true, Some(i)) = (room, free_slot) {
                    spares[i] = Some(Spare {
                        start: ptr as usize,
                        len,
                        freed: now,
                    });
                    break;
                }
                let oldest = (0..SLOTS)
                    .filter(|&i| spares[i].is_some())
                    .min_by_key(|&i| spares[i].map(|s| s.freed))
                    .expect("no room, so something is kept");
                doomed.push(spares[oldest].take().expect("found"));
            }
        } else {
            doomed.push(Spare {
                start: ptr as usize,
                len,
                freed: Instant::now(),
            });
        }
        doomed.unmap();
    }

    /// Bytes kept for reuse now.
    #[cfg(test)]
    pub fn kept() -> usize {
        let spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
        spares.iter().flatten().map(|s| s.len).sum()
    }

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
}

#[cfg(not(target_os = "linux"))]
mod huge {
    pub fn map(_: usize) -> *mut u8 {
        unreachable!("huge-page buffers are Linux only (HugePageBuffers::is_huge)")
    }

    pub fn take(_: usize) -> Option<*mut u8> {
        unreachable!("huge-page buffers are Linux only (HugePageBuffers::is_huge)")
    }

    pub unsafe fn free(_: *mut u8, _: usize) {
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

    #[cfg(target_os = "linux")]
    #[test]
    fn a_freed_buffer_is_reused_zeroed_where_asked_and_the_kept_bytes_are_bounded() {
        let a = HugePageBuffers;
        // sizes no other test uses, so that the shared spares cannot hand them elsewhere
        let layout = Layout::from_size_align((7 << 20) + 24, 64).unwrap();
        // SAFETY: a non-zero layout; each block is used within its size and freed once with
        // the layout it was made with.
        unsafe {
            let p = a.alloc(layout);
            std::slice::from_raw_parts_mut(p, layout.size()).fill(0xAB);
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert_eq!(q, p, "the freed mapping comes back");
            let s = std::slice::from_raw_parts_mut(q, layout.size());
            assert!(s.iter().all(|&b| b == 0), "zeroed as asked");
            a.dealloc(q, layout);
            assert_eq!(huge::take(layout.size()), Some(p), "kept for reuse");
            huge::free(p, layout.size());
            // more than may be kept: the oldest go back, and never more than the bound is kept
            let big = Layout::from_size_align((13 << 20) + 8, 64).unwrap();
            let blocks: Vec<*mut u8> = (0..8).map(|_| a.alloc(big)).collect();
            for &b in &blocks {
                a.dealloc(b, big);
                assert!(huge::kept() <= SPARE_BYTES);
            }
            // a giant is never kept
            let giant = Layout::from_size_align(SPARE_BYTES / 2, 64).unwrap();
            let g = a.alloc(giant);
            a.dealloc(g, giant);
            assert_eq!(huge::take(giant.size()), None);
        }
    }
}
