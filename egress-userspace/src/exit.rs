//! The exit codes of `egress` (README, Exit codes). A configuration error — a policy that does
//! not parse, validate or compile, a flag value that cannot be used — exits with
//! [`CONFIG`] (78, `EX_CONFIG` of sysexits.h), distinct from a failure at run time, so that the
//! systemd unit's `RestartPreventExitStatus=` stops a restart loop on a bad policy while a
//! transient failure is still restarted.

use crate::policy::{PolicyError, compile::CompileError};

/// Success.
pub const OK: u8 = 0;
/// Any other failure (the kernel refused something, no controller answers, ...). `egress check`
/// also exits 1 when a policy is invalid, and `egress exec` with its command's status.
pub const FAILURE: u8 = 1;
/// A command line clap cannot parse (unknown flag, missing argument).
pub const USAGE: u8 = 2;
/// A configuration error: bad policy, bad flag value.
pub const CONFIG: u8 = 78;

/// A flag value that parsed but cannot be used (e.g. `--dns-listen` with two IPv4 addresses).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A command line that parsed but does not make sense (e.g. an unknown `--filter` key): exits
/// with [`USAGE`], as clap's own usage errors do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code of an error returned by a command.
pub fn code_of(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<UsageError>()) {
        return USAGE;
    }
    let config = e
        .chain()
        .any(|c| c.is::<PolicyError>() || c.is::<CompileError>() || c.is::<ConfigError>());
    if config { CONFIG } else { FAILURE }
}

/// The exit code of a command line clap refused: [`CONFIG`] for a value it rejected (a bad flag
/// value), clap's own otherwise (0 for --help and --version, [`USAGE`] for the rest).
pub fn code_of_clap(e: &clap::Error) -> u8 {
    use clap::error::ErrorKind::*;
    match e.kind() {
        InvalidValue | ValueValidation | InvalidUtf8 => CONFIG,
        _ => u8::try_from(e.exit_code()).unwrap_or(USAGE),
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn policy_and_flag_errors_are_configuration_errors() {
        let bad = crate::policy::Policy::parse("p.toml", "mode = \"nope\"\n").unwrap_err();
        let e = anyhow::Error::new(bad).context("loading the policy");
        assert_eq!(code_of(&e), CONFIG);
        let e = anyhow::Error::new(ConfigError("two IPv4 addresses".into()));
        assert_eq!(code_of(&e), CONFIG);
        let e = anyhow::Error::new(UsageError("--filter: unknown key `x`".into()));
        assert_eq!(code_of(&e), USAGE);
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("the kernel said no"));
        assert_eq!(code_of(&e.context("attaching").unwrap_err()), FAILURE);
    }

    #[test]
    fn clap_value_errors_are_configuration_errors() {
        use clap::Parser as _;
        #[derive(clap::Parser, Debug)]
        struct Args {
            #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
            n: Option<u32>,
        }
        let code = |argv: &[&str]| code_of_clap(&Args::try_parse_from(argv).unwrap_err());
        assert_eq!(code(&["x", "--n", "0"]), CONFIG);
        assert_eq!(code(&["x", "--n", "many"]), CONFIG);
        assert_eq!(code(&["x", "--bogus"]), USAGE);
        assert_eq!(code(&["x", "--help"]), OK);
    }
}
