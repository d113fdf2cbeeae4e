//! P4: size of the stripped release binary and of the publish zip (the zip step of
//! `scripts/package` around the release binary, or the full `scripts/package` with
//! `BENCH_PACKAGE=1`).

use anyhow::{ensure, Context, Result};

use crate::env::Env;
use crate::report::{row, Row};

pub fn run(env: &Env, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let size = std::fs::metadata(&env.handler)?.len();
    let base_size = std::fs::metadata(&env.baseline)?.len();
    // The release profile strips already; strip a copy to prove it.
    let copy = env.scratch.join("handler.stripped");
    std::fs::copy(&env.handler, &copy)?;
    let stripped = match std::process::Command::new("strip").arg(&copy).status() {
        Ok(s) if s.success() => std::fs::metadata(&copy)?.len(),
        _ => size,
    };
    let mb = |b: u64| format!("{:.2} MB", b as f64 / 1e6);
    rows.push(
        row("P4", "stripped release binary", mb(stripped))
            .base(mb(base_size))
            .target("≤ 12 MB", stripped <= 12_000_000),
    );
    if stripped != size {
        notes.push(format!(
            "P4: target/release/handler is {size} bytes; `strip` makes it {stripped}"
        ));
    }
    let package = env.root.join("scripts/package");
    let (zip, how) = if std::env::var("BENCH_PACKAGE").as_deref() == Ok("1") {
        // The real publish build (cargo zigbuild against glibc 2.31): a second release build.
        let st = std::process::Command::new(&package)
            .current_dir(&env.root)
            .status()?;
        ensure!(st.success(), "scripts/package failed");
        (
            env.root.join("publish.zip"),
            "scripts/package (zigbuild, glibc 2.31)".to_string(),
        )
    } else {
        // What scripts/package zips (host.json, handler, <Function>/function.json, deflate),
        // around the release handler built here; then checked by `scripts/package --verify`.
        let stage = env.scratch.join("publish");
        for f in testkit::function_folders(&env.root) {
            std::fs::create_dir_all(stage.join(&f))?;
            std::fs::copy(
                env.root.join(&f).join("function.json"),
                stage.join(&f).join("function.json"),
            )?;
        }
        std::fs::copy(env.root.join("host.json"), stage.join("host.json"))?;
        std::fs::copy(&copy, stage.join("handler"))?;
        let zip = env.scratch.join("publish.zip");
        let script = "import os, sys, zipfile\n\
            with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n\
            \x20   for root, _, files in os.walk('.'):\n\
            \x20       for name in sorted(files):\n\
            \x20           p = os.path.join(root, name)\n\
            \x20           z.write(p, os.path.relpath(p, '.'))\n";
        let st = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&zip)
            .current_dir(&stage)
            .status()
            .context("python3 for the zip")?;
        ensure!(st.success(), "zipping failed");
        let mut how = "the zip step of scripts/package around target/release/handler".to_string();
        if package.exists() {
            let st = std::process::Command::new(&package)
                .arg("--verify")
                .arg(&zip)
                .stdout(std::process::Stdio::null())
                .status()?;
            ensure!(st.success(), "scripts/package --verify rejected the zip");
            how.push_str(", layout verified by `scripts/package --verify` (BENCH_PACKAGE=1 runs the full scripts/package)");
        }
        (zip, how)
    };
    let zsize = std::fs::metadata(&zip)?.len();
    rows.push(row("P4", "publish zip", mb(zsize)).target("≤ 5 MB", zsize <= 5_000_000));
    notes.push(format!("P4: publish zip built with {how}"));
    Ok(())
}
