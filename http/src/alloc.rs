//! Global allocator for servers built on tiny_http: the system allocator,
//! plus one fallback for huge zeroed allocations that the kernel's overcommit
//! heuristic refuses.
//!
//! Why it exists: tiny_http 0.12 discards an unread request body, when the
//! request is dropped, by allocating one zeroed buffer as large as the part of
//! the Content-Length not read yet. A client that aborts an upload larger than
//! RAM + swap (easy in a small VM) would make that allocation fail, and Rust
//! aborts the process when an allocation fails. Zeroed pages that are never
//! written cost nothing, so such an allocation is instead mapped with
//! `MAP_NORESERVE`, which the heuristic does not count. Every other allocation
//! goes to the system allocator unchanged.
//!
//! A library cannot install a global allocator for the program that uses it,
//! so every server binary installs this one itself, in its `main.rs`:
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: wrenn_http::ServerAllocator = wrenn_http::ServerAllocator;
//! # fn main() {}
//! ```
//!
//! Without it, a client that announces a huge body and hangs up can abort
//! the server.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Zeroed allocations at least this large may use the fallback.
const FALLBACK_MIN: usize = 64 << 20;
/// Alignment a fresh anonymous mapping always has.
const PAGE_ALIGN: usize = 4096;
/// Fallback mappings that can exist at once (one per aborted upload).
const SLOTS: usize = 64;

/// Addresses of live fallback mappings; 0 marks a free slot.
static MAPPED: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

/// The process-wide allocator; each server binary installs it with
/// `#[global_allocator]` (see the module documentation for why).
pub struct ServerAllocator;

// SAFETY: every method either forwards to `System` with the caller's
// arguments, or hands out / releases a private anonymous mapping that is
// tracked in `MAPPED` and is only ever released once.
unsafe impl GlobalAlloc for ServerAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (valid, non-zero) layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (valid, non-zero) layout.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() || layout.size() < FALLBACK_MIN || layout.align() > PAGE_ALIGN {
            return ptr;
        }
        map_noreserve(layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= FALLBACK_MIN && take_slot(ptr) {
            // SAFETY: `ptr` came from `map_noreserve` with this exact size and
            // its slot was just cleared, so it is unmapped exactly once.
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
            return;
        }
        // SAFETY: not ours, so it came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < FALLBACK_MIN || !is_mapped(ptr) {
            // SAFETY: not ours, so it came from `System` with this layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size` with the old alignment is a
        // valid layout size.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` is valid and non-zero per the realloc contract.
        let new_ptr = unsafe { self.alloc(new_layout) };
        if !new_ptr.is_null() {
            // SAFETY: both blocks are live, distinct, and at least this long.
            unsafe { ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size)) };
            // SAFETY: `ptr` is a live fallback block with this layout.
            unsafe { self.dealloc(ptr, layout) };
        }
        new_ptr
    }
}

/// Maps `size` zeroed bytes without reserving swap; null when impossible.
fn map_noreserve(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address the kernel picks
    // touches no existing memory.
    let addr = unsafe {
        libc::mmap(
            ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    for slot in &MAPPED {
        if slot
            .compare_exchange(0, addr as usize, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return addr.cast();
        }
    }
    // SAFETY: the mapping was created above and never handed out.
    unsafe { libc::munmap(addr, size) };
    ptr::null_mut()
}

fn is_mapped(ptr: *mut u8) -> bool {
    MAPPED
        .iter()
        .any(|slot| slot.load(Ordering::Acquire) == ptr as usize)
}

/// Clears the slot holding `ptr`; false if `ptr` is not a fallback mapping.
fn take_slot(ptr: *mut u8) -> bool {
    MAPPED.iter().any(|slot| {
        slot.compare_exchange(ptr as usize, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict_overcommit() -> bool {
        std::fs::read_to_string("/proc/sys/vm/overcommit_memory")
            .map(|mode| mode.trim() == "2")
            .unwrap_or(true)
    }

    #[test]
    fn zeroed_allocation_larger_than_ram_succeeds() {
        if strict_overcommit() {
            return;
        }
        // 16 TiB: far more than RAM + swap, well inside the address space.
        let mut huge = vec![0u8; 1 << 44];
        let last = huge.len() - 1;
        assert_eq!(huge[last], 0);
        huge[last] = 7;
        assert_eq!(huge[last], 7);
        assert!(is_mapped(huge.as_mut_ptr()));
        drop(huge);
        assert!(MAPPED.iter().all(|s| s.load(Ordering::Acquire) == 0));
    }

    #[test]
    fn ordinary_allocations_use_the_system_allocator() {
        let mut v = vec![1u8; 1024];
        v.resize(1 << 20, 2);
        assert!(!is_mapped(v.as_mut_ptr()));
        assert_eq!(v[(1 << 20) - 1], 2);
    }
}
