//! Giving memory back to the system after connections close.
//!
//! mimalloc (Portico's allocator) returns freed pages to the system only after a delay, and only
//! when the thread that freed them calls into the allocator again. A gateway whose connections
//! all closed goes quiet: without a nudge, the memory of 10,000 idle keep-alive connections
//! stays resident long after they are gone. So each closed connection makes sure one collection
//! runs a second later (at most one per second, whatever the rate of closes). Under steady load
//! it costs one `mi_collect` per second; the purge itself is what the allocator would do anyway.
//!
//! A second collection runs once the timers of those connections' requests have fired:
//! Pingora's timeouts (upstream connect, read and write, body reads) keep a small timer object
//! until its deadline passes, even when the request finished long before, and those objects,
//! scattered over many pages, kept ~3.5 MB of 10,000 connections' pages resident until the next
//! collection — which an idle gateway never ran. Measured: 13.1 MB before 10,000 connections,
//! 18.2 MB after for good without it, 14.8 MB once the timers fired and a collection ran.
//!
//! Transparent huge pages are turned off for the process: mimalloc marks its arena
//! `MADV_HUGEPAGE`, and the kernel's khugepaged then refills the 4 KiB pages a purge gave back
//! into whole 2 MiB pages, every 10 seconds — measured: RSS 30 MB a second after 10,000
//! connections closed, 68 MB twenty seconds later, and 11 MB more at start (bench/README.md).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long after a close the collection runs (closes in between share it).
const COLLECT_AFTER: Duration = Duration::from_secs(1);
/// The late collection waits at most this long (a config may set longer timeouts).
const MAX_TIMER_HORIZON: Duration = Duration::from_secs(3600);

static SCHEDULED: AtomicBool = AtomicBool::new(false);
static LATE_SCHEDULED: AtomicBool = AtomicBool::new(false);
/// The longest timeout a request may register (milliseconds): see [`set_timer_horizon`].
static TIMER_HORIZON_MS: AtomicU64 = AtomicU64::new(60_000);

/// The longest timeout the live config gives a request (set at start and by each reload):
/// the late collection runs that long (plus a margin) after connections close.
pub fn set_timer_horizon(longest: Duration) {
    let ms = longest.min(MAX_TIMER_HORIZON).as_millis();
    TIMER_HORIZON_MS.store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Process start: no transparent huge pages (see the module comment). Before any listener.
#[allow(unsafe_code)]
pub fn init() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// A connection closed: collect freed memory soon, and again once its requests' timers have
/// fired (on this runtime's thread, whose heap holds them).
pub fn connection_closed() {
    schedule_collection(&SCHEDULED, COLLECT_AFTER);
    let horizon = Duration::from_millis(TIMER_HORIZON_MS.load(Ordering::Relaxed));
    // Timers are kept in 10 ms buckets and the closes of a burst spread over a moment: margin.
    schedule_collection(&LATE_SCHEDULED, horizon + 2 * COLLECT_AFTER);
}

/// One collection `after` from now, unless one is already pending under `flag`.
fn schedule_collection(flag: &'static AtomicBool, after: Duration) {
    if flag.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        flag.store(false, Ordering::Release);
        return;
    };
    runtime.spawn(async move {
        tokio::time::sleep(after).await;
        flag.store(false, Ordering::Release);
        collect();
    });
}

/// Return the freed pages of this thread's heap, and every purge already due, to the system.
/// Harmless when mimalloc is not the global allocator (its heaps are then empty).
#[allow(unsafe_code)]
pub fn collect() {
    // SAFETY: mi_collect only walks mimalloc's own heap structures; it may be called from any
    // thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Portico's global allocator: mimalloc, asked the cheapest way a layout allows.
///
/// The `mimalloc` crate sends every allocation through `mi_malloc_aligned`, whose checks cost
/// ~45 instructions more than `mi_malloc`'s fast path; a proxied request allocates ~100 times
/// (callgrind, bench/README.md). Every mimalloc block is aligned to at least a machine word, so
/// layouts that ask no more than that take the plain calls; larger alignments keep the aligned
/// ones. Freeing is the same call for both.
pub struct Allocator;

/// The alignment every `mi_malloc` block has (mimalloc's size classes are whole words).
const WORD: usize = std::mem::size_of::<usize>();

#[allow(unsafe_code)]
// SAFETY: each method forwards to the mimalloc call for the same contract (size, alignment,
// zeroing), and a block is always freed or resized by mimalloc, which allocated it.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= WORD {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= WORD {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= WORD {
            mi::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Allocator;
    use std::alloc::{GlobalAlloc, Layout};

    #[test]
    #[allow(unsafe_code)]
    fn every_layout_gets_its_alignment_its_zeroes_and_its_bytes_across_realloc() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 7, 8, 24, 100, 4096, 70_000] {
                let layout = Layout::from_size_align(size.max(align), align).unwrap();
                // SAFETY: non-zero sizes; every block is freed with the layout it has.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null() && (p as usize).is_multiple_of(align), "alloc {layout:?}");
                    p.write_bytes(0xA5, layout.size());
                    let grown = a.realloc(p, layout, layout.size() * 3);
                    assert!((grown as usize).is_multiple_of(align), "realloc {layout:?}");
                    assert!(
                        (0..layout.size()).all(|i| *grown.add(i) == 0xA5),
                        "realloc kept {layout:?}"
                    );
                    a.dealloc(grown, Layout::from_size_align(layout.size() * 3, align).unwrap());

                    let z = a.alloc_zeroed(layout);
                    assert!((z as usize).is_multiple_of(align), "alloc_zeroed {layout:?}");
                    assert!((0..layout.size()).all(|i| *z.add(i) == 0), "zeroed {layout:?}");
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
