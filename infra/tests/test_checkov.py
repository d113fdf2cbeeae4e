"""Security scan of the Bicep files with checkov, and proof that the gate
fails on what checkov alone would let through."""

import pytest

from checkov_gate import gate_problems, run_checkov
from conftest import replace_once
from infra_model import INFRA


@pytest.fixture(scope="module")
def report():
    return run_checkov(INFRA)


def test_checkov_finds_nothing_unexplained_in_the_infra(report):
    assert gate_problems(report) == []
    summary = report["summary"]
    assert summary["resource_count"] >= 20, summary
    assert summary["passed"] > 0


def test_every_accepted_finding_has_a_reason_and_is_listed_in_the_deploy_guide(report):
    guide = (INFRA.parent / "docs" / "deploy.md").read_text()
    for check in report["results"]["skipped_checks"]:
        assert len(check["check_result"]["suppress_comment"].strip()) >= 15, check["check_id"]
        assert check["check_id"] in guide, f"{check['check_id']} is not explained in docs/deploy.md"


def test_gate_fails_on_a_file_checkov_cannot_parse(infra_copy):
    target = infra_copy / "modules" / "storage.bicep"
    replace_once(target, "    minimumTlsVersion: 'TLS1_2'\n", "    minimumTlsVersion 'TLS1_2'\n")
    problems = gate_problems(run_checkov(target))
    assert any("could not parse" in p or "no Bicep resource" in p for p in problems), problems


def test_gate_fails_on_a_finding_without_a_skip(infra_copy):
    target = infra_copy / "modules" / "storage.bicep"
    replace_once(target, "    supportsHttpsTrafficOnly: true\n", "    supportsHttpsTrafficOnly: false\n")
    problems = gate_problems(run_checkov(target))
    assert any(p.startswith("CKV_AZURE_3 failed") for p in problems), problems


def test_gate_fails_on_a_skip_without_a_reason(infra_copy):
    target = infra_copy / "modules" / "keyvault.bicep"
    text = target.read_text()
    start = text.index("// checkov:skip=CKV_AZURE_41:")
    end = text.index("\n", start)
    target.write_text(text[:start] + "// checkov:skip=CKV_AZURE_41" + text[end:])
    problems = gate_problems(run_checkov(target))
    assert any("CKV_AZURE_41" in p and "without a reason" in p for p in problems), problems
