//! What already held when the issue was filed, kept as tests: each refused
//! (or answered) as before, and nothing but a sanitised request upstream.

use crate::raw::{
    assert_nothing_forwarded, assert_sanitised, exchange, pool_host, post, setup_with,
    upstream_text,
};

const CHAT: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread")]
async fn malformed_heads_are_400_and_forward_nothing() {
    let s = setup_with(|_| {}).await;
    let many_headers = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n{}Content-Length: 0\r\n\r\n",
        (0..300)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let cases: [(&[u8], &str); 9] = [
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x", "ambiguous_length"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nX-A: a\r\n  folded\r\nContent-Length: 0\r\n\r\n", "malformed_request"),
        (b"POST /v1/chat/completions HTTP/1.1\nHost: g\nContent-Length: 0\n\n", "malformed_request"),
        (b"GET /v1/chat/completions\r\n\r\n", "malformed_request"),
        (b"POST /v1/chat/completions HTTP/1.2\r\nHost: g\r\nContent-Length: 0\r\n\r\n", "malformed_request"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n", "malformed_request"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n", "malformed_request"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: -1\r\n\r\n", "ambiguous_length"),
        (many_headers.as_bytes(), "too_many_headers"),
    ];
    for (request, code) in cases {
        let reply = exchange(s.gw.chat, request).await;
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (400, code),
            "{}",
            String::from_utf8_lossy(request)
        );
    }
    assert_nothing_forwarded(&s.ups, "malformed heads");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_chunk_size_is_a_400_and_no_upstream_gets_a_whole_request() {
    let s = setup_with(|_| {}).await;
    let request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    let reply = exchange(s.gw.chat, request).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (400, "malformed_body")
    );
    // Bodies stream: the upstream may have seen the sanitised head, never the bad chunk.
    let bytes = upstream_text(&s.ups);
    assert!(!bytes.contains("zz"), "{bytes}");
    for (pool, r) in s.ups.all_requests() {
        assert_sanitised(&r, &pool_host(&s.ups, &pool), CHAT, &["transfer-encoding"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_is_405_and_path_tricks_on_literal_routes_are_404() {
    let s = setup_with(|_| {}).await;
    let reply = exchange(
        s.gw.chat,
        b"CONNECT inference.internal:443 HTTP/1.1\r\nHost: inference.internal:443\r\n\r\n",
    )
    .await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (405, "method_not_allowed")
    );
    for path in [
        "/v1/chat/completions/",
        "//v1/chat/completions",
        "/V1/chat/completions",
        "/v1/chat/completions;x",
        "/v1/chat//completions",
        "/v1/chat/completions%20",
    ] {
        let reply = exchange(s.gw.chat, &post(path, &[])).await;
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (404, "unknown_route"),
            "{path}"
        );
    }
    assert_nothing_forwarded(&s.ups, "unknown routes");
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_tricks_neither_remove_stamps_nor_pass_h2c_settings() {
    let s = setup_with(|_| {}).await;
    let reply = exchange(
        s.gw.api,
        &post(
            CHAT,
            &[
                "Authorization: Bearer demo-api-zdr",
                "Connection: x-privacy-training, x-zero-data-retention, HTTP2-Settings",
                "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA",
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (pool, r) = crate::raw::only_request(&s.ups);
    assert_sanitised(&r, &pool_host(&s.ups, &pool), CHAT, &["connection"]);
    assert_eq!(r.header("x-privacy-training"), Some("denied"));
    assert_eq!(r.header("x-zero-data-retention"), Some("1"));
    assert!(r.header("http2-settings").is_none(), "{r:?}");
    let connection = r.header_values("connection").join(",").to_ascii_lowercase();
    assert!(
        !connection.contains("x-privacy") && !connection.contains("x-zero"),
        "{connection}"
    );
}
