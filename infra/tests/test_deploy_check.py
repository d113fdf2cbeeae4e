"""scripts/deploy-check against a fake `az` on PATH: the per-region runtime
check before a deployment and the Key Vault reference check (with restarts)
after it."""

import json
import os
import stat
import subprocess
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


def test_an_unresolved_reference_restarts_the_app_until_it_resolves(az):
    scenario = {"references": [{"value": [ref("AccessToKeyVaultDenied", "role not yet propagated")]},
                               {"value": [ref("AccessToKeyVaultDenied")]}, {"value": [ref("Resolved")]}]}
    result, calls = az(scenario, "keyvault-refs", "-g", "rg", "-n", "app", "--wait", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c for c in calls if c.startswith("functionapp restart")] == \
        ["functionapp restart --resource-group rg --name app -o none"] * 2


def test_references_that_never_resolve_fail_after_the_attempts(az):
    result, calls = az({"references": [{"value": [ref("SecretNotFound")]}]},
                       "keyvault-refs", "-g", "rg", "-n", "app", "--attempts", "3", "--wait", "0")
    assert result.returncode == 1
    assert "still unresolved after 3 checks" in result.stderr
    assert len([c for c in calls if c.startswith("rest ")]) == 3
    assert len([c for c in calls if c.startswith("functionapp restart")]) == 2
    assert "secrets/device-api-key" not in result.stdout, "the reference itself is not printed"


def test_an_app_without_key_vault_references_fails(az):
    result, _ = az({"references": [{"value": []}]}, "keyvault-refs", "-g", "rg", "-n", "app", "--wait", "0")
    assert result.returncode == 1
    assert "no Key Vault reference" in result.stdout


def test_missing_arguments_are_a_usage_error(az):
    result, calls = az({}, "keyvault-refs", "-g", "rg")
    assert result.returncode == 2 and calls == []
