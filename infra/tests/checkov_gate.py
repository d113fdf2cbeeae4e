"""Runs `checkov --framework bicep` and turns its report into a pass/fail list.

checkov exits 0 when it cannot parse a file (the file is simply not scanned),
and offline it knows no severities (those come from the Prisma Cloud API), so
this gate is stricter than "no high finding": it fails on any parse error, any
failed check, and any skip comment without a reason. Every accepted finding is
an inline `// checkov:skip=ID: reason` inside the resource it concerns; the
list with reasons is in docs/deploy.md.

Run directly:  tools/venv/bin/python infra/tests/checkov_gate.py [infra]"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHECKOV = Path(sys.executable).with_name("checkov")


def run_checkov(target: Path) -> dict:
    args = [str(CHECKOV), "--framework", "bicep", "--compact", "--output", "json",
            # no network: do not fetch guidelines or policies from the Prisma Cloud API
            "--skip-download"]
    args += ["--file", str(target)] if target.is_file() else ["--directory", str(target)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"checkov exited {proc.returncode}: {proc.stderr[-2000:]}")
    if not proc.stdout.strip():
        raise RuntimeError(f"checkov printed no report: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    bicep = [r for r in reports if r.get("check_type") == "bicep"]
    if not bicep:
        # checkov prints a bare summary when it found nothing it could scan
        return {"summary": report.get("summary", {}) if isinstance(report, dict) else {},
                "results": {}, "empty": True}
    return bicep[0]


def gate_problems(report: dict) -> list[str]:
    problems = []
    summary = report.get("summary", {})
    if report.get("empty") or summary.get("resource_count", 0) == 0:
        problems.append("checkov scanned no Bicep resource")
    results = report.get("results", {})
    if summary.get("parsing_errors", 0) or results.get("parsing_errors"):
        problems.append(f"checkov could not parse {summary.get('parsing_errors')} file(s): "
                        f"{results.get('parsing_errors', [])}")
    for check in results.get("failed_checks", []):
        problems.append(f"{check['check_id']} failed on {check['resource']} in {check['file_path']}: "
                        f"{check['check_name']}")
    for check in results.get("skipped_checks", []):
        reason = (check.get("check_result") or {}).get("suppress_comment", "") or ""
        if len(reason.strip()) < 15 or reason == "No comment provided":
            problems.append(f"{check['check_id']} on {check['resource']} is skipped without a reason")
    return problems


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    report = run_checkov(target)
    problems = gate_problems(report)
    summary = report.get("summary", {})
    print(f"checkov bicep: passed {summary.get('passed')}, failed {summary.get('failed')}, "
          f"skipped {summary.get('skipped')}, parsing errors {summary.get('parsing_errors')}")
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
