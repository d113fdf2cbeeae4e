"""Source-level checks of the Bicep files, and proof that each one fails on a
broken copy."""

import json

import pytest

from conftest import replace_once
from infra_model import (
    ENVIRONMENTS,
    INFRA,
    bicep_files,
    effective_queue,
    iso_seconds,
    module_call,
    parse,
    queue_problems,
    resources_of_type,
    setting_problems,
)


def test_every_bicep_file_parses():
    files = bicep_files()
    assert len(files) >= 6, files
    for path in files:
        parse(path)


def test_a_syntax_error_is_reported(infra_copy):
    target = infra_copy / "modules" / "servicebus.bicep"
    replace_once(target, "    maxDeliveryCount: maxDeliveryCount\n", "    maxDeliveryCount maxDeliveryCount\n")
    with pytest.raises(Exception):
        parse(target)


def test_settings_queue_has_the_required_properties_in_every_environment():
    assert queue_problems() == []
    for env in ENVIRONMENTS:
        q = effective_queue(INFRA, env)
        assert q["deadLetteringOnMessageExpiration"] is True
        assert iso_seconds(q["defaultMessageTimeToLive"]) >= 7 * 86400


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("deadLetteringOnMessageExpiration: true", "deadLetteringOnMessageExpiration: false", "deadLettering"),
        ("    deadLetteringOnMessageExpiration: true\n", "", "deadLettering"),
        ("    requiresDuplicateDetection: true\n", "", "requiresDuplicateDetection"),
        ("    maxDeliveryCount: maxDeliveryCount\n", "", "maxDeliveryCount"),
        ("    lockDuration: lockDuration\n", "    lockDuration: 'PT10M'\n", "lockDuration"),
        ("    defaultMessageTimeToLive: messageTimeToLive\n", "    defaultMessageTimeToLive: 'P1D'\n", "defaultMessageTimeToLive"),
    ],
)
def test_queue_check_fails_on_a_broken_queue(infra_copy, old, new, expected):
    replace_once(infra_copy / "modules" / "servicebus.bicep", old, new)
    problems = queue_problems(infra_copy)
    assert any(expected in p for p in problems), problems


def test_queue_ttl_shorter_than_the_request_ttl_in_one_environment_fails(infra_copy):
    params = infra_copy / "params" / "prod.parameters.json"
    data = json.loads(params.read_text())
    data["parameters"]["queueMessageTimeToLive"] = {"value": "P6D"}
    params.write_text(json.dumps(data))
    assert any(p.startswith("prod: defaultMessageTimeToLive") for p in queue_problems(infra_copy))


def test_the_device_key_comes_from_key_vault_and_the_runtime_is_custom():
    assert setting_problems() == []


@pytest.mark.parametrize(
    "old,new",
    [
        (
            "  DEVICE_API_KEY: '@Microsoft.KeyVault(SecretUri=${deviceApiKeySecretUri})'\n",
            "  DEVICE_API_KEY: 'plain-text-key'\n",
        ),
        (
            "  SOC_STATE_STORAGE: ''\n",
            "  SOC_STATE_STORAGE: '@Microsoft.KeyVault(SecretUri=${deviceApiKeySecretUri})'\n",
        ),
        ("  FUNCTIONS_WORKER_RUNTIME: 'custom'\n", "  FUNCTIONS_WORKER_RUNTIME: 'node'\n"),
        ("        name: 'custom'\n", "        name: 'python'\n"),
    ],
)
def test_setting_check_fails_without_key_vault_or_custom_runtime(infra_copy, old, new):
    replace_once(infra_copy / "modules" / "functionapp.bicep", old, new)
    assert setting_problems(infra_copy) != []


def _references(expr) -> set[str]:
    """Symbol names an expression in the pycep JSON refers to."""
    found = set()
    if isinstance(expr, dict):
        operator = expr.get("operator", {})
        if operator.get("type") == "property_accessor":
            first = operator["operands"]["operand_1"]
            if isinstance(first, str):
                found.add(first)
        for value in expr.values():
            found |= _references(value)
    elif isinstance(expr, list):
        for value in expr:
            found |= _references(value)
    return found


def test_the_identity_module_is_fed_by_the_modules_it_grants_roles_on_and_feeds_the_app():
    main = parse(INFRA / "main.bicep")
    identity, identity_params = module_call(main, "modules/identity.bicep")
    _, app_params = module_call(main, "modules/functionapp.bicep")
    for path in ("modules/servicebus.bicep", "modules/keyvault.bicep", "modules/storage.bicep",
                 "modules/monitoring.bicep", "modules/eventgrid.bicep"):
        name, _ = module_call(main, path)
        assert name in _references(identity_params), f"the identity must take {name} outputs (deploy order)"
        assert name in _references(app_params), f"function app must take {name} outputs (deploy order)"
    assert identity in _references(app_params), "the app is created after its identity and roles"


def test_key_vault_uses_rbac():
    kv = parse(INFRA / "modules" / "keyvault.bicep")
    (vault,) = resources_of_type(kv, "Microsoft.KeyVault/vaults").values()
    assert vault["config"]["properties"]["enableRbacAuthorization"] is True
    secrets = resources_of_type(kv, "Microsoft.KeyVault/vaults/secrets")
    assert [s["config"]["name"] for s in secrets.values()] == ["device-api-key"]


def test_service_bus_tier_supports_duplicate_detection_and_scheduling():
    sb = parse(INFRA / "modules" / "servicebus.bicep")
    (ns,) = resources_of_type(sb, "Microsoft.ServiceBus/namespaces").values()
    assert ns["config"]["sku"]["tier"] in ("Standard", "Premium")


def test_parameter_files_hold_no_secret_and_main_declares_the_key_secure():
    main = parse(INFRA / "main.bicep")
    decorators = [d["type"] for d in main["parameters"]["deviceApiKey"]["decorators"]]
    assert "secure" in decorators
    for env in ENVIRONMENTS:
        text = (INFRA / "params" / f"{env}.parameters.json").read_text()
        assert "deviceApiKey" not in text
        assert "SharedAccessKey" not in text and "AccountKey" not in text


def test_outputs_give_the_deployer_app_name_hostname_and_queue():
    main = parse(INFRA / "main.bicep")
    assert {"functionAppName", "defaultHostname", "queueName", "identityPrincipalId",
            "notifyTopicName", "notifyTopicEndpoint"} <= set(main["outputs"])
