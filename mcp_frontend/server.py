"""The MCP server: tools that enqueue state changes and report on jobs.

Tools never call Prefect. Errors a caller can act on become `ToolError`s that
name the field and the rule; anything else is logged and reported generically.
"""

import contextlib
import importlib.metadata
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, ClassVar, TypeVar

from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from mcp_frontend.auth import Auth, Forbidden, Right, require
from mcp_frontend.capabilities import AdvertiseWhatExists
from mcp_frontend.jobs import (
    MAX_LIST,
    JobList,
    JobNotFound,
    JobQuery,
    JobService,
    NotCancellable,
    open_job_service,
)
from mcp_frontend.progress import describe
from mcp_frontend.strict_tools import RefusesUnknown, strict_tool
from mcp_frontend.task_listen import TaskListens
from mcp_frontend.tasks import TasksExtension
from worker.contract import (
    PENDING_STATUSES,
    InvalidChange,
    JobRecord,
    JobStatus,
    JobTicket,
    RunType,
    StateChange,
    utcnow,
)
from worker.durability import NotDurable
from worker.settings import Settings
from worker.store import IdempotencyConflict, QueueFull, QuotaExceeded

log = logging.getLogger(__name__)

MAX_JOB_IDS = 1_000
_JOB_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")  # \Z: `$` allows a final newline

T = TypeVar("T")
Ctx = Context[JobService, Any]

StateArg = Annotated[
    str,
    Field(
        description="Prefect state type, case-insensitive: SCHEDULED, PENDING, RUNNING, "
        "COMPLETED, FAILED, CANCELLED, CRASHED, PAUSED or CANCELLING."
    ),
]
MessageArg = Annotated[str | None, Field(description="Optional state message.")]
ForceArg = Annotated[
    bool, Field(strict=True, description="Ask Prefect to skip its orchestration rules.")
]
IdempotencyArg = Annotated[
    str | None,
    Field(
        description="Optional key (1-128 of A-Z a-z 0-9 . _ : -); a repeat returns the same job."
    ),
]
JobIdArg = Annotated[str, Field(description="A job id returned by a state-change tool.")]


class TicketList(BaseModel):
    jobs: list[JobTicket]


NameArg = Annotated[
    str | None,
    Field(
        description="Optional state name: Prefect's (AwaitingRetry, Late, Retrying, Suspended, "
        "Cancelling, ...; each with its own type) or a custom one, up to 64 characters."
    ),
]
ScheduledTimeArg = Annotated[
    str | None,
    Field(
        description="SCHEDULED only: when the run is due, ISO 8601 with a zone or relative "
        "(90s, 10m, 2h, 1d); stored as UTC at acceptance."
    ),
]
PauseTimeoutArg = Annotated[
    float | None,
    Field(
        strict=True,
        description="PAUSED only: seconds until the pause expires (or pause_expiration_time).",
    ),
]
PauseExpirationArg = Annotated[
    str | None,
    Field(
        description="PAUSED only: when the pause expires, ISO 8601 with a zone or relative "
        "(10m); must be in the future."
    ),
]
PauseRescheduleArg = Annotated[
    bool | None,
    Field(
        strict=True,
        description="PAUSED only: release the run's infrastructure and reschedule it on resume "
        "(what the name Suspended means; flow runs with a deployment).",
    ),
]
PauseKeyArg = Annotated[
    str | None, Field(description="PAUSED only: a key that makes the pause fire once per run.")
]


class ChangeIn(RefusesUnknown):
    """One change in a `submit_state_changes` batch."""

    unknown_outcome: ClassVar[str] = "nothing was queued"

    run_type: str = Field(description="'task' or 'flow'.")
    run_id: str = Field(description="UUID of the task run or flow run.")
    state: StateArg
    name: NameArg = None
    message: MessageArg = None
    force: ForceArg = False
    idempotency_key: IdempotencyArg = None
    scheduled_time: ScheduledTimeArg = None
    pause_timeout: PauseTimeoutArg = None
    pause_expiration_time: PauseExpirationArg = None
    pause_reschedule: PauseRescheduleArg = None
    pause_key: PauseKeyArg = None


# A state-change tool's arguments that make up the change: a batch item's but the run.
CHANGE_ARGS = frozenset(ChangeIn.model_fields) - {"run_type", "run_id"}


_SUBMIT = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True
)
_READ = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
_CANCEL = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


def build_server(
    settings: Settings, *, auth: Auth | None = None, public_url: str | None = None
) -> MCPServer:
    """The MCPServer with every tool; Redis is opened by its lifespan.

    With `auth` enabled (HTTP only) every request needs a bearer token, each job
    belongs to the client whose token created it, and each tool asks the token's
    role for the right it needs.
    """

    token_required = auth is not None and auth.enabled

    def allowed(right: Right, tool: str) -> str:
        return _allowed(right, tool, token_required=token_required)

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[JobService]:
        async with open_job_service(settings) as service:
            yield service

    async def submit_one(ctx: Ctx, run_type: RunType, run_id: str, **change: Any) -> JobTicket:
        client = allowed(Right.SUBMIT, f"set_{run_type.value}_run_state")
        parsed = _parse(
            "",
            run_type=run_type.value,
            run_id=run_id,
            max_message_chars=settings.max_message_chars,
            run_id_field=f"{run_type.value}_run_id",
            **change,
        )
        tickets = await _guard(
            ctx.request_context.lifespan_context.submit([parsed], client), submit=True
        )
        return tickets[0]

    async def set_task_run_state(
        task_run_id: Annotated[str, Field(description="UUID of the Prefect task run.")],
        state: StateArg,
        ctx: Ctx,
        name: NameArg = None,
        message: MessageArg = None,
        force: ForceArg = False,
        idempotency_key: IdempotencyArg = None,
        scheduled_time: ScheduledTimeArg = None,
        pause_timeout: PauseTimeoutArg = None,
        pause_expiration_time: PauseExpirationArg = None,
        pause_reschedule: PauseRescheduleArg = None,
        pause_key: PauseKeyArg = None,
    ) -> JobTicket:
        change = {name: value for name, value in locals().items() if name in CHANGE_ARGS}
        return await submit_one(ctx, RunType.TASK, task_run_id, **change)

    async def set_flow_run_state(
        flow_run_id: Annotated[str, Field(description="UUID of the Prefect flow run.")],
        state: StateArg,
        ctx: Ctx,
        name: NameArg = None,
        message: MessageArg = None,
        force: ForceArg = False,
        idempotency_key: IdempotencyArg = None,
        scheduled_time: ScheduledTimeArg = None,
        pause_timeout: PauseTimeoutArg = None,
        pause_expiration_time: PauseExpirationArg = None,
        pause_reschedule: PauseRescheduleArg = None,
        pause_key: PauseKeyArg = None,
    ) -> JobTicket:
        change = {name: value for name, value in locals().items() if name in CHANGE_ARGS}
        return await submit_one(ctx, RunType.FLOW, flow_run_id, **change)

    set_task_run_state.__doc__ = _state_change_doc("task")
    set_flow_run_state.__doc__ = _state_change_doc("flow")

    async def submit_state_changes(
        changes: Annotated[
            list[ChangeIn],
            Field(
                min_length=1,
                max_length=settings.max_batch_size,
                description=f"1 to {settings.max_batch_size} changes, applied per run in "
                "this order.",
            ),
        ],
        ctx: Ctx,
    ) -> TicketList:
        """Queue many state changes at once: all validated first, all queued or none."""
        client = allowed(Right.SUBMIT, "submit_state_changes")
        parsed = [
            _parse(
                f"changes[{index}].",
                max_message_chars=settings.max_message_chars,
                **item.model_dump(),
            )
            for index, item in enumerate(changes)
        ]
        tickets = await _guard(
            ctx.request_context.lifespan_context.submit(parsed, client),
            submit=True,
            batch=True,
        )
        return TicketList(jobs=tickets)

    async def get_job(
        job_id: JobIdArg,
        ctx: Ctx,
        wait_s: Annotated[
            float,
            Field(
                ge=0,
                description=f"Wait up to this long (capped at {settings.max_wait_s:g} s) "
                "for the job to finish.",
            ),
        ] = 0,
    ) -> JobStatus:
        """A job's status and, once finished, Prefect's answer.

        While waiting, a caller that sent a progress token gets a progress
        notification each time the job's status changes.
        """
        service = ctx.request_context.lifespan_context
        client = allowed(Right.READ, "get_job")
        _check_job_id(job_id, "job_id")
        if wait_s > 0:
            on_change = _progress_reporter(ctx) if _wants_progress(ctx) else None
            return await _guard(service.wait(job_id, wait_s, client, on_change))
        return await _guard(service.get(job_id, client))

    async def get_jobs(
        job_ids: Annotated[
            list[str], Field(min_length=1, max_length=MAX_JOB_IDS, description="Job ids.")
        ],
        ctx: Ctx,
    ) -> JobList:
        """Statuses of many jobs at once, in the order asked."""
        client = allowed(Right.READ, "get_jobs")
        for index, job_id in enumerate(job_ids):
            _check_job_id(job_id, f"job_ids[{index}]")
        return JobList(
            jobs=await _guard(ctx.request_context.lifespan_context.get_many(job_ids, client))
        )

    async def list_jobs(
        ctx: Ctx,
        status: Annotated[
            list[str] | None,
            Field(description="Only jobs in these statuses, e.g. ['failed', 'rejected']."),
        ] = None,
        run_id: Annotated[str | None, Field(description="Only changes to this run.")] = None,
        since: Annotated[
            str | None,
            Field(description="Only jobs queued since: 90s, 15m, 2h, 1d, or an ISO 8601 time."),
        ] = None,
        limit: Annotated[int, Field(description=f"At most this many (1 to {MAX_LIST}).")] = 50,
    ) -> JobList:
        """Your newest jobs, newest first, filtered; failures come with Prefect's reasons."""
        client = allowed(Right.READ, "list_jobs")
        try:
            query = JobQuery.parse(
                statuses=status or (),
                run_id=run_id,
                client_id=client,
                since=since,
                limit=limit,
            )
        except InvalidChange as exc:
            raise ToolError(f"invalid {exc.field}: {exc.rule}") from exc
        records = await _guard(ctx.request_context.lifespan_context.find(query))
        return JobList(jobs=[JobStatus.of(record) for record in records])

    async def cancel_job(job_id: JobIdArg, ctx: Ctx) -> JobStatus:
        """Cancel a job that has not started (queued or waiting); it will never be applied."""
        client = allowed(Right.CANCEL, "cancel_job")
        _check_job_id(job_id, "job_id")
        return await _guard(ctx.request_context.lifespan_context.cancel(job_id, client))

    queued = "nothing was queued"
    tools = [
        strict_tool(set_task_run_state, annotations=_SUBMIT, outcome=queued),
        strict_tool(set_flow_run_state, annotations=_SUBMIT, outcome=queued),
        strict_tool(submit_state_changes, annotations=_SUBMIT, outcome=queued),
        strict_tool(get_job, annotations=_READ),
        strict_tool(get_jobs, annotations=_READ),
        strict_tool(list_jobs, annotations=_READ),
        strict_tool(cancel_job, annotations=_CANCEL, outcome="nothing was cancelled"),
    ]
    if settings.bench_noop_tool:

        async def noop() -> JobList:
            """Does nothing: the MCP transport's own cost, for bench/b1_caller_latency.py."""
            allowed(Right.READ, "noop")
            return JobList(jobs=[])

        tools.append(strict_tool(noop, annotations=_READ))

    tasks = TasksExtension.from_settings(settings, token_required=token_required)
    mcp = MCPServer(
        "prefect-mcp-queue",
        version=importlib.metadata.version("prefect-mcp-queue"),
        instructions=(
            "Queue state changes for Prefect task runs and flow runs. State-change tools answer "
            "at once with a job id; poll get_job (wait_s long-polls) for Prefect's answer."
        ),
        lifespan=lifespan,
        tools=tools,
        extensions=[tasks],
        # subscriptions/listen is a core method, which an extension cannot bind:
        # this middleware serves the listens that ask for task ids.
        middleware=[
            AdvertiseWhatExists(),
            TaskListens(tasks, max_listen_s=settings.max_wait_s),
        ],
        **_auth_options(auth, public_url),
    )

    return mcp


def _state_change_doc(kind: str) -> str:
    """The state-change tools' description: what an agent can ask for, one line each."""
    return f"""Queue a state change for a Prefect {kind} run; answers at once with a job ticket.

Besides a plain state type (state=RUNNING, COMPLETED, ...):
- retry later: state=SCHEDULED, name=AwaitingRetry, scheduled_time=10m
- reschedule: state=SCHEDULED, scheduled_time=2026-12-24T09:00:00Z (flow runs need a deployment)
- mark late: state=SCHEDULED, name=Late
- pause until: state=PAUSED, pause_expiration_time=2026-12-03T14:00:00Z (or pause_timeout=600)
- suspend: state=PAUSED, name=Suspended (releases infrastructure; flow runs with a deployment)
- cancel properly: state=CANCELLING, name=Cancelling (the run's worker tears down)
Unknown arguments are refused."""


def _wants_progress(ctx: Ctx) -> bool:
    meta = ctx.request_context.meta
    return meta is not None and meta.get("progress_token") is not None


def _progress_reporter(ctx: Ctx) -> Callable[[JobRecord], Awaitable[None]]:
    """Send each status the job is seen in as a progress notification, with its story."""
    sent = 0

    async def report(record: JobRecord) -> None:
        nonlocal sent
        service = ctx.request_context.lifespan_context
        progress = None
        if record.status in PENDING_STATUSES:
            progress = await service.store.progress(record.job_id)
        sent += 1
        await ctx.report_progress(sent, None, describe(record, progress, utcnow()))

    return report


def _auth_options(auth: Auth | None, public_url: str | None) -> dict[str, Any]:
    if auth is None or not auth.enabled:
        return {}
    url = (public_url or "http://127.0.0.1").rstrip("/")
    if auth.jwt_rules is None:
        # Static tokens are issued out of band: there is no authorization server to
        # send OAuth clients to, so no protected-resource metadata names one (it would
        # answer 404) and a 401 carries a plain `WWW-Authenticate: Bearer`. The SDK
        # still wants an issuer URL; nothing advertises it.
        settings = AuthSettings(
            issuer_url=url, resource_server_url=None, validate_token_resource=False
        )
    else:
        # RFC 9728 metadata at /.well-known/oauth-protected-resource/mcp names the
        # identity provider, and a 401 points OAuth-aware clients at it. The
        # verifier checks each token's audience itself.
        # Strings, not AnyHttpUrl(...): AuthSettings keeps an issuer's empty path
        # as it is, and RFC 8414 compares issuers character for character.
        settings = AuthSettings(
            issuer_url=auth.jwt_rules.issuer,
            resource_server_url=f"{url}/mcp",
            validate_token_resource=False,
        )
    return {"token_verifier": auth.verifier(), "auth": settings}


def _allowed(right: Right, tool: str, *, token_required: bool) -> str:
    """The caller's client id, or a tool error naming its role and the missing right."""
    try:
        return require(right, tool, token_required=token_required)
    except Forbidden as exc:
        outcome = {Right.SUBMIT: "; nothing was queued", Right.CANCEL: "; nothing was cancelled"}
        raise ToolError(f"{exc}{outcome.get(right, '')}") from None


def _parse(where: str, **kwargs: Any) -> StateChange:
    """Validate one change; `where` prefixes the field name (e.g. "changes[3].")."""
    try:
        return StateChange.parse(**kwargs)
    except InvalidChange as exc:
        raise ToolError(f"invalid {where}{exc.field}: {exc.rule}; nothing was queued") from exc


def _check_job_id(job_id: str, field: str) -> None:
    if not _JOB_ID_RE.match(job_id):
        raise ToolError(
            f"invalid {field}: must be a job id (32 lowercase hex characters), got {job_id!r:.50}"
        )


async def _guard(call: Awaitable[T], *, submit: bool = False, batch: bool = False) -> T:
    """Translate domain errors into tool errors an agent can act on.

    `submit`: the call writes changes, so a Redis failure after the write was sent
    leaves them maybe stored; the caller is told, and how to resend safely.
    """
    try:
        return await call
    except NotDurable as exc:
        if not exc.written:
            raise ToolError(f"job store misconfigured: {exc.reason}; nothing was queued") from None
        log.warning("change not confirmed at the durability level: %s", exc.reason)
        raise ToolError(
            f"the {'changes' if batch else 'change'} may or may not be stored: {exc.reason}. "
            + _RESEND
        ) from None
    except QueueFull:
        raise ToolError(
            "queue full: too many changes are waiting; nothing was queued, retry later"
        ) from None
    except QuotaExceeded as exc:
        raise ToolError(f"quota exceeded: {exc}; nothing was queued") from None
    except IdempotencyConflict as exc:
        field = f"changes[{exc.index}].idempotency_key" if batch else "idempotency_key"
        raise ToolError(f"invalid {field}: {exc.detail}; nothing was queued") from None
    except JobNotFound as exc:
        raise ToolError(
            f"unknown job_id {exc.job_id}: no such job, or its record expired"
        ) from None
    except NotCancellable as exc:
        raise ToolError(
            f"job {exc.status.job_id} cannot be cancelled: it is "
            f"{exc.status.status.value}; only queued or waiting jobs can be"
        ) from None
    except RedisError as exc:
        log.warning("job store unavailable: %s", exc)
        if submit:
            raise ToolError(
                f"job store (Redis) unavailable ({type(exc).__name__}): the "
                f"{'changes' if batch else 'change'} may or may not be stored. " + _RESEND
            ) from exc
        raise ToolError("job store (Redis) unavailable: retry later") from exc


_RESEND = (
    "Resending it with the same idempotency_key is safe: it is queued and applied at most "
    "once (without one, a resend may queue it twice)."
)
