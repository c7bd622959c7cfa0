use std::time::Instant;
use whittle_models::{load, text, LoadOptions, Model};
fn main() {
    let l = load(&format!("{}/.cache/whittle/models/all-MiniLM-L6-v2", std::env::var("HOME").unwrap()), &LoadOptions::default()).unwrap();
    let t = Instant::now();
    for _ in 0..20 { let _ = text::truncating(&l.tokenizer, 128).unwrap(); }
    println!("clone+trunc {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / 20.0);
    let tok = text::truncating(&l.tokenizer, 128).unwrap();
    let t = Instant::now();
    for _ in 0..20 { let _ = text::encode_batch(&tok, &["A man is playing a guitar on the stage tonight."]).unwrap(); }
    println!("encode {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / 20.0);
    let b = text::encode_batch(&tok, &["A man is playing a guitar on the stage tonight."]).unwrap();
    let Model::Bert(m) = &l.model else { panic!() };
    for _ in 0..3 { m.forward(&b.ids, &b.type_ids, &b.mask).unwrap(); }
    let t = Instant::now();
    for _ in 0..20 { m.forward(&b.ids, &b.type_ids, &b.mask).unwrap(); }
    println!("forward b1 {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / 20.0);
    let x = candle_core::Tensor::zeros((14, 384), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let lin = &m.blocks[0].query;
    let t = Instant::now();
    for _ in 0..200 { lin.forward(&x).unwrap(); }
    println!("linear 14x384x384 {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / 200.0);
    let lin = &m.blocks[0].intermediate;
    let t = Instant::now();
    for _ in 0..200 { lin.forward(&x).unwrap(); }
    println!("linear 14x384x1536 {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / 200.0);
}
