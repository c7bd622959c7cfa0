//! Weight-name tables between formats, as data. `{i}` stands for the block index; the `.weight` /
//! `.bias` suffix carries over unchanged.

/// LLaMA-family tensors: (Hugging Face name, GGUF name).
pub const LLAMA_HF_GGUF: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("model.layers.{i}.input_layernorm", "blk.{i}.attn_norm"),
    ("model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_q"),
    ("model.layers.{i}.self_attn.k_proj", "blk.{i}.attn_k"),
    ("model.layers.{i}.self_attn.v_proj", "blk.{i}.attn_v"),
    ("model.layers.{i}.self_attn.o_proj", "blk.{i}.attn_output"),
    ("model.layers.{i}.post_attention_layernorm", "blk.{i}.ffn_norm"),
    ("model.layers.{i}.mlp.gate_proj", "blk.{i}.ffn_gate"),
    ("model.layers.{i}.mlp.up_proj", "blk.{i}.ffn_up"),
    ("model.layers.{i}.mlp.down_proj", "blk.{i}.ffn_down"),
];

/// Matches `name` against a pattern with an optional `{i}`; returns the block index (or `usize::MAX`
/// when the pattern has none) and the suffix after the pattern.
fn match_pattern<'a>(pattern: &str, name: &'a str) -> Option<(usize, &'a str)> {
    match pattern.split_once("{i}") {
        None => name.strip_prefix(pattern).map(|rest| (usize::MAX, rest)),
        Some((pre, post)) => {
            let rest = name.strip_prefix(pre)?;
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let i: usize = rest[..digits].parse().ok()?;
            let rest = rest[digits..].strip_prefix(post)?;
            Some((i, rest))
        }
    }
}

fn translate(table: &[(&str, &str)], name: &str, forward: bool) -> Option<String> {
    for (hf, gg) in table {
        let (from, to) = if forward { (hf, gg) } else { (gg, hf) };
        if let Some((i, suffix)) = match_pattern(from, name) {
            if suffix == ".weight" || suffix == ".bias" {
                return Some(to.replace("{i}", &i.to_string()) + suffix);
            }
        }
    }
    None
}

/// HF name -> GGUF name.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    translate(LLAMA_HF_GGUF, name, true)
}

/// GGUF name -> HF name.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    translate(LLAMA_HF_GGUF, name, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for n in ["model.layers.12.self_attn.q_proj.weight", "lm_head.weight", "model.layers.3.mlp.down_proj.bias"] {
            let g = hf_to_gguf(n).unwrap();
            assert_eq!(gguf_to_hf(&g).as_deref(), Some(n));
        }
        assert_eq!(hf_to_gguf("model.layers.1.self_attn.k_proj.weight").unwrap(), "blk.1.attn_k.weight");
        assert_eq!(gguf_to_hf("blk.x.attn_k.weight"), None);
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
    }
}
