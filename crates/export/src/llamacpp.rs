//! llama.cpp as `verify`'s runtime for GGUF exports: the committed script `scripts/llamacpp_verify.py`
//! (embedded in the binary) run by a Python that has llama-cpp-python (the peers' venv by default), fed the
//! token ids whittle uses and streaming back llama.cpp's logits chunk by chunk (raw f32 on a pipe: 16 chunks of
//! WikiText-2 are 0.8 GB of logits for a 49k vocabulary, never held at once). The same protocol runs
//! transformers for compressed-tensors exports ([`PyRuntime::Transformers`], `scripts/transformers_verify.py`).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The script, as committed: run with `python -c`, so the binary needs no file beside it.
pub const SCRIPT: &str = include_str!("../../../scripts/llamacpp_verify.py");

/// A runtime `verify` drives through a committed Python script in the peers' venv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PyRuntime {
    /// llama.cpp through llama-cpp-python, on a GGUF file.
    LlamaCpp,
    /// transformers' `AutoModelForCausalLM` with the `compressed-tensors` package, on an HF directory.
    Transformers,
}

impl PyRuntime {
    fn script(self) -> &'static str {
        match self {
            PyRuntime::LlamaCpp => SCRIPT,
            PyRuntime::Transformers => crate::transformers::SCRIPT,
        }
    }

    /// What the Python must be able to import.
    fn needs(self) -> &'static str {
        match self {
            PyRuntime::LlamaCpp => "`llama_cpp` (pip install llama-cpp-python)",
            PyRuntime::Transformers => {
                "`torch`, `transformers` and `compressed_tensors` (pip install compressed-tensors)"
            }
        }
    }

    /// An error of this runtime.
    pub fn err(self, msg: impl Into<String>) -> Error {
        match self {
            PyRuntime::LlamaCpp => Error::LlamaCpp(msg.into()),
            PyRuntime::Transformers => Error::Transformers(msg.into()),
        }
    }
}

/// The peers' Python (`~/.cache/whittle-peers/bin/python`, made by `scripts/test-deps.sh`), if it exists.
pub fn default_python() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".cache/whittle-peers/bin/python");
    p.exists().then_some(p)
}

/// What llama.cpp is asked to run.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    /// Prompts (token ids) to continue greedily for `n_tokens`.
    pub prompts: Vec<Vec<u32>>,
    pub n_tokens: usize,
    /// Chunks whose logits at positions `first-1 .. len-2` come back.
    pub chunks: Vec<Vec<u32>>,
    pub first: usize,
    /// Texts llama.cpp tokenizes (the tokenizer check).
    pub texts: Vec<String>,
    pub threads: Option<usize>,
}

/// The runtime's first answer: its version, vocabulary, greedy continuations and tokenizations.
#[derive(Debug, Clone, Deserialize)]
pub struct Reply {
    /// llama-cpp-python's version, or transformers' (with compressed-tensors' and torch's).
    #[serde(alias = "llama_cpp", alias = "transformers")]
    pub version: String,
    pub n_vocab: usize,
    pub greedy: Vec<Vec<u32>>,
    pub tokens: Vec<Vec<u32>>,
    /// transformers: the Linears compressed-tensors quantized (0 means it did not apply the config).
    #[serde(default)]
    pub quantized_linears: Option<usize>,
}

/// A running llama.cpp process, its logits still to read.
pub struct Session {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<String>>,
    pub reply: Reply,
    pub python: PathBuf,
    runtime: PyRuntime,
}

impl Session {
    /// Starts llama.cpp on `gguf` with `python` (else the peers' venv) and sends `req`.
    pub fn start(python: Option<&Path>, gguf: &Path, req: &Request) -> Result<Session> {
        Self::start_runtime(PyRuntime::LlamaCpp, python, gguf, req)
    }

    /// Starts `runtime`'s script on `model` with `python` (else the peers' venv) and sends `req`.
    pub fn start_runtime<R: Serialize>(
        runtime: PyRuntime,
        python: Option<&Path>,
        model: &Path,
        req: &R,
    ) -> Result<Session> {
        let err = |m: String| runtime.err(m);
        let python = match python {
            Some(p) if !p.exists() => return Err(err(format!("{}: no such Python (option `python`)", p.display()))),
            Some(p) => p.to_path_buf(),
            None => default_python().ok_or_else(|| {
                err(format!(
                    "verifying {} runs it through a Python with {}, and ~/.cache/whittle-peers/bin/python (the \
                     peers' venv, scripts/test-deps.sh) does not exist: make it, or pass option `python`",
                    model.display(),
                    runtime.needs()
                ))
            })?,
        };
        let mut child = Command::new(&python)
            .arg("-c")
            .arg(runtime.script())
            .arg(model)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("{}: cannot run: {e}", python.display())))?;
        let mut stderr = child.stderr.take().expect("piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut stdin = child.stdin.take().expect("piped");
        let line = serde_json::to_string(req).map_err(|e| err(e.to_string()))? + "\n";
        // A write error means the process died: its status and stderr say why, below.
        let _ = stdin.write_all(line.as_bytes());
        drop(stdin);
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut first = String::new();
        let _ = stdout.read_line(&mut first);
        let mut s = Session { child, stdout, stderr: Some(stderr), reply: Reply::empty(), python, runtime };
        if first.trim().is_empty() {
            return Err(s.failure("no reply"));
        }
        s.reply = serde_json::from_str(&first).map_err(|e| err(format!("unreadable reply ({e}): {first:.200}")))?;
        Ok(s)
    }

    /// The next chunk's logits: `rows` rows of `v` values.
    pub fn next_chunk(&mut self, rows: usize, v: usize) -> Result<Vec<f32>> {
        let mut buf = vec![0u8; rows * v * 4];
        if self.stdout.read_exact(&mut buf).is_err() {
            return Err(self.failure("the logits ended early"));
        }
        Ok(buf.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Waits for the process; an error with its stderr when it failed.
    pub fn finish(mut self) -> Result<()> {
        let status = self.child.wait().map_err(|e| self.runtime.err(e.to_string()))?;
        if !status.success() {
            return Err(self.failure("exited"));
        }
        Ok(())
    }

    /// The error for a failed run: the exit status (3: a package is missing, 4: the model did not load) and
    /// stderr.
    fn failure(&mut self, what: &str) -> Error {
        let _ = self.child.kill();
        let status = self.child.wait().ok().and_then(|s| s.code());
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let tail: String =
            stderr.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        let hint = match status {
            Some(3) => format!(" ({} lacks {}, or pass option `python`)", self.python.display(), self.runtime.needs()),
            _ => String::new(),
        };
        self.runtime.err(format!("{what} (exit status {}){hint}: {tail}", status.map_or("?".into(), |c| c.to_string())))
    }
}

impl Reply {
    fn empty() -> Self {
        Reply { version: String::new(), n_vocab: 0, greedy: vec![], tokens: vec![], quantized_linears: None }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // An early return (an error on whittle's side) must not leave llama.cpp running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
