//! The catalog of node services: the inference engines (and the extraction
//! service) this agent can run as Docker containers, by name.

/// Every service the agent knows, by the name configs and flags use.
pub const CATALOG: &[&str] = &["vllm", "ollama", "llamacpp", "extraction"];

/// Whether `name` is in the catalog.
pub fn known(name: &str) -> bool {
    CATALOG.contains(&name)
}

/// `vllm, llamacpp` → the names, each checked against the catalog, without
/// repeats; the error names the unknown one and lists the catalog.
pub fn parse_list(v: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !known(name) {
            return Err(format!(
                "'{name}' is not a service this agent runs (known: {})",
                CATALOG.join(", ")
            ));
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_checked_against_the_catalog() {
        assert_eq!(
            parse_list("vllm, llamacpp,vllm").unwrap(),
            ["vllm", "llamacpp"]
        );
        assert!(parse_list("").unwrap().is_empty());
        let err = parse_list("vllm,tgi").unwrap_err();
        assert!(err.contains("'tgi'") && err.contains("extraction"), "{err}");
    }
}
