//! The kernel's debug log (`egress run --kernel-log`): one aya-log line per decision of the
//! sock_addr hooks, read from aya-log's ring buffer and forwarded into `tracing` at debug level
//! under the target `egress_ebpf`.
//!
//! Whether the kernel writes anything is decided at load: aya-log's level (`AYA_LOG_LEVEL`, a
//! read-only global of the object) is set to debug only when asked, and to 0 otherwise. The
//! verifier sees the frozen value and drops the logging branch, so a datapath loaded without it
//! pays one load and a jump per decision, and nothing reads the (empty) ring.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;

/// The `tracing` target of the kernel's log lines.
pub const TARGET: &str = "egress_ebpf";

/// aya-log's level that enables the hooks' debug line, and the one that disables every line.
static DEBUG: u8 = aya_log::Level::Debug as u8;
static OFF: u8 = 0;

/// Sets aya-log's level in the object about to be loaded: debug when `on`, else off. (Left
/// alone, the object's default enables every level.)
pub(super) fn set_level(loader: &mut EbpfLoader<'_>, on: bool) {
    loader.override_global(aya_log::LEVEL, if on { &DEBUG } else { &OFF }, true);
}

/// Forwards aya-log's records into `tracing`, whatever level the kernel gave them: every line
/// the kernel writes is a debug line of `egress_ebpf`.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "egress_ebpf", "{}", record.args());
    }

    fn flush(&self) {}
}

/// The reader of the kernel's log ring. Keep it as long as the programs are loaded; drain it
/// with [`KernelLog::forward`] (or [`KernelLog::flush`]).
pub struct KernelLog {
    logger: EbpfLogger<Forward>,
}

impl KernelLog {
    /// Takes aya-log's ring out of the loaded object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<KernelLog, aya_log::Error> {
        Ok(KernelLog {
            logger: EbpfLogger::init_with_logger(ebpf, Forward)?,
        })
    }

    /// Forwards every record in the ring now.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Forwards records as they come, until the task is dropped.
    pub async fn forward(self) -> std::io::Result<()> {
        // SAFETY: the descriptor is the ring's, owned by the logger inside, open and the same
        // for as long as the AsyncFd holds it.
        let mut fd =
            unsafe { tokio::io::unix::AsyncFd::register(self) }.map_err(std::io::Error::from)?;
        loop {
            let mut ready = fd.readable_mut().await?;
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}

impl AsFd for KernelLog {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.logger.as_fd()
    }
}

impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> RawFd {
        self.logger.as_raw_fd()
    }
}
