// mimalloc: measured in bench/run against glibc malloc, which spent ~15% of the proxy's CPU.
// The `system-allocator` feature leaves it out, for heap profilers that only see malloc
// (valgrind's massif, heaptrack): see bench/README.md.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOC: portico::memory::Allocator = portico::memory::Allocator;

fn main() -> std::process::ExitCode {
    portico::cli::main_with(portico::Registry::builtin())
}
