//! `whittle serve` as a process: SIGTERM drains in-flight requests (a stream and a plain completion both
//! finish whole), refuses new connections, exits 0 and frees the port (issue 19).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long the tests wait for a server to load, a request to finish or the process to exit.
const PATIENCE: Duration = Duration::from_secs(300);

/// A `whittle serve` child on a free loopback port, its stderr collected by a thread.
struct Serve {
    child: Child,
    port: u16,
    stderr: mpsc::Receiver<String>,
}

impl Serve {
    fn start(model: &std::path::Path) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_whittle"))
            .args(["serve", model.to_str().unwrap(), "--host", "127.0.0.1", "--port", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // "whittle serve: listening on http://127.0.0.1:PORT (loading …)"
        let line = rx.recv_timeout(PATIENCE).expect("whittle serve printed no address");
        let port = line
            .split("http://127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in `{line}`"));
        let s = Serve { child, port, stderr: rx };
        let t0 = Instant::now();
        while request(s.port, "GET", "/health", None).map(|r| r.status).ok() != Some(200) {
            assert!(t0.elapsed() < PATIENCE, "not healthy within {PATIENCE:?}: {}", s.stderr_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sigterm(&self) {
        let st = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap();
        assert!(st.success(), "kill -TERM failed");
    }

    /// The exit code, waiting at most `PATIENCE`.
    fn wait_exit(&mut self) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(t0.elapsed() < PATIENCE, "still running {PATIENCE:?} after SIGTERM: {}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    /// The body with any chunked transfer encoding removed.
    body: String,
}

/// Opens a connection and sends one HTTP/1.1 request (`Connection: close`).
fn send(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(PATIENCE))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(s)
}

/// Reads a whole response (the server closes the connection after it).
fn finish(mut s: TcpStream, mut raw: Vec<u8>) -> std::io::Result<Answer> {
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Ok(Answer { status, body: if chunked { dechunk(body) } else { body.to_string() } })
}

fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<Answer> {
    finish(send(port, method, path, body)?, Vec::new())
}

/// The payload of a chunked body (`SIZE\r\nDATA\r\n` … `0\r\n\r\n`).
fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

fn metric(port: u16, name: &str) -> f64 {
    let m = request(port, "GET", "/metrics", None).unwrap();
    m.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn sigterm_drains_a_stream_and_a_completion_then_exits_0_and_frees_the_port() {
    let dir = tempfile::tempdir().unwrap();
    whittle_models::testing::slow_llama(dir.path());
    let mut s = Serve::start(dir.path());
    let port = s.port;
    let (n_stream, n_plain) = (1000, 300);

    // A stream, read until its first event.
    let body = json!({"prompt": "w3 w4", "max_tokens": n_stream, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut stream = send(port, "POST", "/v1/completions", Some(&body.to_string())).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains("data: ") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream closed before its first event");
        raw.extend_from_slice(&buf[..n]);
    }
    // A plain completion, running beside it.
    let plain = std::thread::spawn(move || {
        let b = json!({"prompt": "w5", "max_tokens": n_plain, "ignore_eos": true, "temperature": 0});
        request(port, "POST", "/v1/completions", Some(&b.to_string()))
    });
    let t0 = Instant::now();
    while metric(port, "whittle_running_sequences") < 2.0 {
        assert!(t0.elapsed() < PATIENCE, "the completion never joined the running batch");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before_signal = raw.len();

    s.sigterm();
    // New connections are refused from now on (the listener is closed first), while the old ones drain.
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(10), "still accepting 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }

    let streamed = finish(stream, raw).unwrap();
    assert_eq!(streamed.status, 200);
    assert!(streamed.body.len() > before_signal, "nothing was streamed after SIGTERM: the test did not run mid-stream");
    let events: Vec<&str> = streamed.body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "the stream did not end cleanly: {:?}", events.last());
    let chunks: Vec<Value> =
        events.iter().filter(|e| **e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "an error event in a drained stream");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], n_stream, "the stream was cut short: {usage}");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "length"));

    let plain = plain.join().unwrap().unwrap();
    assert_eq!(plain.status, 200, "{}", plain.body);
    let v: Value = serde_json::from_str(&plain.body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], n_plain);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    assert_eq!(s.wait_exit(), Some(0), "{}", s.stderr_text());
    let err = s.stderr_text();
    assert!(!err.contains("panicked"), "{err}");
    assert!(free(port), "port {port} still held after exit");
}

#[test]
fn sigterm_when_idle_exits_0_at_once() {
    let dir = tempfile::tempdir().unwrap();
    whittle_models::testing::tiny_llama(dir.path());
    let mut s = Serve::start(dir.path());
    s.sigterm();
    let t0 = Instant::now();
    assert_eq!(s.wait_exit(), Some(0), "{}", s.stderr_text());
    assert!(t0.elapsed() < Duration::from_secs(10), "an idle server took {:?} to stop", t0.elapsed());
    assert!(free(s.port), "port {} still held after exit", s.port);
}
