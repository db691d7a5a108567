//! Cutting text that goes into one-line messages (logs, errors, listings),
//! at a character boundary and visibly.

/// The first `max` characters of `s`, ending in `…` when something was cut.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// `s` on one line (runs of whitespace folded to one space), then clipped.
pub fn one_line(s: &str, max: usize) -> String {
    clip(&s.split_whitespace().collect::<Vec<_>>().join(" "), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_at_characters_and_marks_the_cut() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("äbcd", 2), "äb…");
        assert_eq!(one_line(" a\n  b\tc ", 10), "a b c");
        assert_eq!(one_line("a b c", 3), "a b…");
    }
}
