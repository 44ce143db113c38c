"""Prefect's server, work pool, deployments and worker, for people who have not learned Prefect yet.

Each command wraps the Prefect CLI or client with mmkd's defaults: the server listens on
127.0.0.1, the work pool is a process pool named `mmkd-process`, and the deployments come
from deployments/prefect.yaml. Everything they do can also be done with Prefect's own tools.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mmkd.errors import ConfigError, MmkdError

DEFAULT_POOL = "mmkd-process"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
DEPLOYMENTS_FILE = Path("deployments") / "prefect.yaml"


def default_deployments_file() -> Path:
    """Return ./deployments/prefect.yaml when the current folder has one, else the copy installed with mmkd."""
    if DEPLOYMENTS_FILE.is_file():
        return DEPLOYMENTS_FILE
    from importlib import resources

    return Path(str(resources.files("mmkd.deployments").joinpath("prefect.yaml")))


def prefect_executable() -> str:
    """Return the `prefect` command installed beside this Python, or the one on PATH."""
    beside = Path(sys.executable).with_name("prefect")
    if beside.exists():
        return str(beside)
    found = shutil.which("prefect")
    if found is None:
        raise MmkdError("The `prefect` command was not found beside this Python or on PATH; reinstall mmkd.")
    return found


def _run_prefect(arguments: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
    """Run a Prefect CLI command in the foreground and return its exit status."""
    command = [prefect_executable(), *arguments]
    try:
        return subprocess.run(command, cwd=cwd, env=env, check=False).returncode
    except KeyboardInterrupt:
        return 130


def _exec_prefect(arguments: list[str], *, env: dict[str, str] | None = None) -> int:
    """Replace this process with a long-running Prefect command, so that a signal sent to
    this process (from `kill`, a service manager or a container runtime) reaches Prefect."""
    command = [prefect_executable(), *arguments]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env if env is not None else dict(os.environ))
    raise AssertionError("os.execve returned")  # pragma: no cover - execve does not return


def server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Run a Prefect server with its SQLite database under PREFECT_HOME until interrupted.

    It listens on loopback unless `host` names another address. Usage statistics stay off, as
    everywhere in mmkd (see mmkd.offline).
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mmkd: the server will accept connections from other machines on {host}:{port}", file=sys.stderr)
    url = f"http://{host}:{port}"
    print(f"Prefect UI and API on {url} (set PREFECT_API_URL={url}/api)")
    # The UI sends its requests to PREFECT_UI_API_URL, which otherwise stays on port 4200.
    env = {**os.environ, "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL", f"{url}/api")}
    return _exec_prefect(["server", "start", "--host", host, "--port", str(port)], env=env)


def load_deployment_specs(path: Path) -> list[dict[str, Any]]:
    """Read the deployments of a prefect.yaml, checking the keys mmkd relies on.

    Raises:
        ConfigError: the file is missing, is not YAML or declares no deployments.
    """
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Deployments file {path} does not exist; pass --file with the path of prefect.yaml.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Deployments file {path} is not valid YAML: {exc}") from None
    deployments = (document or {}).get("deployments") if isinstance(document, dict) else None
    if not deployments:
        raise ConfigError(f"Deployments file {path} has no `deployments:` list.")
    for number, spec in enumerate(deployments, start=1):
        missing = [key for key in ("name", "entrypoint") if key not in spec]
        if missing:
            raise ConfigError(f"Deployment {number} in {path} is missing {', '.join(missing)}.")
    return deployments


def ensure_work_pool(name: str = DEFAULT_POOL) -> bool:
    """Create a process work pool named `name` unless it exists; return True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def deploy(path: Path | None = None, *, pool: str = DEFAULT_POOL, names: list[str] | None = None) -> int:
    """Create the work pool and register the deployments of `path` with the Prefect server.

    The worker runs each flow in the folder this command is run from, so relative
    parameters such as `config_path: config.yaml` are read from there.
    """
    path = Path(path or default_deployments_file()).resolve()
    specs = load_deployment_specs(path)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("PREFECT_API_URL is not set; start `mmkd server` and set it to the API address it prints, "
                          "such as http://127.0.0.1:4200/api.")
    if ensure_work_pool(pool):
        print(f"Created the process work pool {pool!r}")
    chosen = names or [spec["name"] for spec in specs]
    unknown = sorted(set(chosen) - {spec["name"] for spec in specs})
    if unknown:
        raise ConfigError(f"{path} has no deployment named {', '.join(unknown)}; it has {', '.join(s['name'] for s in specs)}.")
    flags = [flag for name in chosen for flag in ("--name", name)]
    return _run_prefect(["--no-prompt", "deploy", "--prefect-file", str(path), "--pool", pool, *flags])


def worker(pool: str = DEFAULT_POOL, *, name: str | None = None, limit: int | None = None) -> int:
    """Run a process worker that takes flow runs from `pool` until interrupted."""
    arguments = ["worker", "start", "--pool", pool, "--type", "process"]
    if name:
        arguments += ["--name", name]
    if limit:
        arguments += ["--limit", str(limit)]
    return _exec_prefect(arguments)


def _schedules(spec: dict[str, Any]) -> list:
    """Turn a prefect.yaml deployment's `schedules:` into Prefect schedule objects."""
    from prefect.schedules import Cron, Interval

    schedules = []
    for entry in spec.get("schedules") or []:
        active = entry.get("active", True)
        if "cron" in entry:
            schedules.append(Cron(entry["cron"], timezone=entry.get("timezone"), active=active))
        elif "interval" in entry:
            schedules.append(Interval(entry["interval"], active=active))
        else:
            raise ConfigError(f"Deployment {spec['name']!r}: a schedule needs `cron` or `interval`, got {entry}.")
    return schedules


def build_served_deployments(specs: list[dict[str, Any]]) -> list:
    """Build runnable deployments from prefect.yaml entries, for serving from this process."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    deployments = []
    for spec in specs:
        module_name, _, attribute = spec["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module_name), attribute)
        limit = spec.get("concurrency_limit")
        if isinstance(limit, dict):
            limit = ConcurrencyLimitConfig(**limit)
        deployments.append(flow.to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters"),
            schedules=_schedules(spec),
            triggers=[DeploymentEventTrigger(**trigger) for trigger in spec.get("triggers") or []],
            concurrency_limit=limit,
        ))
    return deployments


def _deployed_to_pools(names: list[str]) -> list[str]:
    """Return `flow/deployment` names among `names` that the server has bound to a work pool."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return sorted(f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()
                      if d.name in names and d.work_pool_name)


def serve(path: Path | None = None) -> None:
    """Serve every deployment of `path` from this process until interrupted; no worker needed.

    Raises:
        ConfigError: `mmkd deploy` registered the same deployments for a worker. Serving
            would take them over, and its runs would fail where the worker's pull steps
            were; both kinds cannot share names.
    """
    from prefect import serve as prefect_serve

    deployments = build_served_deployments(load_deployment_specs(path or default_deployments_file()))
    taken = _deployed_to_pools([d.name for d in deployments])
    if taken:
        raise ConfigError(
            f"{', '.join(taken)} are deployed for a worker (by `mmkd deploy`). Run `mmkd worker` instead of "
            f"`mmkd serve`, or delete them first: prefect deployment delete {taken[0]} (and so on)."
        )
    prefect_serve(*deployments)
