//! Evaluation data: the project's copies in `data/` are compiled in as defaults, so every task works
//! offline from anywhere; every task also reads a user file. Readers validate and name the file and line.

use std::path::Path;

use crate::{Error, Result};

/// WikiText-2 raw test split (perplexity default).
pub const WIKI_TEST: (&str, &str) =
    ("data/wikitext-2/wiki.test.raw", include_str!("../../../data/wikitext-2/wiki.test.raw"));
/// WikiText-2 tokenized validation split (calibration / training default; never used for evaluation).
pub const WIKI_VALID: (&str, &str) =
    ("data/wikitext-2/wiki.valid.tokens", include_str!("../../../data/wikitext-2/wiki.valid.tokens"));
/// STS Benchmark test split.
pub const STS_TEST: (&str, &str) =
    ("data/stsbenchmark/sts-test.tsv", include_str!("../../../data/stsbenchmark/sts-test.tsv"));
/// STS Benchmark dev split (distillation text for encoders; never used for evaluation).
pub const STS_DEV: (&str, &str) =
    ("data/stsbenchmark/sts-dev.tsv", include_str!("../../../data/stsbenchmark/sts-dev.tsv"));
/// GLUE SST-2 dev split.
pub const SST2_DEV: (&str, &str) = ("data/sst2/dev.tsv", include_str!("../../../data/sst2/dev.tsv"));
/// Cloze lines made from WikiText-2 test by `scripts/make_cloze.py`.
pub const CLOZE: (&str, &str) =
    ("data/cloze/wikitext2-test-cloze.jsonl", include_str!("../../../data/cloze/wikitext2-test-cloze.jsonl"));

/// A named text: `(name for messages, contents)`.
pub type Named = (String, String);

/// Reads `path` as UTF-8 text, or returns `default` when no path is given. Empty and binary files are errors.
pub fn read_text(path: Option<&Path>, default: (&str, &str)) -> Result<Named> {
    let Some(p) = path else {
        return Ok((default.0.to_string(), default.1.to_string()));
    };
    let bytes = std::fs::read(p).map_err(|err| Error::Io { path: p.to_path_buf(), err })?;
    let name = p.display().to_string();
    if bytes.contains(&0) {
        return Err(Error::Data { path: name, msg: "looks binary (contains NUL bytes); expected a text file".into() });
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::Data { path: name.clone(), msg: format!("not UTF-8 text: {e}") })?;
    if text.trim().is_empty() {
        return Err(Error::Data { path: name, msg: "is empty".into() });
    }
    Ok((name, text))
}

/// One STS pair: (sentence 1, sentence 2, gold score 0..5).
pub type StsPair = (String, String, f64);

/// STS Benchmark TSV: a header, then `genre file year id score sentence1 sentence2` (extra columns ignored).
pub fn parse_sts(named: &Named) -> Result<Vec<StsPair>> {
    let (path, text) = named;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let c: Vec<&str> = line.split('\t').collect();
        let err = |msg: String| Error::Line { path: path.clone(), line: i + 1, msg };
        if c.len() < 7 {
            return Err(err(format!(
                "{} tab-separated columns, expected 7 (genre file year id score sentence1 sentence2)",
                c.len()
            )));
        }
        let score: f64 = c[4].trim().parse().map_err(|_| err(format!("score `{}` is not a number", c[4])))?;
        out.push((c[5].to_string(), c[6].to_string(), score));
    }
    if out.is_empty() {
        return Err(Error::Data { path: path.clone(), msg: "no sentence pairs after the header".into() });
    }
    Ok(out)
}

/// SST-2 TSV: a header `sentence<TAB>label`, then rows with label 0 or 1.
pub fn parse_sst2(named: &Named) -> Result<Vec<(String, u8)>> {
    let (path, text) = named;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| Error::Line { path: path.clone(), line: i + 1, msg };
        let (s, l) = line.rsplit_once('\t').ok_or_else(|| err("expected `sentence<TAB>label`".into()))?;
        let label = match l.trim() {
            "0" => 0,
            "1" => 1,
            other => return Err(err(format!("label `{other}` is not 0 or 1"))),
        };
        out.push((s.to_string(), label));
    }
    if out.is_empty() {
        return Err(Error::Data { path: path.clone(), msg: "no rows after the header".into() });
    }
    Ok(out)
}

/// JSONL of `{"text": ...}` objects (LAMBADA format).
pub fn parse_jsonl_texts(named: &Named) -> Result<Vec<String>> {
    let (path, text) = named;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| Error::Line { path: path.clone(), line: i + 1, msg };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| err("no string field `text`".into()))?;
        out.push(t.to_string());
    }
    if out.is_empty() {
        return Err(Error::Data { path: path.clone(), msg: "no lines".into() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(s: &str) -> Named {
        ("f.tsv".into(), s.into())
    }

    #[test]
    fn defaults_parse() {
        assert_eq!(parse_sts(&read_text(None, STS_TEST).unwrap()).unwrap().len(), 1379);
        assert_eq!(parse_sst2(&read_text(None, SST2_DEV).unwrap()).unwrap().len(), 872);
        assert!(parse_jsonl_texts(&read_text(None, CLOZE).unwrap()).unwrap().len() >= 100);
    }

    #[test]
    fn bad_rows_name_the_line() {
        let e = parse_sts(&named("h\na\tb\tc\n")).unwrap_err().to_string();
        assert!(e.starts_with("f.tsv:2:"), "{e}");
        let e = parse_sst2(&named("sentence\tlabel\ngood\t7\n")).unwrap_err().to_string();
        assert!(e.contains("f.tsv:2") && e.contains("`7`"), "{e}");
        let e = parse_jsonl_texts(&named("{\"text\": \"a\"}\n{\"txt\": 1}\n")).unwrap_err().to_string();
        assert!(e.contains("f.tsv:2") && e.contains("text"), "{e}");
    }

    #[test]
    fn empty_and_binary_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("e.txt");
        std::fs::write(&p, "  \n").unwrap();
        assert!(read_text(Some(&p), WIKI_TEST).unwrap_err().to_string().contains("empty"));
        std::fs::write(&p, [0u8, 159, 146, 150]).unwrap();
        assert!(read_text(Some(&p), WIKI_TEST).unwrap_err().to_string().contains("binary"));
    }
}
