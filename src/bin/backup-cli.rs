//! `backup-cli`: init, restore, verify, demo (and the plugin, when lightningd runs it).
fn main() -> std::process::ExitCode {
    cln_backup::cli::entry()
}
