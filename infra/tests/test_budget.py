"""The device-call budget in the infra: DEVICE_API_INSTANCES follows the Flex scale-out
limit, and every environment gives each instance a share the handler accepts. Each check
also runs on a broken copy to show it fails."""

import json

import pytest

from conftest import replace_once
from infra_model import budget_problems


def test_the_instance_count_is_the_flex_limit_and_every_environment_has_a_usable_share():
    assert budget_problems() == []


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (
            "  DEVICE_API_INSTANCES: string(isFlex ? maximumInstanceCount : 1)\n",
            "  DEVICE_API_INSTANCES: string(isFlex ? 40 : 1)\n",
            "not the Flex maximumInstanceCount",
        ),
        (
            "  DEVICE_API_INSTANCES: string(isFlex ? maximumInstanceCount : 1)\n",
            "  DEVICE_API_INSTANCES: string(isFlex ? maximumInstanceCount : 3)\n",
            "Dedicated plan",
        ),
    ],
)
def test_budget_check_fails_on_a_broken_function_app(infra_copy, old, new, expected):
    replace_once(infra_copy / "modules" / "functionapp.bicep", old, new)
    assert any(expected in p for p in budget_problems(infra_copy)), budget_problems(infra_copy)


def test_budget_check_fails_when_one_environment_starves_its_instances(infra_copy):
    params = infra_copy / "params" / "prod.parameters.json"
    data = json.loads(params.read_text())
    data["parameters"]["maximumInstanceCount"] = {"value": 1000}
    data["parameters"]["deviceApiMaxCallsPerSecond"] = {"value": 20}
    params.write_text(json.dumps(data))
    assert any(p.startswith("prod: DEVICE_API_MAX_CALLS_PER_SECOND 20 over 1000") for p in budget_problems(infra_copy))
