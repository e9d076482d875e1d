"""/dashboard: 401 without a token, and live numbers in Debian's headless Chromium.

The browser is the `chromium` package (`make tools` installs it), driven by
Playwright's Python client; Playwright downloads no browser of its own here.
"""

import base64
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from playwright.async_api import ConsoleMessage, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError

from mcp_frontend.dashboard import CHALLENGE, presented_token
from mcp_frontend.devstack import Service
from mcp_frontend.fleet_view import FleetSnapshot
from tests.conftest import Stack
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).parent / "artifacts" / "dashboard.png"
TOKEN = "ops-token-0123456789abcdef"  # an operator's: the dashboard shows every client
AGENT = "ops-agent-0123456789abcdef"  # submits the changes the dashboard shows
UNKNOWN_RUN = "00000000-0000-4000-8000-000000000000"
APPLIED_CHANGES = 3
PAGE_TIMEOUT_MS = 30_000
PATHS = ["/dashboard", "/dashboard/api/snapshot", "/dashboard/static/dashboard.js"]


@dataclass
class Frontend:
    url: str
    service: Service


@pytest.fixture(scope="module")
def frontend(worked_stack: Stack) -> Iterator[Frontend]:
    service, port = worked_stack.start_frontend(auth_tokens=f"{TOKEN}:ops:operator,{AGENT}:ops")
    yield Frontend(f"http://127.0.0.1:{port}", service)
    # Browser, Basic and bearer requests alike: the token never reaches the log.
    log = service.log_path.read_text()
    assert TOKEN not in log and AGENT not in log


def _basic(password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"anyone:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


@pytest.mark.parametrize("path", PATHS)
def test_without_the_token_it_is_401(frontend: Frontend, path: str) -> None:
    url = frontend.url + path
    refused = [
        httpx.get(url, timeout=5),
        httpx.get(url, headers={"Authorization": "Bearer not-a-real-token-x"}, timeout=5),
        httpx.get(url, headers=_basic("not-a-real-token-x"), timeout=5),
        httpx.get(url, headers={"Authorization": f"Token {TOKEN}"}, timeout=5),
    ]
    for response in refused:
        assert response.status_code == 401, (path, response.request.headers)
        assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).is_success
    assert httpx.get(url, headers=_basic(TOKEN), timeout=5).is_success


def test_the_snapshot_api_answers_a_fleet_snapshot(frontend: Frontend) -> None:
    response = httpx.get(frontend.url + "/dashboard/api/snapshot", headers=_basic(TOKEN), timeout=5)
    assert response.headers["Cache-Control"] == "no-store"
    fleet = FleetSnapshot.model_validate(response.json())
    assert fleet.workers_alive == 1
    page = httpx.get(frontend.url + "/dashboard", headers=_basic(TOKEN), timeout=5)
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Content-Type"].startswith("text/html")


def test_only_listed_assets_are_served(frontend: Frontend) -> None:
    for name in ["index.html", "..%2Fdashboard.py", "nothing.js"]:
        response = httpx.get(
            f"{frontend.url}/dashboard/static/{name}", headers=_basic(TOKEN), timeout=5
        )
        assert response.status_code == 404, name


def test_a_token_is_a_bearer_token_or_a_basic_password() -> None:
    assert presented_token(f"Bearer {TOKEN}") == TOKEN
    assert presented_token(_basic(TOKEN)["Authorization"]) == TOKEN
    assert presented_token(_basic("pass:with:colons")["Authorization"]) == "pass:with:colons"
    assert presented_token("Basic " + base64.b64encode(b"no-colon").decode()) is None
    assert presented_token("Basic not base64!") is None
    assert presented_token(_basic("")["Authorization"]) is None
    assert presented_token("") is None


async def _count(page: Page, selector: str) -> int:
    return int((await page.locator(selector).inner_text()).replace(",", ""))


async def test_the_page_shows_live_numbers_in_chromium(
    frontend: Frontend, prefect: PrefectRuns
) -> None:
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: run `make tools` (Debian's chromium)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            # Headless, there is no one to ask for a password: the challenge ends the load.
            stranger = await (await browser.new_context()).new_page()
            async with stranger.expect_response(frontend.url + "/dashboard") as challenged:
                with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                    await stranger.goto(frontend.url + "/dashboard")
            assert (await challenged.value).status == 401

            context = await browser.new_context(
                http_credentials={"username": "operator", "password": TOKEN},
                viewport={"width": 1280, "height": 900},
            )
            page = await context.new_page()
            requested: list[str] = []
            problems: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda message: _note_csp(message, problems))

            response = await page.goto(frontend.url + "/dashboard")
            assert response is not None and response.status == 200
            applied = page.locator("#applied-total")
            await expect(applied).to_have_text(re.compile(r"^\d[\d,]*$"), timeout=PAGE_TIMEOUT_MS)
            before = await _count(page, "#applied-total")
            await expect(page.locator("#workers-alive")).to_have_text("1")

            # Two waves, the second once the page has shown the first: the charts
            # get a shape, and the rates a step to measure.
            for wave in (1, 2):
                await _submit_changes(frontend, prefect, failing=wave == 1)
                await expect(applied).to_have_text(
                    f"{before + wave * APPLIED_CHANGES:,}", timeout=PAGE_TIMEOUT_MS
                )
            # Rendered in the same pass as the new total, from samples seconds apart.
            await expect(page.locator("#applied-rate")).not_to_have_text(
                re.compile(r"^(\u2013|0\.0)$")
            )
            await expect(page.locator("#failures")).to_contain_text(
                "run_not_found", timeout=PAGE_TIMEOUT_MS
            )
            await expect(page.locator("#rate-chart polyline")).to_have_count(1)
            # The worker reports its Prefect latency with its next heartbeat.
            await expect(page.locator("#prefect-ms")).to_have_text(
                re.compile(r"^\d+ ms$"), timeout=PAGE_TIMEOUT_MS
            )

            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=SCREENSHOT, full_page=True)
        finally:
            await browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
    assert problems == []
    # Nothing from outside: page, script, stylesheet and snapshots all come from the frontend.
    assert requested and all(url.startswith(frontend.url + "/") for url in requested), requested


def _note_csp(message: ConsoleMessage, problems: list[str]) -> None:
    """A blocked load shows up as a console error naming the Content Security Policy."""
    if "Content Security Policy" in message.text:
        problems.append(message.text)


@asynccontextmanager
async def as_client(url: str, token: str) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


async def _submit_changes(frontend: Frontend, prefect: PrefectRuns, *, failing: bool) -> None:
    """Changes to real task runs, all applied; with `failing`, one to a run that does not
    exist, which the worker fails with run_not_found."""
    flow_run = await prefect.flow_run("RUNNING")
    changes = [
        {"run_type": "task", "run_id": await prefect.task_run(flow_run), "state": "RUNNING"}
        for _ in range(APPLIED_CHANGES)
    ]
    if failing:
        changes.append({"run_type": "task", "run_id": UNKNOWN_RUN, "state": "RUNNING"})
    async with as_client(frontend.url + "/mcp", AGENT) as client:
        tickets = (await ok(client, "submit_state_changes", changes=changes))["jobs"]
        outcomes = [(await wait_terminal(client, t["job_id"]))["status"] for t in tickets]
    assert outcomes == ["applied"] * APPLIED_CHANGES + ["failed"] * failing
