"""Fixtures of the compose test: a private engine, the images, the stack up and healthy.

The test runs only when asked, as `make test-compose` does (PMQ_COMPOSE_TEST=1):
it needs root to start a Docker engine and takes minutes, so plain `make test`
does not even collect it. The fault suite in faults/ (`make test-faults`,
PMQ_FAULTS_TEST=1) uses the same fixtures and is collected only when asked too.
"""

import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.compose.dockerd import DEFAULT_CACHE, Engine, private_engine, unavailable_reason
from tests.compose.images import Images, ensure_all
from tests.compose.ports import PREFECT_API, PUBLISHED
from tests.compose.stack import ROOT, ComposeStack
from tests.compose.steps import report, step
from tests.prefect_runs import PrefectRuns

collect_ignore_glob = [] if os.environ.get("PMQ_COMPOSE_TEST") == "1" else ["test_*.py"]
collect_ignore = [] if os.environ.get("PMQ_FAULTS_TEST") == "1" else ["faults"]

PROJECT = "pmq-compose-test"
# Each `down` leaves the logs of what it removed here, and the engine its own log.
ARTIFACTS = ROOT / "tests" / "artifacts" / "compose"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """A dockerd of our own; skips only where none can start (not root, not installed)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no Docker engine can start here: {reason}")
    cache = Path(os.environ.get("PMQ_COMPOSE_CACHE", DEFAULT_CACHE))
    with ExitStack() as running:
        with step(f"start a private dockerd (images in {cache})"):
            started = running.enter_context(private_engine(cache))
        try:
            yield started
        finally:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(started.log_path, ARTIFACTS / "dockerd.log")


@pytest.fixture(scope="module")
def images(engine: Engine) -> Images:
    with step("images: build what is not cached"):
        return ensure_all(engine, log=report)


@pytest.fixture(scope="module")
def token() -> str:
    """A fresh bearer token per run, so that finding it in a log means it leaked."""
    return f"compose-{secrets.token_hex(16)}"


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory, token: str) -> Path:
    """The compose secret as an operator keeps it: `<token>:alice`, readable by its owner only."""
    path = tmp_path_factory.mktemp("secrets") / "pmq_tokens"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(f"{token}:alice\n")
    assert path.stat().st_mode & 0o777 == 0o600
    return path


@pytest.fixture(scope="module")
def stack(engine: Engine, images: Images, tokens_file: Path) -> Iterator[ComposeStack]:
    """compose.yaml up (`up -d`) and every service healthy; `down -v` afterwards."""
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    current = ComposeStack(
        engine,
        PROJECT,
        {"PMQ_TOKENS_FILE": str(tokens_file), **PUBLISHED.env(), **images.compose_env()},
        ARTIFACTS,
    )
    # A run that died before its own `down` left containers the engine would restart.
    current.compose("down", "-v", "--remove-orphans")
    try:
        with step("up -d"):
            current.up()
        with step("every service healthy"):
            current.wait_healthy(timeout_s=240)
        yield current
    finally:
        with step("down -v"):
            current.down(volumes=True)


class ServedPrefect(PrefectRuns):
    """The containerized Prefect, through the port compose.yaml publishes.

    That server runs all of Prefect's services, the late-runs one included: a
    flow run that stays SCHEDULED for 15 s past its time (as one does behind a
    killed worker's settle wait) gets a "Late" state from Prefect itself. Those
    are not changes anyone submitted, so the history leaves them out.
    """

    async def history(self, run_type: str, run_id: str) -> list[dict[str, Any]]:
        return [
            state
            for state in await super().history(run_type, run_id)
            if not (state["name"] == "Late" and state["message"] is None)
        ]


@pytest.fixture
async def prefect_api(stack: ComposeStack) -> AsyncIterator[PrefectRuns]:
    """Prefect as the stack serves it, on the port it is published on."""
    runs = ServedPrefect(PREFECT_API)
    try:
        yield runs
    finally:
        await runs.aclose()
