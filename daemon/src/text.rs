//! Strings from records and state files on a terminal. Anything stored in the log or the
//! daemon's state is attacker-controlled until verified (and a signed record still carries
//! whatever host name or path it was given), so control characters (ESC sequences that
//! rewrite the screen, newlines that forge a line, bidi overrides that reorder it) are
//! printed escaped, `\u{1b}`, never raw.

use std::borrow::Cow;

/// Whether `c` could change what a terminal shows beyond itself.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character escaped as `\u{..}`.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if is_unsafe(c) {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// [`terminal_safe`] line by line: the line breaks of a message that lists several errors
/// stay, every other control character is escaped.
pub fn terminal_safe_lines(s: &str) -> String {
    s.split('\n')
        .map(terminal_safe)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_keep_their_lines() {
        assert_eq!(
            terminal_safe_lines("a.toml:1: x\nb.toml:2: y\x1b"),
            "a.toml:1: x\nb.toml:2: y\\u{1b}"
        );
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(terminal_safe("host-1 é ✓"), "host-1 é ✓");
        assert_eq!(
            terminal_safe("a\nb\x1b[2Jc\u{202E}d\t"),
            "a\\u{a}b\\u{1b}[2Jc\\u{202e}d\\u{9}"
        );
    }
}
