"""The alerts and the operators' workbook exist with their conditions. Each
check is also run on a broken copy to show it fails."""

import pytest

from conftest import replace_once
import re

import json

from infra_model import INFRA, alert_problems, alert_rules, operator_queries, sampling_problems

ALERTS = ("modules", "alerts.bicep")


def test_the_five_alerts_and_the_workbook_exist_with_their_conditions():
    assert alert_problems() == []
    assert len(alert_rules()) == 5


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("          threshold: 0\n          timeAggregation: 'Maximum'",
         "          threshold: 5\n          timeAggregation: 'Maximum'", "does not fire on > 0"),
        ("          metricName: 'DeadletteredMessages'", "          metricName: 'ActiveMessages'",
         "no metric alert on DeadletteredMessages"),
        ("              name: 'EntityName'\n", "              name: 'OperationResult'\n", "EntityName"),
        ('outcome != "applied"', 'outcome == "failed"', "rate of failed and expired"),
        ('contains_cs " ERROR "', 'contains_cs " WARN "', "handler errors"),
        ("var sweepWindowMinutes = 3 * drainIntervalMinutes", "var sweepWindowMinutes = 6 * drainIntervalMinutes",
         "three schedules"),
        ('requests | where name == "DrainSocTimer"', 'requests | where name == "SetSocHttp"',
         "sweep not running"),
        # the outbox alert: the field the handler logs, the worst age, the threshold
        ('extract(" outbox_oldest_age_s=([0-9]+)"', 'extract(" outbox_age=([0-9]+)"', "outbox age"),
        ("maxAgeSeconds = max(oldestAgeSeconds)", "maxAgeSeconds = min(oldestAgeSeconds)", "outbox age"),
        ("param outboxAgeThresholdSeconds int = 900", "param outboxAgeThresholdSeconds int = 3600",
         "> 900 s"),
        ("    windowSize: 'PT15M'\n    autoMitigate: true\n    criteria: {\n      allOf: [\n        {\n          query: outboxAgeQuery",
         "    windowSize: 'PT1H'\n    autoMitigate: true\n    criteria: {\n      allOf: [\n        {\n          query: outboxAgeQuery",
         "max age over 15 min"),
    ],
)
def test_alert_check_fails_on_a_broken_alert(infra_copy, old, new, expected):
    replace_once(infra_copy.joinpath(*ALERTS), old, new)
    problems = alert_problems(infra_copy)
    assert any(expected in p for p in problems), problems


def test_every_log_alert_skips_query_validation():
    logs = [r for r in alert_rules().values() if "query" in r]
    assert len(logs) == 4
    assert all(r["properties"]["skipQueryValidation"] is True for r in logs)


def test_a_log_alert_without_skip_query_validation_is_reported(infra_copy):
    target = infra_copy.joinpath(*ALERTS)
    text = target.read_text()
    start = text.index("resource sweepMissingAlert")
    at = text.index("    skipQueryValidation: true\n", start)
    target.write_text(text[:at] + text[at + len("    skipQueryValidation: true\n"):])
    problems = alert_problems(infra_copy)
    assert [p for p in problems if "skipQueryValidation" in p] == [
        "log alert ${namePrefix}: DrainSocTimer has not run does not set skipQueryValidation: true "
        "(its first creation can fail against a new component)"], problems


# ---- sampling: host.json, the alert queries and docs/operations.md together

ROOT = INFRA.parent


def test_no_request_exception_or_trace_is_sampled_and_every_count_sums_item_count():
    assert sampling_problems() == []
    host = json.loads((ROOT / "host.json").read_text())
    excluded = host["logging"]["applicationInsights"]["samplingSettings"]["excludedTypes"].split(";")
    assert {"Request", "Exception", "Trace"} <= set(excluded)
    queries = operator_queries()
    assert "sum(itemCount)" in queries["sweepMissingQuery"]
    assert "sumif(itemCount," in queries["handlerErrorsQuery"]


@pytest.mark.parametrize(
    "excluded,sampled",
    [("Request;Exception", "Trace"), ("Trace", "Exception"), ("", "Request")],
)
def test_host_json_that_samples_an_alerted_type_is_reported(tmp_path, excluded, sampled):
    host = json.loads((ROOT / "host.json").read_text())
    settings = host["logging"]["applicationInsights"]["samplingSettings"]
    settings["excludedTypes"] = excluded
    path = tmp_path / "host.json"
    path.write_text(json.dumps(host))
    problems = sampling_problems(host_json=path)
    assert any("lets Application Insights sample" in p and sampled in p for p in problems), problems


def test_sampling_switched_off_entirely_is_accepted(tmp_path):
    host = json.loads((ROOT / "host.json").read_text())
    host["logging"]["applicationInsights"]["samplingSettings"] = {"isEnabled": False}
    path = tmp_path / "host.json"
    path.write_text(json.dumps(host))
    problems = sampling_problems(host_json=path)
    # Only the guide, which states the deployed setting, now disagrees.
    assert problems == ['operations.md does not state host.json\'s sampling settings '
                        '("samplingSettings": {"isEnabled": false})'], problems


def test_a_row_count_in_an_alert_or_the_guide_is_reported(infra_copy, tmp_path):
    replace_once(infra_copy.joinpath(*ALERTS), "summarize sweeps = sum(itemCount)", "summarize sweeps = count()")
    problems = sampling_problems(infra_copy, host_json=ROOT / "host.json", guide=ROOT / "docs" / "operations.md")
    assert any("sweepMissingQuery counts rows" in p for p in problems), problems
    guide = tmp_path / "operations.md"
    guide.write_text((ROOT / "docs" / "operations.md").read_text().replace(
        'pauses = sumif(itemCount, message has "device API throttled")',
        'pauses = countif(message has "device API throttled")'))
    problems = sampling_problems(guide=guide)
    assert any("operations.md query" in p and "counts rows" in p for p in problems), problems


def test_a_sweep_alert_on_its_own_interval_is_reported(infra_copy):
    replace_once(infra_copy / "main.bicep", "var drainSchedule = '0 */${drainIntervalMinutes} * * * *'",
                 "var drainSchedule = '0 */10 * * * *'")
    assert any("share drainIntervalMinutes" in p for p in alert_problems(infra_copy))


def test_a_missing_alerts_module_is_reported(infra_copy):
    target = infra_copy / "main.bicep"
    replace_once(target, "module alerts 'modules/alerts.bicep'", "module alerts 'modules/other.bicep'")
    assert any("does not deploy modules/alerts.bicep" in p for p in alert_problems(infra_copy))


def _kql_blocks(markdown: str) -> list[str]:
    """The ```kusto blocks of a page, whitespace collapsed."""
    blocks = re.findall(r"```kusto\n(.*?)```", markdown, re.S)
    return [re.sub(r"\s+", " ", b).strip() for b in blocks]


def _missing_from_docs(markdown: str, queries: dict[str, str]) -> list[str]:
    blocks = _kql_blocks(markdown)
    return [name for name, q in queries.items() if re.sub(r"\s+", " ", q).strip() not in blocks]


def test_the_operations_guide_shows_every_alert_and_workbook_query_as_deployed():
    queries = operator_queries()
    assert len(queries) == 7, sorted(queries)
    guide = (INFRA.parent / "docs" / "operations.md").read_text()
    assert _missing_from_docs(guide, queries) == []


def test_a_query_changed_in_the_bicep_only_is_reported():
    queries = operator_queries()
    guide = (INFRA.parent / "docs" / "operations.md").read_text()
    changed = dict(queries, sweepMissingQuery=queries["sweepMissingQuery"].replace("== 0", "< 1"))
    assert _missing_from_docs(guide, changed) == ["sweepMissingQuery"]


LEDGER = INFRA.parent / "src" / "adapters" / "table_ledger.rs"
# KQL key (as the queries extract it) -> the tracing field the handler logs it under.
LOG_FIELDS = {" device=": "device = %state.device_id", " request_id=": "request_id = %state.request_id",
              " outcome=": "outcome = %state.status.as_str()", " last_error=": "last_error = ?last_error"}


def log_field_problems(source: str, queries: dict[str, str]) -> list[str]:
    """The handler's ledger-write log line carries every field the queries extract."""
    start = source.index("fn log_written(")
    body = source[start:source.index("\n}\n", start)]
    problems = []
    for key, field in LOG_FIELDS.items():
        if not any(key in q for q in queries.values()):
            problems.append(f"no query extracts {key!r}")
        if field not in body:
            problems.append(f"log_written does not log {field!r} (the queries extract {key!r})")
    return problems


def test_the_handler_logs_every_field_the_queries_extract():
    assert log_field_problems(LEDGER.read_text(), operator_queries()) == []


def test_a_renamed_log_field_is_reported():
    source = LEDGER.read_text().replace("outcome = %state.status.as_str()", "status = %state.status.as_str()")
    problems = log_field_problems(source, operator_queries())
    assert any("outcome" in p for p in problems), problems
