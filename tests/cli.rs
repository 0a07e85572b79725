//! The user's path: the `lumen demo` binary starts, says where the dashboard is, serves it,
//! and on SIGINT (Ctrl-C) drains, flushes to Parquet and exits 0 within a few seconds.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_binary_starts_serves_and_stops_on_ctrl_c() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lumen"))
        .args([
            "demo",
            "--pod-subnet",
            "127.0.78",
            "--otlp-grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .args([
            "--xds",
            "127.0.0.1:0",
            "--control-http",
            "127.0.0.1:0",
            "--duration",
            "120",
            "--data",
        ])
        .arg(data.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("lumen starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("lumen: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut dashboard = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while dashboard.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            dashboard = line.strip_prefix("dashboard: ").map(str::to_string);
        }
    }
    let Some(url) = dashboard else {
        let _ = child.kill();
        panic!("no 'dashboard: <url>' line within 30 s");
    };
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // Some traffic, and a dashboard that answers.
    std::thread::sleep(Duration::from_secs(4));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let html = rt.block_on(async {
        reqwest::get(&url)
            .await
            .expect("dashboard")
            .text()
            .await
            .expect("html")
    });
    assert!(html.contains("Lumen service mesh"));

    let interrupted = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let code = loop {
        if let Some(code) = child.try_wait().expect("wait") {
            break code;
        }
        if interrupted.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("lumen demo still running 15 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(code.success(), "exit status {code}");
    assert!(
        interrupted.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        interrupted.elapsed()
    );
    let files = std::fs::read_dir(data.path().join("spans"))
        .expect("spans dir")
        .count();
    assert!(files > 0, "no Parquet files flushed");
    let lines: Vec<String> = rx.try_iter().collect();
    assert!(lines.iter().any(|l| l == "stopped"), "{lines:?}");
}
