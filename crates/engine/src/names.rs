//! The grammar of image names and tags.
//!
//! A name groups the snapshots of one disk; it appears as a directory in
//! the FUSE tree (`by-name/NAME/`), in NBD export names (`NAME@latest`), in
//! the `snapshots` table and in retention groups. So it may not contain
//! `/`, whitespace or control characters, may not be `.` or `..`, may not
//! contain `@` (export syntax) and is at most 128 bytes:
//!
//! ```text
//! name = [A-Za-z0-9_] [A-Za-z0-9._+-]{0,127}
//! ```
//!
//! Tags follow the same grammar (a tag list is shown comma-separated, so a
//! comma is not allowed either).

use crate::EngineError;

/// Longest name or tag, in bytes.
pub const NAME_MAX: usize = 128;

fn valid(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= NAME_MAX
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b'-'))
}

fn refuse(what: &'static str, s: &str) -> EngineError {
    EngineError::Invalid {
        what,
        why: format!(
            "{s:?} is not allowed: use 1 to {NAME_MAX} letters, digits, '.', '_', '+' or '-', starting with a letter, digit or '_'"
        ),
    }
}

/// Checks an image name against the grammar.
pub fn check_name(name: &str) -> Result<(), EngineError> {
    if valid(name) {
        Ok(())
    } else {
        Err(refuse("image name", name))
    }
}

/// Checks a tag against the grammar.
pub fn check_tag(tag: &str) -> Result<(), EngineError> {
    if valid(tag) {
        Ok(())
    } else {
        Err(refuse("tag", tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        for ok in [
            "vm",
            "vm-root",
            "disk-0.img",
            "_x",
            "A.b+c_d-e",
            &"a".repeat(128),
        ] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "x@latest",
            "a b",
            "a\tb",
            "a\nb",
            "-x",
            ".hidden",
            "é",
            "a,b",
            &"a".repeat(129),
        ] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "one line: {e}");
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
    }
}
