"""scripts/deploy-check against a fake `az` on PATH (and, for the confirmation
through the app, a loopback stand-in of the app): the per-region runtime check
before a deployment, the wait for the identity's roles, and the Key Vault
reference check (refresh endpoint, never a restart) after it."""

import datetime
import http.server
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "deploy-check"

# A stand-in for the Azure CLI: answers from a JSON scenario file and appends
# every call to a log. `configreferences` answers are consumed one per call;
# the last one repeats.
FAKE_AZ = r'''#!/usr/bin/env python3
import json, os, sys
scenario_path = os.environ["FAKE_AZ_SCENARIO"]
with open(scenario_path) as f:
    scenario = json.load(f)
with open(os.environ["FAKE_AZ_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if args[:2] == ["functionapp", "list-flexconsumption-runtimes"]:
    print(json.dumps(scenario["runtimes"]))
elif args[:2] == ["functionapp", "show"]:
    print("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Web/sites/app")
elif args[:3] == ["functionapp", "function", "keys"]:
    print(scenario.get("function_key", "fk-0123456789"))
elif args[:3] == ["role", "assignment", "list"]:
    print(json.dumps(scenario["roles"]))
elif args[:3] == ["rest", "--method", "post"]:
    pass
elif args[:1] == ["rest"]:
    answers = scenario["references"]
    print(json.dumps(answers[0]))
    if len(answers) > 1:
        scenario["references"] = answers[1:]
        with open(scenario_path, "w") as f:
            json.dump(scenario, f)
elif args[:2] == ["functionapp", "restart"]:
    pass
else:
    sys.exit("fake az: unexpected call " + " ".join(args))
'''


@pytest.fixture
def az(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "az"
    fake.write_text(FAKE_AZ)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    scenario = tmp_path / "scenario.json"
    log = tmp_path / "az.log"

    def run(data, *args):
        scenario.write_text(json.dumps(data))
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
                   FAKE_AZ_SCENARIO=str(scenario), FAKE_AZ_LOG=str(log))
        result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        return result, calls

    return run


def ref(status, details=""):
    return {"name": "DEVICE_API_KEY", "properties": {"status": status, "details": details,
                                                     "reference": "@Microsoft.KeyVault(SecretUri=https://kv/secrets/device-api-key)"}}


OFFERED = [{"version": "1.0", "isDefault": True, "endOfLifeDate": None, "sku": {"skuCode": "FC1"}}]


def test_runtime_check_passes_when_the_region_offers_custom_1_0(az):
    result, calls = az({"runtimes": OFFERED}, "runtime", "--location", "swedencentral")
    assert result.returncode == 0, result.stderr
    assert calls == ["functionapp list-flexconsumption-runtimes --location swedencentral --runtime custom -o json"]


@pytest.mark.parametrize("runtimes", [[], [{"version": "2.0", "isDefault": True}]])
def test_runtime_check_fails_when_the_region_does_not_offer_it(az, runtimes):
    result, _ = az({"runtimes": runtimes}, "runtime", "--location", "westus")
    assert result.returncode == 1
    assert "does not offer runtime custom 1.0" in result.stderr


def test_resolved_references_pass_without_a_restart(az):
    result, calls = az({"references": [{"value": [ref("Resolved")]}]},
                       "keyvault-refs", "-g", "rg", "-n", "app", "--wait", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(c.startswith("functionapp restart") for c in calls)
    assert "DEVICE_API_KEY: Resolved" in result.stdout


REFRESH = ("rest --method post --url https://management.azure.com/subscriptions/s/resourceGroups/rg/providers/"
           "Microsoft.Web/sites/app/config/configreferences/appsettings/refresh?api-version=2022-03-01 -o none")


def test_an_unresolved_reference_is_refreshed_not_restarted_until_it_resolves(az):
    scenario = {"references": [{"value": [ref("AccessToKeyVaultDenied", "role not yet propagated")]},
                               {"value": [ref("AccessToKeyVaultDenied")]}, {"value": [ref("Resolved")]}]}
    result, calls = az(scenario, "keyvault-refs", "-g", "rg", "-n", "app", "--wait", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c for c in calls if c.startswith("rest --method post")] == [REFRESH] * 2
    assert not any("restart" in c for c in calls), calls


def test_references_that_never_resolve_fail_after_the_attempts(az):
    result, calls = az({"references": [{"value": [ref("SecretNotFound")]}]},
                       "keyvault-refs", "-g", "rg", "-n", "app", "--attempts", "3", "--wait", "0")
    assert result.returncode == 1
    assert "still unresolved after 3 checks" in result.stderr
    assert len([c for c in calls if c.startswith("rest --method get")]) == 3
    assert [c for c in calls if c.startswith("rest --method post")] == [REFRESH] * 2
    assert not any("restart" in c for c in calls), calls
    assert "secrets/device-api-key" not in result.stdout, "the reference itself is not printed"


def test_an_app_without_key_vault_references_fails(az):
    result, _ = az({"references": [{"value": []}]}, "keyvault-refs", "-g", "rg", "-n", "app", "--wait", "0")
    assert result.returncode == 1
    assert "no Key Vault reference" in result.stdout


def test_missing_arguments_are_a_usage_error(az):
    result, calls = az({}, "keyvault-refs", "-g", "rg")
    assert result.returncode == 2 and calls == []


# ---- a status that says nothing: confirmed through the app


class _App(http.server.BaseHTTPRequestHandler):
    """The function app's HTTP front: answers every GET with the scenario's status."""
    answers: list = []
    seen: list = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).seen.append((self.path, self.headers.get("x-functions-key")))
        status, ctype = type(self).answers.pop(0) if len(type(self).answers) > 1 else type(self).answers[0]
        body = b'{"type":"about:blank","title":"Not found","status":404}' if status == 404 else b"{}"
        self.send_response(status)
        if ctype:
            self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def app():
    class App(_App):
        answers = []
        seen = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield App, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("status", [None, "Initialized", "OtherReasons", "SomethingNew"])
def test_an_unknown_status_is_confirmed_through_the_app_not_failed(az, app, status):
    handler, url = app
    handler.answers = [(404, "application/problem+json")]
    reference = ref(status) if status else {"name": "DEVICE_API_KEY", "properties": {}}
    result, calls = az({"references": [{"value": [reference]}], "function_key": "fk-secret-77"},
                       "keyvault-refs", "-g", "rg", "-n", "app", "--wait", "0", "--app-url", url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "confirmed through the app" in result.stdout
    assert handler.seen == [("/api/devices/deploy-check/soc", "fk-secret-77")], handler.seen
    assert "fk-secret-77" not in result.stdout + result.stderr, "the function key is never printed"
    assert not any(c.startswith("rest --method post") for c in calls), "nothing to refresh"


def test_an_app_that_refuses_its_configuration_is_refreshed_then_fails(az, app):
    handler, url = app
    handler.answers = [(500, "application/problem+json")]
    result, calls = az({"references": [{"value": [ref("Initialized")]}]},
                       "keyvault-refs", "-g", "rg", "-n", "app", "--wait", "0", "--attempts", "2", "--app-url", url)
    assert result.returncode == 1
    assert "refuses its configuration" in result.stdout
    assert len(handler.seen) == 2
    assert [c for c in calls if c.startswith("rest --method post")] == [REFRESH]


def test_an_answer_not_from_the_handler_does_not_confirm(az, app):
    # The Functions host answers an empty 404 for a function it does not know yet.
    handler, url = app
    handler.answers = [(404, None), (404, "application/problem+json")]
    result, calls = az({"references": [{"value": [ref("Initialized")]}]},
                       "keyvault-refs", "-g", "rg", "-n", "app", "--wait", "0", "--app-url", url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not from the handler" in result.stdout
    assert len(handler.seen) == 2
    assert [c for c in calls if c.startswith("rest --method post")] == [REFRESH]


# ---- the identity's roles settle before the first publish


def _ago(seconds: float) -> str:
    return (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)).isoformat()


def test_old_roles_need_no_wait(az):
    started = time.monotonic()
    result, calls = az({"roles": [_ago(3600)] * 6}, "roles", "--principal-id", "p-1")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 5
    assert calls == ['role assignment list --assignee p-1 --all --query [].createdOn -o json']


def test_fresh_roles_are_waited_for_until_they_are_settle_seconds_old(az):
    started = time.monotonic()
    result, _ = az({"roles": [_ago(3600)] * 5 + [_ago(1)]}, "roles", "--principal-id", "p-1", "--settle", "4")
    assert result.returncode == 0, result.stderr
    assert "waiting" in result.stdout
    assert 2 <= time.monotonic() - started < 10


def test_an_identity_without_its_roles_fails(az):
    result, _ = az({"roles": [_ago(3600)] * 2}, "roles", "--principal-id", "p-1")
    assert result.returncode == 1
    assert "holds 2 role assignment(s), expected at least 6" in result.stderr
