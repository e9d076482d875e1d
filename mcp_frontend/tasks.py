"""The MCP tasks extension (`io.modelcontextprotocol/tasks`, SEP-2663) over the job store.

Spec: the extension as published with MCP revision 2026-07-28. A client that
declares the extension in a request's `_meta` capabilities gets a task instead
of a ticket from the state-change tools; `tasks/get` and `tasks/cancel` then
read and cancel the jobs behind it. Every task lives in Redis, so any frontend
replica answers for any task.

Mapping (README, "MCP tasks"):
- `set_task_run_state` / `set_flow_run_state`: task id = job id.
- `submit_state_changes`: one task for the whole batch, id `batch-<hex>`; it
  completes when every job in it is terminal.
- queued / running / waiting -> `working`; applied -> `completed`; rejected and
  failed -> `completed` with `isError: true`, because the spec reserves
  `failed` for JSON-RPC errors; cancelled -> `cancelled`.
- A completed task carries, inline, exactly what `get_job` (or `get_jobs`)
  returns for its jobs.

`subscriptions/listen` for task ids (pushed `notifications/tasks`) is served by
`mcp_frontend.task_listen`, from the same `TasksExtension.snapshot` that answers
`tasks/get`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pydantic_core
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequestParams, CallToolResult, RequestParams, TextContent
from mcp_types.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from mcp_frontend.auth import Forbidden, Right, current_client, require
from mcp_frontend.jobs import JobList, JobNotFound, JobService
from mcp_frontend.progress import Drain, describe, poll_interval_ms
from worker.contract import PENDING_STATUSES, Batch, JobRecord, JobStatus, Status, utcnow
from worker.durability import NotDurable
from worker.settings import Settings

log = logging.getLogger(__name__)

TASKS = "io.modelcontextprotocol/tasks"
# A role without the right. JSON-RPC leaves -32000..-32099 to servers; MCP and
# its tasks extension use -32000..-32003, -32020..-32022 and -32042 there.
FORBIDDEN = -32030
# The extension's own code for a client that did not declare it. The core
# revision's is -32021 (the SDK's MISSING_REQUIRED_CLIENT_CAPABILITY); the
# extension's text says -32003, and the extension's methods follow it.
MISSING_CAPABILITY = -32003
TERMINAL_TASK_STATUSES = frozenset({"completed", "failed", "cancelled"})
SINGLE_CHANGE_TOOLS = frozenset({"set_task_run_state", "set_flow_run_state"})
BATCH_TOOL = "submit_state_changes"
_BATCH_PREFIX = "batch-"
# The spec's wording of a not-found error, per method.
_VERBS = {"tasks/get": "retrieve", "tasks/cancel": "cancel", "tasks/update": "update"}

T = TypeVar("T")
Ctx = ServerRequestContext[JobService, Any]


class TaskIdParams(RequestParams):
    task_id: str = Field(alias="taskId", max_length=200)


class UpdateTaskParams(TaskIdParams):
    input_responses: dict[str, Any] = Field(alias="inputResponses", default_factory=dict)


@dataclass(frozen=True)
class TaskSnapshot:
    """A task as `tasks/get` answers it (without `resultType`), and the records it was read from."""

    task: dict[str, Any]
    records: list[JobRecord]

    @property
    def is_terminal(self) -> bool:
        return self.task["status"] in TERMINAL_TASK_STATUSES

    @property
    def job_statuses(self) -> tuple[tuple[str, Status, int], ...]:
        """What changes when a job behind the task changes status (a retry included)."""
        return tuple((r.job_id, r.status, r.attempts) for r in self.records)


class TasksExtension(Extension):
    """Answers opted-in state-change calls with tasks, and serves `tasks/*`."""

    identifier = TASKS

    def __init__(
        self, *, result_ttl_s: float, job_deadline_s: float, token_required: bool = False
    ) -> None:
        self._token_required = token_required
        self._result_ttl = timedelta(seconds=result_ttl_s)
        self._pending_ttl = timedelta(seconds=job_deadline_s + result_ttl_s)

    @classmethod
    def from_settings(cls, settings: Settings, *, token_required: bool) -> TasksExtension:
        return cls(
            result_ttl_s=settings.result_ttl_s,
            job_deadline_s=settings.job_deadline_s,
            token_required=token_required,
        )

    def caller(self, right: Right, method: str) -> str:
        """The caller's client id if its role has `right`, else FORBIDDEN."""
        try:
            return require(right, method, token_required=self._token_required)
        except Forbidden as exc:
            raise MCPError(code=FORBIDDEN, message=str(exc)) from None

    async def snapshot(self, service: JobService, task_id: str, client_id: str) -> TaskSnapshot:
        """The task now, exactly as `tasks/get` answers it.

        JobNotFound for an unknown id and for another client's alike; a Redis
        failure is the JSON-RPC internal error.
        """
        if task_id.startswith(_BATCH_PREFIX):
            batch = await store_call(service.batch(task_id, client_id))
            records = await store_call(service.records(batch.job_ids, client_id))
            return TaskSnapshot(await self._batch_task(service, batch, records), records)
        (record,) = await store_call(service.records([task_id], client_id))
        return TaskSnapshot(await self._job_task(service, record), [record])

    def methods(self) -> Sequence[MethodBinding]:
        # Tasks need the per-request capability envelope of 2026-07-28.
        modern = frozenset(MODERN_PROTOCOL_VERSIONS)
        return (
            MethodBinding("tasks/get", TaskIdParams, self._get, modern),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel, modern),
            MethodBinding("tasks/update", UpdateTaskParams, self._update, modern),
        )

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: Ctx, call_next: CallNext
    ) -> HandlerResult:
        result = await call_next(ctx)
        if not declares_tasks(ctx) or params.name not in SINGLE_CHANGE_TOOLS | {BATCH_TOOL}:
            return result
        # Bad input and a full queue stay plain tool errors: there is nothing to follow.
        if not isinstance(result, CallToolResult) or result.is_error:
            return result
        tickets = result.structured_content or {}
        service = ctx.lifespan_context
        try:
            drain = await service.drain.read()
        except RedisError:
            drain = Drain(None, 0)  # the change is queued: answer without the estimate
        if params.name == BATCH_TOOL:
            job_ids = [ticket["job_id"] for ticket in tickets["jobs"]]
            try:
                batch = await service.open_batch(job_ids, current_client())
            except (RedisError, NotDurable):
                log.warning("could not record batch of %d jobs", len(job_ids), exc_info=True)
                return _tool_error(
                    "job store (Redis) unavailable or the batch not confirmed after queueing: "
                    "the changes may be queued; resubmit with the same idempotency keys to get "
                    "their tickets"
                )
            statuses = [Status(ticket["status"]) for ticket in tickets["jobs"]]
            task = self._seed(batch.batch_id, batch.created_at, statuses, drain)
        else:
            created = datetime.fromisoformat(tickets["enqueued_at"])
            task = self._seed(tickets["job_id"], created, [Status(tickets["status"])], drain)
        return {"resultType": "task", **task}

    def _seed(
        self, task_id: str, created: datetime, statuses: list[Status], drain: Drain
    ) -> dict[str, Any]:
        """The task as first answered. A repeated idempotency key may name a finished job."""
        pending = sum(1 for status in statuses if not status.is_terminal)
        if pending:
            status = "working"
            message = (
                f"queued: {pending} of {len(statuses)} to apply" if len(statuses) > 1 else "queued"
            )
        elif statuses == [Status.CANCELLED]:
            status, message = "cancelled", "cancelled before this call: a repeated key"
        else:
            status, message = "completed", "finished before this call: tasks/get has the result"
        return {
            "taskId": task_id,
            "status": status,
            "statusMessage": message,
            "createdAt": _iso(created),
            "lastUpdatedAt": _iso(utcnow()),
            "ttlMs": _ms(self._pending_ttl),
            "pollIntervalMs": poll_interval_ms(drain, jobs_ahead=drain.queued),
        }

    async def _get(self, ctx: Ctx, params: TaskIdParams) -> dict[str, Any]:
        require_declared(ctx)
        client = self.caller(Right.READ, "tasks/get")
        try:
            snapshot = await self.snapshot(ctx.lifespan_context, params.task_id, client)
        except JobNotFound:
            raise _not_found("tasks/get") from None
        return {"resultType": "complete", **snapshot.task}

    async def _cancel(self, ctx: Ctx, params: TaskIdParams) -> dict[str, Any]:
        """Cancel what has not started; the rest finishes (the spec makes this cooperative)."""
        require_declared(ctx)
        service = ctx.lifespan_context
        batch, records = await _lookup(
            service, params.task_id, "tasks/cancel", self.caller(Right.CANCEL, "tasks/cancel")
        )
        if batch is not None:
            await store_call(service.store.mark_batch_cancelled(batch))
        for record in records:
            if record.status in PENDING_STATUSES:
                await store_call(service.cancel_if_pending(record.job_id))
        return {"resultType": "complete"}

    async def _update(self, ctx: Ctx, params: UpdateTaskParams) -> dict[str, Any]:
        # No task here ever asks for input, so every response is for an unknown key:
        # the spec says to ignore those, once the task is known to exist.
        require_declared(ctx)
        await _lookup(
            ctx.lifespan_context,
            params.task_id,
            "tasks/update",
            self.caller(Right.SUBMIT, "tasks/update"),
        )
        return {"resultType": "complete"}

    async def _job_task(self, service: JobService, record: JobRecord) -> dict[str, Any]:
        now = utcnow()
        task = self._frame(record.job_id, record.enqueued_at, [record])
        if record.status.is_terminal:
            task["statusMessage"] = describe(record, None, now)
            return self._finish(task, record.status is Status.CANCELLED, [record], single=True)
        progress = await store_call(service.store.progress(record.job_id))
        drain = await store_call(service.drain.read())
        due_in = None
        if record.status is Status.WAITING and record.next_attempt_at and not record.blocked_on:
            due_in = (record.next_attempt_at - now).total_seconds()
        ahead = max(progress.queue_rank, 0) + progress.ahead_in_run
        task["statusMessage"] = describe(record, progress, now)
        task["pollIntervalMs"] = poll_interval_ms(drain, jobs_ahead=ahead, next_attempt_in_s=due_in)
        return task

    async def _batch_task(
        self, service: JobService, batch: Batch, records: list[JobRecord]
    ) -> dict[str, Any]:
        task = self._frame(batch.batch_id, batch.created_at, records)
        counts: dict[Status, int] = {}
        for record in records:
            counts[record.status] = counts.get(record.status, 0) + 1
        summary = ", ".join(f"{n} {status.value}" for status, n in sorted(counts.items()))
        done = sum(n for status, n in counts.items() if status.is_terminal)
        task["statusMessage"] = f"{done} of {len(records)} changes finished: {summary}"
        if done < len(records):
            drain = await store_call(service.drain.read())
            task["pollIntervalMs"] = poll_interval_ms(drain, jobs_ahead=drain.queued)
            return task
        cancelled = batch.cancel_requested and Status.CANCELLED in counts
        return self._finish(task, cancelled, records, single=False)

    def _frame(self, task_id: str, created: datetime, records: list[JobRecord]) -> dict[str, Any]:
        """The fields every task has; `working` until `_finish` says otherwise."""
        finished = [r.finished_at for r in records if r.finished_at is not None]
        if len(finished) == len(records):
            ttl = max(finished) - created + self._result_ttl  # records expire then
        else:
            ttl = self._pending_ttl
        return {
            "taskId": task_id,
            "status": "working",
            "createdAt": _iso(created),
            "lastUpdatedAt": _iso(max(_touched(r) for r in records)),
            "ttlMs": _ms(ttl),
        }

    @staticmethod
    def _finish(
        task: dict[str, Any], cancelled: bool, records: list[JobRecord], *, single: bool
    ) -> dict[str, Any]:
        if cancelled:
            return {**task, "status": "cancelled"}
        statuses = [JobStatus.of(record) for record in records]
        is_error = any(record.status is not Status.APPLIED for record in records)
        value: BaseModel = statuses[0] if single else JobList(jobs=statuses)
        return {**task, "status": "completed", "result": tool_result(value, is_error=is_error)}


def tool_result(value: BaseModel, *, is_error: bool) -> dict[str, Any]:
    """`value` as the MCPServer returns it from a tool: JSON text plus structured content."""
    result = CallToolResult(
        content=[
            TextContent(
                type="text", text=pydantic_core.to_json(value, fallback=str, indent=2).decode()
            )
        ],
        structured_content=value.model_dump(mode="json", by_alias=True),
        is_error=is_error,
    )
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def require_declared(ctx: Ctx) -> None:
    """The spec (c0ca5e7): a `tasks/*` request that does not declare the extension
    gets -32003, naming the capability it lacks."""
    if not declares_tasks(ctx):
        raise MCPError(
            code=MISSING_CAPABILITY,
            message="Missing required client capability",
            data={"requiredCapabilities": {"extensions": {TASKS: {}}}},
        )


def declares_tasks(ctx: Ctx) -> bool:
    """The spec: only a request that itself declares the extension gets its behaviour."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and TASKS in capabilities.extensions)


async def _lookup(
    service: JobService, task_id: str, method: str, client: str
) -> tuple[Batch | None, list[JobRecord]]:
    """The task's batch (if it is one) and its records, or the spec's -32602.

    Another client's task answers exactly like an unknown one.
    """
    try:
        if task_id.startswith(_BATCH_PREFIX):
            batch = await store_call(service.batch(task_id, client))
            return batch, await store_call(service.records(batch.job_ids, client))
        return None, await store_call(service.records([task_id], client))
    except JobNotFound:
        raise _not_found(method) from None


def _not_found(method: str) -> MCPError:
    return MCPError(
        code=INVALID_PARAMS,
        message=f"Failed to {_VERBS[method]} task: "
        "task not found (unknown id, or expired after its TTL)",
    )


async def store_call(call: Awaitable[T]) -> T:
    """`call`, with a Redis failure turned into the JSON-RPC internal error."""
    try:
        return await call
    except RedisError as exc:
        log.warning("job store unavailable: %s", exc)
        raise MCPError(
            code=INTERNAL_ERROR, message="job store (Redis) unavailable: retry later"
        ) from exc


def _tool_error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def _touched(record: JobRecord) -> datetime:
    moments = (record.enqueued_at, record.started_at, record.attempt_started_at, record.finished_at)
    return max(moment for moment in moments if moment is not None)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _ms(delta: timedelta) -> int:
    return max(0, round(delta.total_seconds() * 1000))
