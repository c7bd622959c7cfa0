//! `generate`: decode with a KV cache, greedy or seeded top-k / top-p sampling.

use std::io::Write;

use anyhow::{bail, Result};
use whittle_models::generate::{check_context, generate, truncate_prompt, Sampling};
use whittle_models::{text, Model};

use super::{Env, ModelArg};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    #[arg(short, long)]
    pub prompt: String,
    /// Tokens to generate
    #[arg(short, default_value_t = 32)]
    pub n: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template (its tokenizer config or GGUF metadata; ChatML if none),
    /// as `whittle serve`'s /v1/chat/completions does
    #[arg(long)]
    pub chat: bool,
    /// Keep generating past end-of-sequence tokens
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object with prompt and generated token ids
    #[arg(long)]
    pub json: bool,
    /// Keep only the prompt's last tokens when it and -n do not fit in the model's context (default: error)
    #[arg(long)]
    pub truncate: bool,
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature {}: must be a finite number >= 0", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p {}: must be in (0, 1]", a.top_p);
    }
    if a.n == 0 {
        bail!("-n 0: asks for no tokens; it must be at least 1");
    }
    let s = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let l = env.open(&a.m)?;
    let Model::Llama(dec) = &l.model else {
        bail!("`generate` needs a decoder; {} is a {} encoder", a.m.model, l.model.family());
    };
    let text_in = if a.chat {
        let user = text::ChatMessage { role: "user".into(), content: a.prompt.clone() };
        text::ChatTemplate::of(&l)?.render(&[user], true)?
    } else {
        a.prompt.clone()
    };
    let mut ids = text::encode_prompt(&l, &text_in, false)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    if a.truncate {
        let context = dec.config.max_position_embeddings;
        let Some(cut) = truncate_prompt(dec, &ids, a.n, l.bos_token_id) else {
            bail!("-n {}: leaves no room for the prompt in the model's context of {context} positions", a.n);
        };
        if cut.len() < ids.len() {
            eprintln!("[prompt truncated to its last {} of {} tokens (context {context})]", cut.len(), ids.len());
        }
        ids = cut;
    }
    check_context(dec, ids.len(), a.n)?;
    let eos: Vec<u32> = if a.ignore_eos { vec![] } else { l.eos_token_ids.clone() };
    let mut stdout = std::io::stdout().lock();
    if !a.json {
        write!(stdout, "{text_in}")?;
        stdout.flush()?;
    }
    let t0 = std::time::Instant::now();
    let (mut shown, mut so_far) = (String::new(), Vec::new());
    let out = generate(dec, &ids, a.n, &eos, &s, |tok| {
        if a.json {
            return;
        }
        // Decode the whole continuation each time so multi-byte characters print whole.
        so_far.push(tok);
        if let Ok(t) = text::decode(&l, &so_far) {
            if t.len() > shown.len() && t.starts_with(&shown) {
                let _ = write!(stdout, "{}", &t[shown.len()..]);
                let _ = stdout.flush();
                shown = t;
            }
        }
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "model": a.m.model, "prompt": text_in, "prompt_ids": ids, "ids": out,
            "text": text::decode(&l, &out)?, "seconds": secs,
        });
        writeln!(stdout, "{v}")?;
        return Ok(());
    }
    writeln!(stdout)?;
    let n = out.len();
    eprintln!("[{} prompt tokens, {n} generated in {secs:.2}s, {:.1} tok/s]", ids.len(), n as f64 / secs);
    Ok(())
}
