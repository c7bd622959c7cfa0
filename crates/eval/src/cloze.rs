//! Cloze accuracy (LAMBADA format): each line's target is its final whitespace-separated word; the
//! context is everything before it. The model decodes greedily from the context; a line counts as correct
//! when the decoded continuation, trimmed, starts with exactly the target word followed by a non-letter
//! (or nothing).

use whittle_models::generate::{generate, Sampling};
use whittle_models::{text, Loaded, Model};

use crate::{Error, Metrics, Progress, Result};

/// Splits a line into (context, target word).
pub fn split_target(line: &str) -> Option<(&str, &str)> {
    let t = line.trim_end();
    let i = t.rfind(char::is_whitespace)?;
    let (ctx, word) = (t[..i].trim_end(), t[i..].trim());
    (!ctx.is_empty() && !word.is_empty()).then_some((ctx, word))
}

/// Whether a decoded continuation spells exactly `target` as its next word.
pub fn matches(continuation: &str, target: &str) -> bool {
    let c = continuation.trim_start();
    match c.strip_prefix(target) {
        Some(rest) => !rest.starts_with(|ch: char| ch.is_alphanumeric()),
        None => false,
    }
}

pub fn cloze(l: &Loaded, lines: &[String], limit: Option<usize>, progress: Progress) -> Result<Metrics> {
    let Model::Llama(m) = &l.model else {
        return Err(Error::Usage(format!("cloze needs a decoder; {} is a BERT encoder", l.source.path.display())));
    };
    let n = limit.map_or(lines.len(), |k| k.min(lines.len()));
    let mut correct = 0;
    for (i, line) in lines[..n].iter().enumerate() {
        let (ctx, target) = split_target(line)
            .ok_or_else(|| Error::Usage(format!("cloze line {} has no context before its last word", i + 1)))?;
        let ids = text::encode_prompt(l, ctx, false)?;
        // Enough tokens for the word as its own tokens plus a following character.
        let want = l.tokenizer.encode(format!(" {target}"), false).map_err(|e| Error::Usage(e.to_string()))?.len() + 1;
        let out = generate(m, &ids, want, &l.eos_token_ids, &Sampling::default(), |_| {})?;
        if matches(&text::decode(l, &out)?, target) {
            correct += 1;
        }
        progress(i + 1, n);
    }
    Ok(Metrics {
        task: Some("cloze".into()),
        cloze_acc: Some(100.0 * correct as f64 / n as f64),
        items: Some(n),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_matching() {
        assert_eq!(split_target("the cat sat on the mat "), Some(("the cat sat on the", "mat")));
        assert_eq!(split_target("single"), None);
        assert!(matches(" mat.", "mat"));
        assert!(matches(" mat", "mat"));
        assert!(!matches(" matter", "mat"));
        assert!(!matches(" hat", "mat"));
    }
}
