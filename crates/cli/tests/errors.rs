//! Bad inputs and what each gets: one test per case, named after it (the examples of issue 22 among them),
//! and `docs/errors.md` generated from the same table. Every case asserts a non-zero exit, no panic, the
//! exact error text of the table, and that no output (or temporary) is left behind.
//!
//! Regenerate the document after changing a case: `WHITTLE_BLESS=1 cargo test -p whittle-cli --test errors`.

#[path = "../../models/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn whittle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whittle")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What a case needs on disk: a temporary directory with the tiny models, and the real ones.
struct Fx {
    dir: tempfile::TempDir,
}

impl Fx {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        whittle_models::testing::tiny_llama(&dir.path().join("tiny"));
        Fx { dir }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).to_str().unwrap().to_string()
    }
    /// The tiny LLaMA with `edit` applied to its config.json.
    fn tiny_with_config(&self, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let d = self.p(name);
        whittle_models::testing::tiny_llama(&d);
        let p = d.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(&p, cfg.to_string()).unwrap();
        d.to_str().unwrap().to_string()
    }
    /// A copy of MiniLM's config and tokenizer with `weights` made by `make` as its model.safetensors.
    fn minilm_with_weights(&self, name: &str, make: impl FnOnce(&Path)) -> String {
        let d = self.p(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(common::minilm().join(f), d.join(f)).unwrap();
        }
        make(&d.join("model.safetensors"));
        d.to_str().unwrap().to_string()
    }
}

fn smol() -> String {
    common::smollm2().to_str().unwrap().to_string()
}

fn minilm() -> String {
    common::minilm().to_str().unwrap().to_string()
}

/// SmolLM2 with the data offset of its second tensor moved by 7 bytes.
fn misaligned_gguf(fx: &Fx) -> String {
    let src = common::smollm2();
    let g = whittle_formats::gguf::Gguf::open(&src).unwrap();
    let t = &g.tensors[1];
    let mut bytes = std::fs::read(&src).unwrap();
    let key = [&(t.name.len() as u64).to_le_bytes()[..], t.name.as_bytes()].concat();
    let at = bytes.windows(key.len()).position(|w| w == key.as_slice()).unwrap();
    // name, n_dims (4), dims (8 each), type (4), then the offset.
    let off = at + key.len() + 4 + 8 * t.ne.len() + 4;
    assert_eq!(u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap()) as usize, t.offset);
    bytes[off..off + 8].copy_from_slice(&(t.offset as u64 + 7).to_le_bytes());
    let p = fx.p("misaligned.gguf");
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

/// One bad input: the test that runs it, the class of issue 22 it belongs to, what is wrong, the command
/// (as shown in the document), how to run it, and the text its error must contain.
struct Case {
    test: &'static str,
    class: &'static str,
    input: &'static str,
    shown: &'static str,
    args: fn(&Fx) -> Vec<String>,
    gets: &'static str,
}

const CASES: &[Case] = &[
    Case {
        test: "generate_prompt_past_the_context",
        class: "Limits",
        input: "a prompt of ~100k characters (25k tokens), far past SmolLM2's 8192 positions",
        shown: "whittle generate smol.gguf --prompt \"$(python -c 'print(\"word \" * 20000)')\"",
        args: |_| vec!["generate".into(), smol(), "--prompt".into(), "word ".repeat(20000)],
        gets: "positions, past the model's context of 8192 (max_position_embeddings / context_length); shorten the prompt, ask for fewer tokens, or set --truncate to keep the prompt's last tokens",
    },
    Case {
        test: "embed_max_len_zero",
        class: "Limits",
        input: "`--max-len 0` (was silently ignored)",
        shown: "whittle embed all-MiniLM-L6-v2 hello --max-len 0",
        args: |_| vec!["embed".into(), minilm(), "hello".into(), "--max-len".into(), "0".into()],
        gets: "error: --max-len 0: must be at least 3 ([CLS], one token, [SEP])",
    },
    Case {
        test: "config_num_hidden_layers_zero",
        class: "Limits",
        input: "`num_hidden_layers: 0` in config.json (loaded and ran on the embeddings alone)",
        shown: "whittle inspect tiny-0-layers",
        args: |fx| vec!["inspect".into(), fx.tiny_with_config("zero", |c| c["num_hidden_layers"] = 0.into())],
        gets: "config.json: config field `num_hidden_layers`: must be at least 1",
    },
    Case {
        test: "config_fewer_layers_than_the_weights",
        class: "Limits",
        input: "`num_hidden_layers` smaller than the blocks in the weights file (the rest were ignored)",
        shown: "whittle inspect tiny-1-of-2-layers",
        args: |fx| vec!["inspect".into(), fx.tiny_with_config("one", |c| c["num_hidden_layers"] = 1.into())],
        gets: "config field `num_hidden_layers`: 1, but the weights hold 2 blocks (tensor `model.layers.1.",
    },
    Case {
        test: "config_heads_do_not_divide_width",
        class: "Limits",
        input: "`num_attention_heads` that does not divide `hidden_size`",
        shown: "whittle inspect tiny-5-heads",
        args: |fx| {
            let d = fx.tiny_with_config("heads", |c| {
                c["num_attention_heads"] = 5.into();
                c["num_key_value_heads"] = 5.into();
            });
            vec!["inspect".into(), d]
        },
        gets: "config field `num_attention_heads`: 5 does not divide hidden_size 32 (and no head_dim is given)",
    },
    Case {
        test: "tokenizer_ids_beyond_the_vocabulary",
        class: "Limits",
        input: "a tokenizer whose ids exceed the model's vocabulary (an out-of-range id printed a candle backtrace)",
        shown: "whittle generate tiny --tokenizer tokenizer-80.json --prompt w70",
        args: |fx| {
            let p = fx.p("tok80.json");
            std::fs::write(&p, whittle_models::testing::word_tokenizer(80).to_string()).unwrap();
            let tiny = fx.s("tiny");
            vec!["generate".into(), tiny, "--tokenizer".into(), fx.s("tok80.json"), "--prompt".into(), "w70".into()]
        },
        gets: "tok80.json: tokenizer has token ids up to 79 but the model's embedding table has 50 rows (ids 0..50)",
    },
    Case {
        test: "bert_tokenizer_for_a_llama_gguf",
        class: "Limits",
        input: "a BERT tokenizer given to a LLaMA GGUF",
        shown: "whittle generate smol.gguf --tokenizer all-MiniLM-L6-v2/tokenizer.json --prompt hi",
        args: |_| {
            let tok = common::minilm().join("tokenizer.json").to_str().unwrap().to_string();
            vec!["generate".into(), smol(), "--tokenizer".into(), tok, "--prompt".into(), "hi".into()]
        },
        gets: "tokenizer.json: tokenizer does not belong to this model: a WordPiece (BERT-style) tokenizer cannot drive a llama decoder",
    },
    Case {
        test: "gguf_offset_not_aligned",
        class: "Corrupt data",
        input: "a GGUF tensor offset that is not a multiple of `general.alignment` (loaded; generate printed nothing)",
        shown: "whittle generate smol-offset+7.gguf --prompt hi",
        args: |fx| vec!["generate".into(), misaligned_gguf(fx), "--prompt".into(), "hi".into()],
        gets: "is not a multiple of general.alignment 32",
    },
    Case {
        test: "smoothquant_out_of_range_before_loading",
        class: "Late validation",
        input: "`--smoothquant 5` (refused after ~10 s of calibration); the model path does not even exist",
        shown: "whittle quantize /no/such/model --scheme w8a8-static --smoothquant 5 -o out",
        args: |fx| {
            let o = fx.s("out");
            ["quantize", "/no/such/model", "--scheme", "w8a8-static", "--smoothquant", "5", "-o", o.as_str()]
                .map(String::from)
                .to_vec()
        },
        gets: "error: --smoothquant 5: must be in [0, 1]",
    },
    Case {
        test: "drop_layers_out_of_range_before_calibration",
        class: "Late validation",
        input: "`--drop-layers 99` (refused after ~10 s of calibration; now right after loading)",
        shown: "whittle prune smol.gguf --drop-layers 99 -o out",
        args: |fx| {
            let o = fx.s("out");
            vec!["prune".into(), smol(), "--drop-layers".into(), "99".into(), "-o".into(), o]
        },
        gets: "error: --drop-layers 99: the model has blocks 0..29",
    },
    Case {
        test: "drop_every_block_before_calibration",
        class: "Late validation",
        input: "dropping every block",
        shown: "whittle prune smol.gguf --drop-layers 0,1,...,29 -o out",
        args: |fx| {
            let all: Vec<String> = (0..30).map(|i| i.to_string()).collect();
            vec!["prune".into(), smol(), "--drop-layers".into(), all.join(","), "-o".into(), fx.s("out")]
        },
        gets: "dropping 30 of 30 blocks would leave none; at least one must stay",
    },
    Case {
        test: "calibration_file_missing_before_loading",
        class: "Late validation",
        input: "a calibration file that does not exist (checked before the model is loaded)",
        shown: "whittle quantize /no/such/model --scheme w8a8-static --calib /no/such.txt -o out",
        args: |fx| {
            let o = fx.s("out");
            ["quantize", "/no/such/model", "--scheme", "w8a8-static", "--calib", "/no/such.txt", "-o", o.as_str()]
                .map(String::from)
                .to_vec()
        },
        gets: "error: --calib /no/such.txt: No such file or directory (os error 2)",
    },
    Case {
        test: "safetensors_is_a_directory",
        class: "Messages",
        input: "`model.safetensors` that is a directory (said \"No such device\")",
        shown: "whittle inspect dir-with-model.safetensors-dir",
        args: |fx| vec!["inspect".into(), fx.minilm_with_weights("stdir", |p| std::fs::create_dir(p).unwrap())],
        gets: "model.safetensors: is a directory, expected a safetensors file",
    },
    Case {
        test: "safetensors_symlink_loop",
        class: "Messages",
        input: "`model.safetensors` that is a symlink loop (said \"no model.safetensors in this directory\")",
        shown: "whittle inspect dir-with-looping-link",
        args: |fx| {
            let d = fx.minilm_with_weights("loop", |p| std::os::unix::fs::symlink("model.safetensors", p).unwrap());
            vec!["inspect".into(), d]
        },
        gets: "model.safetensors: Too many levels of symbolic links (os error 40)",
    },
    Case {
        test: "config_type_error_names_the_field",
        class: "Messages",
        input: "a config value of the wrong type, `\"hidden_size\": \"32\"` (the field was named `(file)`)",
        shown: "whittle inspect tiny-string-width",
        args: |fx| vec!["inspect".into(), fx.tiny_with_config("str", |c| c["hidden_size"] = "32".into())],
        gets: "config field `hidden_size`: invalid type: string \"32\", expected usize (found \"32\")",
    },
    Case {
        test: "os_error_printed_once",
        class: "Messages",
        input: "a model directory without config.json (the OS error was printed twice)",
        shown: "whittle inspect empty-dir",
        args: |fx| {
            std::fs::create_dir_all(fx.p("empty")).unwrap();
            vec!["inspect".into(), fx.s("empty")]
        },
        gets: "config.json: No such file or directory (os error 2)\n",
    },
    Case {
        test: "share_groups_range_syntax",
        class: "Messages",
        input: "`share --groups 0-2-4` (`0-2` meant blocks {0, 2}; it is now the range 0, 1, 2)",
        shown: "whittle share all-MiniLM-L6-v2 --groups 0-2-4 -o out",
        args: |fx| {
            let o = fx.s("out");
            vec!["share".into(), minilm(), "--groups".into(), "0-2-4".into(), "-o".into(), o]
        },
        gets: "`0-2-4`: a range is FIRST-LAST; join blocks that are not adjacent with `+` (0+2)",
    },
    Case {
        test: "threads_zero",
        class: "Limits",
        input: "`--threads 0`",
        shown: "whittle --threads 0 inspect tiny",
        args: |fx| vec!["--threads".into(), "0".into(), "inspect".into(), fx.s("tiny")],
        gets: "error: --threads 0: must be at least 1",
    },
    Case {
        test: "eval_ctx_below_two",
        class: "Limits",
        input: "`eval --ctx 1` (no token to score)",
        shown: "whittle eval smol.gguf --ctx 1",
        args: |_| vec!["eval".into(), smol(), "--ctx".into(), "1".into()],
        gets: "error: --ctx 1: must be at least 2",
    },
    Case {
        test: "output_exists_without_force",
        class: "Outputs",
        input: "an existing output without `--force`",
        shown: "whittle convert tiny -o existing-dir",
        args: |fx| {
            std::fs::create_dir_all(fx.p("out")).unwrap();
            vec!["convert".into(), fx.s("tiny"), "-o".into(), fx.s("out")]
        },
        gets: "exists; set --force to replace it",
    },
    Case {
        test: "export_unknown_format",
        class: "Export",
        input: "an export format whittle does not write",
        shown: "whittle export tiny --format tflite -o out",
        args: |fx| vec!["export".into(), fx.s("tiny"), "--format".into(), "tflite".into(), "-o".into(), fx.s("out")],
        gets: "error: --format tflite: unknown format (formats: onnx, gguf, compressed-tensors)",
    },
    Case {
        test: "export_output_exists_without_force",
        class: "Export",
        input: "an export onto an existing output without `--force`",
        shown: "whittle export tiny --format onnx -o existing-dir",
        args: |fx| {
            std::fs::create_dir_all(fx.p("out")).unwrap();
            vec!["export".into(), fx.s("tiny"), "--format".into(), "onnx".into(), "-o".into(), fx.s("out")]
        },
        gets: "exists; set --force to replace it",
    },
    Case {
        test: "export_block_format_has_no_onnx_form",
        class: "Export",
        input: "a GGUF Q4_1 model exported to ONNX in its block format (no faithful ONNX form; never a silent f32 fallback)",
        shown: "whittle export smol.gguf --format onnx -o out",
        args: |fx| vec!["export".into(), smol(), "--format".into(), "onnx".into(), "-o".into(), fx.s("out")],
        gets: "`model.layers.0.self_attn.q_proj` (q4_1): this block format has no faithful ONNX form in this exporter (4-bit grouped `w4a16` and GGUF `q4_0` do, as com.microsoft.MatMulNBits); load the model with `--dequantize` to export its f32 dequantization",
    },
    Case {
        test: "export_gguf_unknown_scheme",
        class: "Export",
        input: "a GGUF export with a `--scheme` that is no GGUF file type (refused before loading)",
        shown: "whittle export tiny --format gguf --scheme q9_0 -o out.gguf",
        args: |fx| {
            vec!["export".into(), fx.s("tiny"), "--format".into(), "gguf".into(), "--scheme".into(), "q9_0".into(), "-o".into(), fx.s("out.gguf")]
        },
        gets: "error: --scheme q9_0: not a GGUF file type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m (q3_k), q3_k_l, q4_k_s, q4_k_m (q4_k), q5_k_s, q5_k_m (q5_k), q6_k)",
    },
    Case {
        test: "export_gguf_tokenizer_not_bpe",
        class: "Export",
        input: "a GGUF export of a model whose tokenizer.json is not byte-level BPE",
        shown: "whittle export tiny --format gguf -o out.gguf",
        args: |fx| vec!["export".into(), fx.s("tiny"), "--format".into(), "gguf".into(), "-o".into(), fx.s("out.gguf")],
        gets: "tiny/tokenizer.json: tokenizer: model type `WordLevel`: only byte-level BPE tokenizers (llama.cpp's `gpt2` model) can be written to GGUF yet",
    },
    Case {
        test: "export_gguf_of_an_encoder",
        class: "Export",
        input: "a GGUF export of an encoder (GGUF export writes LLaMA-family decoders)",
        shown: "whittle export all-MiniLM-L6-v2 --format gguf -o out.gguf",
        args: |fx| vec!["export".into(), common::minilm().to_str().unwrap().into(), "--format".into(), "gguf".into(), "-o".into(), fx.s("out.gguf")],
        gets: "all-MiniLM-L6-v2: GGUF export is for decoders (LLaMA family); this is a bert encoder (export it with --format onnx)",
    },
    Case {
        test: "verify_gguf_python_missing",
        class: "Export",
        input: "`verify` of a GGUF with a `--python` that does not exist (refused before loading)",
        shown: "whittle verify smol.gguf --against smol.gguf --python /no/such/python",
        args: |_| vec!["verify".into(), smol(), "--against".into(), smol(), "--python".into(), "/no/such/python".into()],
        gets: "error: --python /no/such/python: no such file",
    },
    Case {
        test: "export_ct_output_exists_without_force",
        class: "Export",
        input: "a compressed-tensors export onto an existing output without `--force`",
        shown: "whittle export tiny --format compressed-tensors -o existing-dir",
        args: |fx| {
            std::fs::create_dir_all(fx.p("out")).unwrap();
            vec!["export".into(), fx.s("tiny"), "--format".into(), "compressed-tensors".into(), "-o".into(), fx.s("out")]
        },
        gets: "exists; set --force to replace it",
    },
    Case {
        test: "export_ct_block_format_has_no_ct_form",
        class: "Export",
        input: "a GGUF Q4_1 model exported to compressed-tensors (a ggml block type; never a silent dequantization)",
        shown: "whittle export smol.gguf --format compressed-tensors -o out",
        args: |fx| vec!["export".into(), smol(), "--format".into(), "compressed-tensors".into(), "-o".into(), fx.s("out")],
        gets: "`model.layers.0.self_attn.q_proj` (q4_1): a GGUF block type (super-blocks, f16 mins) has no compressed-tensors form; export it with --format gguf, or requantize the float model with `whittle quantize --scheme w4a16`",
    },
    Case {
        test: "export_ct_per_block_widths",
        class: "Export",
        input: "a compressed-tensors export of a model whose blocks differ in width (transformers' config has one width)",
        shown: "whittle export tiny --format compressed-tensors -o out",
        args: |fx| vec!["export".into(), fx.s("tiny"), "--format".into(), "compressed-tensors".into(), "-o".into(), fx.s("out")],
        gets: "one width for every layer (export per-block widths with --format gguf or onnx)",
    },
    Case {
        test: "export_ct_of_an_encoder",
        class: "Export",
        input: "a compressed-tensors export of an encoder (written for decoders, loaded by AutoModelForCausalLM)",
        shown: "whittle export all-MiniLM-L6-v2 --format compressed-tensors -o out",
        args: |fx| vec!["export".into(), common::minilm().to_str().unwrap().into(), "--format".into(), "compressed-tensors".into(), "-o".into(), fx.s("out")],
        gets: "all-MiniLM-L6-v2: compressed-tensors export is for decoders (LLaMA family, loaded by AutoModelForCausalLM); this is a bert encoder (export it with --format onnx)",
    },
    Case {
        test: "verify_ct_python_missing",
        class: "Export",
        input: "`verify` of a compressed-tensors directory with a `--python` that does not exist (refused before loading)",
        shown: "whittle verify smol-ct --against smol-gptq --python /no/such/python",
        args: |fx| {
            let d = fx.p("ct");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config.json"), r#"{"quantization_config": {"quant_method": "compressed-tensors"}}"#).unwrap();
            vec!["verify".into(), fx.s("ct"), "--against".into(), fx.s("tiny"), "--python".into(), "/no/such/python".into()]
        },
        gets: "error: --python /no/such/python: no such file",
    },
    Case {
        test: "verify_block_activations_differ",
        class: "Export",
        input: "`verify` of a 4-bit ONNX export whose MatMulNBits take int8-rounded activations against a `--float-activations` run (different arithmetic, not a runtime difference)",
        shown: "whittle --float-activations verify tiny-w4-onnx --against tiny-w4",
        args: |fx| {
            let q = ["quantize", &fx.s("tiny"), "--scheme", "w4a16", "--group-size", "32", "--override", ".*down_proj=keep", "-o", &fx.s("w4")];
            assert!(whittle(&q).status.success(), "{}", stderr(&whittle(&q)));
            let e = ["export", &fx.s("w4"), "--format", "onnx", "-o", &fx.s("w4-onnx")];
            assert!(whittle(&e).status.success(), "{}", stderr(&whittle(&e)));
            vec!["--float-activations".into(), "verify".into(), fx.s("w4-onnx"), "--against".into(), fx.s("w4")]
        },
        gets: "its 4-bit layers take int8/32 activations (exported without --float-activations), but the source runs them with f32 activations; verify without --float-activations to compare the same arithmetic",
    },
    Case {
        test: "verify_export_missing",
        class: "Export",
        input: "`verify` of an export that does not exist",
        shown: "whittle verify /no/such/export --against tiny",
        args: |fx| vec!["verify".into(), "/no/such/export".into(), "--against".into(), fx.s("tiny")],
        gets: "/no/such/export: no such ONNX file (pass the directory `whittle export` wrote, or a .onnx file)",
    },
];

/// Runs case `name`: non-zero exit, no panic, the table's text, nothing left in the work directory but
/// the case's own inputs.
fn run(name: &str) {
    let c = CASES.iter().find(|c| c.test == name).unwrap();
    let fx = Fx::new();
    let args = (c.args)(&fx);
    let before: Vec<_> = listing(fx.dir.path());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = std::time::Instant::now();
    let o = whittle(&refs);
    let e = stderr(&o);
    assert!(!o.status.success(), "{name}: succeeded\n{e}");
    assert_eq!(o.status.code(), Some(1), "{name}: {e}");
    assert!(!e.contains("panicked") && !e.contains("backtrace"), "{name}: {e}");
    assert!(e.contains(c.gets), "{name}: expected `{}` in:\n{e}", c.gets);
    assert!(!e.contains("calibrated on") && !e.contains("calibration activations"), "{name}: calibrated first: {e}");
    assert_eq!(listing(fx.dir.path()), before, "{name} left files behind");
    // Every one of these is refused before any expensive work.
    assert!(t0.elapsed().as_secs() < 60, "{name} took {:?}", t0.elapsed());
}

fn listing(d: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

macro_rules! cases {
    ($($name:ident)*) => { $( #[test] fn $name() { run(stringify!($name)); } )* };
}

cases! {
    generate_prompt_past_the_context embed_max_len_zero config_num_hidden_layers_zero
    config_fewer_layers_than_the_weights config_heads_do_not_divide_width tokenizer_ids_beyond_the_vocabulary
    bert_tokenizer_for_a_llama_gguf gguf_offset_not_aligned smoothquant_out_of_range_before_loading
    drop_layers_out_of_range_before_calibration drop_every_block_before_calibration
    calibration_file_missing_before_loading safetensors_is_a_directory safetensors_symlink_loop
    config_type_error_names_the_field os_error_printed_once share_groups_range_syntax threads_zero
    eval_ctx_below_two output_exists_without_force export_unknown_format export_output_exists_without_force
    export_block_format_has_no_onnx_form verify_export_missing export_gguf_unknown_scheme export_gguf_tokenizer_not_bpe
    export_gguf_of_an_encoder verify_gguf_python_missing export_ct_output_exists_without_force
    export_ct_block_format_has_no_ct_form export_ct_per_block_widths export_ct_of_an_encoder verify_ct_python_missing
    verify_block_activations_differ
}

const BEGIN: &str = "<!-- generated by crates/cli/tests/errors.rs: do not edit by hand -->";
const END: &str = "<!-- end of generated table -->";

/// The table of `docs/errors.md`, from [`CASES`].
fn table() -> String {
    let mut s = format!(
        "{BEGIN}\n\n| class | bad input | command | what whittle says (exit 1) | test |\n|---|---|---|---|---|\n"
    );
    for c in CASES {
        let cell = |t: &str| t.trim_end().replace('|', "\\|").replace('\n', " ");
        // A code span holding backticks is delimited by double ones (CommonMark).
        let code = |t: &str| if t.contains('`') { format!("`` {} ``", cell(t)) } else { format!("`{}`", cell(t)) };
        s += &format!("| {} | {} | {} | {} | `{}` |\n", c.class, cell(c.input), code(c.shown), code(c.gets), c.test);
    }
    s + "\n" + END
}

/// `docs/errors.md` holds exactly this table, and every case has its test.
#[test]
fn errors_md_matches_the_cases() {
    let src = include_str!("errors.rs");
    for c in CASES {
        assert!(src.matches(&format!(" {} ", c.test)).count() + src.matches(&format!(" {}\n", c.test)).count() >= 1);
    }
    let path = common::repo_root().join("docs/errors.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    let (head, tail) = match (doc.find(BEGIN), doc.find(END)) {
        (Some(a), Some(b)) => (doc[..a].to_string(), doc[b + END.len()..].to_string()),
        _ => (String::new(), String::new()),
    };
    let want = format!("{head}{}{tail}", table());
    if std::env::var_os("WHITTLE_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    assert_eq!(doc, want, "docs/errors.md is stale: WHITTLE_BLESS=1 cargo test -p whittle-cli --test errors");
}

/// Issue 22 ("Limits"): `--threads 100000` spent minutes spawning threads; it is capped at a multiple of the
/// CPUs this process may use, with a note, and the command runs as usual.
#[test]
fn threads_far_past_the_cpus_are_capped() {
    let fx = Fx::new();
    let t0 = std::time::Instant::now();
    let o = whittle(&["--threads", "100000", "embed", &minilm(), "hello", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cpus = std::thread::available_parallelism().unwrap().get();
    let note = format!("note: --threads 100000 capped at {} (4 × the {cpus} CPUs available to this process)", 4 * cpus);
    assert!(stderr(&o).contains(&note), "{}", stderr(&o));
    assert!(t0.elapsed().as_secs() < 60, "{:?}", t0.elapsed());
    drop(fx);
}

/// Issue 22 ("Limits"): the `--truncate` way out of a prompt past the context keeps the prompt's last tokens.
#[test]
fn generate_truncate_keeps_the_last_tokens() {
    let fx = Fx::new();
    // The tiny LLaMA has 64 positions; 100 prompt tokens and 4 new ones do not fit.
    let prompt: Vec<String> = (0..100).map(|i| format!("w{}", 1 + i % 40)).collect();
    let prompt = prompt.join(" ");
    let o = whittle(&["generate", &fx.s("tiny"), "--prompt", &prompt, "-n", "4", "--ignore-eos", "--json"]);
    assert!(
        !o.status.success()
            && stderr(&o).contains(
                "the prompt is 100 tokens and 4 more are asked for: 104 positions, past the model's context of 64"
            ),
        "{}",
        stderr(&o)
    );
    let o =
        whittle(&["generate", &fx.s("tiny"), "--prompt", &prompt, "-n", "4", "--ignore-eos", "--truncate", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prompt_ids"].as_array().unwrap().len(), 60);
    assert_eq!(v["ids"].as_array().unwrap().len(), 4);
    assert!(stderr(&o).contains("[prompt truncated to its last 60 of 100 tokens (context 64)]"), "{}", stderr(&o));
}
