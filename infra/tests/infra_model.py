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
    for name in ("ServiceBusConnection", "DEVICE_API_KEY"):
        if not isinstance(settings.get(name), str) or not _KV_REF.match(settings[name]):
            problems.append(f"{name} is not a Key Vault reference: {settings.get(name)!r}")
    dedicated = dedicated_settings(root)
    if dedicated.get("FUNCTIONS_WORKER_RUNTIME") != "custom":
        problems.append("Dedicated plan: FUNCTIONS_WORKER_RUNTIME is not 'custom'")
    if dedicated.get("FUNCTIONS_EXTENSION_VERSION") != "~4":
        problems.append("Dedicated plan: FUNCTIONS_EXTENSION_VERSION is not '~4'")
    if flex_runtime(root).get("name") != "custom":
        problems.append("Flex Consumption: functionAppConfig.runtime.name is not 'custom'")
    return problems
