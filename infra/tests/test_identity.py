"""Identity instead of keys: one user-assigned identity, created and granted the
least roles before the app exists, used by every connection, the Key Vault
reference, deployment storage and telemetry; role assignments named from scope,
principal id and role; shared keys / SAS / instrumentation-key ingestion off.
Each check is also run on a broken copy to show it fails."""

import pytest

from conftest import replace_once
from infra_model import EXPECTED_ROLES, identity_problems, local_auth_problems, role_assignments

APP = ("modules", "functionapp.bicep")
ROLES = ("modules", "identity-roles.bicep")
IDENTITY = ("modules", "identity.bicep")
MAIN = ("main.bicep",)


def test_one_user_assigned_identity_with_the_least_roles_is_used_everywhere():
    assert identity_problems() == []
    roles = role_assignments()
    assert set(roles) == set(EXPECTED_ROLES)
    assert all(r["principal"] == "principalId" for r in roles.values())


@pytest.mark.parametrize(
    "path,old,new,expected",
    [
        (APP, "  AzureWebJobsStorage__credential: 'managedidentity'\n", "", "AzureWebJobsStorage__credential"),
        (
            APP,
            "  ServiceBusConnection__credential: 'managedidentity'\n",
            "  ServiceBusConnection__credential: 'connectionstring'\n",
            "ServiceBusConnection__credential",
        ),
        (
            APP,
            "  SOC_STATE_STORAGE: ''\n",
            "  SOC_STATE_STORAGE: ''\n  ServiceBusConnection: 'Endpoint=sb://x.servicebus.windows.net/'\n",
            "ServiceBusConnection is set as a connection string",
        ),
        (APP, "  AzureWebJobsStorage__accountName: storage.name\n", "", "AzureWebJobsStorage__accountName"),
        (
            APP,
            "  ServiceBusConnection__fullyQualifiedNamespace: serviceBusFullyQualifiedNamespace\n",
            "",
            "fullyQualifiedNamespace",
        ),
        # the host and the handler would ask for a system-assigned identity the app has not
        (APP, "  AzureWebJobsStorage__clientId: identityClientId\n", "", "AzureWebJobsStorage__clientId"),
        (APP, "  ServiceBusConnection__clientId: identityClientId\n", "", "ServiceBusConnection__clientId"),
        (
            APP,
            "  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'\n} : {",
            "  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD'\n} : {",
            "Flex: APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        ),
        (APP, "    type: 'UserAssigned'\n", "    type: 'SystemAssigned, UserAssigned'\n", "user-assigned identity identityId"),
        (APP, "    keyVaultReferenceIdentity: identityId\n", "", "keyVaultReferenceIdentity"),
        (
            APP,
            "            type: 'UserAssignedIdentity'\n            userAssignedIdentityResourceId: identityId\n",
            "            type: 'SystemAssignedIdentity'\n",
            "deployment storage",
        ),
        # the app created before (or without) its identity and roles
        (MAIN, "    identityId: identity.outputs.id\n",
         "    identityId: resourceId('Microsoft.ManagedIdentity/userAssignedIdentities', 'id-x')\n",
         "identityId is not identity.outputs.id"),
        (MAIN, "    keyVaultName: keyVault.outputs.vaultName\n    deviceApiKeySecretName: keyVault.outputs.deviceApiKeySecretName\n",
         "    keyVaultName: 'kv-x'\n    deviceApiKeySecretName: 'device-api-key'\n",
         "does not take keyVault's outputs"),
        (IDENTITY, "    principalId: identity.properties.principalId\n", "    principalId: principalIdParam\n",
         "to its identity's principalId"),
        # the scale controller cannot read the message count with Data Receiver
        (
            ROLES,
            "var serviceBusDataOwnerRoleId = '090c5cfd-751d-490a-894a-3ce6f1109419'",
            "var serviceBusDataOwnerRoleId = '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'",
            "serviceBusDataOwnerRoleId is not the built-in role",
        ),
        # broader scope than needed
        (ROLES, "  scope: deviceApiKeySecret\n", "  scope: vault\n", "keyVaultSecretsUserRoleId is scoped to 'vault'"),
        (ROLES, "  scope: queue\n", "  scope: serviceBusNamespace\n", "serviceBusDataOwnerRoleId is scoped"),
        # names that do not change with the principal: a re-created identity would hit
        # RoleAssignmentUpdateNotPermitted
        (ROLES, "  name: guid(queue.id, principalId, serviceBusDataOwnerRoleId)\n",
         "  name: guid(queue.id, serviceBusDataOwnerRoleId)\n",
         "serviceBusDataOwnerRoleId is not named from scope, principal id and role id"),
        (ROLES, "  name: guid(appInsights.id, principalId, monitoringMetricsPublisherRoleId)\n",
         "  name: guid(resourceGroup().id, principalId, monitoringMetricsPublisherRoleId)\n",
         "monitoringMetricsPublisherRoleId is not named from scope"),
        # the notifications: EventGrid Data Sender on the one topic, granted before the app
        (ROLES, "var eventGridDataSenderRoleId = 'd5a91429-5739-47e2-a06b-3470a27159e7'",
         "var eventGridDataSenderRoleId = '1e241071-0855-49ea-94dc-649edcd759de'",
         "eventGridDataSenderRoleId is not the built-in role"),
        (ROLES, "  scope: topic\n", "  scope: storage\n", "eventGridDataSenderRoleId is scoped to 'storage'"),
        (ROLES, "  name: guid(topic.id, principalId, eventGridDataSenderRoleId)\n",
         "  name: guid(topic.id, eventGridDataSenderRoleId)\n",
         "eventGridDataSenderRoleId is not named from scope, principal id and role id"),
        (MAIN, "    eventGridTopicName: eventGrid.outputs.topicName\n", "    eventGridTopicName: 'evgt-x'\n",
         "does not take eventGrid's outputs"),
    ],
)
def test_identity_check_fails_on_keys_wrong_identity_or_wrong_roles(infra_copy, path, old, new, expected):
    replace_once(infra_copy.joinpath(*path), old, new)
    problems = identity_problems(infra_copy)
    assert any(expected in p for p in problems), problems


def _role(text: str, symbol: str) -> str:
    start = text.index(f"resource {symbol}")
    return text[start:text.index("\n}\n", start) + 3]


def test_an_extra_role_is_reported(infra_copy):
    target = infra_copy.joinpath(*ROLES)
    text = target.read_text()
    extra = _role(text, "telemetryRole").replace("telemetryRole", "ownerRole").replace(
        "monitoringMetricsPublisherRoleId", "ownerRoleId")
    target.write_text(text + "\nvar ownerRoleId = '8e3af657-a8ff-443c-a75c-2fe8c4bcb635'\n\n" + extra)
    problems = identity_problems(infra_copy)
    assert any("unexpected role assignment ownerRoleId" in p for p in problems), problems


def test_a_role_assigned_by_the_function_app_again_is_reported(infra_copy):
    role = _role(infra_copy.joinpath(*ROLES).read_text(), "telemetryRole").replace(
        "principalId: principalId", "principalId: identityClientId")
    target = infra_copy.joinpath(*APP)
    target.write_text(target.read_text() + "\nvar monitoringMetricsPublisherRoleId = 'x'\n\n" + role)
    problems = identity_problems(infra_copy)
    assert any("functionapp.bicep assigns roles" in p for p in problems), problems


def test_shared_keys_sas_and_local_telemetry_auth_are_off():
    assert local_auth_problems() == []


@pytest.mark.parametrize(
    "path,old,new,expected",
    [
        ("storage.bicep", "allowSharedKeyAccess: false", "allowSharedKeyAccess: true", "allowSharedKeyAccess"),
        ("servicebus.bicep", "disableLocalAuth: true", "disableLocalAuth: false", "disableLocalAuth"),
        ("monitoring.bicep", "    DisableLocalAuth: true\n", "", "DisableLocalAuth"),
        ("eventgrid.bicep", "disableLocalAuth: true", "disableLocalAuth: false", "Event Grid topic: disableLocalAuth"),
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
