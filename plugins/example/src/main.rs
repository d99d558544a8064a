//! Portico with the example plugin built in: the same command line as `portico`.

fn main() -> std::process::ExitCode {
    let mut registry = portico::Registry::builtin();
    portico_plugin_example::register(&mut registry);
    portico::cli::main_with(registry)
}
