"""Prefect calls for one job, and the classification of Prefect's answer.

The table in DESIGN.md ("Outcome classification") is implemented by
`classify_answer` and `classify_error`; nothing else decides a job's fate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
from prefect.client.schemas.actions import StateCreate
from prefect.client.schemas.objects import StateDetails

from worker.concurrency import AdaptiveLimit
from worker.contract import (
    ErrorCode,
    JobError,
    JobRecord,
    Orchestration,
    RunType,
    Status,
    utcnow,
)
from worker.metrics import PREFECT_CALL_SECONDS
from worker.policy import parse_retry_after
from worker.prefect_http import PrefectHttp
from worker.store import RateLimiter

log = logging.getLogger(__name__)

_TRANSIENT_HTTP = frozenset({408, 429})
# Answers after which the change may still have been written (by the server behind a
# gateway, or before an internal error): the next try must look at the history first.
_AMBIGUOUS_HTTP = frozenset({500, 502, 504})
# Transport errors raised before the request was sent: nothing can have been written.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_INVALID_HTTP = frozenset({400, 409, 422})
_AUTH_HTTP = frozenset({401, 403})


@dataclass(frozen=True)
class Outcome:
    """What one attempt decided. `waiting` outcomes carry the delay before the next try."""

    status: Status
    orchestration: Orchestration | None = None
    error: JobError | None = None
    delay_s: float | None = None
    # True for errors that use up the attempt budget; False for Prefect's WAIT.
    transient: bool = False
    # Whether this try reached Prefect at all (what `attempts` counts); the shared
    # rate limit can send a job back before it does.
    called: bool = True
    # The change may have been written although no answer said so.
    ambiguous: bool = False
    # This try read the run's history, settling any earlier try's uncertainty.
    history_checked: bool = False
    # This try sent the change again after an earlier try that may have reached Prefect.
    resent: bool = False


class CallTimedOut(httpx.TimeoutException):
    """A Prefect call took longer than its hard limit; it may have been sent."""


class RateLimited(Exception):
    """The shared Prefect budget is spent for longer than a worker should hold a slot."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(wait_s)
        self.wait_s = wait_s


# Waits up to this long for the shared rate limit happen in place; longer ones
# go back to the queue so the slot serves other work meanwhile.
MAX_INLINE_RATE_WAIT_S = 1.0


def classify_answer(body: dict[str, Any]) -> Outcome:
    """Map a set_state response body (an OrchestrationResult) to an outcome."""
    status = str(body.get("status", "")).upper()
    state = body.get("state") or {}
    details = body.get("details") or {}
    orchestration = Orchestration(
        status=status,
        state_type=state.get("type"),
        state_name=state.get("name"),
        scheduled_time=(state.get("state_details") or {}).get("scheduled_time"),
        reason=details.get("reason"),
    )
    if status == "ACCEPT":
        return Outcome(Status.APPLIED, orchestration)
    if status in ("REJECT", "ABORT"):
        return Outcome(Status.REJECTED, orchestration)
    if status == "WAIT":
        return Outcome(
            Status.WAITING, orchestration, delay_s=float(details.get("delay_seconds") or 0)
        )
    return Outcome(
        Status.FAILED,
        orchestration,
        JobError(
            code=ErrorCode.INVALID_REQUEST, message=f"unknown orchestration status {status!r}"
        ),
    )


def classify_error(exc: Exception) -> Outcome:
    """Map an HTTP or transport error from Prefect to an outcome."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        detail = _detail(exc.response)
        if code == 404:
            return Outcome(
                Status.FAILED, error=JobError(code=ErrorCode.RUN_NOT_FOUND, message=detail)
            )
        if code in _INVALID_HTTP:
            return Outcome(
                Status.FAILED, error=JobError(code=ErrorCode.INVALID_REQUEST, message=detail)
            )
        if code in _AUTH_HTTP:
            log.error("Prefect refused our credentials (HTTP %s): check PREFECT_API_KEY", code)
            return Outcome(
                Status.FAILED, error=JobError(code=ErrorCode.UNAUTHORIZED, message=detail)
            )
        if code in _TRANSIENT_HTTP or code >= 500:
            return Outcome(
                Status.WAITING,
                error=JobError(code=ErrorCode.TRANSIENT, message=detail),
                delay_s=parse_retry_after(exc.response.headers.get("Retry-After")),
                transient=True,
                ambiguous=code in _AMBIGUOUS_HTTP,
            )
        return Outcome(
            Status.FAILED, error=JobError(code=ErrorCode.INVALID_REQUEST, message=detail)
        )
    # Read timeouts and dropped connections: Prefect may still write the change.
    return Outcome(
        Status.WAITING,
        error=JobError(code=ErrorCode.TRANSIENT, message=f"{type(exc).__name__}: {exc}"[:500]),
        transient=True,
        ambiguous=not isinstance(exc, _NOT_SENT),
    )


def _detail(response: httpx.Response) -> str:
    text = response.text[:300].strip()
    return f"Prefect answered HTTP {response.status_code}" + (f": {text}" if text else "")


class PrefectApplier:
    """Applies one job's change through a shared, long-lived Prefect connection pool."""

    def __init__(
        self,
        http: PrefectHttp,
        limiter: RateLimiter | None = None,
        concurrency: AdaptiveLimit | None = None,
        *,
        call_timeout_s: float = 10.0,
    ) -> None:
        self.http = http
        self.limiter = limiter
        self.concurrency = concurrency
        self.call_timeout_s = call_timeout_s
        # What the last call told us about Prefect, for the worker's heartbeat.
        self.prefect_ok = False
        self.last_answer_at: float | None = None
        # Since when Prefect has answered every call without a transport error or a
        # 5xx; None while it does not. A stalled server may still hold requests it will
        # process when it wakes, so a history read counts only after a quiet spell.
        self.answering_since: datetime | None = None
        # The latest calls' latencies, for the heartbeat (`pmq jobs watch`, the dashboard).
        self.recent_latencies_s: deque[float] = deque(maxlen=100)

    async def _throttle(self) -> float:
        """Book one call of the shared budget and wait for its turn (returns how long),
        or raise RateLimited when that is too far off.

        The adaptive limit counts the wait as part of the call: the budget is then
        Prefect's pace as this worker sees it. Judged on the call alone, four workers
        at 28 calls/s kept 16 calls each waiting; most waited over a second, went
        back to the queue and were taken again (65 Redis commands per change, B6
        with --prefect-max-rps).
        """
        if self.limiter is None:
            return 0.0
        booked, wait_s = await self.limiter.book(MAX_INLINE_RATE_WAIT_S)
        if not booked:
            if self.concurrency is not None:
                await self.concurrency.observe(wait_s, overloaded=True)
            raise RateLimited(wait_s)
        if wait_s > 0:
            await asyncio.sleep(wait_s)  # the booked turn
        return wait_s

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call with Prefect's configuration (URL, auth, TLS) but none of its retries.

        Prefect's client sleeps through 429/502/503 (Retry-After or 2, 4, 8 s) before
        returning, even with PREFECT_CLIENT_MAX_RETRIES=0, and its connection pool
        retries connects (3 tries of a 10 s connect timeout outlived the job timeout):
        that would hold a worker slot and hide the state from callers. The queue
        retries instead, visibly, so Prefect's client only builds the request
        (see `worker.prefect_http`).
        """
        waited_s = await self._throttle()
        request = self.http.build_request(method, path, **kwargs)
        call = "set_state" if method == "POST" else "read_history"
        started = time.monotonic()
        try:
            response = await self._bounded_send(request)
        except httpx.HTTPError:
            self._unanswered()
            await self._observed(call, "error", started, waited_s, overloaded=True)
            raise
        self._answered(response.status_code)
        await self._observed(
            call,
            str(response.status_code),
            started,
            waited_s,
            overloaded=response.status_code == 429 or response.status_code >= 500,
        )
        response.raise_for_status()
        return response

    async def _bounded_send(
        self, request: httpx.Request, *, timeout_s: float | None = None
    ) -> httpx.Response:
        """httpx's send under a hard limit: whatever the transport does (connect
        retries, a DNS lookup that hangs), no call outlives `call_timeout_s` by
        more than a second. The second lets httpx's own timeouts fire first: they
        say whether the request was sent."""
        limit_s = min(timeout_s or self.call_timeout_s, self.call_timeout_s) + 1.0
        try:
            async with asyncio.timeout(limit_s):
                return await self.http.send(request)
        except TimeoutError:
            message = f"no answer from Prefect in {limit_s:g} s"
            raise CallTimedOut(message, request=request) from None

    def _answered(self, status_code: int) -> None:
        self.prefect_ok = status_code < 500
        self.last_answer_at = time.monotonic()
        if status_code >= 500:
            self.answering_since = None
        elif self.answering_since is None:
            self.answering_since = utcnow()

    def _unanswered(self) -> None:
        self.prefect_ok = False
        self.answering_since = None

    async def _observed(
        self, call: str, outcome: str, started: float, waited_s: float, *, overloaded: bool
    ) -> None:
        """Record a call's latency (Prefect's alone); the adaptive limit also counts the
        wait for the shared budget before it (see `_throttle`)."""
        latency_s = time.monotonic() - started
        PREFECT_CALL_SECONDS.labels(call, outcome).observe(latency_s)
        self.recent_latencies_s.append(latency_s)
        if self.concurrency is not None:
            await self.concurrency.observe(latency_s + waited_s, overloaded=overloaded)

    async def probe(self, *, timeout_s: float | None = None) -> bool:
        """Is Prefect answering? For the heartbeat, when no job has asked lately."""
        try:
            response = await self._bounded_send(
                self.http.build_request("GET", "/health"), timeout_s=timeout_s
            )
        except httpx.HTTPError:
            self._unanswered()
            return False
        self._answered(response.status_code)
        self.prefect_ok = response.status_code == 200
        return self.prefect_ok

    async def find_applied(self, record: JobRecord) -> Orchestration | None:
        """The state this job already wrote, if an earlier attempt reached Prefect.

        Task runs accept a repeated transition, so after a crash or a timeout the
        run's history is the only way to know; flow runs would reject the repeat,
        and reporting that as `rejected` would be wrong too.
        """
        found = await self.find_transitions(record)
        if not found:
            return None
        state = found[0]
        return Orchestration(
            status="ACCEPT",
            state_type=state.get("type"),
            state_name=state.get("name"),
            reason="found in the run's state history after an interrupted attempt",
        )

    async def find_transitions(self, record: JobRecord) -> list[dict[str, Any]]:
        """Every state in the run's history that this job's transition wrote (oldest first)."""
        path = "/task_run_states/" if record.run_type is RunType.TASK else "/flow_run_states/"
        param = "task_run_id" if record.run_type is RunType.TASK else "flow_run_id"
        response = await self._send("GET", path, params={param: record.run_id})
        return [
            state
            for state in response.json()
            if (state.get("state_details") or {}).get("transition_id") == record.transition_id
        ]

    async def set_state(self, record: JobRecord) -> dict[str, Any]:
        """One set_state call; returns Prefect's OrchestrationResult as JSON."""
        state = StateCreate(
            type=record.state.value,
            name=record.state_name,
            message=record.message,
            state_details=StateDetails(
                transition_id=UUID(record.transition_id),
                scheduled_time=record.scheduled_time,
                pause_timeout=record.pause_expiration_time,  # Prefect's name for the expiry
                pause_reschedule=record.pause_reschedule,
                pause_key=record.pause_key,
            ),
        )
        response = await self._send(
            "POST",
            f"/{record.run_type.value}_runs/{record.run_id}/set_state",
            json={
                "state": state.model_dump(mode="json", serialize_as_any=True),
                "force": record.force,
            },
        )
        body: dict[str, Any] = response.json()
        return body

    async def apply(self, record: JobRecord, *, check_history: bool) -> Outcome:
        """One attempt: optionally look for an earlier write, then call set_state."""
        checked = False
        try:
            if check_history:
                found = await self.find_applied(record)
                if found is not None:
                    return Outcome(Status.APPLIED, found, history_checked=True)
                checked = True
            outcome = classify_answer(await self.set_state(record))
        except RateLimited as exc:
            outcome = Outcome(Status.WAITING, delay_s=exc.wait_s, called=False)
        except (httpx.HTTPError, OSError) as exc:
            outcome = classify_error(exc)
        return replace(outcome, history_checked=checked, resent=checked)
