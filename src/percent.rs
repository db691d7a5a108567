//! Percent-encoding of one URL component (RFC 3986): everything but the
//! unreserved characters is written `%XX`. For a job id in a Nexus path
//! and for a user or password put back into a Redis URL.

pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_unreserved_characters_stay() {
        assert_eq!(super::encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(super::encode("Az09-._~"), "Az09-._~");
        assert_eq!(super::encode("pä:ss@"), "p%C3%A4%3Ass%40");
    }
}
