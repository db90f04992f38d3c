//! Signals for `egress exec`'s command: forwarded once, never twice.

use rustix::process::{Pid, Signal, getpgrp, kill_process};

/// SIGINT and SIGQUIT typed at a terminal already reach the whole foreground process group, the
/// command included: forward them only when egress is not in the terminal's foreground group
/// (someone sent them to egress alone), so a Ctrl-C is never delivered twice.
pub(super) fn forward_from_terminal(pid: Option<u32>, sig: Signal) {
    let foreground = rustix::termios::tcgetpgrp(std::io::stdin()).is_ok_and(|fg| fg == getpgrp());
    if !foreground {
        forward(pid, sig);
    }
}

pub(super) fn forward(pid: Option<u32>, sig: Signal) {
    if let Some(pid) = pid.and_then(|p| Pid::from_raw(p as i32)) {
        let _ = kill_process(pid, sig);
    }
}
