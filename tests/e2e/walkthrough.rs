//! The walk-through `scripts/dev` prints, run as written: the script prints it for this test's
//! ports and keys (`--print-walkthrough`), and every `curl` line is executed with bash; each
//! `#    expect: TEXT` line below a command must appear in that command's output. Commands that
//! only read (no `-X POST`) are repeated until they match, as a person would; a POST runs once.
//! devicesim gets the demo batteries scripts/dev creates (bat-online, bat-offline) and sends
//! its connection events to DeviceEventsHttp, as scripts/dev runs it.

use std::time::{Duration, Instant};

use crate::support::{app_root, Setup};

struct Step {
    command: String,
    expect: Vec<String>,
}

fn parse(text: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for line in text.lines() {
        if line.starts_with("curl ") {
            steps.push(Step {
                command: line.to_string(),
                expect: vec![],
            });
        } else if let Some(e) = line.trim_start().strip_prefix("#    expect: ") {
            steps
                .last_mut()
                .expect("an expect line follows a command")
                .expect
                .push(e.to_string());
        } else if let Some(e) = line.strip_prefix("#") {
            assert!(
                !e.trim_start().starts_with("expect"),
                "malformed expect line: {line:?}"
            );
        }
    }
    steps
}

async fn run(command: &str) -> String {
    let out = tokio::process::Command::new("bash")
        .args(["-c", command])
        .kill_on_drop(true)
        .output()
        .await
        .expect("bash");
    assert!(out.status.success(), "{command}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How the person following the walk-through behaves.
#[derive(Clone, Copy)]
struct Pace {
    /// SOC_RECHECK_INITIAL_SECONDS (scripts/dev's default is 60).
    recheck_seconds: u64,
    /// After this step (its number), wait until the request has had this many device attempts
    /// (the POST's own plus one per re-check), as a person who walks away for a while.
    pause_after_step: Option<(usize, u64)>,
}

const FUNCTION_KEY: &str = "e2e-walkthrough-function-key";
const MASTER_KEY: &str = "e2e-walkthrough-master-key";

/// Runs the printed walk-through at `pace`; returns the app and each step's output (step N
/// at index N: the walk-through starts at step 0).
async fn walk(pace: Pace) -> (crate::support::App, Vec<String>) {
    // scripts/dev runs with local.settings.json's timings unless told otherwise.
    let app = Setup::new()
        .set(
            "SOC_RECHECK_INITIAL_SECONDS",
            &pace.recheck_seconds.to_string(),
        )
        .set("SOC_RECHECK_MAX_SECONDS", "1800")
        .set("DRAIN_SOC_SCHEDULE", "0 */5 * * * *")
        .keys(FUNCTION_KEY, MASTER_KEY)
        .events()
        .start()
        .await;
    app.sim.add_device("bat-online", true);
    app.sim.add_device("bat-offline", false);
    let outputs = walk_on(&app, &pace).await;
    (app, outputs)
}

/// Runs the walk-through printed for `app`'s current ports.
async fn walk_on(app: &crate::support::App, pace: &Pace) -> Vec<String> {
    let printed = std::process::Command::new("bash")
        .arg(app_root().join("scripts/dev"))
        .args([
            "--print-walkthrough",
            "--port",
            &app.host().addr().port().to_string(),
            "--sim-port",
            &app.sim.addr().port().to_string(),
            "--function-key",
            FUNCTION_KEY,
            "--master-key",
            MASTER_KEY,
        ])
        .output()
        .expect("scripts/dev");
    assert!(printed.status.success(), "{printed:?}");
    let text = String::from_utf8(printed.stdout).unwrap();
    let steps = parse(&text);
    assert!(steps.len() >= 9, "the walk-through has its steps:\n{text}");

    let mut outputs: Vec<String> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        assert!(!step.expect.is_empty(), "step {i} says what to expect");
        let expect: Vec<String> = step
            .expect
            .iter()
            .cloned()
            .chain(expect_from_earlier(step, &outputs))
            .collect();
        let retry = !step.command.contains("-X POST");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run(&step.command).await;
            let missing: Vec<&String> = expect.iter().filter(|e| !out.contains(*e)).collect();
            if missing.is_empty() {
                outputs.push(out);
                break;
            }
            assert!(
                retry && Instant::now() < deadline,
                "step {i}: {}\nexpected {missing:?} in:\n{out}\n{}",
                step.command,
                app.handler_log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if let Some((after, attempts)) = pace.pause_after_step {
            if after == i {
                let wait = Duration::from_secs(pace.recheck_seconds * 8 + 20);
                app.eventually("the re-checks of a user who walked away", wait, || async {
                    let (_, body) = app.get("bat-offline").await;
                    (body["attempts"].as_u64() >= Some(attempts)).then_some(())
                })
                .await;
            }
        }
    }
    // 30 applied by the reconnect event, then 45 (its event lost) by the sweep; 35,
    // cancelled in step 12, never: only its POST's own try (one per walk) reached the
    // offline battery.
    assert_eq!(app.device_value("bat-offline"), Some(45));
    let cancelled = outcomes_of(app, 35);
    assert!(
        !cancelled.is_empty() && cancelled.iter().all(|o| o == "offline"),
        "the cancelled request is never PUT again: {cancelled:?}"
    );
    assert_eq!(app.device_value("bat-online"), Some(25));
    outputs
}

/// The events page of the online battery: `subjectBeginsWith=devices/bat-online/`.
const ONLINE_EVENTS: &str = "/_devhost/events?subjectBeginsWith=devices/bat-online/";

/// What a step must show beyond its printed expectations, from what the steps before it
/// answered: the online battery's events page shows the applied event of the request the
/// step just before set (its id and subject; earlier walks' events are listed too).
fn expect_from_earlier(step: &Step, outputs: &[String]) -> Vec<String> {
    if !step.command.contains(ONLINE_EVENTS) {
        return vec![];
    }
    let set = outputs.last().expect("a step before the events page");
    assert!(
        set.contains("200 OK") && set.contains(r#""deviceId":"bat-online""#),
        "the step before the events page sets bat-online directly:\n{set}"
    );
    let id = request_id_in(set);
    vec![
        format!(r#""id": "{id}.applied""#),
        format!(r#""subject": "devices/bat-online/soc/requests/{id}""#),
    ]
}

/// The `requestId` in an API answer (headers and compact JSON, as curl prints them).
fn request_id_in(answer: &str) -> String {
    let (_, rest) = answer
        .split_once(r#""requestId":""#)
        .unwrap_or_else(|| panic!("a requestId in:\n{answer}"));
    rest.split('"').next().unwrap().to_string()
}

/// What became of each PUT of `min_soc` to bat-offline, oldest first.
fn outcomes_of(app: &crate::support::App, min_soc: i64) -> Vec<String> {
    app.history("bat-offline")
        .into_iter()
        .filter(|p| p.min_soc == Some(min_soc))
        .map(|p| p.outcome)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_through_printed_by_scripts_dev_works_as_written() {
    let (app, outputs) = walk(Pace {
        recheck_seconds: 60,
        pause_after_step: None,
    })
    .await;

    // Step 1's Location is that request's own status; like every API call it needs the key:
    // without it the host answers 401 with an empty body.
    let location = outputs[1]
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(name, _)| name.eq_ignore_ascii_case("location"))
        })
        .map(|(_, v)| v.trim().to_string())
        .expect("the 202 of step 1 has a Location");
    assert!(
        location.starts_with("/api/devices/bat-offline/soc/requests/"),
        "{location}"
    );
    let url = format!("{}{location}", app.host().base_url());
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = app
        .http
        .get(&url)
        .header("x-functions-key", app.host().function_key())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (request["minSoc"].as_u64(), request["status"].as_str()),
        (Some(30), Some("applied")),
        "step 1's request, applied in step 5 by the reconnect event"
    );
    // Applied by the event (step 4), not by a re-check or the sweep: the event says so.
    let events = app.sim.events();
    let first = events
        .iter()
        .find(|e| e.event_type == "com.vendor.device.connected")
        .expect("devicesim sent the reconnect event");
    let answer = first.answer.clone().unwrap();
    assert_eq!(answer["events"][0]["result"], "applied", "{answer}");
    assert_eq!(answer["events"][0]["requestId"], request["requestId"]);
    assert_eq!(
        events.len(),
        2,
        "connected (step 4), disconnected (step 11); none for steps 0 and 14: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_through_works_again_after_a_restart_with_the_batteries_as_it_left_them() {
    let pace = Pace {
        recheck_seconds: 60,
        pause_after_step: None,
    };
    let (mut app, _) = walk(pace).await;
    app.restart_devhost().await;
    assert_eq!(
        app.sim.device("bat-offline").map(|d| d.online),
        Some(true),
        "the first walk-through leaves bat-offline online"
    );

    let outputs = walk_on(&app, &pace).await;

    assert!(outputs[1].contains("202 Accepted"), "{}", outputs[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_through_stays_true_for_a_user_who_pauses_while_re_checks_run() {
    // Re-checks 3 s after the POST, then 6 s later: the user returns after both ran.
    let (app, _) = walk(Pace {
        recheck_seconds: 3,
        pause_after_step: Some((3, 3)),
    })
    .await;
    assert_eq!(
        outcomes_of(&app, 30),
        ["offline", "offline", "offline", "applied"],
        "the POST's try, two re-checks, the apply"
    );
}
