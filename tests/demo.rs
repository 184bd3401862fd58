//! `privacy-gateway demo`: the shipped example configuration with one echo
//! upstream per pool, as the README's first command runs it (on free ports).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{client, free_ports, shipped, CLIENT_V4};

/// The demo process; killed when dropped.
struct Demo {
    child: Child,
    api: u16,
    chat: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo() -> Demo {
    let dir = tempfile::tempdir().expect("tempdir");
    let [api, chat, admin] = free_ports();
    let gateway = shipped("gateway.toml")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{api}"))
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{chat}"))
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin}"))
        .replace(
            "/tmp/privacy-gateway",
            &dir.path().join("pg").display().to_string(),
        );
    std::fs::write(dir.path().join("gateway.toml"), gateway).expect("write");
    for name in ["rules.toml", "pools.toml", "accounts.jsonl"] {
        std::fs::write(dir.path().join(name), shipped(name)).expect("write");
    }
    let child = Command::new(support::binary())
        .args(["demo", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let deadline = Instant::now() + Duration::from_secs(15);
    for port in [api, chat] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the demo did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Demo {
        child,
        api,
        chat,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_shows_what_a_model_api_is_told() {
    let demo = start_demo();
    let resp = client()
        .post(format!("http://127.0.0.1:{}/v1/chat/completions", demo.api))
        .bearer_auth("demo-api-paid")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.expect("echo JSON");
    let headers = &echo["headers"];
    assert_eq!(headers["x-privacy-training"], "denied");
    assert_eq!(headers["x-privacy-training-basis"], "3.4.2/paid");
    assert_eq!(headers["x-privacy-retention"], "30d");
    assert_eq!(headers["x-forwarded-for"], "127.45.67.0");
    assert_eq!(echo["pool"], headers["x-privacy-pool"], "{echo}");
    assert_eq!(echo["method"], "POST");
    assert!(headers.get("authorization").is_none());
    assert!(!echo.to_string().contains(CLIENT_V4));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_streams_events_for_stream_requests() {
    let demo = start_demo();
    let mut resp = client()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            demo.chat
        ))
        .body(r#"{"stream":true}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("type")
        .starts_with("text/event-stream"));
    let mut body = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline.into(), resp.chunk())
        .await
        .expect("bounded")
    {
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(body.matches("data: ").count(), 4, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
}
