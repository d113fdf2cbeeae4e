"""Flex Consumption rules: the siteConfig split, the platform-owned settings,
stable API versions. Each check is also run on a broken copy to show it fails."""

import pytest

from conftest import replace_once
from infra_model import api_version_problems, flex_problems, site_config_branches


def test_flex_site_config_carries_no_property_flex_rejects_and_dedicated_keeps_them():
    assert flex_problems() == []
    flex, dedicated = site_config_branches()
    assert not {"ftpsState", "linuxFxVersion", "alwaysOn"} & set(flex)
    assert dedicated["ftpsState"] == "Disabled" and dedicated["alwaysOn"] is True


FLEX_BRANCH = """    siteConfig: isFlex ? {
      minTlsVersion: '1.2'
"""


@pytest.mark.parametrize(
    "old,new,expected",
    [
        # the defect of issue 10: ftpsState on the Flex branch
        (FLEX_BRANCH, FLEX_BRANCH + "      ftpsState: 'Disabled'\n", "Flex siteConfig carries ftpsState"),
        # even null is refused by Flex
        (FLEX_BRANCH, FLEX_BRANCH + "      alwaysOn: null\n", "Flex siteConfig carries alwaysOn"),
        (FLEX_BRANCH, FLEX_BRANCH + "      linuxFxVersion: null\n", "Flex siteConfig carries linuxFxVersion"),
        ("      ftpsState: 'Disabled'\n", "      ftpsState: 'AllAllowed'\n", "Dedicated siteConfig: ftpsState"),
        ("      alwaysOn: true\n", "", "Dedicated siteConfig: alwaysOn"),
        ("    siteConfig: isFlex ? {\n", "    siteConfig: true ? {\n", "not split by plan"),
        (
            "  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'\n} : {",
            "  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'\n"
            "  WEBSITE_RUN_FROM_PACKAGE: '1'\n} : {",
            "Flex app settings set WEBSITE_RUN_FROM_PACKAGE",
        ),
    ],
)
def test_flex_check_fails_on_a_broken_site(infra_copy, old, new, expected):
    replace_once(infra_copy / "modules" / "functionapp.bicep", old, new)
    problems = flex_problems(infra_copy)
    assert any(expected in p for p in problems), problems


def test_every_resource_uses_a_stable_api_version():
    assert api_version_problems() == []


def test_api_version_check_fails_on_a_preview_version(infra_copy):
    replace_once(infra_copy / "modules" / "servicebus.bicep",
                 "resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01'",
                 "resource queue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview'")
    problems = api_version_problems(infra_copy)
    assert any("2022-10-01-preview" in p for p in problems), problems
