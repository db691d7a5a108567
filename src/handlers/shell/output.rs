//! A shell command's output, without I/O: bytes of stdout or stderr cut into
//! chunk texts ([`LineBuffer`]: whole lines, or a partial line once it has
//! waited [`FLUSH_AFTER`] or grown to [`FLUSH_BYTES`]), and the text kept
//! for the result ([`Capture`]: capped, the cut marked, the tail kept for
//! error messages). Bytes that are not UTF-8 become U+FFFD; a character is
//! never split between two chunks.

use std::time::{Duration, Instant};

/// A partial line (no newline yet) is sent this long after its first byte.
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// A partial line this long is sent at once.
pub const FLUSH_BYTES: usize = 4096;
/// How much of the output's end an error message quotes, in bytes.
const TAIL_BYTES: usize = 2000;

/// The bytes of one stream not yet sent as a chunk.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
    /// When the oldest pending byte arrived.
    since: Option<Instant>,
}

impl LineBuffer {
    /// Takes `bytes` that arrived at `now`; returns what is ready to send:
    /// everything up to the last newline, or a long partial line.
    pub fn push(&mut self, bytes: &[u8], now: Instant) -> Option<String> {
        if bytes.is_empty() {
            return None;
        }
        if self.pending.is_empty() {
            self.since = Some(now);
        }
        self.pending.extend_from_slice(bytes);
        let ready = match self.pending.iter().rposition(|&b| b == b'\n') {
            Some(nl) if self.pending.len() - nl - 1 < FLUSH_BYTES => nl + 1,
            _ if self.pending.len() >= FLUSH_BYTES => complete_len(&self.pending),
            Some(nl) => nl + 1,
            None => 0,
        };
        self.take(ready, now)
    }

    /// When the pending partial line must be sent, if there is one.
    pub fn due(&self) -> Option<Instant> {
        self.since.map(|t| t + FLUSH_AFTER)
    }

    /// Sends the partial line (all of it at `eof`; otherwise it keeps a
    /// character whose last bytes have not arrived yet).
    pub fn flush(&mut self, eof: bool, now: Instant) -> Option<String> {
        let n = if eof {
            self.pending.len()
        } else {
            complete_len(&self.pending)
        };
        self.take(n, now)
    }

    fn take(&mut self, n: usize, now: Instant) -> Option<String> {
        if n == 0 {
            return None;
        }
        let text = String::from_utf8_lossy(&self.pending[..n]).into_owned();
        self.pending.drain(..n);
        self.since = (!self.pending.is_empty()).then_some(now);
        Some(text)
    }
}

/// How many leading bytes of `b` end on a character boundary: all of them
/// unless they end in the first bytes of a multi-byte UTF-8 character.
fn complete_len(b: &[u8]) -> usize {
    let n = b.len();
    for back in 1..=n.min(3) {
        let c = b[n - back];
        if c & 0xC0 == 0x80 {
            continue;
        }
        let need = match c {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if need > back { n - back } else { n };
    }
    n
}

/// The output kept for the result: the first `cap` bytes, then a marker
/// saying how much was cut; and the last [`TAIL_BYTES`] for errors.
pub struct Capture {
    kept: String,
    cap: usize,
    dropped: u64,
    tail: String,
}

impl Capture {
    pub fn new(cap: usize) -> Capture {
        Capture {
            kept: String::new(),
            cap,
            dropped: 0,
            tail: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) {
        let room = self.cap.saturating_sub(self.kept.len());
        let mut keep = text.len().min(room);
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
        self.kept.push_str(&text[..keep]);
        self.dropped += (text.len() - keep) as u64;
        self.tail.push_str(text);
        if self.tail.len() > 2 * TAIL_BYTES {
            let mut cut = self.tail.len() - TAIL_BYTES;
            while !self.tail.is_char_boundary(cut) {
                cut += 1;
            }
            self.tail.drain(..cut);
        }
    }

    /// The last bytes of the output (about [`TAIL_BYTES`]), for an error.
    pub fn tail(&self) -> &str {
        let mut cut = self.tail.len().saturating_sub(TAIL_BYTES);
        while !self.tail.is_char_boundary(cut) {
            cut += 1;
        }
        &self.tail[cut..]
    }

    /// The result's `output`.
    pub fn finish(self) -> String {
        let mut out = self.kept;
        if self.dropped > 0 {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!(
                "[output truncated: {} more bytes not kept (shell-output-cap is {} bytes)]\n",
                self.dropped, self.cap
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_lines_go_at_once_and_a_partial_line_waits() {
        let t = Instant::now();
        let mut b = LineBuffer::default();
        assert_eq!(b.push(b"a\nb\nc", t).as_deref(), Some("a\nb\n"));
        assert_eq!(b.due(), Some(t + FLUSH_AFTER));
        assert_eq!(b.push(b"d", t).as_deref(), None);
        assert_eq!(b.flush(false, t).as_deref(), Some("cd"));
        assert_eq!(b.due(), None);
        assert_eq!(
            b.push(&[b'x'; FLUSH_BYTES], t).map(|s| s.len()),
            Some(FLUSH_BYTES)
        );
    }

    #[test]
    fn characters_are_never_split_and_bad_bytes_are_replaced() {
        let t = Instant::now();
        let mut b = LineBuffer::default();
        let e = "é".as_bytes();
        assert_eq!(b.push(&[b'a', e[0]], t), None);
        assert_eq!(b.flush(false, t).as_deref(), Some("a"));
        assert_eq!(b.push(&[e[1], b'\n'], t).as_deref(), Some("é\n"));
        assert_eq!(
            b.push(&[0xff, 0xfe, b'\n'], t).as_deref(),
            Some("\u{fffd}\u{fffd}\n")
        );
        assert_eq!(b.push(&[0xE2, 0x82], t), None);
        assert_eq!(b.flush(true, t).as_deref(), Some("\u{fffd}"));
    }

    #[test]
    fn capture_keeps_the_head_marks_the_cut_and_keeps_the_tail() {
        let mut c = Capture::new(5);
        c.push("abc");
        c.push("déf\n");
        assert_eq!(c.tail(), "abcdéf\n");
        let out = c.finish();
        assert!(
            out.starts_with("abcd\n[output truncated: 4 more bytes"),
            "{out}"
        );
        let mut c = Capture::new(100);
        c.push("ok\n");
        assert_eq!(c.finish(), "ok\n");
    }
}
