//! The process's allocator, for the binaries that choose mimalloc (`elbo`, the benchmark
//! workloads): how long it keeps freed memory.

/// mimalloc's `mi_option_purge_delay` (the 16th entry of `mi_option_e` in mimalloc.h, v3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to hand freed pages back to the system.
///
/// By default mimalloc purges memory freed for longer than a second (`MADV_DONTNEED`). A step
/// longer than that (DDPM's CIFAR-10 U-Net takes about 1.4 s on two cores) frees its
/// activations and parameter-sized buffers, mimalloc purges them, and the next step takes them
/// back as fresh pages that the kernel zeroes: 11% of that step in `clear_page_erms`. Kept, the
/// pages are reused, as PyTorch's caching allocator reuses its blocks. The process's peak
/// resident memory does not change; memory stays at that peak until it exits.
///
/// Call it once, first thing in `main`, where mimalloc is the global allocator (anywhere else
/// it only tunes an allocator nobody uses).
pub fn keep_freed_memory() {
    // SAFETY: sets one integer option; mimalloc documents -1 as "no purging at all".
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}
