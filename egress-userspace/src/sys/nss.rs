//! User names through NSS (`getpwuid_r`): what alerts call a uid. The system's own lookup, so
//! LDAP or systemd-homed users are named as `id` names them.

use std::ffi::CStr;

/// The name of user `uid`, or None when NSS knows no such user (or the lookup failed).
pub fn user_name(uid: u32) -> Option<String> {
    // SAFETY: an all-zero `passwd` is a valid value to be filled (pointers null).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `pwd`, `buf` and `result` outlive the call, and `buf.len()` is its size.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        // The entry does not fit: a bigger buffer (bounded, in case NSS keeps asking).
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success `pw_name` points to a NUL-terminated string inside `buf`.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_named_and_an_unknown_uid_is_not() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(user_name(4_000_000_000), None);
    }
}
