"""Create and read Prefect runs over the REST API, for tests."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

# Prefect's own client retries these (SQLite answers 503 "database is locked"
# when its background services hold the write lock); so does the tests' client.
RETRY_STATUSES = {429, 503}
ATTEMPTS = 6


class PrefectRuns:
    """A thin REST helper: the tests' own view of Prefect, independent of the worker."""

    def __init__(self, api_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=api_url, timeout=30)
        self._flow_id: str | None = None
        self._deployment_id: str | None = None

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(ATTEMPTS):
            response = await self.http.post(path, json=body)
            if response.status_code not in RETRY_STATUSES or attempt == ATTEMPTS - 1:
                break
            await asyncio.sleep(float(response.headers.get("retry-after", 0.2 * 2**attempt)))
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def flow_id(self) -> str:
        if self._flow_id is None:
            self._flow_id = str((await self._post("/flows/", {"name": "pmq-tests"}))["id"])
        return self._flow_id

    async def flow_run(self, state: str = "PENDING", *, scheduled_in_s: float | None = None) -> str:
        state_body: dict[str, Any] = {"type": state}
        if scheduled_in_s is not None:
            when = datetime.now(UTC) + timedelta(seconds=scheduled_in_s)
            state_body["state_details"] = {"scheduled_time": when.isoformat()}
        run = await self._post(
            "/flow_runs/",
            {
                "flow_id": await self.flow_id(),
                "name": f"r-{uuid.uuid4().hex[:8]}",
                "state": state_body,
            },
        )
        return str(run["id"])

    async def deployment_flow_run(self, state: str = "RUNNING") -> str:
        """A flow run of a deployment: Prefect reschedules and suspends only those."""
        if self._deployment_id is None:
            deployment = await self._post(
                "/deployments/", {"name": "pmq-tests", "flow_id": await self.flow_id()}
            )
            self._deployment_id = str(deployment["id"])
        run = await self._post(
            f"/deployments/{self._deployment_id}/create_flow_run",
            {"name": f"d-{uuid.uuid4().hex[:8]}", "state": {"type": "PENDING"}},
        )
        if state != "PENDING":
            await self.set_state("flow", str(run["id"]), state)
        return str(run["id"])

    async def task_run(self, flow_run_id: str | None = None, state: str = "PENDING") -> str:
        run = await self._post(
            "/task_runs/",
            {
                "flow_run_id": flow_run_id,
                "task_key": "pmq-test-task",
                "dynamic_key": uuid.uuid4().hex,
                "name": "t",
                "state": {"type": state},
            },
        )
        return str(run["id"])

    async def set_state(self, run_type: str, run_id: str, state: str, force: bool = True) -> None:
        await self._post(
            f"/{run_type}_runs/{run_id}/set_state", {"state": {"type": state}, "force": force}
        )

    async def state(self, run_type: str, run_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/{run_type}_runs/{run_id}")
        response.raise_for_status()
        state: dict[str, Any] = response.json()["state"]
        return state

    async def history(self, run_type: str, run_id: str) -> list[dict[str, Any]]:
        response = await self.http.get(
            f"/{run_type}_run_states/", params={f"{run_type}_run_id": run_id}
        )
        response.raise_for_status()
        states: list[dict[str, Any]] = response.json()
        return sorted(states, key=lambda s: s["timestamp"])
