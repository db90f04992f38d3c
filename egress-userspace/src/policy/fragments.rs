//! A policy directory (`/etc/egress/policy.d/*.toml`): fragments read in file-name order and
//! merged into one document that parses as one policy, with every error naming the fragment's
//! own file, line and column.
//!
//! How fragments merge:
//! - a top-level key or table (`mode`, `default`, `allow_loopback`, `nat64_prefixes`,
//!   `[sockets]`, `[dns]`) may be set by one fragment only: a second is an error naming both
//!   files;
//! - `[[service]]`, `[[block]]` and `[[alert]]` tables are concatenated, in file-name order and
//!   file order within each fragment (names stay unique across all fragments);
//! - the named sets (`[executable_sets]`, `[user_sets]`, `[group_sets]`, `[cgroup_sets]`) are
//!   merged; a set defined by two fragments is an error naming both.
//!
//! The merge is textual, so that the one parser reports every error: each fragment is cut at its
//! table headers into a preamble (its top-level keys) and sections; the merged text is every
//! preamble, then each kind of named set under one header, then the other sections, fragment by
//! fragment. [`Merged::locate`] maps an offset of the merged text back to its fragment. Each
//! fragment is first read as TOML on its own, so a syntax error names its file, and so that the
//! checks above can name both files.

use std::{collections::BTreeMap, ops::Range, path::Path};

use serde::{Deserialize, Serialize};

use super::{PolicyError, error::Source};

/// One policy file's name and text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    pub file: String,
    pub text: String,
}

/// The keys whose tables merge by their keys.
const SET_KEYS: [&str; 4] = ["executable_sets", "user_sets", "group_sets", "cgroup_sets"];
/// The keys whose arrays of tables concatenate.
const ARRAY_KEYS: [&str; 3] = ["service", "block", "alert"];

/// Reads the policy at `path`: the file, or every `*.toml` file of the directory in file-name
/// order (an empty directory is an error).
pub fn read(path: &Path) -> Result<Vec<Fragment>, PolicyError> {
    let file = path.display().to_string();
    if !path.is_dir() {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::unreadable(&file, &e))?;
        return Ok(vec![Fragment { file, text }]);
    }
    let mut names = toml_files(path).map_err(|e| PolicyError::unreadable(&file, &e))?;
    if names.is_empty() {
        return Err(PolicyError::whole(
            &file,
            "the policy directory holds no *.toml file: expected at least one fragment".into(),
        ));
    }
    names.sort();
    names
        .into_iter()
        .map(|p| {
            let file = p.display().to_string();
            let text =
                std::fs::read_to_string(&p).map_err(|e| PolicyError::unreadable(&file, &e))?;
            Ok(Fragment { file, text })
        })
        .collect()
}

/// The `*.toml` files of `dir` (not hidden ones: editors' swap and backup files), unsorted.
pub fn toml_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".toml") && !name.starts_with('.') && p.is_file() {
            out.push(p);
        }
    }
    Ok(out)
}

/// Where a stretch of the merged text comes from.
#[derive(Debug, Clone)]
struct Piece {
    /// Its range in the merged text.
    merged: Range<usize>,
    /// Its fragment, and where the stretch starts there.
    fragment: usize,
    start: usize,
}

/// Fragments merged into one policy text.
#[derive(Debug)]
pub struct Merged<'a> {
    pub fragments: &'a [Fragment],
    pub text: String,
    pieces: Vec<Piece>,
}

impl<'a> Merged<'a> {
    /// The fragment and offset there of an offset of the merged text (inserted text, such as a
    /// set's header, maps to the start of the piece after it).
    pub fn locate(&self, offset: usize) -> (&'a Fragment, usize) {
        if self.pieces.is_empty() {
            return (&self.fragments[0], 0);
        }
        let i = self
            .pieces
            .partition_point(|p| p.merged.end <= offset)
            .min(self.pieces.len().saturating_sub(1));
        let p = &self.pieces[i];
        let local = p.start + offset.saturating_sub(p.merged.start).min(p.merged.len());
        (&self.fragments[p.fragment], local)
    }

    fn push(&mut self, fragment: usize, range: Range<usize>) {
        let text = &self.fragments[fragment].text[range.clone()];
        let start = self.text.len();
        self.text.push_str(text);
        if !text.ends_with('\n') {
            self.text.push('\n');
        }
        self.pieces.push(Piece {
            merged: start..self.text.len(),
            fragment,
            start: range.start,
        });
    }
}

/// A fragment cut at its table headers: the preamble (top-level keys) and each section (a header
/// line and what follows it until the next header), with the header's first key.
struct Cut {
    preamble: Range<usize>,
    sections: Vec<(String, Range<usize>)>,
}

/// Merges `fragments` (in the order given). Each is first read alone: a syntax error names its
/// file; a top-level key or named set given by two fragments is an error naming both.
pub fn merge(fragments: &[Fragment]) -> Result<Merged<'_>, PolicyError> {
    // Who set each top-level key, and each named set.
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    let mut cuts = Vec::new();
    for (i, f) in fragments.iter().enumerate() {
        let src = Source::new(&f.file, &f.text);
        let doc = toml::Deserializer::parse(&f.text).map_err(|e| src.syntax(&e))?;
        let table: BTreeMap<String, toml::Spanned<toml::Value>> =
            BTreeMap::deserialize(doc).map_err(|e| src.syntax(&e))?;
        for (key, value) in &table {
            if ARRAY_KEYS.contains(&key.as_str()) {
                continue;
            }
            let mut claim = |name: String, field: String| match owners.get(&name) {
                Some(&j) if j != i => Err(src.error(
                    value.span().start,
                    field.clone(),
                    format!(
                        "`{field}` is also set in {}: expected it in one fragment only",
                        fragments[j].file
                    ),
                )),
                _ => {
                    owners.insert(name, i);
                    Ok(())
                }
            };
            match (SET_KEYS.contains(&key.as_str()), value.get_ref()) {
                (true, toml::Value::Table(sets)) => {
                    for set in sets.keys() {
                        claim(format!("{key}.{set}"), format!("{key}.{set}"))?;
                    }
                }
                _ => claim(key.clone(), key.clone())?,
            }
        }
        cuts.push(cut(&f.text));
    }
    let mut merged = Merged {
        fragments,
        text: String::new(),
        pieces: Vec::new(),
    };
    for (i, c) in cuts.iter().enumerate() {
        if !c.preamble.is_empty() {
            merged.push(i, c.preamble.clone());
        }
    }
    // Each kind of named set under one header: TOML defines a table once.
    for key in SET_KEYS {
        let mut header = false;
        for (i, c) in cuts.iter().enumerate() {
            for (k, range) in &c.sections {
                if k != key {
                    continue;
                }
                let text = &fragments[i].text[range.clone()];
                let body = text.find('\n').map_or(text.len(), |n| n + 1);
                let is_bare = text[..body]
                    .trim_end_matches(|c| c != ']')
                    .replace([' ', '\t'], "")
                    == format!("[{key}]");
                if is_bare && header {
                    merged.push(i, range.start + body..range.end);
                } else {
                    header |= is_bare;
                    merged.push(i, range.clone());
                }
            }
        }
    }
    for (i, c) in cuts.iter().enumerate() {
        for (k, range) in &c.sections {
            if !SET_KEYS.contains(&k.as_str()) {
                merged.push(i, range.clone());
            }
        }
    }
    Ok(merged)
}

/// Cuts TOML text at its table headers: lines whose first character is `[` outside strings,
/// arrays and inline tables. (The text has parsed, so its brackets and quotes balance.)
fn cut(text: &str) -> Cut {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    let mut line_start = true;
    let mut headers: Vec<(usize, String)> = Vec::new();
    while i < bytes.len() {
        let c = bytes[i];
        if line_start && depth == 0 {
            // Skip indentation, then look for a header.
            let mut j = i;
            while j < bytes.len() && (bytes[j] == b' ' || bytes[j] == b'\t') {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'[' {
                let end = text[j..].find('\n').map_or(text.len(), |n| j + n);
                headers.push((i, header_key(&text[j..end])));
                i = end;
                continue;
            }
        }
        line_start = false;
        match c {
            b'\n' => line_start = true,
            b'#' => {
                i = text[i..].find('\n').map_or(text.len(), |n| i + n);
                continue;
            }
            b'"' | b'\'' => {
                let triple = bytes[i..].starts_with(if c == b'"' { b"\"\"\"" } else { b"'''" });
                i = string_end(bytes, i, c, triple);
                continue;
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    let preamble_end = headers.first().map_or(text.len(), |h| h.0);
    let sections = headers
        .iter()
        .enumerate()
        .map(|(n, (start, key))| {
            let end = headers.get(n + 1).map_or(text.len(), |h| h.0);
            (key.clone(), *start..end)
        })
        .collect();
    Cut {
        preamble: 0..preamble_end,
        sections,
    }
}

/// The offset just past a string starting at `i` (quote `q`, `triple` for `"""`/`'''`).
fn string_end(bytes: &[u8], i: usize, q: u8, triple: bool) -> usize {
    let mut j = i + if triple { 3 } else { 1 };
    while j < bytes.len() {
        if q == b'"' && bytes[j] == b'\\' {
            j += 2;
            continue;
        }
        if triple {
            if bytes[j..].starts_with(&[q, q, q]) {
                // A closing delimiter may be followed by up to two more quotes of the content.
                let mut k = j + 3;
                while k < bytes.len() && bytes[k] == q && k < j + 5 {
                    k += 1;
                }
                return k;
            }
        } else if bytes[j] == q || bytes[j] == b'\n' {
            return j + 1;
        }
        j += 1;
    }
    bytes.len()
}

/// The first key of a header line: `service` of `[[service]]`, `dns` of `[dns]`,
/// `executable_sets` of `[ executable_sets ]`.
fn header_key(line: &str) -> String {
    let inner = line.trim_start_matches(['[', ' ', '\t']);
    let key: String = inner
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    if key.is_empty() {
        // A quoted key: compare it whole (it is no key merging knows).
        inner.to_string()
    } else {
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn frag(file: &str, text: &str) -> Fragment {
        Fragment {
            file: file.into(),
            text: text.into(),
        }
    }

    #[test]
    fn fragments_merge_keys_arrays_and_sets() {
        let a = frag(
            "10-base.toml",
            "mode = \"enforce\"\n[executable_sets]\ntools = [\"/usr/bin/curl\"]\n[[service]]\nname = \"dns\"\ndestinations = [\"10.0.0.53\"]\nports = [53]\n",
        );
        let b = frag(
            "20-web.toml",
            "# web\n[[service]]\nname = \"web\"\ndestinations = [\n  \"10.1.0.0/16\", # [not a header]\n]\nexecutables = [\"*tools\", \"*more\"]\n[executable_sets]\nmore = [\"/usr/bin/wget\"]\n[[block]]\nname = \"bad\"\ndestinations = [\"192.0.2.0/24\"]\n",
        );
        let p = Policy::from_fragments("policy.d", &[a, b]).unwrap();
        assert_eq!(p.source, "policy.d");
        assert_eq!(p.mode.to_string(), "enforce");
        let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["dns", "web", "bad"]);
        // Lines are the fragment's own.
        assert_eq!(p.rules[1].line, 2);
    }

    #[test]
    fn a_key_set_twice_names_both_files() {
        let a = frag("10-a.toml", "mode = \"audit\"\n");
        let b = frag("20-b.toml", "\n\nmode = \"enforce\"\n");
        let e = Policy::from_fragments("d", &[a.clone(), b]).unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("20-b.toml", 3), "{e}");
        assert!(e.message.contains("10-a.toml"), "{e}");
        let c = frag("30-c.toml", "[dns]\nunlisted = \"refuse\"\n");
        let d = frag("40-d.toml", "dns.unlisted = \"allow\"\n");
        let e = Policy::from_fragments("d", &[a, c, d]).unwrap_err();
        assert_eq!(e.file, "40-d.toml", "{e}");
        assert!(e.message.contains("30-c.toml"), "{e}");
    }

    #[test]
    fn a_set_defined_twice_names_both_files() {
        let a = frag("a.toml", "[user_sets]\nops = [\"root\"]\n");
        let b = frag(
            "b.toml",
            "[user_sets]\ndevs = [\"root\"]\nops = [\"root\"]\n",
        );
        let e = Policy::from_fragments("d", &[a, b]).unwrap_err();
        assert_eq!(e.file, "b.toml", "{e}");
        assert_eq!(e.field, "user_sets.ops", "{e}");
        assert!(e.message.contains("a.toml"), "{e}");
    }

    #[test]
    fn errors_name_the_fragment_file_and_line() {
        let a = frag(
            "10-a.toml",
            "[[service]]\nname = \"web\"\ndestinations = [\"10.0.0.0/8\"]\n",
        );
        // A syntax error.
        let b = frag("20-b.toml", "[[service]]\nname = \n");
        let e = Policy::from_fragments("d", &[a.clone(), b]).unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("20-b.toml", 2), "{e}");
        // A validation error.
        let b = frag(
            "20-b.toml",
            "\n[[service]]\nname = \"ok\"\ndestinations = [\"10.0.0.0/33\"]\n",
        );
        let e = Policy::from_fragments("d", &[a.clone(), b]).unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("20-b.toml", 4), "{e}");
        assert_eq!(e.field, "service[2].destinations", "{e}");
        // A duplicate name across fragments says where the first is.
        let b = frag(
            "20-b.toml",
            "[[block]]\nname = \"web\"\ndestinations = [\"10.0.0.0/8\"]\n",
        );
        let e = Policy::from_fragments("d", &[a, b]).unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("20-b.toml", 2), "{e}");
        assert!(e.message.contains("line 2 of 10-a.toml"), "{e}");
    }

    #[test]
    fn one_file_hashes_as_before() {
        let text = "mode = \"audit\"\n";
        let p = Policy::from_fragments("p.toml", &[frag("p.toml", text)]).unwrap();
        assert_eq!(p, Policy::parse("p.toml", text).unwrap());
    }

    #[test]
    fn headers_are_found_outside_strings_and_arrays() {
        let text = "a = \"\"\"\n[x]\n\"\"\"\nb = [\n[1, 2],\n]\n  [t]\nc = 'lit'\n[[u]] # c\n";
        let c = cut(text);
        let keys: Vec<&str> = c.sections.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(keys, ["t", "u"]);
        assert_eq!(
            &text[c.preamble.clone()],
            "a = \"\"\"\n[x]\n\"\"\"\nb = [\n[1, 2],\n]\n"
        );
    }
}
