//! Giving memory back to the system after connections close.
//!
//! mimalloc (Portico's allocator) returns freed pages to the system only after a delay, and only
//! when the thread that freed them calls into the allocator again. A gateway whose connections
//! all closed goes quiet: without a nudge, the memory of 10,000 idle keep-alive connections
//! stays resident long after they are gone. So each closed connection makes sure one collection
//! runs a second later (at most one per second, whatever the rate of closes). Under steady load
//! it costs one `mi_collect` per second; the purge itself is what the allocator would do anyway.
//!
//! Transparent huge pages are turned off for the process: mimalloc marks its arena
//! `MADV_HUGEPAGE`, and the kernel's khugepaged then refills the 4 KiB pages a purge gave back
//! into whole 2 MiB pages, every 10 seconds — measured: RSS 30 MB a second after 10,000
//! connections closed, 68 MB twenty seconds later, and 11 MB more at start (bench/README.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long after a close the collection runs (closes in between share it).
const COLLECT_AFTER: Duration = Duration::from_secs(1);

static SCHEDULED: AtomicBool = AtomicBool::new(false);

/// Process start: no transparent huge pages (see the module comment). Before any listener.
#[allow(unsafe_code)]
pub fn init() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// A connection closed: collect freed memory soon (on this runtime's thread).
pub fn connection_closed() {
    if SCHEDULED.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        SCHEDULED.store(false, Ordering::Release);
        return;
    };
    runtime.spawn(async {
        tokio::time::sleep(COLLECT_AFTER).await;
        SCHEDULED.store(false, Ordering::Release);
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
