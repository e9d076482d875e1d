"""compose.yaml without a Docker engine: a real Compose parser, and its services as processes.

`make test-compose` (tests/compose/) runs the stack in a real engine; what can
be shown without one runs here, in `make test`: the file through
`docker-compose config`, every setting reachable from `.env`, the project's
services started with exactly the file's command and environment (service
hostnames mapped to this machine), and the image's root-then-drop start with a
private tokens file.
"""

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import prefect
import pytest
import typer
import yaml  # type: ignore[import-untyped]

from mcp_frontend.cli import app as pmq_app
from mcp_frontend.devstack import BIN_DIR, RedisServer, free_port, pmq_service, wait_until
from tests.conftest import Services, Stack
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from tests.test_auth import ALICE, INITIALIZE, as_client
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
OURS = ("worker", "mcp-frontend")


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The file as the parser normalises it (variables resolved with their defaults)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (make test installs it where it can)")
    folder = tmp_path_factory.mktemp("secrets")
    tokens = folder / "pmq_tokens"
    tokens.write_text(f"{ALICE}:alice\n")
    empty = folder / ".env"
    empty.write_text("")
    return _config(empty, tokens)


def _config(env_file: Path, tokens: Path) -> dict[str, Any]:
    done = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "--env-file", str(env_file), "config"],
        env={"PATH": "/usr/bin:/bin", "PMQ_TOKENS_FILE": str(tokens)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


# Set by the service's command, its secret, the image, or used only by benchmarks.
NOT_FROM_ENV_FILE = {
    "PMQ_HTTP_HOST",
    "PMQ_HTTP_PORT",
    "PMQ_AUTH_TOKENS_FILE",
    "PMQ_WORKER_METRICS_PORT",
    "PMQ_WORKER_METRICS_HOST",
    "PMQ_RUN_AS",
    "PMQ_BENCH_NOOP_TOOL",
}


def test_every_setting_can_be_set_from_the_env_file(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """Each value in `.env` reaches the services that read it; unset ones stay empty."""
    names = setting_names() - NOT_FROM_ENV_FILE
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}=from-env-{name}\n" for name in sorted(names)))
    tokens = tmp_path / "pmq_tokens"
    tokens.write_text(f"{ALICE}:alice\n")
    services = _config(env_file, tokens)["services"]
    for name in sorted(names):
        given = {s: services[s]["environment"].get(name) for s in OURS}
        assert f"from-env-{name}" in given.values(), f"{name} cannot be set from .env"
    # With nothing set, a setting stays empty (= its default), never a literal "${...}".
    for service in OURS:
        for name, value in compose["services"][service]["environment"].items():
            assert "$" not in str(value or ""), (service, name, value)


def setting_names() -> set[str]:
    return {
        str(field.validation_alias or f"PMQ_{name.upper()}")
        for name, field in Settings.model_fields.items()
    }


def test_the_stack_is_what_an_operator_expects(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "prefect-server", *OURS}
    assert services["prefect-server"]["image"].startswith(
        f"prefecthq/prefect:{prefect.__version__}-"
    )
    assert (
        "postgresql+asyncpg://"
        in services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    )
    assert "--appendonly" in services["redis"]["command"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency in service.get("depends_on", {}).values():
            assert dependency["condition"] == "service_healthy"
    assert services["mcp-frontend"]["ports"] == ["127.0.0.1:8000:8000/tcp"]
    assert "ports" not in services["worker"]  # scalable: nothing to collide
    assert services["mcp-frontend"]["secrets"][0]["source"] == "pmq_tokens"


@pytest.mark.parametrize("name", OURS)
def test_commands_are_real_entry_points_and_variables_real_settings(
    compose: dict[str, Any], name: str
) -> None:
    service = compose["services"][name]
    cli = typer.main.get_group(pmq_app)
    assert service["command"][0] in cli.commands
    check = service["healthcheck"]["test"]
    assert check[1] == "pmq" and check[2] in cli.commands
    if check[2] == "health":
        assert check[3] in cli.commands["health"].commands  # type: ignore[attr-defined]
    unknown = {k for k in service["environment"] if k.startswith("PMQ_")} - setting_names()
    assert not unknown, f"{name} sets variables that are no setting: {unknown}"


async def test_services_run_with_their_compose_command_and_serve_a_call(
    compose: dict[str, Any],
    services: Services,
    stack: Stack,
    prefect: PrefectRuns,
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "pmq_tokens"
    tokens.write_text(f"{ALICE}:alice\n")
    # A Redis with compose.yaml's options: the durability the workers and frontend
    # are configured for depends on them.
    redis_server = RedisServer(free_port(), tmp_path / "redis")
    redis_server.argv += compose["services"]["redis"]["command"][1:]
    redis_server.start_and_wait()
    prefect_host = services.prefect.api_url.removeprefix("http://").removesuffix("/api")
    hosts = {
        "redis://redis:6379/0": redis_server.url(),
        "http://prefect-server:4200": f"http://{prefect_host}",
        "/run/secrets/pmq_tokens": str(tokens),
    }
    port = free_port()
    started = {}
    for name in OURS:
        service = compose["services"][name]
        env = {k: _mapped(v, hosts) for k, v in service["environment"].items() if v is not None}
        env |= {
            "PATH": str(BIN_DIR) + ":/usr/bin:/bin",
            "PMQ_HEARTBEAT_S": "1",
            "PREFECT_HOME": str(tmp_path / name),
        }
        if name == "worker":
            env["PMQ_WORKER_METRICS_PORT"] = str(free_port())
        argv = [str(port) if a == "8000" else a for a in service["command"]]
        process = pmq_service(name, argv, env=env, log_path=tmp_path / f"{name}.log")
        process.start()
        stack.workers.append(process)  # stopped with the stack
        started[name] = (process, env)
    stack.workers.append(redis_server)  # stopped with the stack, after our services

    def healthy(name: str) -> bool:
        """The service's own healthcheck command, run the way Docker would."""
        _, env = started[name]
        test = compose["services"][name]["healthcheck"]["test"][1:]
        check = subprocess.run(
            [str(BIN_DIR / test[0]), *[_mapped(a, {"8000": str(port)}) for a in test[1:]]],
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        return check.returncode == 0

    wait_until(lambda: healthy("worker"), 60, "worker healthcheck")
    wait_until(lambda: healthy("mcp-frontend"), 60, "frontend healthcheck")
    flow_run = await prefect.flow_run()
    async with as_client(f"http://127.0.0.1:{port}/mcp", ALICE) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
        assert (await wait_terminal(client, ticket["job_id"]))["status"] == "applied"


def _mapped(value: Any, hosts: dict[str, str]) -> str:
    text = str(value)
    for name, here in hosts.items():
        text = text.replace(name, here)
    return text


@pytest.mark.skipif(os.geteuid() != 0, reason="starting as root is what the image does")
def test_the_image_start_reads_a_private_tokens_file_then_leaves_root(
    stack: Stack, tmp_path: Path
) -> None:
    """As in the image: started as root with PMQ_RUN_AS, a mode-600 tokens file owned
    by someone else (compose mounts the host's file as it is) is read, and the process
    serves as the unprivileged user."""
    tokens = tmp_path / "pmq_tokens"
    tokens.write_text(f"{ALICE}:alice\n")
    tokens.chmod(0o600)
    os.chown(tokens, 4321, 4321)  # an operator's uid, not the service's
    tmp_path.chmod(0o755)
    frontend, port = stack.start_frontend(
        "--host", "0.0.0.0", auth_tokens_file=str(tokens), run_as="65534:65534"
    )
    assert frontend.proc is not None
    status = Path(f"/proc/{frontend.proc.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == ["65534"] * 4
    url = f"http://127.0.0.1:{port}/mcp"
    headers = {"Accept": "application/json, text/event-stream"}
    assert httpx.post(url, json=INITIALIZE, headers=headers, timeout=5).status_code == 401
    headers["Authorization"] = f"Bearer {ALICE}"
    assert httpx.post(url, json=INITIALIZE, headers=headers, timeout=5).status_code == 200
