"""The Kubernetes manifests (deploy/) and the deployment guide (docs/deploy.md) stay true to the code:
every flag is one of the CLI's, every serve.yaml key a setting that validates, every
``ADAPTERDECK_*`` variable one the code reads, and each vLLM replica is started exactly as
``adapterdeck serve`` starts one itself (serve/engines/process.py)."""

from __future__ import annotations

import ast
import inspect
import re
import shlex
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main
import yaml

from adapterdeck.core.cli import app
from adapterdeck.core.plugins import LOAD_ENV
from adapterdeck.registry.settings import RegistrySettings
from adapterdeck.serve.engines.process import VllmSupervisor
from adapterdeck.serve.engines.vllm import VLLM_KEY_ENV
from adapterdeck.serve.settings import ServeSettings, load_serve_settings
from tests.test_docs import config_groups, config_keys, env_variables

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GUIDE = ROOT / "docs" / "deploy.md"
VLLM_SERVER = "vllm.entrypoints.openai.api_server"
SERVE_KEYS = set(config_keys(ServeSettings))
SERVE_GROUPS = config_groups(ServeSettings)
ENV_VARIABLES = {*env_variables(RegistrySettings), VLLM_KEY_ENV, LOAD_ENV}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def _resources() -> list[tuple[str, dict[str, Any]]]:
    """``(file, resource)`` for every Kubernetes object in deploy/*.yaml."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and "kind" in doc and doc["kind"] != "Kustomization":
                found.append((path.name, doc))
    return found


RESOURCES = _resources()


def _named(kind: str, name: str) -> dict[str, Any]:
    matches = [r for _, r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"deploy/ has {len(matches)} {kind} named {name}"
    return matches[0]


def _containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(workload name, workload, container)`` for every container of adapterdeck's image."""
    found = []
    for _, resource in RESOURCES:
        if resource["kind"] in WORKLOADS:
            spec = resource["spec"]["template"]["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                if container["image"].split(":")[0].endswith("adapterdeck"):
                    found.append((resource["metadata"]["name"], resource, container))
    return found


CONTAINERS = _containers()


def _argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    """Every variable a container gets: its ``env`` entries (a value, or a secretKeyRef as
    ``("secret", name, key)``) and the keys of the ConfigMaps and Secrets of its ``envFrom``."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if ref in source:
                name = source[ref]["name"]
                data = _named(kind, name).get("data" if kind == "ConfigMap" else "stringData", {})
                env.update({k: ("secret", name, k) if kind == "Secret" else str(v) for k, v in data.items()})
    for entry in container.get("env", []):
        secret = entry.get("valueFrom", {}).get("secretKeyRef")
        env[entry["name"]] = ("secret", secret["name"], secret["key"]) if secret else str(entry["value"])
    return env


def _serve_yaml() -> str:
    return _named("ConfigMap", "adapterdeck-serve")["data"]["serve.yaml"]


def _serve_settings(tmp_path: Path, **overrides: Any) -> ServeSettings:
    path = tmp_path / "serve.yaml"
    path.write_text(_serve_yaml(), encoding="utf-8")
    return load_serve_settings(path, overrides)


def _vllm() -> tuple[dict[str, Any], dict[str, Any]]:
    """The vLLM StatefulSet and its container."""
    found = [(w, c) for _, w, c in CONTAINERS if VLLM_SERVER in _argv(c)]
    assert len(found) == 1, "deploy/ must run vLLM in exactly one workload"
    return found[0]


# -- the CLI --------------------------------------------------------------------------------------

CLI = typer.main.get_command(app)


def _command_of(argv: list[str]) -> tuple[list[str], set[str]]:
    """The command words of an ``adapterdeck ...`` line and every option its command and the groups
    above it take (``registry --db``)."""
    assert argv[0] == "adapterdeck", argv
    command: click.Command = CLI
    words, options = ["adapterdeck"], {o for p in CLI.params for o in p.opts}
    for word in argv[1:]:
        subcommands = getattr(command, "commands", None)
        if subcommands is None or word.startswith("-"):
            break
        assert word in subcommands, f"`{' '.join(words)}` has no command {word!r}"
        command = subcommands[word]
        words.append(word)
        options |= {o for p in command.params for o in p.opts + p.secondary_opts}
    assert getattr(command, "commands", None) is None, f"`{' '.join(words)}` is a group, not a command"
    return words, options


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


ADAPTERDECK_FLAGS = [
    (name, flag) for name, _, c in CONTAINERS if _argv(c)[:1] == ["adapterdeck"] for flag in _flags(_argv(c))
]


def test_the_manifests_are_found() -> None:
    kinds = {(r["kind"], r["metadata"]["name"]) for _, r in RESOURCES}
    assert {
        ("Deployment", "adapterdeck-gateway"),
        ("Service", "adapterdeck-gateway"),
        ("StatefulSet", "adapterdeck-vllm"),
        ("Service", "adapterdeck-vllm"),
        ("Deployment", "adapterdeck-worker"),
        ("ConfigMap", "adapterdeck-serve"),
        ("Secret", "adapterdeck-secrets"),
    } <= kinds
    commands = {" ".join(_command_of(_argv(c))[0]) for _, _, c in CONTAINERS if _argv(c)[0] == "adapterdeck"}
    assert commands == {"adapterdeck serve", "adapterdeck worker"}
    assert len(ADAPTERDECK_FLAGS) >= 2


@pytest.mark.parametrize(("workload", "flag"), ADAPTERDECK_FLAGS, ids=lambda v: str(v))
def test_each_flag_in_the_manifests_exists(workload: str, flag: str) -> None:
    container = next(c for name, _, c in CONTAINERS if name == workload)
    words, options = _command_of(_argv(container))
    assert flag in options, f"deploy/: {workload} runs `{' '.join(words)} {flag}`, which has no such flag"


def test_each_container_file_argument_is_mounted() -> None:
    for name, workload, container in CONTAINERS:
        argv = _argv(container)
        if "--config" not in argv:
            continue
        path = Path(argv[argv.index("--config") + 1])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
        volume = next(
            v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
        )
        assert volume["configMap"]["name"] == "adapterdeck-serve", f"{name}: --config is not serve.yaml"
        assert path.name == "serve.yaml"


# -- serve.yaml -----------------------------------------------------------------------------------


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """The dotted key of every value a YAML mapping sets, stopping at a setting (``tenant_limits``)."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted not in SERVE_KEYS and dotted in SERVE_GROUPS and isinstance(value, dict):
            yield from _leaf_keys(value, dotted + ".")
        else:
            yield dotted


CONFIG_KEYS = sorted(_leaf_keys(yaml.safe_load(_serve_yaml())))


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_each_key_of_the_configmap_is_a_setting(key: str) -> None:
    assert key in SERVE_KEYS, f"deploy/config.yaml's serve.yaml sets {key}, which is no serve setting"


def test_the_configmap_validates_and_deploys_the_fleet(tmp_path: Path) -> None:
    settings = _serve_settings(tmp_path)
    assert settings.vllm.endpoints(), "the gateways must name the vLLM replicas (vllm.urls)"
    assert settings.vllm.local_replicas() == 0, "a gateway pod must start no vLLM of its own"
    assert settings.finetune.workers == 0, "a gateway pod must start no fine-tuning worker"
    assert settings.limits_storage.url.startswith("redis://"), "gateways must share limits in Redis"
    assert settings.host == "0.0.0.0"
    gateway = _named("Deployment", "adapterdeck-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert settings.port in [p["containerPort"] for p in gateway["ports"]]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health", "port": settings.port}


def test_vllm_urls_name_every_replica_of_the_statefulset(tmp_path: Path) -> None:
    settings = _serve_settings(tmp_path)
    workload, container = _vllm()
    assert workload["kind"] == "StatefulSet"
    service = _named("Service", workload["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "the vLLM Service must be headless: one name per pod"
    assert service["spec"].get("publishNotReadyAddresses") is True
    argv = _argv(container)
    port = int(argv[argv.index("--port") + 1])
    assert port in [p["port"] for p in service["spec"]["ports"]]
    name, service_name = workload["metadata"]["name"], service["metadata"]["name"]
    pods = [f"http://{name}-{i}.{service_name}:{port}" for i in range(workload["spec"]["replicas"])]
    assert settings.vllm.endpoints() == pods


# -- the vLLM replicas: started as `adapterdeck serve` starts one ---------------------------------


def expected_vllm_command(settings: ServeSettings, port: int) -> list[str]:
    """The supervisor's command line for ``settings``, as a pod runs it: ``python`` for the
    supervisor's interpreter, the pod's address for loopback (the key guards it), no ``nice``."""
    settings = settings.model_copy(update={"vllm": settings.vllm.model_copy(update={"nice": 0})})
    command = VllmSupervisor(settings, {}, Path("unused.log"), port=port).command()
    command[0] = "python"
    host = command.index("--host") + 1
    assert command[host] == "127.0.0.1"
    command[host] = "0.0.0.0"
    return command


def test_the_vllm_command_is_the_supervisor_s(tmp_path: Path) -> None:
    _, container = _vllm()
    argv = _argv(container)
    port = int(argv[argv.index("--port") + 1])
    assert argv == expected_vllm_command(_serve_settings(tmp_path), port)
    assert "adapterdeck.serve.engines.guard.EngineGuard" in argv


def _spawn_env_keys() -> list[str]:
    """The variables ``VllmSupervisor`` sets in vLLM's environment (the literal keys of ``_spawn``'s
    env), but the CPU build's KV cache size."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(VllmSupervisor._spawn)))
    keys = [
        k.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for k in node.keys
        if isinstance(k, ast.Constant) and isinstance(k.value, str)
    ]
    return [k for k in keys if k != "VLLM_CPU_KVCACHE_SPACE"]


VLLM_ENV = _spawn_env_keys() + sorted(RegistrySettings(database_url="x", storage_url="y").child_env())


def test_the_supervisor_s_environment_is_found() -> None:
    assert {"VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "ADAPTERDECK_DATABASE_URL"} <= set(VLLM_ENV)


@pytest.mark.parametrize("variable", VLLM_ENV)
def test_each_vllm_variable_is_set(variable: str) -> None:
    _, container = _vllm()
    env = _env(container)
    assert variable in env, f"deploy/vllm.yaml does not set {variable}, which the supervisor gives vLLM"
    if variable == "VLLM_ALLOW_RUNTIME_LORA_UPDATING":
        assert env[variable] == "1"


def test_vllm_and_the_gateways_share_one_key() -> None:
    _, container = _vllm()
    gateway = _named("Deployment", "adapterdeck-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert _env(container)["VLLM_API_KEY"] == _env(gateway)[VLLM_KEY_ENV]
    assert _env(container)["VLLM_API_KEY"][0] == "secret"


@pytest.mark.parametrize("workload", sorted({name for name, _, _ in CONTAINERS}))
def test_each_workload_has_the_registry(workload: str) -> None:
    container = next(c for name, _, c in CONTAINERS if name == workload)
    env = _env(container)
    for variable in ("ADAPTERDECK_DATABASE_URL", "ADAPTERDECK_STORAGE_URL"):
        assert variable in env, f"{workload} does not get {variable}: it would open a registry of its own"
    assert env["ADAPTERDECK_DATABASE_URL"][0] == "secret"


# -- the ADAPTERDECK_* environment ----------------------------------------------------------------


def _manifest_variables() -> list[str]:
    names = {v for _, _, c in CONTAINERS for v in _env(c)}
    for _, resource in RESOURCES:
        if resource["kind"] in ("ConfigMap", "Secret"):
            names |= set(resource.get("data", {})) | set(resource.get("stringData", {}))
    return sorted(n for n in names if n.startswith("ADAPTERDECK_"))


@pytest.mark.parametrize("variable", _manifest_variables())
def test_each_adapterdeck_variable_in_the_manifests_exists(variable: str) -> None:
    assert variable in ENV_VARIABLES, f"deploy/ sets {variable}, which adapterdeck does not read"


# -- docs/deploy.md -------------------------------------------------------------------------------

GUIDE_TEXT = GUIDE.read_text(encoding="utf-8")


def _shell_lines(text: str) -> list[str]:
    """Every command of the guide's ``sh`` blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"^```(?:sh|bash)\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.split(" #", 1)[0].strip() for line in joined.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith("#")]


def _guide_commands() -> list[str]:
    spans = re.findall(r"`(adapterdeck [^`]+)`", GUIDE_TEXT)
    return sorted({*(line for line in _shell_lines(GUIDE_TEXT) if line.startswith("adapterdeck ")), *spans})


GUIDE_COMMANDS = _guide_commands()


def test_the_guide_s_commands_are_found() -> None:
    words = {" ".join(_command_of(shlex.split(c))[0]) for c in GUIDE_COMMANDS}
    assert {"adapterdeck serve", "adapterdeck worker"} <= words


@pytest.mark.parametrize("line", GUIDE_COMMANDS)
def test_each_command_of_the_guide_exists(line: str) -> None:
    argv = shlex.split(line.replace("...", ""))
    words, options = _command_of(argv)
    unknown = [f for f in _flags(argv) if f not in options]
    assert not unknown, f"docs/deploy.md: `{' '.join(words)}` has no {unknown}"


def test_the_guide_s_vllm_command_is_the_supervisor_s(tmp_path: Path) -> None:
    found = [shlex.split(line) for line in _shell_lines(GUIDE_TEXT) if VLLM_SERVER in line]
    assert found, "docs/deploy.md must write out the vLLM command line"
    _, container = _vllm()
    for argv in found:
        assert argv == _argv(container), "docs/deploy.md's vLLM command is not deploy/vllm.yaml's"
    port = int(found[0][found[0].index("--port") + 1])
    assert found[0] == expected_vllm_command(_serve_settings(tmp_path), port)


def _guide_settings() -> list[str]:
    """Every ``dotted.name`` the guide shows that starts with a serve setting, but entry point
    groups (``vllm.general_plugins``)."""
    spans = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", GUIDE_TEXT))
    groups = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"])
    top = set(ServeSettings.model_fields)
    return sorted(s for s in spans - groups if s.split(".")[0] in top)


@pytest.mark.parametrize("key", _guide_settings())
def test_each_setting_the_guide_names_exists(key: str) -> None:
    assert key in SERVE_KEYS | SERVE_GROUPS, f"docs/deploy.md names `{key}`, which is no serve setting"


@pytest.mark.parametrize("variable", sorted(set(re.findall(r"\bADAPTERDECK_[A-Z_]+\b", GUIDE_TEXT))))
def test_each_variable_the_guide_names_exists(variable: str) -> None:
    assert variable in ENV_VARIABLES, f"docs/deploy.md names {variable}, which adapterdeck does not read"


def test_the_guide_s_serve_yaml_validates(tmp_path: Path) -> None:
    blocks = re.findall(r"^```yaml\n(# serve\.yaml.*?)^```", GUIDE_TEXT, flags=re.M | re.S)
    assert blocks, "docs/deploy.md shows no serve.yaml (a yaml block starting `# serve.yaml`)"
    for i, block in enumerate(blocks):
        for key in _leaf_keys(yaml.safe_load(block) or {}):
            assert key in SERVE_KEYS, f"docs/deploy.md's serve.yaml sets {key}, which is no setting"
        path = tmp_path / f"serve{i}.yaml"
        path.write_text(block, encoding="utf-8")
        load_serve_settings(path, {})


def test_the_guide_is_linked() -> None:
    assert "docs/deploy.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "deploy.md" in (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")


def _guide_flags() -> list[str]:
    """Every ``--flag`` the guide's prose names on its own (not in a whole command line)."""
    return sorted({span.split()[0] for span in re.findall(r"`(--[a-z-]+[^`]*)`", GUIDE_TEXT)})


# vLLM's own flags the guide names beside the ones the supervisor passes.
VLLM_ONLY_FLAGS = {"--tensor-parallel-size"}


@pytest.mark.parametrize("flag", _guide_flags())
def test_each_flag_the_guide_names_exists(flag: str, tmp_path: Path) -> None:
    _, serve = _command_of(["adapterdeck", "serve"])
    _, worker = _command_of(["adapterdeck", "worker"])
    vllm = set(_flags(_argv(_vllm()[1]))) | VLLM_ONLY_FLAGS
    assert flag in serve | worker | vllm, f"docs/deploy.md names {flag}: neither adapterdeck's nor vLLM's"
