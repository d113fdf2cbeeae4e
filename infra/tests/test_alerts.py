"""The alerts and the operators' workbook exist with their conditions. Each
check is also run on a broken copy to show it fails."""

import pytest

from conftest import replace_once
from infra_model import alert_problems, alert_rules

ALERTS = ("modules", "alerts.bicep")


def test_the_four_alerts_and_the_workbook_exist_with_their_conditions():
    assert alert_problems() == []
    assert len(alert_rules()) == 4


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
    ],
)
def test_alert_check_fails_on_a_broken_alert(infra_copy, old, new, expected):
    replace_once(infra_copy.joinpath(*ALERTS), old, new)
    problems = alert_problems(infra_copy)
    assert any(expected in p for p in problems), problems


def test_a_sweep_alert_on_its_own_interval_is_reported(infra_copy):
    replace_once(infra_copy / "main.bicep", "var drainSchedule = '0 */${drainIntervalMinutes} * * * *'",
                 "var drainSchedule = '0 */10 * * * *'")
    assert any("share drainIntervalMinutes" in p for p in alert_problems(infra_copy))


def test_a_missing_alerts_module_is_reported(infra_copy):
    target = infra_copy / "main.bicep"
    replace_once(target, "module alerts 'modules/alerts.bicep'", "module alerts 'modules/other.bicep'")
    assert any("does not deploy modules/alerts.bicep" in p for p in alert_problems(infra_copy))
