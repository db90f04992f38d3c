//! What the webhook sends with each request besides the body: headers given on the command line
//! (`--webhook-header`) or in a file (`--webhook-header-file`, for credentials), and the
//! HMAC-SHA256 signature of the body (`--webhook-secret-file`). Secrets come from files only,
//! never from the command line (which every user of the host can read in /proc), and a file
//! that holds one must be private to its owner.

use std::path::Path;

use anyhow::{Context as _, bail};
use hmac::{Hmac, Mac as _};
use reqwest::header::{HeaderName, HeaderValue};
use sha2::Sha256;

/// The signature header: `sha256=` and the lowercase hex HMAC-SHA256 of the body.
pub const SIGNATURE_HEADER: &str = "x-egress-signature";

/// One header to send, as `Name: value`.
pub type Header = (HeaderName, HeaderValue);

/// Parses `Name: value` (the form of `--webhook-header` and of a header file's lines).
pub fn parse_header(text: &str) -> Result<Header, String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not a header: expected `Name: value`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("`{}` is not a valid header name", name.trim()))?;
    let mut value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of header `{name}` has characters a header cannot hold"))?;
    // Never printed by the HTTP client's debug output.
    value.set_sensitive(true);
    Ok((name, value))
}

/// Reads a file that holds a secret, refusing one that its group or others can read or write:
/// a leaked webhook secret lets anyone forge alerts, or silence them.
fn read_private(path: &Path, what: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("the {what} {} is not a regular file", path.display());
    }
    if meta.mode() & 0o077 != 0 {
        bail!(
            "the {what} {} is accessible to its group or others (mode {:o}): `chmod 600` it (in Kubernetes, mount the Secret with defaultMode: 0400)",
            path.display(),
            meta.mode() & 0o777
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// The HMAC key in `path`: its content, without the line ending an editor or `echo` adds.
pub fn read_secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = read_private(path, "webhook secret file")?;
    let key = text.strip_suffix('\n').unwrap_or(&text);
    let key = key.strip_suffix('\r').unwrap_or(key);
    if key.is_empty() {
        bail!("the webhook secret file {} is empty", path.display());
    }
    Ok(key.as_bytes().to_vec())
}

/// The webhook's URL in `path` (`--webhook-url-file`): its one line, trimmed.
pub fn read_url_file(path: &Path) -> anyhow::Result<String> {
    let text = read_private(path, "webhook URL file")?;
    let url = text.trim();
    let parsed = reqwest::Url::parse(url)
        .with_context(|| format!("the webhook URL file {} holds no URL", path.display()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!(
            "the webhook URL file {} holds a {} URL: http or https expected",
            path.display(),
            parsed.scheme()
        );
    }
    Ok(url.to_string())
}

/// The headers in `path`, one `Name: value` per line (blank lines and lines starting with `#`
/// skipped).
pub fn read_header_file(path: &Path) -> anyhow::Result<Vec<Header>> {
    let text = read_private(path, "webhook header file")?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| {
            parse_header(l).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// The value of the signature header for `body` under `key`: `sha256=<hex>`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn temp(name: &str, content: &str, mode: u32) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("egress-webhook-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn headers_parse_as_name_colon_value() {
        let (n, v) = parse_header("Authorization: Bearer abc:def").unwrap();
        assert_eq!(n.as_str(), "authorization");
        assert_eq!(v.to_str().unwrap(), "Bearer abc:def");
        assert!(v.is_sensitive());
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
        assert!(parse_header("X-Ok: line\nbreak").is_err());
    }

    /// RFC 4231, test case 2.
    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secret_files_must_be_private_and_lose_their_line_ending() {
        let ok = temp("secret-ok", "s3cret\n", 0o600);
        assert_eq!(read_secret_file(&ok).unwrap(), b"s3cret");
        let open = temp("secret-open", "s3cret\n", 0o644);
        let e = format!("{:#}", read_secret_file(&open).unwrap_err());
        assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
        let empty = temp("secret-empty", "\n", 0o600);
        assert!(read_secret_file(&empty).is_err());
        let missing = ok.with_file_name("nope");
        let e = format!("{:#}", read_secret_file(&missing).unwrap_err());
        assert!(
            e.contains("webhook secret file") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn url_files_hold_one_http_url() {
        let ok = temp("url", "https://hooks.slack.test/services/T/B/x\n", 0o600);
        assert_eq!(
            read_url_file(&ok).unwrap(),
            "https://hooks.slack.test/services/T/B/x"
        );
        let bad = temp("url-bad", "not a url\n", 0o600);
        assert!(read_url_file(&bad).is_err());
        let ftp = temp("url-ftp", "ftp://x/\n", 0o600);
        assert!(read_url_file(&ftp).is_err());
        let open = temp("url-open", "https://x/\n", 0o640);
        assert!(read_url_file(&open).is_err());
    }

    #[test]
    fn header_files_hold_one_header_a_line_and_name_the_bad_line() {
        let f = temp(
            "headers",
            "# credentials\nAuthorization: Bearer t0k\n\nX-Scope-OrgID: team-a\n",
            0o400,
        );
        let h = read_header_file(&f).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].1.to_str().unwrap(), "team-a");
        let bad = temp("headers-bad", "X-A: 1\nnot a header\n", 0o600);
        let e = format!("{:#}", read_header_file(&bad).unwrap_err());
        assert!(e.contains(":2:"), "{e}");
    }
}
