//! Dumps whittle's intermediate activations of a LLaMA decoder on the first WikiText-2 test chunk, for
//! finding where an export's runtime first departs from whittle (`scripts/onnx_divergence.py` reads them).
//!
//! ```sh
//! cargo run --release -p whittle-export --example dump_hidden -- MODEL OUT_DIR [CTX]
//! ```
//!
//! Writes `OUT_DIR/ids.bin` (u32) and, per block `i`, f32 little-endian (T, width) arrays:
//! `b{i}.qkv_in`, `b{i}.o_in`, `b{i}.attn_res`, `b{i}.gate_up_in`, `b{i}.down_in`, `b{i}.out`; then
//! `logits.bin` (T, V).

use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use whittle_models::{loader, Model};

fn save(dir: &std::path::Path, name: &str, t: &Tensor) -> anyhow::Result<()> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{name}.bin")))?);
    for x in v {
        f.write_all(&x.to_le_bytes())?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(out)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: dump_hidden MODEL OUT_DIR [CTX]");
    };
    let ctx: usize = args.get(3).map_or(Ok(512), |s| s.parse())?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let l = loader::load(model, &Default::default())?;
    let Model::Llama(m) = &l.model else { anyhow::bail!("{model} is not a LLaMA decoder") };
    let text = whittle_eval::data::read_text(None, whittle_eval::data::WIKI_TEST)?;
    let chunk = whittle_eval::ppl::chunks(&l, &text.1, ctx, 1)?.remove(0);
    let mut f = std::fs::File::create(out.join("ids.bin"))?;
    for id in &chunk {
        f.write_all(&id.to_le_bytes())?;
    }
    let ids = Tensor::new(chunk.as_slice(), m.embed_tokens.device())?.unsqueeze(0)?; // (1, T)
    let (cos, sin, mask) = m.block_inputs(chunk.len())?;
    let d = m.config.head_dim;
    let mut x = m.embed(&ids)?; // (1, T, C)
    for (i, b) in m.blocks.iter().enumerate() {
        // Stage s's output is the input of the Linears named here (stage 4 finishes the block).
        let names = ["qkv_in", "o_in", "gate_up_in", "down_in", "out"];
        let mut input: Option<Tensor> = None;
        for (s, name) in names.iter().enumerate() {
            input = b.stage(s, &mut x, input.as_ref(), &cos, &sin, mask.as_ref(), d)?;
            if s == 2 {
                save(&out, &format!("b{i}.attn_res"), &x)?;
            }
            save(&out, &format!("b{i}.{name}"), input.as_ref().unwrap_or(&x))?;
        }
    }
    let h = m.norm.forward(&x)?;
    save(&out, "logits", &m.lm_head.forward(&h)?)?;
    println!("wrote {} ({} tokens, {} blocks)", out.display(), chunk.len(), m.blocks.len());
    Ok(())
}
