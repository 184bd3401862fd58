//! Through the real proxy: a server-sent-events answer reaches the client
//! event by event, over HTTP/1.1, HTTP/2 over TLS and cleartext HTTP/2. Each upstream event after the first is held back until the
//! test has seen the one before it at the client, so a gateway that buffered
//! the stream (or any part of it) would make the test time out and fail.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use privacy_gateway::echo::{EchoUpstream, StreamPace, STREAM_EVENTS};
use reqwest::StatusCode;
use support::tls::{client_for, serve_tls_on_api, Protocol, TestCa, GATEWAY_NAME};
use support::{client, shipped_pool_names, Gateway, TestConfig, Upstreams};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Longest wait for any one event.
const EVENT_WAIT: Duration = Duration::from_secs(5);

/// One gated echo per shipped pool, all sharing `gate`.
async fn gated_upstreams(gate: &Arc<Semaphore>) -> Upstreams {
    let mut echoes = HashMap::new();
    for name in shipped_pool_names() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo listener");
        let echo = EchoUpstream::start_with(&name, listener, StreamPace::Gate(gate.clone()))
            .expect("start gated echo upstream");
        echoes.insert(name, echo);
    }
    Upstreams { echoes }
}

/// Reads the response until one complete event (terminated by a blank line)
/// is buffered, and returns it without its terminator. Fails the test when
/// none arrives within [`EVENT_WAIT`] or the body ends first.
async fn next_event(resp: &mut reqwest::Response, buf: &mut BytesMut, what: &str) -> String {
    let read = async {
        loop {
            if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event = buf.split_to(end + 2);
                return String::from_utf8_lossy(&event[..end]).into_owned();
            }
            match resp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => panic!(
                    "the body ended before {what}; unparsed: {:?}",
                    String::from_utf8_lossy(buf)
                ),
                Err(e) => panic!("reading the body before {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(EVENT_WAIT, read)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what} did not reach the client within {EVENT_WAIT:?} (held back by the gateway?); \
             received so far: {:?}",
                String::from_utf8_lossy(buf)
            )
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_reach_the_client_one_by_one() {
    assert_events_arrive_one_by_one(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_reach_an_http2_client_over_tls_one_by_one() {
    assert_events_arrive_one_by_one(Some(Protocol::Http2OverTls)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sent_events_reach_a_cleartext_http2_client_one_by_one() {
    assert_events_arrive_one_by_one(Some(Protocol::H2c)).await;
}

/// Streams a chat completion through the api listener, speaking `protocol`
/// (HTTP/1.1 in the clear when `None`), and checks every event arrives alone.
async fn assert_events_arrive_one_by_one(protocol: Option<Protocol>) {
    let gate = Arc::new(Semaphore::new(0));
    let ups = gated_upstreams(&gate).await;
    let mut config = TestConfig::shipped_with(&ups);
    let ca = TestCa::new("gateway test CA");
    match protocol {
        Some(Protocol::H2c) => config.api_listener = "h2c = true\n".into(),
        Some(_) => serve_tls_on_api(&mut config, &ca.leaf(GATEWAY_NAME)),
        None => {}
    }
    let gw = Gateway::start(&config);
    let (c, url) = match protocol {
        Some(p) => (
            client_for(p, gw.api, Some(&ca)),
            p.url(gw.api, "/v1/chat/completions"),
        ),
        None => (client(), gw.api_url("/v1/chat/completions")),
    };

    let mut resp = tokio::time::timeout(
        EVENT_WAIT,
        c.post(url)
            .bearer_auth("demo-api-paid")
            .header("accept", "text/event-stream")
            .header("content-type", "application/json")
            .body(r#"{"stream":true}"#)
            .send(),
    )
    .await
    .expect("the response head arrives before the stream is released")
    .expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    if let Some(p) = protocol {
        assert_eq!(resp.version(), p.version());
    }
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("text/event-stream"),
        "content-type: {content_type:?}"
    );
    let decision_id =
        support::decision_id(&resp).expect("x-privacy-decision-id on the streamed response");

    // Exactly one upstream got the request, stamped with the same decision.
    let forwarded = ups.all_requests();
    assert_eq!(forwarded.len(), 1, "one upstream request: {forwarded:?}");
    let (pool, recorded) = &forwarded[0];
    assert_eq!(
        recorded.header("x-privacy-decision-id"),
        Some(decision_id.as_str())
    );

    let mut buf = BytesMut::new();
    for index in 0..STREAM_EVENTS {
        if index > 0 {
            // The upstream sends event `index` only now that the client has
            // seen event `index - 1`.
            gate.add_permits(1);
        }
        let what = format!("event {index}");
        let event = next_event(&mut resp, &mut buf, &what).await;
        assert_eq!(
            event,
            format!("data: {{\"pool\":\"{pool}\",\"index\":{index}}}"),
            "{what}"
        );
        if index + 1 < STREAM_EVENTS {
            assert!(
                buf.is_empty(),
                "nothing beyond {what} can have arrived yet: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
    }
    assert_eq!(
        next_event(&mut resp, &mut buf, "the [DONE] event").await,
        "data: [DONE]"
    );
    // HTTP/2 may end the stream with an empty DATA frame: nothing else may come.
    let rest = tokio::time::timeout(EVENT_WAIT, async {
        let mut rest = Vec::new();
        while let Some(chunk) = resp.chunk().await.expect("reading the end of the body") {
            rest.extend_from_slice(&chunk);
        }
        rest
    })
    .await
    .expect("the body ends after [DONE]");
    assert!(rest.is_empty(), "nothing after [DONE]: {rest:?}");
}
