"""Identity instead of keys: identity-based connections, the least roles for
the app's one identity, shared keys / SAS / instrumentation-key ingestion off.
Each check is also run on a broken copy to show it fails."""

import pytest

from conftest import replace_once
from infra_model import EXPECTED_ROLES, identity_problems, local_auth_problems, role_assignments

APP = ("modules", "functionapp.bicep")


def test_connections_are_identity_based_with_the_least_roles():
    assert identity_problems() == []
    assert set(role_assignments()) == set(EXPECTED_ROLES)


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("  AzureWebJobsStorage__credential: 'managedidentity'\n", "", "AzureWebJobsStorage__credential"),
        (
            "  ServiceBusConnection__credential: 'managedidentity'\n",
            "  ServiceBusConnection__credential: 'connectionstring'\n",
            "ServiceBusConnection__credential",
        ),
        (
            "  SOC_STATE_STORAGE: ''\n",
            "  SOC_STATE_STORAGE: ''\n  ServiceBusConnection: 'Endpoint=sb://x.servicebus.windows.net/'\n",
            "ServiceBusConnection is set as a connection string",
        ),
        ("  AzureWebJobsStorage__accountName: storage.name\n", "", "AzureWebJobsStorage__accountName"),
        (
            "  ServiceBusConnection__fullyQualifiedNamespace: serviceBusFullyQualifiedNamespace\n",
            "",
            "fullyQualifiedNamespace",
        ),
        # the scale controller cannot read the message count with Data Receiver
        (
            "var serviceBusDataOwnerRoleId = '090c5cfd-751d-490a-894a-3ce6f1109419'",
            "var serviceBusDataOwnerRoleId = '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'",
            "serviceBusDataOwnerRoleId is not the built-in role",
        ),
        # broader scope than needed
        ("  scope: deviceApiKeySecret\n", "  scope: vault\n", "keyVaultSecretsUserRoleId is scoped to 'vault'"),
        ("  scope: queue\n", "  scope: serviceBusNamespace\n", "serviceBusDataOwnerRoleId is scoped"),
        ("    telemetryRole\n  ]", "  ]", "do not wait for role assignment telemetryRole"),
        (
            "  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD'\n} : {",
            "} : {",
            "Flex: APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        ),
    ],
)
def test_identity_check_fails_on_keys_or_wrong_roles(infra_copy, old, new, expected):
    replace_once(infra_copy.joinpath(*APP), old, new)
    problems = identity_problems(infra_copy)
    assert any(expected in p for p in problems), problems


def test_an_extra_role_is_reported(infra_copy):
    target = infra_copy.joinpath(*APP)
    text = target.read_text()
    start = text.index("resource telemetryRole")
    end = text.index("\n}\n", start) + 3
    extra = text[start:end].replace("telemetryRole", "ownerRole").replace(
        "monitoringMetricsPublisherRoleId)", "ownerRoleId)")
    target.write_text(text + "\nvar ownerRoleId = '8e3af657-a8ff-443c-a75c-2fe8c4bcb635'\n\n" + extra)
    problems = identity_problems(infra_copy)
    assert any("unexpected role assignment ownerRoleId" in p for p in problems), problems


def test_shared_keys_sas_and_local_telemetry_auth_are_off():
    assert local_auth_problems() == []


@pytest.mark.parametrize(
    "path,old,new,expected",
    [
        ("storage.bicep", "allowSharedKeyAccess: false", "allowSharedKeyAccess: true", "allowSharedKeyAccess"),
        ("servicebus.bicep", "disableLocalAuth: true", "disableLocalAuth: false", "disableLocalAuth"),
        ("monitoring.bicep", "    DisableLocalAuth: true\n", "", "DisableLocalAuth"),
        (
            "functionapp.bicep",
            "  SOC_STATE_STORAGE: ''\n",
            "  SOC_STATE_STORAGE: 'AccountName=${storage.name};AccountKey=${storage.listKeys().keys[0].value}'\n",
            "reads or writes a key",
        ),
    ],
)
def test_local_auth_check_fails_when_keys_come_back(infra_copy, path, old, new, expected):
    replace_once(infra_copy / "modules" / path, old, new)
    problems = local_auth_problems(infra_copy)
    assert any(expected in p for p in problems), problems


def test_a_shared_access_rule_is_reported(infra_copy):
    target = infra_copy / "modules" / "servicebus.bicep"
    target.write_text(target.read_text() + """
resource rule 'Microsoft.ServiceBus/namespaces/authorizationRules@2024-01-01' = {
  parent: namespace
  name: 'send-listen'
  properties: {
    rights: [
      'Send'
    ]
  }
}
""")
    assert any("shared access rule" in p for p in local_auth_problems(infra_copy))
