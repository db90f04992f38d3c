//! `egress`: the command line of the egress firewall (see `egress::cli`).

fn main() -> std::process::ExitCode {
    egress::cli::main()
}
