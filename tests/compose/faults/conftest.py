"""Fixtures of the fault suite: the fault topology up and healthy, and the results file.

The engine, the images and the token come from tests/compose/conftest.py.
"""

import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.compose.conftest import ServedPrefect
from tests.compose.dockerd import Engine
from tests.compose.faults.topology import FAULTS_FILES, FRONTENDS, Topology
from tests.compose.images import Images
from tests.compose.ports import PREFECT_API, PUBLISHED
from tests.compose.stack import ROOT, ComposeStack
from tests.compose.steps import report, step
from tests.prefect_runs import PrefectRuns

PROJECT = "pmq-faults-test"
ARTIFACTS = ROOT / "tests" / "artifacts" / "faults"
RESULTS = ARTIFACTS / "results.json"


@pytest.fixture(scope="session")
def results() -> Iterator[dict[str, Any]]:
    """Each scenario's figures, written to tests/artifacts/faults/results.json at the end."""
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    started = time.monotonic()
    collected: dict[str, Any] = {"scenarios": {}}
    try:
        yield collected
    finally:
        collected["suite_duration_s"] = round(time.monotonic() - started, 1)
        RESULTS.write_text(json.dumps(collected, indent=2) + "\n")
        report(f"results in {RESULTS.relative_to(ROOT)}:\n{json.dumps(collected, indent=2)}")


def fault_stack(
    engine: Engine, images: Images, tokens_file: Path, files: tuple[Path, ...], **env: str
) -> ComposeStack:
    """A compose project of the fault topology; a leftover of a killed run is taken down."""
    stack = ComposeStack(
        engine,
        PROJECT,
        {
            "PMQ_TOKENS_FILE": str(tokens_file),
            **PUBLISHED.env(FRONTENDS),
            **images.compose_env(),
            **env,
        },
        ARTIFACTS,
        files,
    )
    stack.compose("down", "-v", "--remove-orphans")
    return stack


@pytest.fixture(scope="module")
def topology(
    engine: Engine, images: Images, tokens_file: Path, results: dict[str, Any]
) -> Iterator[Topology]:
    """compose.yaml + override.yaml + faults.yaml: 3 workers, 2 frontends, prefect-proxy."""
    stack = fault_stack(engine, images, tokens_file, FAULTS_FILES)
    try:
        current = Topology(stack)
        with step("fault topology up, every service healthy"):
            current.ensure()
        yield current
    finally:
        with step("down -v"):
            stack.down(volumes=True)


@pytest.fixture
async def prefect_api() -> AsyncIterator[PrefectRuns]:
    """Prefect as the stack serves it, on its published port (not through prefect-proxy)."""
    runs = ServedPrefect(PREFECT_API)
    try:
        yield runs
    finally:
        await runs.aclose()
