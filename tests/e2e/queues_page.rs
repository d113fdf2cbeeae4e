//! devhost's queues page as a developer reads it: the fate of each message read from the
//! ledger and its history (an applied request is never called superseded), and the HTML page
//! rendered by a real browser (headless Chromium, installed by `scripts/setup browser`).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::Setup;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_page_tells_which_message_will_apply_and_which_will_no_op_and_why() {
    // Re-checks far away, no timer: the messages stay scheduled while the page is read.
    // bat-2 is applied by its reconnect event.
    let app = Setup::new()
        .rechecks_far_away()
        .no_timers()
        .events()
        .start()
        .await;
    app.sim.add_device("bat-1", false);
    app.sim.add_device("bat-2", false);
    let a = app.post("bat-1", r#"{"minSoc":20}"#).await;
    let b = app.post("bat-1", r#"{"minSoc":80}"#).await;
    let c = app.post("bat-2", r#"{"minSoc":50}"#).await;
    assert_eq!((a.status, b.status, c.status), (202, 202, 202));
    app.sim.set_online("bat-2", true);
    app.wait_status("bat-2", "applied", None, Duration::from_secs(15))
        .await;
    // A newer request after c was applied: c's message still says applied, not superseded.
    app.sim.set_online("bat-2", false);
    let d = app.post("bat-2", r#"{"minSoc":55}"#).await;
    assert_eq!(d.status, 202);

    let page = app.queues_page("application/json").await;
    assert!(page.contains("\n  "), "pretty-printed: {page}");
    let page: Value = serde_json::from_str(&page).unwrap();
    let fate_of = |request: &Value| {
        let id = request["requestId"].as_str().unwrap();
        let found: Vec<&str> = page[0]["scheduled"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["bodyText"].as_str().unwrap().contains(id))
            .map(|m| m["fate"].as_str().unwrap())
            .collect();
        assert_eq!(found.len(), 1, "one message for {id}: {page:#}");
        found[0].to_string()
    };
    assert_eq!(
        fate_of(&a.body),
        format!(
            "will no-op: superseded by {}",
            b.body["requestId"].as_str().unwrap()
        )
    );
    assert!(fate_of(&b.body).starts_with("will apply"));
    assert_eq!(fate_of(&c.body), "will no-op: request already applied");
    assert!(fate_of(&d.body).starts_with("will apply"));

    // A browser gets the same as a table.
    let html = app.queues_page("text/html,application/xhtml+xml").await;
    assert!(html.contains("<table") && html.contains("will no-op: request already applied"));
}

/// The browser: the first of `chromium`, `chromium-browser`, `google-chrome` on PATH (what
/// `scripts/setup browser` looks for, and installs as Debian's `chromium` when none is there).
fn browser() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no headless browser: the browser test needs chromium (or chromium-browser, \
                 google-chrome) on PATH; scripts/setup browser installs it (Debian: apt-get \
                 install chromium, as root or with password-less sudo)"
            )
        })
}

/// Headless Chromium's DOM of `url` after loading it. Fails, saying how to get it, when
/// Chromium is not installed: the test never passes without a browser.
fn browser_dom(url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("soc-chromium-{}", uuid::Uuid::new_v4()));
    let out = Command::new(browser())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output();
    let _ = std::fs::remove_dir_all(&profile);
    let out = out.unwrap_or_else(|e| {
        panic!(
            "headless Chromium could not run ({e}): the browser test needs `chromium` on PATH; \
             scripts/setup browser installs it (Debian: apt-get install chromium)"
        )
    });
    assert!(out.status.success(), "chromium failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_page_renders_in_a_browser_with_its_columns_time_and_empty_sections() {
    let app = Setup::new().rechecks_far_away().no_timers().start().await;
    app.sim.add_device("bat-1", false);
    let a = app.post("bat-1", r#"{"minSoc":20}"#).await;
    assert_eq!(a.status, 202);
    let request_id = a.body["requestId"].as_str().unwrap().to_string();
    let url = format!("{}/_devhost/queues", app.host().base_url());

    let dom = tokio::task::spawn_blocking(move || browser_dom(&url))
        .await
        .unwrap();

    assert!(dom.contains("<title>devhost queues</title>"), "{dom}");
    assert!(
        dom.contains("<th>due (UTC)</th><th>device</th><th>request</th>"),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("<td>bat-1</td><td><code>{request_id}</code></td>")),
        "{dom}"
    );
    assert!(dom.contains("will apply"), "{dom}");
    assert!(dom.contains("<time id=\"now\""), "{dom}");
    assert!(
        dom.contains("no active messages") && dom.contains("no dead-lettered messages"),
        "{dom}"
    );
}
