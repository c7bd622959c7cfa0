use thiserror::Error;

/// Errors of the core crate: tensor-engine failures and shape mismatches at the `Linear` seam.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("linear `{name}`: {msg}")]
    Linear { name: String, msg: String },
    #[error(transparent)]
    Option(#[from] InvalidOption),
}

pub type Result<T> = std::result::Result<T, Error>;

/// An option a library call cannot take: the option's name as configs and recipes spell it (`sparsity`,
/// `group_size`), the value, and why. Libraries name options only through this type (or as "option `name`"
/// inside a reason); interfaces word them for their users (the CLI as `--group-size`, see `option_words`).
#[derive(Debug, Clone, Error)]
#[error("option `{option}` {value}: {reason}")]
pub struct InvalidOption {
    pub option: &'static str,
    pub value: String,
    pub reason: String,
}

impl InvalidOption {
    pub fn new(option: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self { option, value: value.to_string(), reason: reason.into() }
    }
}

/// Rewrites every "option `name`" of a library message with `word(name)`, e.g. `--group-size` for a CLI.
pub fn option_words(msg: &str, word: impl Fn(&str) -> String) -> String {
    const MARK: &str = "option `";
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(MARK) {
        let after = &rest[i + MARK.len()..];
        match after.find('`') {
            Some(j) if after[..j].chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && j > 0 => {
                out.push_str(&rest[..i]);
                out.push_str(&word(&after[..j]));
                rest = &after[j + 1..];
            }
            _ => {
                out.push_str(&rest[..i + MARK.len()]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_words_rewrites_each_named_option() {
        let e = InvalidOption::new("group_size", 48, "must be a positive multiple of 32 (see option `zero_point`)");
        let cli = option_words(&e.to_string(), |n| format!("--{}", n.replace('_', "-")));
        assert_eq!(cli, "--group-size 48: must be a positive multiple of 32 (see --zero-point)");
        assert_eq!(
            option_words("no options here; option `` stays", |n| n.to_uppercase()),
            "no options here; option `` stays"
        );
    }
}
