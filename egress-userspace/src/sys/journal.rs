//! Whether logs should go to the systemd journal: a service's stderr connected to the journal
//! carries `$JOURNAL_STREAM` (`device:inode` of that stream, see `systemd.exec(5)`). Only when
//! stderr still is that stream (not redirected by a shell in between) does egress log natively
//! to the journal, with a priority per record, so that `journalctl -p warning -u egress` works.

use std::os::fd::AsFd as _;

/// True when `$JOURNAL_STREAM` names the stream stderr is.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    names_stream(&value.to_string_lossy(), st.st_dev, st.st_ino)
}

/// `value` is `device:inode` (decimal) of the stream with device `dev` and inode `ino`.
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_names_device_and_inode() {
        assert!(names_stream("8:12345", 8, 12345));
        assert!(!names_stream("8:12345", 8, 12346));
        assert!(!names_stream("9:12345", 8, 12345));
        assert!(!names_stream("", 8, 12345));
        assert!(!names_stream("8-12345", 8, 12345));
    }
}
