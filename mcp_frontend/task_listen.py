"""Pushed task status: `subscriptions/listen` with `notifications.taskIds`.

Spec: the tasks extension's "Task Status Notifications" (SEP-2663, revision
2026-07-28), on the core `subscriptions/listen` stream (SEP-2575). For a listen
request with JSON-RPC id L, every frame carries
`_meta["io.modelcontextprotocol/subscriptionId"] = L`, and in this order:

1. `notifications/subscriptions/acknowledged`, whose `notifications.taskIds`
   names the requested ids that exist and are the caller's. Any other id is
   left out, and an unknown id and another client's are treated alike.
2. One `notifications/tasks` for each acknowledged task: the task as
   `tasks/get` answers it now. Without it, a task that changed (or finished)
   between its creation and the listen would never be reported.
3. One more `notifications/tasks` each time a job behind a task changes
   status, with the task read after the change, so it is what `tasks/get`
   answers at that moment. Changes that land between two reads arrive as one.
4. When every acknowledged task has sent its terminal notification, the
   listen's result (`SubscriptionsListenResult`) ends the stream: the core
   spec's graceful close. A terminal task never changes again, so the stream
   would carry nothing more. With nothing acknowledged, it ends after the ack.
   It also ends so, with tasks still working, once it has been open
   `max_listen_s` (`PMQ_MAX_WAIT_S`, as a `get_job` long-poll): a frontend
   holds no request open longer, so a restart never waits on a listen. The
   client listens again and gets each task's state at once (2.).

The push comes from the frontend's one Redis subscription (`TerminalWaiters`),
so a listen works on any replica, whichever replica created the task.

Why a middleware: `subscriptions/listen` is a core method. The SDK's
`ListenHandler` serves it and drops the filter keys it does not know (like
`taskIds`), and an extension's `MethodBinding` may not bind a spec method. A
`ServerMiddleware` sees the request before either of them, and passes on every
listen that asks for no task ids.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Any, Literal, cast

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY
from mcp_types import (
    ServerNotification,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
    SubscriptionsAcknowledgedNotificationParams,
    SubscriptionsListenResult,
)
from mcp_types.jsonrpc import INVALID_PARAMS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from prometheus_client import Gauge
from pydantic import BaseModel

from mcp_frontend.auth import Right
from mcp_frontend.jobs import JobNotFound, JobService
from mcp_frontend.tasks import (
    TasksExtension,
    TaskSnapshot,
    require_declared,
    store_call,
)
from mcp_frontend.waiters import JobChanges

LISTEN = "subscriptions/listen"
MAX_TASK_IDS = 100
# Pub/sub delivers at most once: a listen re-reads its tasks this often even
# when nothing was heard, so a lost notification delays a push, never loses it.
RECHECK_S = 30.0
# Job ids and batch ids as the contract mints them (`uuid4().hex`); any other
# string cannot be a task, and is not looked up.
_TASK_ID_RE = re.compile(r"^(batch-)?[0-9a-f]{32}\Z")

OPEN_LISTENS = Gauge(
    "pmq_frontend_task_listens", "subscriptions/listen streams for tasks open in this process."
)

Ctx = ServerRequestContext[JobService, Any]


class TaskStatusNotification(BaseModel):
    """`notifications/tasks`; its params are the task, as `tasks/get` answers it."""

    method: Literal["notifications/tasks"] = "notifications/tasks"
    params: dict[str, Any]


class TaskListens:
    """A `ServerMiddleware` serving `subscriptions/listen` requests that carry `taskIds`."""

    def __init__(
        self,
        tasks: TasksExtension,
        *,
        max_listen_s: float,
        max_task_ids: int = MAX_TASK_IDS,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self._tasks = tasks
        self._max_listen_s = max_listen_s
        self._max_task_ids = max_task_ids
        self._recheck_s = recheck_s

    async def __call__(self, ctx: Ctx, call_next: CallNext) -> HandlerResult:
        requested = _requested_task_ids(ctx)
        if requested is None:
            return await call_next(ctx)
        require_declared(ctx)
        client = self._tasks.caller(Right.READ, LISTEN)
        task_ids = self._checked(requested)
        OPEN_LISTENS.inc()
        try:
            listen = _Listen(ctx, self._tasks, client, recheck_s=self._recheck_s)
            await listen.run(task_ids, until=time.monotonic() + self._max_listen_s)
        finally:
            OPEN_LISTENS.dec()
        assert ctx.request_id is not None  # `_requested_task_ids` saw one
        result = SubscriptionsListenResult(_meta={SUBSCRIPTION_ID_META_KEY: ctx.request_id})
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)

    def _checked(self, requested: object) -> list[str]:
        if not isinstance(requested, list) or not all(isinstance(i, str) for i in requested):
            raise MCPError(code=INVALID_PARAMS, message="notifications.taskIds: a list of strings")
        if len(requested) > self._max_task_ids:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"notifications.taskIds: at most {self._max_task_ids} task ids per "
                f"subscriptions/listen, got {len(requested)}",
            )
        return list(dict.fromkeys(requested))


class _Listen:
    """One listen stream: acknowledge, push each task's states, end when all are terminal."""

    def __init__(
        self, ctx: Ctx, tasks: TasksExtension, client_id: str, *, recheck_s: float
    ) -> None:
        self._ctx = ctx
        self._service = ctx.lifespan_context
        self._tasks = tasks
        self._client_id = client_id
        self._recheck_s = recheck_s
        self._meta = {SUBSCRIPTION_ID_META_KEY: ctx.request_id}

    async def run(self, task_ids: list[str], *, until: float) -> None:
        """Serve the stream until every task is terminal or the monotonic clock reaches `until`."""
        candidates = await self._job_ids(task_ids)
        job_ids = {job_id for ids in candidates.values() for job_id in ids}
        # Followed before the first read, so no change can fall between the two.
        async with self._service.waiters.changes(job_ids) as changes:
            pushed: dict[str, TaskSnapshot] = {}
            for task_id in candidates:
                snapshot = await self._snapshot(task_id)
                if snapshot is not None:
                    pushed[task_id] = snapshot
            await self._acknowledge(list(pushed))
            for snapshot in pushed.values():
                await self._push(snapshot)
            await self._follow(pushed, candidates, changes, until=until)

    async def _follow(
        self,
        pushed: dict[str, TaskSnapshot],
        candidates: dict[str, frozenset[str]],
        changes: JobChanges,
        *,
        until: float,
    ) -> None:
        """Push each task again whenever a job behind it changes status, until it is terminal."""
        following = {task_id for task_id, snapshot in pushed.items() if not snapshot.is_terminal}
        while following and (remaining_s := until - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(changes.arrived.wait(), min(self._recheck_s, remaining_s))
                changed = changes.take()
            except TimeoutError:
                changed = changes.job_ids
            for task_id in [t for t in pushed if t in following]:  # in the ack's order
                if changed.isdisjoint(candidates[task_id]):
                    continue
                snapshot = await self._snapshot(task_id)
                if snapshot is None:  # expired: nothing more will be said of it
                    following.discard(task_id)
                    continue
                if snapshot.job_statuses != pushed[task_id].job_statuses:
                    pushed[task_id] = snapshot
                    await self._push(snapshot)
                if snapshot.is_terminal:
                    following.discard(task_id)

    async def _job_ids(self, task_ids: list[str]) -> dict[str, frozenset[str]]:
        """The jobs behind each requested id that can be the caller's task (batches read)."""
        candidates: dict[str, frozenset[str]] = {}
        for task_id in task_ids:
            if not _TASK_ID_RE.match(task_id):
                continue
            if not task_id.startswith("batch-"):
                candidates[task_id] = frozenset({task_id})
                continue
            try:
                batch = await store_call(self._service.batch(task_id, self._client_id))
            except JobNotFound:
                continue
            candidates[task_id] = frozenset(batch.job_ids)
        return candidates

    async def _snapshot(self, task_id: str) -> TaskSnapshot | None:
        try:
            return await self._tasks.snapshot(self._service, task_id, self._client_id)
        except JobNotFound:
            return None

    async def _acknowledge(self, task_ids: list[str]) -> None:
        # The spec's ack lists the ids it agreed to, "if any": none, no key.
        honored = SubscriptionFilter(taskIds=task_ids) if task_ids else SubscriptionFilter()
        params = SubscriptionsAcknowledgedNotificationParams(
            notifications=honored, _meta=self._meta
        )
        ack = SubscriptionsAcknowledgedNotification(params=params)
        await self._ctx.session.send_notification(
            ack,
            related_request_id=self._ctx.request_id,
        )

    async def _push(self, snapshot: TaskSnapshot) -> None:
        notification = TaskStatusNotification(params={**snapshot.task, "_meta": self._meta})
        # The SDK's ServerNotification union has no `notifications/tasks` (its
        # TaskStatusNotification is 2025-11-25's `notifications/tasks/status`, kept
        # out of the union). The session sends a notification by dumping it by
        # alias, which is all this model needs.
        await self._ctx.session.send_notification(
            cast(ServerNotification, notification), related_request_id=self._ctx.request_id
        )


def _requested_task_ids(ctx: Ctx) -> object | None:
    """`notifications.taskIds` of a 2026-07-28 listen request (unchecked), else None."""
    if ctx.method != LISTEN or ctx.request_id is None:
        return None
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return None
    notifications = (ctx.params or {}).get("notifications")
    if not isinstance(notifications, Mapping) or "taskIds" not in notifications:
        return None
    requested: object = notifications["taskIds"]
    return requested
