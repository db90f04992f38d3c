//! `hosts = [...]` of a `[[service]]` or `[[block]]`: [`HostPattern`], a validated name pattern,
//! and the rules of a DNS name that patterns, `egress explain NAME` and the matcher share.
//!
//! A pattern is one of:
//! - `example.com`: that name only;
//! - `*.example.com`: exactly one label before `example.com` (`a.example.com`, not
//!   `a.b.example.com`, not `example.com`);
//! - `**.example.com`: one or more labels before it (`a.example.com`, `a.b.example.com`), never
//!   the apex `example.com` itself, which is written out when it is meant. Cilium's `**.` reads
//!   the same way (cilium#43420); AWS's `.example.com` also covers the apex, which is why ours
//!   says so with a second pattern instead.
//!
//! A wildcard is a whole leftmost label: `*foo.example.com`, `a.*.example.com` and a bare `*` are
//! refused, so that a pattern is a suffix of labels and matching compares labels, never
//! substrings (a rule for `google.com` must not cover `evilgoogle.com`).
//!
//! Names are ASCII and compared case-insensitively (stored lowercase); one trailing dot is
//! ignored. Labels are 1 to 63 characters of letters, digits, `-` (not first or last) and `_`
//! (service labels such as `_acme-challenge` are real names); a name is at most 253 characters
//! without its trailing dot (RFC 1035's 255 octets on the wire). A last label of digits only is
//! an address, not a name (RFC 3696 §2): such text belongs in `destinations`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, de};

/// Longest name, in characters, without the trailing dot (255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label, in octets.
pub const MAX_LABEL_LEN: usize = 63;

/// What a pattern's leftmost part stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wildcard {
    /// No wildcard: the name itself.
    Exact,
    /// `*.`: exactly one label.
    OneLabel,
    /// `**.`: one or more labels.
    AnyLabels,
}

/// A validated `hosts` pattern: a wildcard and the name it applies to (lowercase, no trailing
/// dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPattern {
    wildcard: Wildcard,
    /// The exact name, or the suffix after `*.` / `**.`.
    suffix: String,
}

impl HostPattern {
    pub fn wildcard(&self) -> Wildcard {
        self.wildcard
    }

    /// The exact name, or the domain after the wildcard.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// The suffix's labels, rightmost first (the order the matcher's trie is walked in).
    pub fn labels_reversed(&self) -> impl Iterator<Item = &str> {
        self.suffix.rsplit('.')
    }

    /// Whether the pattern covers `name` (any case, trailing dot or not). The reference the
    /// matcher's index is tested against; the index is what serves lookups.
    pub fn covers(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        match self.wildcard {
            Wildcard::Exact => name == self.suffix,
            Wildcard::OneLabel | Wildcard::AnyLabels => {
                let Some(head) = name
                    .strip_suffix(self.suffix.as_str())
                    .and_then(|h| h.strip_suffix('.'))
                else {
                    return false;
                };
                !head.is_empty()
                    && !head.split('.').any(str::is_empty)
                    && (self.wildcard == Wildcard::AnyLabels || !head.contains('.'))
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.wildcard {
            Wildcard::Exact => "",
            Wildcard::OneLabel => "*.",
            Wildcard::AnyLabels => "**.",
        };
        write!(f, "{prefix}{}", self.suffix)
    }
}

const EXPECTED: &str = "expected a name such as \"api.example.com\", \"*.example.com\" (one label) or \"**.example.com\" (one or more labels)";

impl FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<HostPattern, String> {
        if matches!(s, "*" | "**" | "*." | "**.") {
            return Err(format!(
                "`{s}` covers every name: a wildcard needs a domain after it, {EXPECTED}"
            ));
        }
        let (wildcard, rest) = if let Some(rest) = s.strip_prefix("**.") {
            (Wildcard::AnyLabels, rest)
        } else if let Some(rest) = s.strip_prefix("*.") {
            (Wildcard::OneLabel, rest)
        } else {
            (Wildcard::Exact, s)
        };
        if rest.contains('*') || (wildcard == Wildcard::Exact && s.starts_with('*')) {
            return Err(format!(
                "`{s}` has a wildcard inside the name: `*` and `**` stand only as the whole leftmost label, {EXPECTED}"
            ));
        }
        // The wildcard takes at least one label of its own (two characters: "a.").
        let room = match wildcard {
            Wildcard::Exact => MAX_NAME_LEN,
            _ => MAX_NAME_LEN - 2,
        };
        let suffix =
            normalize_name(rest, room).map_err(|why| format!("`{s}` {why}, {EXPECTED}"))?;
        Ok(HostPattern { wildcard, suffix })
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Fail inside the visitor, so that the error carries the span of this very element.
        struct V;
        impl de::Visitor<'_> for V {
            type Value = HostPattern;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a name string such as \"api.example.com\" or \"*.example.com\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HostPattern, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A DNS name as patterns and `egress explain` take it: lowercase, without its trailing dot,
/// checked label by label (see the module documentation). `max_len` is the room the name has.
/// The error completes "`NAME` …".
pub fn normalize_name(s: &str, max_len: usize) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() {
        return Err("is empty".into());
    }
    if !name.is_ascii() {
        return Err("is not ASCII: write an international name in its xn-- (punycode) form".into());
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err("is an address, not a name: put it in `destinations`".into());
    }
    if name.len() > max_len {
        return Err(format!(
            "is {} characters long: at most {max_len} fit a DNS name",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "has a label of {} characters: at most {MAX_LABEL_LEN}",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "has the character {:?}: labels hold letters, digits, `-` and `_`",
                c
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "has the label `{label}`, which starts or ends with `-`"
            ));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(
            "ends in a numeric label, like an address: names end in letters (put addresses in `destinations`)"
                .into(),
        );
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> HostPattern {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn patterns_are_normalized() {
        let p = pat("API.Example.COM.");
        assert_eq!(
            (p.wildcard(), p.suffix()),
            (Wildcard::Exact, "api.example.com")
        );
        assert_eq!(p.to_string(), "api.example.com");
        assert_eq!(pat("*.Example.com").to_string(), "*.example.com");
        assert_eq!(pat("**.example.com.").to_string(), "**.example.com");
        assert_eq!(
            pat("_acme-challenge.example.com").suffix(),
            "_acme-challenge.example.com"
        );
        assert_eq!(pat("localhost").suffix(), "localhost");
        assert_eq!(
            pat("xn--bcher-kva.example").suffix(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            pat("a.b.example.com").labels_reversed().collect::<Vec<_>>(),
            ["com", "example", "b", "a"]
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for (text, why) in [
            ("", "is empty"),
            (".", "is empty"),
            ("*", "covers every name"),
            ("**.", "covers every name"),
            ("a.*.example.com", "wildcard inside"),
            ("*foo.example.com", "wildcard inside"),
            ("***.example.com", "wildcard inside"),
            ("*.*.example.com", "wildcard inside"),
            ("a..example.com", "empty label"),
            (".example.com", "empty label"),
            ("-a.example.com", "starts or ends with `-`"),
            ("a-.example.com", "starts or ends with `-`"),
            ("a b.example.com", "character ' '"),
            ("a/b.example.com", "character '/'"),
            ("bücher.example", "not ASCII"),
            ("10.0.0.1", "is an address"),
            ("2001:db8::1", "is an address"),
            ("a.123", "numeric label"),
            ("1.2.3.4.5", "numeric label"),
        ] {
            let e = text.parse::<HostPattern>().expect_err(text);
            assert!(e.contains(why), "{text}: {e}");
            assert!(e.contains("expected a name"), "{text}: {e}");
        }
    }

    #[test]
    fn lengths_are_those_of_rfc_1035() {
        let label63 = "a".repeat(63);
        pat(&format!("{label63}.com"));
        let e = format!("{}a.com", label63)
            .parse::<HostPattern>()
            .unwrap_err();
        assert!(e.contains("at most 63"), "{e}");
        // 253 characters: three labels of 63 and one of 61, joined by dots (a trailing dot is
        // free).
        let longest = format!("{l}.{l}.{l}.{}", "a".repeat(61), l = label63);
        assert_eq!(longest.len(), 253);
        pat(&longest);
        pat(&format!("{longest}."));
        let e = format!("{longest}.b").parse::<HostPattern>().unwrap_err();
        assert!(e.contains("at most 253"), "{e}");
        // A wildcard needs room for one label of its own.
        let e = format!("*.{longest}").parse::<HostPattern>().unwrap_err();
        assert!(e.contains("at most 251"), "{e}");
    }

    #[test]
    fn covers_compares_whole_labels() {
        let exact = pat("example.com");
        assert!(exact.covers("example.com"));
        assert!(exact.covers("EXAMPLE.com."));
        assert!(!exact.covers("a.example.com"));
        assert!(!exact.covers("evilexample.com"));
        let one = pat("*.example.com");
        assert!(one.covers("a.example.com"));
        assert!(one.covers("A.Example.Com."));
        assert!(!one.covers("example.com"));
        assert!(!one.covers("a.b.example.com"));
        assert!(!one.covers("evilexample.com"));
        assert!(!one.covers(".example.com"));
        let many = pat("**.example.com");
        assert!(many.covers("a.example.com"));
        assert!(many.covers("a.b.c.example.com"));
        assert!(!many.covers("example.com"));
        assert!(!many.covers("a.evilexample.com"));
        assert!(!many.covers("example.com.evil"));
    }
}
