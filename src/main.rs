// mimalloc: measured in bench/run against glibc malloc, which spent ~15% of the proxy's CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    portico::cli::main_with(portico::Registry::builtin())
}
