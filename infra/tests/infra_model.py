"""Reads the Bicep files (through pycep, the parser checkov itself uses) and
answers the questions the tests ask: what the settings queue looks like in each
environment, which app settings the function app gets, which module feeds
which. Every function takes the infra root, so the tests can run the same
checks against a mutated copy and prove they fail."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pycep import BicepParser

INFRA = Path(__file__).resolve().parents[1]
ENVIRONMENTS = ("qa", "prod")
_PARSER = BicepParser()


def bicep_files(root: Path = INFRA) -> list[Path]:
    return sorted(p for p in root.rglob("*.bicep") if "tests" not in p.parts)


def parse(path: Path) -> dict:
    """Parses one Bicep file; raises on a syntax error."""
    return _PARSER.parse(text=path.read_text())


def env_parameters(root: Path, env: str) -> dict:
    data = json.loads((root / "params" / f"{env}.parameters.json").read_text())
    return {k: v["value"] for k, v in data["parameters"].items()}


def _main_value(main: dict, expr, env_params: dict):
    """Value of an expression in main.bicep when it is a literal or a bare parameter name."""
    if isinstance(expr, str) and expr in main["parameters"]:
        if expr in env_params:
            return env_params[expr]
        return main["parameters"][expr]["default"]
    return expr


def _module_value(module: dict, call_params: dict, main: dict, expr, env_params: dict):
    """Value of an expression in a module, following module parameters back to main.bicep."""
    if isinstance(expr, str) and expr in module.get("parameters", {}):
        if expr not in call_params:
            return module["parameters"][expr]["default"]
        return _main_value(main, call_params[expr], env_params)
    return expr


def module_calls(root: Path, *paths: str) -> tuple[dict, list[tuple[str, dict]]]:
    """main.bicep parsed, and (module name, params) of each path it deploys; AssertionError
    when it does not deploy one."""
    main = parse(root / "main.bicep")
    return main, [module_call(main, p) for p in paths]


def module_call(main: dict, path: str) -> tuple[str, dict]:
    for name, mod in main.get("modules", {}).items():
        if mod["detail"]["path"] == path:
            return name, mod["config"]["params"]
    raise AssertionError(f"main.bicep does not deploy {path}")


def resources_of_type(doc: dict, rtype: str) -> dict:
    return {
        name: res
        for name, res in doc.get("resources", {}).items()
        if res["type"] == rtype and not res.get("existing")
    }


def effective_queue(root: Path, env: str) -> dict:
    """The settings queue's properties as deployed to `env`."""
    main = parse(root / "main.bicep")
    module = parse(root / "modules" / "servicebus.bicep")
    _, call = module_call(main, "modules/servicebus.bicep")
    queues = resources_of_type(module, "Microsoft.ServiceBus/namespaces/queues")
    assert len(queues) == 1, f"expected one queue, found {sorted(queues)}"
    props = next(iter(queues.values()))["config"].get("properties", {})
    params = env_parameters(root, env)
    return {k: _module_value(module, call, main, v, params) for k, v in props.items()}


def request_ttl_seconds(root: Path, env: str) -> int:
    main = parse(root / "main.bicep")
    return int(_main_value(main, "requestTtlSeconds", env_parameters(root, env)))


_DURATION = re.compile(
    r"^P(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


def iso_seconds(value: str) -> float:
    """Seconds in an ISO 8601 duration of the forms Service Bus uses (P14D, PT1M, P1DT2H)."""
    m = _DURATION.match(value or "")
    if not m or value in ("P", "PT"):
        raise ValueError(f"not an ISO 8601 duration: {value!r}")
    d, h, mi, s = (float(m.group(g) or 0) for g in "dhms")
    return ((d * 24 + h) * 60 + mi) * 60 + s


def queue_problems(root: Path = INFRA) -> list[str]:
    """What is wrong with the settings queue, per environment; empty when all is well."""
    problems = []
    for env in ENVIRONMENTS:
        q = effective_queue(root, env)
        ttl = request_ttl_seconds(root, env)
        if q.get("deadLetteringOnMessageExpiration") is not True:
            problems.append(f"{env}: deadLetteringOnMessageExpiration is not true")
        mdc = q.get("maxDeliveryCount")
        if not isinstance(mdc, int) or not 1 <= mdc <= 100:
            problems.append(f"{env}: maxDeliveryCount {mdc!r} not an integer in 1..100")
        try:
            lock = iso_seconds(q.get("lockDuration"))
            if not 5 <= lock <= 300:
                problems.append(f"{env}: lockDuration {lock}s outside 5s..5min")
        except ValueError as e:
            problems.append(f"{env}: lockDuration: {e}")
        if q.get("requiresDuplicateDetection") is not True:
            problems.append(f"{env}: requiresDuplicateDetection is not true")
        try:
            window = iso_seconds(q.get("duplicateDetectionHistoryTimeWindow"))
            if not 20 <= window <= 7 * 86400:
                problems.append(f"{env}: duplicate detection window {window}s outside 20s..7d")
        except ValueError as e:
            problems.append(f"{env}: duplicateDetectionHistoryTimeWindow: {e}")
        try:
            qttl = iso_seconds(q.get("defaultMessageTimeToLive"))
            if qttl < ttl:
                problems.append(
                    f"{env}: defaultMessageTimeToLive {qttl}s is shorter than the request TTL {ttl}s"
                )
        except ValueError as e:
            problems.append(f"{env}: defaultMessageTimeToLive: {e}")
    return problems


def app_settings(root: Path = INFRA) -> dict[str, object]:
    """Union of the function app's settings as written in functionapp.bicep:
    socSettings plus both branches of platformSettings."""
    doc = parse(root / "modules" / "functionapp.bicep")
    variables = doc["variables"]
    settings = dict(variables["socSettings"]["value"])
    platform = variables["platformSettings"]["value"]
    branches = platform["operator"]["operands"] if "operator" in platform else {"only": platform}
    for key in ("true_value", "false_value", "only"):
        if isinstance(branches.get(key), dict):
            for name, value in branches[key].items():
                settings.setdefault(name, value)
    return settings


def dedicated_settings(root: Path = INFRA) -> dict:
    doc = parse(root / "modules" / "functionapp.bicep")
    platform = doc["variables"]["platformSettings"]["value"]
    return platform["operator"]["operands"]["false_value"]


def flex_runtime(root: Path = INFRA) -> dict:
    doc = parse(root / "modules" / "functionapp.bicep")
    sites = resources_of_type(doc, "Microsoft.Web/sites")
    assert len(sites) == 1
    fac = next(iter(sites.values()))["config"]["properties"]["functionAppConfig"]
    return fac["operator"]["operands"]["true_value"]["runtime"]


_KV_REF = re.compile(r"^@Microsoft\.KeyVault\(SecretUri=\$\{[A-Za-z_][A-Za-z0-9_]*\}\)$")


def setting_problems(root: Path = INFRA) -> list[str]:
    settings = app_settings(root)
    problems = []
    if not isinstance(settings.get("DEVICE_API_KEY"), str) or not _KV_REF.match(settings["DEVICE_API_KEY"]):
        problems.append(f"DEVICE_API_KEY is not a Key Vault reference: {settings.get('DEVICE_API_KEY')!r}")
    for name, value in settings.items():
        if name != "DEVICE_API_KEY" and isinstance(value, str) and "@Microsoft.KeyVault" in value:
            problems.append(f"{name} is a Key Vault reference; the vault holds only the device API key")
    dedicated = dedicated_settings(root)
    if dedicated.get("FUNCTIONS_WORKER_RUNTIME") != "custom":
        problems.append("Dedicated plan: FUNCTIONS_WORKER_RUNTIME is not 'custom'")
    if dedicated.get("FUNCTIONS_EXTENSION_VERSION") != "~4":
        problems.append("Dedicated plan: FUNCTIONS_EXTENSION_VERSION is not '~4'")
    if flex_runtime(root).get("name") != "custom":
        problems.append("Flex Consumption: functionAppConfig.runtime.name is not 'custom'")
    return problems


# ---------------------------------------------------------------- Flex Consumption

# Flex Consumption refuses these siteConfig properties, even as null (Flex
# deprecations in the Functions app settings reference).
FLEX_FORBIDDEN_SITE_CONFIG = ("ftpsState", "linuxFxVersion", "alwaysOn")
# ... and these app settings (the platform owns them).
FLEX_FORBIDDEN_APP_SETTINGS = ("FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION",
                               "WEBSITE_RUN_FROM_PACKAGE", "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
                               "WEBSITE_CONTENTSHARE")


def _site(doc: dict) -> dict:
    sites = resources_of_type(doc, "Microsoft.Web/sites")
    assert len(sites) == 1, sorted(sites)
    return next(iter(sites.values()))["config"]


def _branches(expr) -> tuple[dict, dict]:
    """(Flex value, Dedicated value) of an `isFlex ? a : b` expression."""
    op = expr.get("operator", {}) if isinstance(expr, dict) else {}
    if op.get("type") != "conditional" or op["operands"]["condition"] != "isFlex":
        raise AssertionError(f"expected `isFlex ? … : …`, got {expr!r}"[:300])
    return op["operands"]["true_value"], op["operands"]["false_value"]


def site_config_branches(root: Path = INFRA) -> tuple[dict, dict]:
    doc = parse(root / "modules" / "functionapp.bicep")
    return _branches(_site(doc)["properties"]["siteConfig"])


def platform_settings_branches(root: Path = INFRA) -> tuple[dict, dict]:
    doc = parse(root / "modules" / "functionapp.bicep")
    return _branches(doc["variables"]["platformSettings"]["value"])


def flex_problems(root: Path = INFRA) -> list[str]:
    """What Flex Consumption would refuse, or the Dedicated fallback lacks."""
    problems = []
    try:
        flex, dedicated = site_config_branches(root)
    except AssertionError as e:
        return [f"siteConfig is not split by plan: {e}"]
    for name in FLEX_FORBIDDEN_SITE_CONFIG:
        if name in flex:
            problems.append(f"Flex siteConfig carries {name} ({flex[name]!r}); Flex rejects it")
    if dedicated.get("ftpsState") != "Disabled":
        problems.append("Dedicated siteConfig: ftpsState is not 'Disabled'")
    if dedicated.get("alwaysOn") is not True:
        problems.append("Dedicated siteConfig: alwaysOn is not true")
    for label, branch in (("Flex", flex), ("Dedicated", dedicated)):
        if branch.get("minTlsVersion") != "1.2":
            problems.append(f"{label} siteConfig: minTlsVersion is not 1.2")
        if branch.get("http20Enabled") is not True:
            problems.append(f"{label} siteConfig: http20Enabled is not true")
    flex_settings, _ = platform_settings_branches(root)
    for name in FLEX_FORBIDDEN_APP_SETTINGS:
        if name in flex_settings:
            problems.append(f"Flex app settings set {name}; the platform owns it on Flex")
    return problems


def api_version_problems(root: Path = INFRA) -> list[str]:
    """Every resource (deployed or existing) on a stable API version."""
    problems = []
    for path in bicep_files(root):
        for name, res in parse(path).get("resources", {}).items():
            version = res.get("api_version", "")
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", version or ""):
                problems.append(f"{path.name}: {name} uses API version {version!r}, not a stable one")
    return problems


# ---------------------------------------------------------------- identity

# Role definition ids (built-in roles) by the variable name identity-roles.bicep uses.
ROLE_IDS = {
    "storageBlobDataOwnerRoleId": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "storageTableDataContributorRoleId": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "serviceBusDataOwnerRoleId": "090c5cfd-751d-490a-894a-3ce6f1109419",
    "keyVaultSecretsUserRoleId": "4633458b-17de-408a-b874-0445c86b69e6",
    "monitoringMetricsPublisherRoleId": "3913510d-42f4-4e42-8a64-420c390055eb",
    "eventGridDataSenderRoleId": "d5a91429-5739-47e2-a06b-3470a27159e7",
}
# The one identity's roles: role variable -> the symbol of the resource it is scoped to.
EXPECTED_ROLES = {
    "storageBlobDataOwnerRoleId": "storage",
    "storageTableDataContributorRoleId": "storage",
    "serviceBusDataOwnerRoleId": "queue",
    "keyVaultSecretsUserRoleId": "deviceApiKeySecret",
    "monitoringMetricsPublisherRoleId": "appInsights",
    "eventGridDataSenderRoleId": "topic",
}
ROLES_FILE = ("modules", "identity-roles.bicep")


def _role_configs(doc: dict) -> dict[str, dict]:
    """Symbol -> config of every role assignment in a parsed file (`if` resources nest)."""
    return {name: res["config"].get("config", res["config"])
            for name, res in resources_of_type(doc, "Microsoft.Authorization/roleAssignments").items()}


def role_assignments(root: Path = INFRA) -> dict[str, dict]:
    """Role variable -> {symbol, scope, principal, name} of every role assignment of the identity."""
    doc = parse(root.joinpath(*ROLES_FILE))
    out = {}
    for name, config in _role_configs(doc).items():
        role = config["properties"]["roleDefinitionId"]["function"]["parameters"]["resource_name_1"]
        out[role] = {"symbol": name, "scope": config.get("scope"),
                     "principal": config["properties"].get("principalId"),
                     "principalType": config["properties"].get("principalType"),
                     "name": config.get("name")}
    return out


def _accessor(expr) -> tuple | None:
    """`a.b` or `a.b.c` (pycep nests either way) as a tuple of names, else None."""
    if isinstance(expr, str):
        return (expr,)
    if not isinstance(expr, dict) or expr.get("operator", {}).get("type") != "property_accessor":
        return None
    ops = expr["operator"]["operands"]
    first, second = _accessor(ops["operand_1"]), _accessor(ops["operand_2"])
    return first + second if first and second else None


def role_name_problems(role: str, entry: dict) -> list[str]:
    """A role assignment is named guid(<its scope>.id, principalId, <its role variable>)."""
    fn = (entry.get("name") or {}).get("function", {}) if isinstance(entry.get("name"), dict) else {}
    params = fn.get("parameters", {})
    base = params.get("base_string")
    parts = (_accessor(base) if isinstance(base, dict) else base, params.get("extra_string_1"),
             params.get("extra_string_2"), params.get("extra_string_3"))
    want = ((entry["scope"], "id"), "principalId", role, None)
    if fn.get("type") != "guid" or parts != want:
        return [f"{role} is not named from scope, principal id and role id "
                f"(guid({entry['scope']}.id, principalId, {role}))"]
    return []


def identity_problems(root: Path = INFRA) -> list[str]:
    """One user-assigned identity, created and granted its least roles before the app exists,
    used for every connection, the Key Vault reference, deployment storage and telemetry."""
    problems = []
    doc = parse(root / "modules" / "functionapp.bicep")
    settings = doc["variables"]["socSettings"]["value"]
    for connection in ("AzureWebJobsStorage", "ServiceBusConnection"):
        if connection in settings:
            problems.append(f"{connection} is set as a connection string; use the identity-based {connection}__ form")
        if settings.get(f"{connection}__credential") != "managedidentity":
            problems.append(f"{connection}__credential is not 'managedidentity'")
        if settings.get(f"{connection}__clientId") != "identityClientId":
            problems.append(f"{connection}__clientId is not the user-assigned identity's client id")
    if not settings.get("AzureWebJobsStorage__accountName"):
        problems.append("AzureWebJobsStorage__accountName is not set")
    if not settings.get("ServiceBusConnection__fullyQualifiedNamespace"):
        problems.append("ServiceBusConnection__fullyQualifiedNamespace is not set")
    flex, dedicated = platform_settings_branches(root)
    for label, branch in (("Flex", flex), ("Dedicated", dedicated)):
        if branch.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING") != "ClientId=${identityClientId};Authorization=AAD":
            problems.append(f"{label}: APPLICATIONINSIGHTS_AUTHENTICATION_STRING is not "
                            "'ClientId=${identityClientId};Authorization=AAD'")
    site = _site(doc)
    identity = site.get("identity", {})
    if identity.get("type") != "UserAssigned" or list(identity.get("userAssignedIdentities", {})) != ["'${identityId}'"]:
        problems.append(f"the site does not run as exactly the user-assigned identity identityId: {identity!r}")
    if site["properties"].get("keyVaultReferenceIdentity") != "identityId":
        problems.append("keyVaultReferenceIdentity is not the user-assigned identity")
    try:
        fac, _ = _branches(site["properties"]["functionAppConfig"])
        auth = fac["deployment"]["storage"]["authentication"]
    except (AssertionError, KeyError, TypeError):
        auth = {}
    if auth != {"type": "UserAssignedIdentity", "userAssignedIdentityResourceId": "identityId"}:
        problems.append(f"Flex deployment storage does not authenticate as the user-assigned identity: {auth!r}")
    if _role_configs(doc):
        problems.append("functionapp.bicep assigns roles; the identity module grants them before the app exists")

    # main.bicep: the identity module runs after the resources it grants roles on, the app after it.
    try:
        main, ((identity_name, identity_call), (_, app_call)) = module_calls(
            root, "modules/identity.bicep", "modules/functionapp.bicep")
    except AssertionError as e:
        return problems + [str(e)]
    for param, output in (("identityId", "id"), ("identityClientId", "clientId")):
        if _accessor(app_call.get(param)) != (identity_name, "outputs", output):
            problems.append(f"functionApp's {param} is not {identity_name}.outputs.{output} "
                            "(the app must be created after its identity and roles)")
    for path in ("modules/storage.bicep", "modules/servicebus.bicep", "modules/keyvault.bicep",
                 "modules/monitoring.bicep", "modules/eventgrid.bicep"):
        name, _ = module_call(main, path)
        if not any(isinstance(v, dict) and (_accessor(v) or ())[:2] == (name, "outputs")
                   for v in identity_call.values()):
            problems.append(f"the identity module does not take {name}'s outputs (it grants roles on them)")

    # identity.bicep: a user-assigned identity, its roles granted in the same module run.
    ident = parse(root / "modules" / "identity.bicep")
    if len(resources_of_type(ident, "Microsoft.ManagedIdentity/userAssignedIdentities")) != 1:
        problems.append("identity.bicep does not create one user-assigned identity")
    roles_modules = [m for m in ident.get("modules", {}).values() if m["detail"]["path"] == "identity-roles.bicep"]
    if len(roles_modules) != 1 or _accessor(roles_modules[0]["config"]["params"].get("principalId")) != \
            ("identity", "properties", "principalId"):
        problems.append("identity.bicep does not grant the roles (identity-roles.bicep) to its identity's principalId")

    roles_doc = parse(root.joinpath(*ROLES_FILE))
    for var, guid in ROLE_IDS.items():
        if roles_doc["variables"].get(var, {}).get("value") != guid:
            problems.append(f"{var} is not the built-in role {guid}")
    roles = role_assignments(root)
    for role, scope in EXPECTED_ROLES.items():
        if role not in roles:
            problems.append(f"missing role assignment {role} on {scope}")
            continue
        entry = roles[role]
        if entry["scope"] != scope:
            problems.append(f"{role} is scoped to {entry['scope']!r}, expected {scope!r}")
            continue
        if entry["principal"] != "principalId" or entry["principalType"] != "ServicePrincipal":
            problems.append(f"{role} is not assigned to the identity's principalId")
        problems += role_name_problems(role, entry)
    for role in sorted(set(roles) - set(EXPECTED_ROLES)):
        problems.append(f"unexpected role assignment {role} (least privilege: docs/deploy.md lists the roles)")
    for path in bicep_files(root):
        if path.name != ROLES_FILE[-1] and _role_configs(parse(path)):
            problems.append(f"{path.name} assigns roles; only identity-roles.bicep does")
    return problems


def local_auth_problems(root: Path = INFRA) -> list[str]:
    """Shared keys, SAS and instrumentation-key ingestion are off; no key is read anywhere."""
    problems = []
    storage = parse(root / "modules" / "storage.bicep")
    (account,) = resources_of_type(storage, "Microsoft.Storage/storageAccounts").values()
    if account["config"]["properties"].get("allowSharedKeyAccess") is not False:
        problems.append("storage: allowSharedKeyAccess is not false")
    sb = parse(root / "modules" / "servicebus.bicep")
    (ns,) = resources_of_type(sb, "Microsoft.ServiceBus/namespaces").values()
    if ns["config"]["properties"].get("disableLocalAuth") is not True:
        problems.append("Service Bus: disableLocalAuth is not true")
    if resources_of_type(sb, "Microsoft.ServiceBus/namespaces/authorizationRules"):
        problems.append("Service Bus: a shared access rule exists")
    mon = parse(root / "modules" / "monitoring.bicep")
    (ai,) = resources_of_type(mon, "Microsoft.Insights/components").values()
    if ai["config"]["properties"].get("DisableLocalAuth") is not True:
        problems.append("Application Insights: DisableLocalAuth is not true")
    if notify_topic(root)["properties"].get("disableLocalAuth") is not True:
        problems.append("Event Grid topic: disableLocalAuth is not true")
    for path in bicep_files(root):
        text = path.read_text()
        for needle in ("listKeys(", "listConnectionStrings(", "AccountKey=", "SharedAccessKey"):
            if needle in text:
                problems.append(f"{path.name} reads or writes a key ({needle})")
    return problems


# ---------------------------------------------------------------- notifications

NOTIFY_ENDPOINT_SETTING = "SOC_NOTIFY_TOPIC_ENDPOINT"


def notify_topic(root: Path = INFRA) -> dict:
    """The config of the one Event Grid topic eventgrid.bicep deploys."""
    doc = parse(root / "modules" / "eventgrid.bicep")
    topics = resources_of_type(doc, "Microsoft.EventGrid/topics")
    assert len(topics) == 1, f"expected one Event Grid topic, found {sorted(topics)}"
    return next(iter(topics.values()))["config"]


def notify_problems(root: Path = INFRA) -> list[str]:
    """The notifications' topic takes CloudEvents 1.0 with Entra ID only, like the rest of the
    infra it is public and tagged, and the app publishes to its endpoint: main.bicep deploys it
    and hands its endpoint to the function app's SOC_NOTIFY_TOPIC_ENDPOINT, and the deployer
    gets its name and endpoint as outputs."""
    problems = []
    topic = notify_topic(root)
    props = topic.get("properties", {})
    if props.get("inputSchema") != "CloudEventSchemaV1_0":
        problems.append(f"the topic's inputSchema is {props.get('inputSchema')!r}, not CloudEventSchemaV1_0")
    if props.get("disableLocalAuth") is not True:
        problems.append("the topic's disableLocalAuth is not true (keys and SAS tokens would publish)")
    if props.get("publicNetworkAccess") != "Enabled":
        problems.append("the topic's publicNetworkAccess is not 'Enabled' (the app reaches it publicly, "
                        "as it does storage and Service Bus)")
    if topic.get("tags") != "tags":
        problems.append("the topic does not carry the common tags")
    doc = parse(root / "modules" / "eventgrid.bicep")
    endpoint = _accessor(doc.get("outputs", {}).get("endpoint", {}).get("value"))
    if endpoint != ("topic", "properties", "endpoint"):
        problems.append(f"eventgrid.bicep does not output the topic's endpoint: {endpoint!r}")

    try:
        main, ((name, call), (_, app_call)) = module_calls(
            root, "modules/eventgrid.bicep", "modules/functionapp.bicep")
    except AssertionError as e:
        return problems + [str(e)]
    if call.get("tags") != "tags":
        problems.append("main.bicep does not pass the common tags to the topic")
    if _accessor(app_call.get("notifyTopicEndpoint")) != (name, "outputs", "endpoint"):
        problems.append(f"functionApp's notifyTopicEndpoint is not {name}.outputs.endpoint")
    settings = parse(root / "modules" / "functionapp.bicep")["variables"]["socSettings"]["value"]
    if settings.get(NOTIFY_ENDPOINT_SETTING) != "notifyTopicEndpoint":
        problems.append(f"{NOTIFY_ENDPOINT_SETTING} is not set to the topic's endpoint (notifyTopicEndpoint)")
    # Named (every setting the handler reads is, tests/infra_settings.rs) but empty.
    if settings.get("SOC_NOTIFY_TOPIC_KEY", "") != "":
        problems.append("SOC_NOTIFY_TOPIC_KEY is set in Azure; the topic takes the identity only")
    outputs = {k: _accessor(v.get("value")) for k, v in main.get("outputs", {}).items()}
    for output in ("topicName", "endpoint"):
        if (name, "outputs", output) not in outputs.values():
            problems.append(f"main.bicep has no output of the topic's {output}")
    return problems


# ---------------------------------------------------------------- alerts

def _expand(doc: dict, text: str, defaults: bool = False) -> str:
    """`${var}` in a string replaced by the module's string variables (and, with
    `defaults`, parameters by their default values); others are left as is."""
    def sub(m):
        value = doc["variables"].get(m.group(1), {}).get("value")
        if isinstance(value, str):
            return _expand(doc, value, defaults)
        default = doc["parameters"].get(m.group(1), {}).get("default") if defaults else None
        return str(default) if isinstance(default, (int, str)) and not isinstance(default, bool) else m.group(0)
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, text)


def operator_queries(root: Path = INFRA) -> dict[str, str]:
    """Every KQL query of the alerts module (alerts and workbook), parameters at their defaults."""
    doc = parse(root / "modules" / "alerts.bicep")
    return {name: _expand(doc, var["value"], defaults=True)
            for name, var in doc["variables"].items()
            if name.endswith("Query") and isinstance(var["value"], str)}


def alert_rules(root: Path = INFRA) -> dict[str, dict]:
    """Alert symbol -> {type, properties, query (expanded, for log alerts)}."""
    doc = parse(root / "modules" / "alerts.bicep")
    out = {}
    for rtype in ("Microsoft.Insights/metricAlerts", "Microsoft.Insights/scheduledQueryRules"):
        for name, res in resources_of_type(doc, rtype).items():
            props = res["config"]["properties"]
            entry = {"type": rtype, "properties": props}
            if rtype.endswith("scheduledQueryRules"):
                (criterion,) = props["criteria"]["allOf"]
                query = criterion["query"]
                query = doc["variables"][query]["value"] if query in doc["variables"] else query
                entry["query"] = _expand(doc, query)
                entry["criterion"] = criterion
            out[name] = entry
    return out


def alert_problems(root: Path = INFRA) -> list[str]:
    """The five alerts exist with the conditions docs/operations.md describes."""
    problems = []
    main = parse(root / "main.bicep")
    try:
        _, call = module_call(main, "modules/alerts.bicep")
    except AssertionError as e:
        return [str(e)]
    rules = alert_rules(root)
    doc = parse(root / "modules" / "alerts.bicep")

    dead = [r for r in rules.values() if r["type"].endswith("metricAlerts")
            and any(c.get("metricName") == "DeadletteredMessages" for c in r["properties"]["criteria"]["allOf"])]
    if len(dead) != 1:
        problems.append("no metric alert on DeadletteredMessages")
    else:
        (c,) = [c for c in dead[0]["properties"]["criteria"]["allOf"] if c.get("metricName") == "DeadletteredMessages"]
        if c.get("operator") != "GreaterThan" or c.get("threshold") != 0:
            problems.append("dead-letter alert does not fire on > 0")
        dims = {d["name"]: d["values"] for d in c.get("dimensions", [])}
        if dims.get("EntityName") != ["queueName"]:
            problems.append("dead-letter alert is not limited to the settings queue (EntityName)")

    logs = {n: r for n, r in rules.items() if "query" in r}

    def find(*needles):
        return [r for r in logs.values() if all(n in r["query"] for n in needles)]

    for r in logs.values():
        if r["properties"].get("skipQueryValidation") is not True:
            problems.append(f"log alert {r['properties'].get('displayName')} does not set skipQueryValidation: "
                            "true (its first creation can fail against a new component)")
        c = r["criterion"]
        if (c.get("operator"), c.get("threshold"), c.get("timeAggregation")) != ("GreaterThan", 0, "Count"):
            problems.append(f"log alert {r['properties'].get('displayName')} does not fire on any result row")
    rate = find('outcome in ("applied", "failed", "expired")', 'outcome != "applied"', "dcount(requestId)")
    if len(rate) != 1:
        problems.append("no log alert on the rate of failed and expired requests")
    if len(find('contains_cs " ERROR "', "success == false", "resultCode")) != 1:
        problems.append("no log alert on handler errors (ERROR lines and failed invocations)")
    outbox = find('message contains " outbox_oldest_age_s="', 'extract(" outbox_oldest_age_s=([0-9]+)"',
                  "max(oldestAgeSeconds)", "where maxAgeSeconds > ${outboxAgeThresholdSeconds}")
    if len(outbox) != 1:
        problems.append("no log alert on the outbox age (the oldest unpublished notification)")
    else:
        props = outbox[0]["properties"]
        threshold = doc["parameters"].get("outboxAgeThresholdSeconds", {}).get("default")
        if (props.get("windowSize"), props.get("evaluationFrequency"), threshold) != ("PT15M", "PT5M", 900):
            problems.append("outbox alert is not: max age over 15 min > 900 s, evaluated every 5 min")
    sweep = find('name == "DrainSocTimer"', "success == true", "== 0")
    if len(sweep) != 1:
        problems.append("no log alert on the sweep not running")
    else:
        props = sweep[0]["properties"]
        window = doc["variables"].get("sweepWindowMinutes", {}).get("value")
        if props.get("windowSize") != "PT${sweepWindowMinutes}M" or window != {
                "operator": {"type": "multiply", "operands": {"operand_1": 3, "operand_2": "drainIntervalMinutes"}}}:
            problems.append("sweep alert window is not three schedules (3 * drainIntervalMinutes)")
        if props.get("evaluationFrequency") != "PT${drainIntervalMinutes}M":
            problems.append("sweep alert is not evaluated once per schedule")
    # The alert and the timer read the same interval.
    if call.get("drainIntervalMinutes") != "drainIntervalMinutes" or \
            main["variables"].get("drainSchedule", {}).get("value") != "0 */${drainIntervalMinutes} * * * *":
        problems.append("DRAIN_SOC_SCHEDULE and the sweep alert do not share drainIntervalMinutes")
    workbooks = resources_of_type(doc, "Microsoft.Insights/workbooks")
    if len(workbooks) != 1:
        problems.append("no operators' workbook")
    return problems


# ---------------------------------------------------------------- sampling

# Item types Application Insights must never sample: the alerts and the on-call views read them.
UNSAMPLED_TYPES = {"Request", "Exception", "Trace"}
# A row count (`count()`, `countif(`) rather than a sum of itemCount; `dcount` is not one.
_ROW_COUNT = re.compile(r"(?<![A-Za-z_])count(?:if)?\s*\(")


def sampled_types(host_json: dict) -> set[str] | None:
    """Item types host.json lets Application Insights sample (None: every type)."""
    settings = host_json.get("logging", {}).get("applicationInsights", {}).get("samplingSettings", {})
    if settings.get("isEnabled") is False:
        return set()
    every = {"Dependency", "Event", "Exception", "PageView", "Request", "Trace"}
    excluded = {t.strip() for t in settings.get("excludedTypes", "").split(";") if t.strip()}
    included = {t.strip() for t in settings.get("includedTypes", "").split(";") if t.strip()}
    return (included or every) - excluded


def sampling_problems(root: Path = INFRA, host_json: Path | None = None, guide: Path | None = None) -> list[str]:
    """host.json keeps every Request, Exception and Trace item; every query of the alerts
    module and of docs/operations.md counts with itemCount; the guide states the setting."""
    host_json = host_json or root.parent / "host.json"
    guide = guide or root.parent / "docs" / "operations.md"
    problems = []
    host = json.loads(host_json.read_text())
    sampled = sampled_types(host) & UNSAMPLED_TYPES
    if sampled:
        problems.append(f"host.json lets Application Insights sample {sorted(sampled)}: "
                        "ERROR lines, invocations and ledger states could be dropped")
    for name, query in operator_queries(root).items():
        if _ROW_COUNT.search(query):
            problems.append(f"alerts.bicep {name} counts rows; use sum(itemCount) / sumif(itemCount, ...)")
    text = guide.read_text()
    for i, block in enumerate(re.findall(r"```kusto\n(.*?)```", text, re.S)):
        if _ROW_COUNT.search(block):
            problems.append(f"{guide.name} query {i + 1} counts rows; use sum(itemCount) / sumif(itemCount, ...)")
    settings = host.get("logging", {}).get("applicationInsights", {}).get("samplingSettings", {})
    stated = json.dumps({"samplingSettings": settings})[1:-1]
    if stated not in text:
        problems.append(f"{guide.name} does not state host.json's sampling settings ({stated})")
    return problems


# The handler's longest wait for a device-call turn (src/adapters/device_budget.rs MAX_WAIT):
# each instance must get at least one call per this many seconds (src/config.rs).
DEVICE_BUDGET_MAX_WAIT_SECONDS = 30


def budget_problems(root: Path = INFRA) -> list[str]:
    """The device-call budget's settings (README "Device-call budget"): the instance count the
    ceiling is divided by is the Flex scale-out limit itself, and in every environment each
    instance's share is one the handler accepts."""
    problems = []
    settings = app_settings(root)
    doc = parse(root / "modules" / "functionapp.bicep")
    site = next(iter(resources_of_type(doc, "Microsoft.Web/sites").values()))
    flex = site["config"]["properties"]["functionAppConfig"]["operator"]["operands"]["true_value"]
    scale_param = flex["scaleAndConcurrency"]["maximumInstanceCount"]
    instances = settings.get("DEVICE_API_INSTANCES", {})
    convert = instances.get("function", {}).get("parameters", {}).get("value_to_convert", {}) \
        if isinstance(instances, dict) else {}
    operands = convert.get("operator", {}).get("operands", {}) if isinstance(convert, dict) else {}
    if operands.get("condition") != "isFlex" or operands.get("true_value") != scale_param:
        problems.append(
            f"DEVICE_API_INSTANCES is not the Flex maximumInstanceCount ({scale_param}): {instances!r}")
    if operands.get("false_value") != 1:
        problems.append("DEVICE_API_INSTANCES on the Dedicated plan is not its one worker")
    ceiling = settings.get("DEVICE_API_MAX_CALLS_PER_SECOND", {})
    ceiling_param = ceiling.get("function", {}).get("parameters", {}).get("value_to_convert") \
        if isinstance(ceiling, dict) else None
    main = parse(root / "main.bicep")
    _, call = module_call(main, "modules/functionapp.bicep")
    for env in ENVIRONMENTS:
        params = env_parameters(root, env)
        rate = _module_value(doc, call, main, ceiling_param, params)
        most = _module_value(doc, call, main, scale_param, params)
        if not isinstance(rate, int) or not isinstance(most, int):
            problems.append(f"{env}: ceiling {rate!r} or maximumInstanceCount {most!r} not a number")
        elif rate * DEVICE_BUDGET_MAX_WAIT_SECONDS < most:
            problems.append(
                f"{env}: DEVICE_API_MAX_CALLS_PER_SECOND {rate} over {most} instances leaves each less "
                f"than one call per {DEVICE_BUDGET_MAX_WAIT_SECONDS} s")
    return problems
