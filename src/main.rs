//! `cln-backup`: the plugin when lightningd runs it, else the same commands as `backup-cli`.
fn main() -> std::process::ExitCode {
    cln_backup::cli::entry()
}
