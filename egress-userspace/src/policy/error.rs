//! [`PolicyError`], and how a place in the policy text becomes `file:line:column: field`.
//!
//! Nothing here re-reads the text to guess where it is. Line and column come from the byte
//! offset the parser reports (a span of toml's, or of a [`toml::Spanned`] value). The field comes
//! from the deserializer's own path when serde fails ([`serde_path_to_error`] around the toml
//! deserializer), and from what the validation knows (table kind, its 1-based index in the file,
//! key: [`Entry::field`]) when our checks fail. A field is a top-level key (`mode`), a key of a
//! table (`dns.upstream`), a key of one `[[service]]`, `[[block]]` or `[[alert]]` table
//! (`service[2].ports`; no element index for an array value), such a table as a whole
//! (`service[2]`: a key it lacks), or `policy` for the file as a whole (syntax errors, unreadable
//! files).

use serde_path_to_error::Segment;

/// A policy error, pointing at the offending place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {field}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `service[2].ports`, or `policy` for the file as a whole.
    pub field: String,
    pub message: String,
}

/// The field of errors about the file as a whole.
const WHOLE_FILE: &str = "policy";

/// Keys that `toml::Spanned` uses to carry its span through serde; not part of the schema.
const SPANNED_PRIVATE_KEY: &str = "$__serde_spanned_private_";

impl PolicyError {
    /// The file cannot be read at all.
    pub(super) fn unreadable(file: &str, e: &std::io::Error) -> PolicyError {
        PolicyError {
            file: file.to_string(),
            line: 0,
            column: 0,
            field: WHOLE_FILE.into(),
            message: format!("cannot read the policy file: {e}"),
        }
    }

    /// An error about the file (or policy directory) as a whole.
    pub(super) fn whole(file: &str, message: String) -> PolicyError {
        PolicyError {
            file: file.to_string(),
            line: 0,
            column: 0,
            field: WHOLE_FILE.into(),
            message,
        }
    }
}

/// The kinds of array-of-tables a policy has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Service,
    Block,
    Alert,
    Blocklist,
}

impl Table {
    /// The table's key in the file.
    pub(super) fn key(self) -> &'static str {
        match self {
            Table::Service => "service",
            Table::Block => "block",
            Table::Alert => "alert",
            Table::Blocklist => "blocklist",
        }
    }
}

/// One `[[service]]`, `[[block]]` or `[[alert]]` table: its kind and its 0-based index among the
/// tables of that kind, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub table: Table,
    pub index: usize,
}

impl Entry {
    /// The field path of one of the table's keys: `service[2].ports` (1-based).
    pub(super) fn field(self, key: &str) -> String {
        format!("{}.{key}", self.whole())
    }

    /// The field path of the table as a whole: `service[2]` (1-based).
    pub(super) fn whole(self) -> String {
        format!("{}[{}]", self.table.key(), self.index + 1)
    }
}

/// The policy text being parsed, to turn byte offsets into positioned errors: one file's, or
/// the fragments of a policy directory merged (then every place is in its fragment's file).
#[derive(Debug, Clone, Copy)]
pub(super) struct Source<'a> {
    pub file: &'a str,
    pub text: &'a str,
    pub merged: Option<&'a super::fragments::Merged<'a>>,
}

impl<'a> Source<'a> {
    /// The text of one file.
    pub(super) fn new(file: &'a str, text: &'a str) -> Self {
        Source {
            file,
            text,
            merged: None,
        }
    }

    /// The file, line and column of a byte offset.
    fn place(&self, offset: usize) -> (&'a str, usize, usize) {
        match self.merged {
            Some(m) => {
                let (fragment, local) = m.locate(offset);
                let (line, column) = line_col(&fragment.text, local);
                (&fragment.file, line, column)
            }
            None => {
                let (line, column) = line_col(self.text, offset);
                (self.file, line, column)
            }
        }
    }

    /// An error at a byte offset, about `field`.
    pub(super) fn error(&self, offset: usize, field: String, message: String) -> PolicyError {
        let (file, line, column) = self.place(offset);
        PolicyError {
            file: file.to_string(),
            line,
            column,
            field: one_line(&field),
            message: one_line(&message),
        }
    }

    /// The file a byte offset is in (its fragment's, for merged fragments).
    pub(super) fn file_of(&self, offset: usize) -> &'a str {
        self.place(offset).0
    }

    /// The 1-based line of a byte offset (in its fragment's file, for merged fragments).
    pub(super) fn line(&self, offset: usize) -> usize {
        self.place(offset).1
    }

    /// The 1-based line and column of a byte offset.
    pub(super) fn line_col(&self, offset: usize) -> (usize, usize) {
        let (_, line, column) = self.place(offset);
        (line, column)
    }

    /// A byte offset for people: `line 3`, or `line 3 of FILE` when fragments are merged.
    pub(super) fn where_is(&self, offset: usize) -> String {
        let (file, line, _) = self.place(offset);
        match self.merged {
            Some(_) => format!("line {line} of {file}"),
            None => format!("line {line}"),
        }
    }

    /// A TOML syntax error: the document could not be read into tables at all.
    pub(super) fn syntax(&self, e: &toml::de::Error) -> PolicyError {
        self.toml(e, WHOLE_FILE.to_string())
    }

    /// A serde error, located by the deserializer's path and the error's span.
    pub(super) fn serde(&self, e: &serde_path_to_error::Error<toml::de::Error>) -> PolicyError {
        self.toml(e.inner(), field_of(e.path()))
    }

    fn toml(&self, e: &toml::de::Error, field: String) -> PolicyError {
        let offset = e.span().map_or(0, |s| s.start);
        self.error(offset, field, clean_toml_message(e.message()))
    }
}

/// The field path of a deserializer path: keys joined by dots, with the 1-based index of the
/// table after a top-level array (`service[2].ports`) and no index for the elements of an array
/// value (`service[2].ports[1]` is `service[2].ports`). `policy` for the root.
fn field_of(path: &serde_path_to_error::Path) -> String {
    let mut field = String::new();
    let segments = path
        .iter()
        .filter(|s| !matches!(s, Segment::Map { key } if key.starts_with(SPANNED_PRIVATE_KEY)));
    for (depth, segment) in segments.enumerate() {
        match segment {
            Segment::Map { key } => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(key);
            }
            // `[[service]]` (or `service = [{ … }]`): which table.
            Segment::Seq { index } if depth == 1 => {
                field.push_str(&format!("[{}]", index + 1));
            }
            // An element of an array value: the field is the array. Enum variants and keys that
            // are not strings do not occur in our schema.
            Segment::Seq { .. } | Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    if field.is_empty() {
        WHOLE_FILE.to_string()
    } else {
        field
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// toml's messages sometimes end in a newline; keep ours on one line.
fn clean_toml_message(m: &str) -> String {
    m.trim().replace('\n', "; ")
}

/// `s` with its control characters escaped (`\n`, `\t`, `\u{1b}`): an error is one line of plain
/// text whatever the policy's strings and keys hold, which messages and fields quote.
pub(super) fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let text = "a = 1\nb = \"é\" x\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // `x` comes after the two-byte `é`: byte 9 of its line, character column 9.
        assert_eq!(line_col(text, text.find('x').unwrap()), (2, 9));
        assert_eq!(line_col(text, usize::MAX), (3, 1));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            one_line("a\nb\tc\u{1b}[31m\0 é"),
            "a\\nb\\tc\\u{1b}[31m\\0 é"
        );
        assert_eq!(one_line("plain `text`: 名前"), "plain `text`: 名前");
    }

    #[test]
    fn entry_fields_are_one_based() {
        let e = Entry {
            table: Table::Alert,
            index: 0,
        };
        assert_eq!(e.field("action"), "alert[1].action");
    }
}
