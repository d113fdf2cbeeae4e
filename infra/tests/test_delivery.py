"""The CI workflow, the package check and .funcignore."""

import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The functions are the folders holding a function.json (what the Functions host indexes).
FUNCTIONS = tuple(sorted(p.parent.name for p in ROOT.glob("*/function.json")))


@pytest.fixture(scope="module")
def workflow():
    return yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())


def test_workflow_runs_tests_on_push_and_pull_requests_and_publishes_on_v_tags(workflow):
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as true
    assert "v*" in triggers["push"]["tags"]
    assert "pull_request" in triggers
    assert set(workflow["jobs"]) >= {"test", "publish"}


def test_test_job_runs_the_ci_entry_point_and_nothing_else(workflow):
    runs = [step["run"] for step in workflow["jobs"]["test"]["steps"] if "run" in step]
    assert runs == ["bash .ci/run"], runs
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("cargo fmt --all -- --check",
                    "cargo clippy --workspace --all-targets --locked -- -D warnings", "scripts/test"):
        assert command in ci, command
    test = (ROOT / "scripts" / "test").read_text()
    for command in ("scripts/setup", "cargo test --workspace --locked", "pytest infra/tests"):
        assert command in test, command


def test_publish_job_checks_the_runtime_before_and_the_roles_and_key_vault_references_after_deploying(workflow):
    script = [s.get("run", "") for s in workflow["jobs"]["publish"]["steps"]]
    runtime = next(i for i, r in enumerate(script) if "scripts/deploy-check runtime" in r)
    deploy = next(i for i, r in enumerate(script) if "az deployment group create" in r)
    roles = next(i for i, r in enumerate(script) if "scripts/deploy-check roles" in r)
    publish = next(i for i, r in enumerate(script) if "config-zip" in r)
    refs = next(i for i, r in enumerate(script) if "scripts/deploy-check keyvault-refs" in r)
    assert runtime < deploy < roles < publish < refs


def outputs_problems(workflow: dict) -> list[str]:
    """The app name and the identity come from the deployment's outputs, not repository variables."""
    problems = []
    steps = workflow["jobs"]["publish"]["steps"]
    deploy = next((s for s in steps if "az deployment group create" in s.get("run", "")), {})
    if deploy.get("id") != "deploy":
        problems.append("the deployment step has no id 'deploy'")
    run = deploy.get("run", "")
    for output, name in (("functionAppName", "app_name"), ("identityPrincipalId", "identity_principal_id")):
        if f'echo "{name}=$(jq -r .{output}.value <<<"$outputs")" >> "$GITHUB_OUTPUT"' not in run:
            problems.append(f"the deployment step does not publish output {output} as {name}")
    if "--query properties.outputs -o json)" not in run:
        problems.append("the deployment step does not read the deployment's outputs")
    for step in steps:
        text = step.get("run", "")
        if "config-zip" in text or "keyvault-refs" in text:
            if '--name "${{ steps.deploy.outputs.app_name }}"' not in text:
                problems.append(f"{step.get('name')}: the app name is not the deployment's output")
        if "deploy-check roles" in text and "steps.deploy.outputs.identity_principal_id" not in text:
            problems.append("the roles check does not take the identity from the deployment's output")
    if "AZURE_FUNCTIONAPP_NAME" in json.dumps(workflow):
        problems.append("the workflow still reads vars.AZURE_FUNCTIONAPP_NAME")
    return problems


def test_the_app_name_and_identity_come_from_the_deployment_outputs(workflow):
    assert outputs_problems(workflow) == []
    main = (ROOT / "infra" / "main.bicep").read_text()
    assert "output functionAppName string = functionApp.outputs.appName" in main
    assert "output identityPrincipalId string = identity.outputs.principalId" in main


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ('--name "${{ steps.deploy.outputs.app_name }}" \\\n            --src', '--name "${{ vars.AZURE_FUNCTIONAPP_NAME }}" \\\n            --src',
         "app name is not the deployment's output"),
        ("        id: deploy\n", "", "no id 'deploy'"),
        ('          echo "app_name=$(jq -r .functionAppName.value <<<"$outputs")" >> "$GITHUB_OUTPUT"\n', "",
         "does not publish output functionAppName"),
        ('--principal-id "${{ steps.deploy.outputs.identity_principal_id }}"', '--principal-id "${{ vars.PRINCIPAL }}"',
         "roles check does not take the identity"),
    ],
)
def test_a_workflow_not_wired_to_the_outputs_is_reported(old, new, expected):
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert text.count(old) == 1, old
    problems = outputs_problems(yaml.safe_load(text.replace(old, new)))
    assert any(expected in p for p in problems), problems


def test_publish_job_needs_tests_a_tag_and_logs_in_with_oidc(workflow):
    job = workflow["jobs"]["publish"]
    assert job["needs"] == "test"
    assert job["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert job["permissions"]["id-token"] == "write"
    steps = job["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("azure/login@") for u in uses)
    login = next(s for s in steps if s.get("uses", "").startswith("azure/login@"))
    assert "client-secret" not in login.get("with", {}) and "creds" not in login.get("with", {})
    script = "\n".join(s.get("run", "") for s in steps)
    assert "scripts/package" in script
    assert "infra/main.bicep" in script
    assert "publish.zip" in script or "func azure functionapp publish" in script
    assert "${{ secrets.DEVICE_API_KEY }}" not in script, "secrets go through env, not the command line"


def _zip(path: Path, entries: dict[str, int]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, mode in entries.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFREG | mode) << 16
            z.writestr(info, b"x")
    return path


GOOD = {"host.json": 0o644, "handler": 0o755, **{f"{f}/function.json": 0o644 for f in FUNCTIONS}}


def _verify(zip_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "package"), "--verify", str(zip_path)],
                          capture_output=True, text=True)


def test_package_check_accepts_exactly_the_app_files(tmp_path):
    result = _verify(_zip(tmp_path / "ok.zip", GOOD))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("change", ["extra", "missing", "not-executable"])
def test_package_check_rejects_a_wrong_zip(tmp_path, change):
    entries = dict(GOOD)
    if change == "extra":
        entries["local.settings.json"] = 0o644
    elif change == "missing":
        del entries[f"{FUNCTIONS[0]}/function.json"]
    else:
        entries["handler"] = 0o644
    result = _verify(_zip(tmp_path / "bad.zip", entries))
    assert result.returncode != 0
    assert "is wrong" in result.stderr


def test_the_function_folders_are_found():
    assert FUNCTIONS, "no */function.json at the repository root"


def test_funcignore_keeps_only_host_json_the_function_folders_and_handler():
    lines = [l.strip() for l in (ROOT / ".funcignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "ignore everything, then re-include"
    kept = {l[1:].rstrip("/") for l in lines[1:]}
    assert kept == {"host.json", "handler", *FUNCTIONS, *(f"{f}/function.json" for f in FUNCTIONS)}
    assert os.access(ROOT / "scripts" / "package", os.X_OK)
