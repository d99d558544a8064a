fn main() -> std::process::ExitCode {
    portico::cli::main_with(portico::Registry::builtin())
}
