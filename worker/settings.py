"""The one settings object, read from `PMQ_*` environment variables at the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.durability import Durability, DurableWrites


class Settings(BaseSettings):
    """Configuration shared by the frontend and the workers.

    Prefect's own variables (`PREFECT_API_URL`, `PREFECT_API_KEY`,
    `PREFECT_API_AUTH_STRING`) configure the Prefect target and are read by
    Prefect's client, not here.
    """

    # Empty means unset: compose files pass `VAR=` for options left alone.
    model_config = SettingsConfigDict(env_prefix="PMQ_", extra="ignore", env_ignore_empty=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding jobs and queue.")
    redis_sentinels: str = Field(
        "", description="Redis Sentinel addresses, `host:port` comma-separated; unset = none."
    )
    redis_sentinel_master: str = Field(
        "mymaster", description="The master's name the sentinels know."
    )
    redis_timeout_s: float = Field(
        5.0, gt=0, description="Redis connect/read timeout: tool calls fail rather than hang."
    )
    durability: Durability = Field(
        Durability.MEMORY,
        description="When a change counts as stored (a ticket is returned, a worker may call "
        "Prefect): `memory` (Redis answered), `disk` (in Redis's fsynced append-only file), "
        "`replicas` (on PMQ_DURABILITY_REPLICAS replicas). See the README's table.",
    )
    durability_replicas: int = Field(
        1, ge=1, description="Replicas that must have a change at PMQ_DURABILITY=replicas."
    )
    durability_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Longest wait for the durability level; past it the caller is told the "
        "change may or may not be stored, and that resending it is safe.",
    )
    result_ttl_s: int = Field(86_400, gt=0, description="How long terminal job records are kept.")
    max_attempts: int = Field(
        8, ge=1, description="Prefect calls that may fail transiently before a job fails."
    )
    job_deadline_s: float = Field(
        3_600, gt=0, description="A job not terminal this long after enqueue fails."
    )
    max_queue_depth: int = Field(
        100_000, gt=0, description="Enqueue answers 'queue full' at this many jobs in the queue."
    )
    recent_jobs: int = Field(
        10_000,
        ge=0,
        description="Newest jobs (and newest failures) that `list_jobs`, `pmq jobs list` and "
        "the dashboard can see; 0 = keep no index.",
    )
    client_max_pending: int | None = Field(
        None, ge=1, description="Most unfinished jobs one client may have; unset = no limit."
    )
    client_max_rps: float | None = Field(
        None, gt=0, description="Changes per second one client may enqueue; unset = no limit."
    )
    client_burst: int = Field(
        1_000, ge=1, description="Changes a client may enqueue at once above its rate."
    )
    max_batch_size: int = Field(
        1_000, ge=1, description="Most changes one `submit_state_changes` call may carry."
    )
    worker_concurrency: int = Field(
        16, ge=1, description="Jobs one worker process runs at once (and most Prefect calls)."
    )
    prefect_adaptive: bool = Field(
        True,
        description="Adapt each worker's Prefect calls in flight to Prefect's latency (AIMD, "
        "up to PMQ_WORKER_CONCURRENCY); false = always PMQ_WORKER_CONCURRENCY.",
    )
    prefect_latency_tolerance: float = Field(
        2.0,
        gt=1,
        description="Calls this many times slower than with no load (90th percentile of a "
        "round of calls, against the fastest recent round) mean Prefect is queueing: "
        "fewer in flight.",
    )
    prefect_latency_floor_s: float = Field(
        0.025,
        ge=0,
        description="A round of calls whose 90th percentile is faster than this is never slow.",
    )
    worker_poll_delay_s: float = Field(
        0.5,
        gt=0,
        description="The longest an idle worker waits before looking at the queue again: "
        "an enqueue wakes it at once, and a job due later (a retry) when it is due.",
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="How often a worker records that it is alive (for /readyz)."
    )
    worker_metrics_port: int | None = Field(
        None, ge=0, le=65_535, description="Serve this worker's Prometheus metrics on this port."
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address the worker's metrics endpoint binds."
    )
    gate_recheck_s: float = Field(
        5.0,
        gt=0,
        description="How often a change parked behind an earlier one re-checks it "
        "(it is normally woken the moment the earlier one finishes).",
    )
    prefect_max_rps: float | None = Field(
        None, gt=0, description="Prefect calls per second shared by all workers; unset = no limit."
    )
    backoff_base_s: float = Field(0.5, gt=0, description="First transient-retry backoff ceiling.")
    backoff_max_s: float = Field(60.0, gt=0, description="Largest transient-retry backoff.")
    prefect_timeout_s: float = Field(10.0, gt=0, description="Timeout of one Prefect API call.")
    settle_s: float = Field(
        10.0,
        ge=0,
        description="After a call whose fate is unknown (timeout, dropped connection, killed "
        "worker), how long past its timeout to wait before reading the run's history.",
    )
    sweep_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often one worker of the fleet requeues jobs that lost their queue "
        "entry and re-reads the histories due for a duplicate check.",
    )
    worker_lease_s: float = Field(
        10.0,
        ge=3,
        description="A killed worker's jobs run again this long after it died "
        "(a live worker renews its lease every third of it).",
    )
    max_message_chars: int = Field(4_000, ge=1, description="Longest accepted state `message`.")
    max_wait_s: float = Field(
        30.0,
        ge=0,
        description="Cap on `get_job(wait_s=...)` and on a `subscriptions/listen` for tasks.",
    )
    http_host: str = Field("127.0.0.1", description="Address `pmq serve --transport http` binds.")
    http_port: int = Field(8000, ge=0, le=65_535, description="Port of the HTTP frontend.")
    bench_noop_tool: bool = Field(
        False, description="Also serve a `noop` tool: the baseline of bench/b1_caller_latency.py."
    )
    http_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Frontend processes sharing the HTTP port (the tools are stateless).",
    )
    auth_tokens: str = Field(
        "",
        description="HTTP bearer tokens, `token:client_id[:role]` comma-separated (tokens of "
        "16+ characters, or digests from `pmq token new`; role agent, reader or operator, "
        "default agent). Never logged.",
    )
    auth_tokens_file: Path | None = Field(
        None,
        description="A file of `token:client_id[:role]` lines, e.g. a Docker secret.",
    )
    jwt_jwks_url: str | None = Field(
        None,
        description="Accept identity-provider JWTs signed by a key of this JWKS; unset = none. "
        "Needs PMQ_JWT_ISSUER and PMQ_JWT_AUDIENCE.",
    )
    jwt_issuer: str | None = Field(None, description="The `iss` every JWT must carry.")
    jwt_audience: str | None = Field(
        None, description="The `aud` every JWT must carry (usually PMQ_PUBLIC_URL + `/mcp`)."
    )
    jwt_client_claim: str = Field(
        "sub", description="The JWT claim that holds the caller's client id."
    )
    jwt_algorithms: str = Field(
        "RS256,ES256", description="Signature algorithms a JWT may use, comma-separated."
    )
    jwt_leeway_s: float = Field(
        30.0, ge=0, le=300, description="Clock skew allowed on a JWT's exp and nbf."
    )
    allow_open: bool = Field(
        False, description="Serve HTTP without tokens on a non-loopback address (not advised)."
    )
    allowed_hosts: str = Field(
        "",
        description="Host headers the HTTP frontend accepts (DNS-rebinding protection), "
        "comma-separated, `host:*` for any port; unset = loopback names only on a "
        "loopback bind, any on others.",
    )
    public_url: str | None = Field(
        None,
        description="The frontend's external URL: with JWTs, OAuth metadata names "
        "`<it>/mcp` as the protected resource; static tokens advertise none.",
    )
    run_as: str | None = Field(
        None,
        description="`uid[:gid]` a `pmq` started as root switches to once it has read its "
        "secrets (the image sets 10001:10001); ignored when not root.",
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="`json`: one JSON object per line; `text` for reading by eye."
    )
    log_level: str = Field("INFO", description="Lowest level logged.")
    prefect_api_key: SecretStr | None = Field(
        None,
        validation_alias="PREFECT_API_KEY",
        description="Prefect's own variable; read here only to keep it out of the logs.",
    )
    prefect_api_auth_string: SecretStr | None = Field(
        None,
        validation_alias="PREFECT_API_AUTH_STRING",
        description="Prefect's own variable; read here only to keep it out of the logs.",
    )
    prefect_api_url: str | None = Field(
        None,
        validation_alias="PREFECT_API_URL",
        description="Prefect's own variable; `pmq dev` starts a local server when unset.",
    )

    @model_validator(mode="after")
    def _jwt_rules_complete(self) -> Settings:
        if self.jwt_jwks_url and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError("PMQ_JWT_JWKS_URL needs PMQ_JWT_ISSUER and PMQ_JWT_AUDIENCE too")
        if not self.jwt_jwks_url and (self.jwt_issuer or self.jwt_audience):
            # Without keys no JWT is checked at all: say so rather than ignore the rest.
            raise ValueError("PMQ_JWT_ISSUER and PMQ_JWT_AUDIENCE need PMQ_JWT_JWKS_URL")
        return self

    @model_validator(mode="after")
    def _durability_wait_fits(self) -> Settings:
        if self.durability is not Durability.MEMORY and (
            self.durability_timeout_s >= self.redis_timeout_s
        ):
            # The wait's answer would come after the client gave up on the socket.
            raise ValueError(
                f"PMQ_DURABILITY_TIMEOUT_S ({self.durability_timeout_s:g}) must be less than "
                f"PMQ_REDIS_TIMEOUT_S ({self.redis_timeout_s:g})"
            )
        return self

    def durable_writes(self) -> DurableWrites:
        return DurableWrites(
            self.durability, replicas=self.durability_replicas, timeout_s=self.durability_timeout_s
        )

    def secrets(self) -> list[str]:
        """Values that must never reach a log line (tokens are added by the frontend)."""
        found = [
            s.get_secret_value() for s in (self.prefect_api_key, self.prefect_api_auth_string) if s
        ]
        password = urlsplit(self.redis_url).password
        if password:
            found.append(password)
        return found

    @property
    def job_timeout_s(self) -> float:
        """The hard limit on one run of a job: a history read plus one set_state call
        (each cut off 1 s after `prefect_timeout_s`), the wait for a call slot (half a
        call's timeout), a liveness probe (2 s) and the inline rate-limit waits.

        Crash recovery does not wait for it: a worker holds each job through a
        renewed `worker_lease_s` lease instead (see worker.dispatch).
        """
        return 2.5 * self.prefect_timeout_s + 5
