//! An oversize body gets a clean `400` problem+json every time, never a reset connection:
//! through devhost (as locally) and straight to the handler (as the Azure host forwards it).
//! 2, 5 and 50 MB, 20 times each, on one connection pool.

use std::time::Duration;

use axum::body::Bytes;

use crate::support::Setup;

const SIZES_MB: [usize; 3] = [2, 5, 50];
const TIMES: usize = 20;

async fn post_oversize_bodies(http: &reqwest::Client, url: &str, key: &str, target: &str) {
    for mb in SIZES_MB {
        let body = Bytes::from(vec![b' '; mb * 1024 * 1024]);
        for i in 0..TIMES {
            let r = http
                .post(url)
                .header("x-functions-key", key)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("{target}: {mb} MB, try {i}: no answer: {e:?}"));
            let status = r.status().as_u16();
            let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
            let text = r.text().await.unwrap();
            assert_eq!(
                (status, content_type.as_str()),
                (400, "application/problem+json"),
                "{target}: {mb} MB, try {i}: {text}"
            );
            let problem: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(problem["field"], "body", "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_body_is_a_clean_400_every_time_through_devhost_and_straight_to_the_handler() {
    let app = Setup::new().no_timers().start().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let key = app.host().function_key().to_string();
    let path = "/api/devices/bat-1/soc";

    let via_devhost = format!("{}{path}", app.host().base_url());
    post_oversize_bodies(&http, &via_devhost, &key, "devhost").await;

    let port = app.host().handler_port().await.expect("handler ready");
    let direct = format!("http://127.0.0.1:{port}{path}");
    post_oversize_bodies(&http, &direct, &key, "handler").await;
}
