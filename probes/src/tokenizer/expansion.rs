//! How much a `tokenizer.json` normalizer can lengthen a text, bounded before the tokenizer
//! is built. Chained `Replace` steps multiply: three that each turn `l` into a thousand `l`s
//! make a 6 GB string of a prompt (and abort on the allocation). Each step's worst case is
//! bounded from its definition, the steps' bounds multiply, and a normalizer whose bound
//! exceeds [`MAX_EXPANSION`] is refused, naming it.

/// The most a normalizer may lengthen a text, in UTF-8 bytes per input byte. Real ones stay
/// below: SentencePiece-style `Replace(" ", "▁")` bounds to 3, and the most composite we know
/// (XLNet's NFKD, lower-casing and compiled character map in one sequence) to 972. A prompt of
/// a few kilobytes stays a few megabytes under this bound.
pub const MAX_EXPANSION: f64 = 4096.0;

/// Per input byte, how many bytes a Unicode normalization form can write at most (U+FDFA, 3
/// bytes, decomposes to 18 characters of 3 bytes each in NFKC).
const UNICODE_FORM: f64 = 18.0;

/// Check the `normalizer` of a parsed `tokenizer.json`: `Err` says which step and why.
pub fn check_normalizer(tokenizer_json: &serde_json::Value) -> Result<(), String> {
    let n = &tokenizer_json["normalizer"];
    let bound = expansion(n, "normalizer", 0)?;
    if bound > MAX_EXPANSION {
        return Err(format!(
            "its normalizer can lengthen a text {bound}-fold, more than the {MAX_EXPANSION} \
             mechwatch allows (each step's worst case multiplied along the sequence)"
        ));
    }
    Ok(())
}

/// The worst-case bytes out per byte in of normalizer `n`, at JSON path `at`.
fn expansion(n: &serde_json::Value, at: &str, depth: usize) -> Result<f64, String> {
    if depth > 16 {
        return Err(format!("`{at}` nests sequences more than 16 deep"));
    }
    if n.is_null() {
        return Ok(1.0);
    }
    let kind = n["type"].as_str().unwrap_or_default();
    let text = |v: &serde_json::Value| v.as_str().map_or(0, str::len) as f64;
    Ok(match kind {
        "Sequence" => {
            let steps = n["normalizers"]
                .as_array()
                .ok_or_else(|| format!("`{at}` is a Sequence without a `normalizers` list"))?;
            let mut product = 1.0;
            for (i, s) in steps.iter().enumerate() {
                product *= expansion(s, &format!("{at}.normalizers[{i}]"), depth + 1)?;
            }
            product
        }
        "Replace" => {
            let content = text(&n["content"]);
            match (&n["pattern"]["String"], &n["pattern"]["Regex"]) {
                (serde_json::Value::String(p), _) if p.is_empty() => {
                    return Err(format!("`{at}` replaces the empty string"));
                }
                (serde_json::Value::String(p), _) => (content / p.len() as f64).max(1.0),
                // A regular expression may match a single byte, or nothing between bytes.
                (_, serde_json::Value::String(_)) => content + 1.0,
                _ => return Err(format!("`{at}` is a Replace without a pattern")),
            }
        }
        // Added once per text, not per byte.
        "Prepend" | "Strip" | "StripAccents" => 1.0,
        "NFC" | "NFD" | "NFKC" | "NFKD" => UNICODE_FORM,
        // A character's lower case may be longer (U+0130 becomes two characters).
        "Lowercase" => 3.0,
        // Spaces around each CJK character, accents stripped through NFD, lower-cased.
        "BertNormalizer" => 2.0 * UNICODE_FORM * 3.0,
        // A byte above 127 becomes a two-byte character.
        "ByteLevel" => 2.0,
        // SentencePiece's compiled character map: each character to a short normalized form.
        "Precompiled" => UNICODE_FORM,
        other => return Err(format!("`{at}` has an unknown normalizer type `{other}`")),
    })
}

#[cfg(test)]
mod tests {
    use super::check_normalizer;

    #[test]
    fn chained_replacements_are_refused_and_real_normalizers_pass() {
        let blowup = serde_json::json!({"normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "l"}, "content": "l".repeat(1000)},
            {"type": "Replace", "pattern": {"String": "l"}, "content": "l".repeat(1000)},
        ]}});
        let e = check_normalizer(&blowup).unwrap_err();
        assert!(e.contains("1000000-fold"), "{e}");
        let llama = serde_json::json!({"normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]}});
        check_normalizer(&llama).unwrap();
        let bert = serde_json::json!({"normalizer": {"type": "BertNormalizer"}});
        check_normalizer(&bert).unwrap();
        check_normalizer(&serde_json::json!({"normalizer": null})).unwrap();
        let empty = serde_json::json!({"normalizer":
            {"type": "Replace", "pattern": {"String": ""}, "content": "x"}});
        assert!(check_normalizer(&empty)
            .unwrap_err()
            .contains("empty string"));
    }
}
