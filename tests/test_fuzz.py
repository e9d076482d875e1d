"""Property-based fuzzing of every tool (issue F6).

Hypothesis generates over 10,000 argument sets across the six tools: well-formed
calls, calls with one thing wrong (a near-miss UUID, an unknown state, a wrong
type, a missing or undeclared field, a too-long or non-text message, a bad key or
job id, an empty or oversized batch, a state name or detail that breaks its rule
or does not fit the state) and arbitrary JSON in any argument.

Every answer is checked against the documented rules and a model of the jobs
queued so far, not against the server's own code:

- a success must be a ticket (or job status) that matches the input exactly;
- a failure must be a tool error blaming a field that really breaks a rule (or
  an unknown job id), never the SDK's generic crash text, and must write nothing;
- afterwards the same session still serves a plain call, and every key in the
  test's Redis database belongs to a ticketed job and holds a valid record.

The SDK reports arguments that fail a tool's input schema as a tool error too
(pydantic's text, one line naming each field), never as a protocol error, so any
exception from a call fails the test. No worker runs, so every accepted job stays
queued where it can be inspected.
"""

import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from mcp import Client

from mcp_frontend.server import build_server
from tests.conftest import Stack
from worker.contract import (
    IDEMPOTENCY_KEY_PREFIX,
    INFLIGHT_KEY,
    JOB_KEY_PREFIX,
    QUEUE_KEY,
    RECENT_KEY,
    RUN_KEY_PREFIX,
    JobRecord,
    JobStatus,
    JobTicket,
)
from worker.fleet_stats import LIVE, STATS_KEY, FleetCounts

Args = dict[str, Any]
Loc = tuple[str | int, ...]  # where a field is, e.g. ("changes", 3, "run_id")

# Argument sets per tool: 10,024 in all. Few 1000-item ones: each costs ~1000 records.
EXAMPLES = {
    "set_task_run_state": 2_200,
    "set_flow_run_state": 1_800,
    "submit_state_changes": 2_400,
    "submit_state_changes (1000-item batches)": 12,
    "get_job": 1_400,
    "get_jobs": 1_100,
    "get_jobs (1000-id lists)": 12,
    "cancel_job": 1_100,
}

# The rules as the tool descriptions state them (written out here, not imported,
# so that a loose check in the server cannot also loosen the test).
STATES = frozenset(
    "SCHEDULED PENDING RUNNING COMPLETED FAILED CANCELLED CRASHED PAUSED CANCELLING".split()
)
KEY_RULE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Prefect's well-known state names and their types (README, "What an agent can ask for").
NAMED = {
    "Scheduled": "SCHEDULED",
    "Late": "SCHEDULED",
    "AwaitingRetry": "SCHEDULED",
    "AwaitingConcurrencySlot": "SCHEDULED",
    "Pending": "PENDING",
    "Submitting": "PENDING",
    "InfrastructurePending": "PENDING",
    "Running": "RUNNING",
    "Retrying": "RUNNING",
    "Completed": "COMPLETED",
    "Cached": "COMPLETED",
    "Failed": "FAILED",
    "TimedOut": "FAILED",
    "Cancelled": "CANCELLED",
    "Crashed": "CRASHED",
    "Paused": "PAUSED",
    "Suspended": "PAUSED",
    "Cancelling": "CANCELLING",
}
FOLDED_NAMES = {name.casefold(): name for name in NAMED}
RELATIVE_RULE = re.compile(r"[0-9]{1,9}[smhd]")
UNIT_S = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}
MAX_AHEAD = timedelta(days=3_660)
PAUSE_FIELDS = ("pause_timeout", "pause_expiration_time", "pause_reschedule", "pause_key")
DETAIL_FIELDS = ("name", "scheduled_time", *PAUSE_FIELDS)
CHANGE_FIELDS = frozenset({"state", "message", "force", "idempotency_key", *DETAIL_FIELDS})
JOB_ID_RULE = re.compile(r"[0-9a-f]{32}")
# The textual forms of a UUID: hyphenated or 32 hex digits, optionally in braces or a URN.
UUID_RULE = re.compile(
    r"(?:urn:uuid:)?(\{)?(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12}|[0-9a-fA-F]{32})(?(1)\})"
)


def canonical_run_id(value: Any) -> str | None:
    """The run id the server must store for `value`, or None if it is no UUID."""
    if isinstance(value, str) and UUID_RULE.fullmatch(value):
        return str(uuid.UUID(value))
    return None


def canonical_state(value: Any) -> str | None:
    """States are case-insensitive and may carry surrounding blanks."""
    if isinstance(value, str) and value.strip().upper() in STATES:
        return value.strip().upper()
    return None


def is_text(value: str) -> bool:
    """True unless `value` holds lone surrogates, which no UTF-8 store can keep."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def change_faults(
    change: Args, id_field: str, at: Loc, *, batch: bool, max_message: int
) -> set[Loc]:
    """The fields of one change that break a rule; absent optional fields are fine.

    Only batch items carry `run_type`; any name a change does not declare is refused.
    """
    wrong = []
    known = CHANGE_FIELDS | {id_field} | ({"run_type"} if batch else set())
    wrong += [name for name in change if name not in known]
    if batch and change.get("run_type") not in ("task", "flow"):
        wrong.append("run_type")
    if canonical_run_id(change.get(id_field)) is None:
        wrong.append(id_field)
    if canonical_state(change.get("state")) is None:
        wrong.append("state")
    message = change.get("message")
    if message is not None and not (
        isinstance(message, str) and len(message) <= max_message and is_text(message)
    ):
        wrong.append("message")
    if not isinstance(change.get("force", False), bool):
        wrong.append("force")
    key = change.get("idempotency_key")
    if key is not None and not (isinstance(key, str) and KEY_RULE.fullmatch(key)):
        wrong.append("idempotency_key")
    wrong += detail_faults(change, canonical_state(change.get("state")))
    # As the error text will spell them: pydantic joins a location with dots, so an
    # undeclared name like "0" or "a.b" reads back as the blame parser reads it.
    return {loc_of(".".join(str(part) for part in (*at, name))) for name in wrong}


def detail_faults(change: Args, state: str | None) -> list[str]:
    """The state-detail fields at fault. A rule that pairs a field with the state is
    only judged when the state itself is valid (the server stops at a bad state)."""
    now = datetime.now(UTC)
    wrong = []
    name = change.get("name")
    if name is not None:
        folded = FOLDED_NAMES.get(name.strip().casefold()) if isinstance(name, str) else None
        if not (isinstance(name, str) and name.strip() and len(name) <= 64) or any(
            ord(c) < 0x20 or ord(c) == 0x7F for c in name
        ):
            wrong.append("name")
        elif state is not None and folded is not None and NAMED[folded] != state:
            wrong.append("name")
    scheduled = change.get("scheduled_time")
    if scheduled is not None:
        when = when_of(scheduled, now)
        if when is None or (state is not None and state != "SCHEDULED"):
            wrong.append("scheduled_time")
    pause = {field: change.get(field) for field in PAUSE_FIELDS}
    if state is not None and state != "PAUSED":
        wrong += [field for field, value in pause.items() if value is not None]
    timeout, expiry = pause["pause_timeout"], pause["pause_expiration_time"]
    if timeout is not None and not (
        isinstance(timeout, int | float)
        and not isinstance(timeout, bool)
        and 0 < timeout <= MAX_AHEAD.total_seconds()
    ):
        wrong.append("pause_timeout")
    if timeout is not None and expiry is not None:
        wrong.append("pause_timeout")
    if expiry is not None and ((when := when_of(expiry, now)) is None or when <= now):
        wrong.append("pause_expiration_time")
    reschedule = pause["pause_reschedule"]
    if reschedule is not None and not isinstance(reschedule, bool):
        wrong.append("pause_reschedule")
    suspended = isinstance(name, str) and FOLDED_NAMES.get(name.strip().casefold()) == "Suspended"
    if reschedule is False and suspended:
        wrong.append("pause_reschedule")
    key = pause["pause_key"]
    if key is not None and not (isinstance(key, str) and 1 <= len(key) <= 64):
        wrong.append("pause_key")
    return wrong


def when_of(value: Any, now: datetime) -> datetime | None:
    """The UTC time a documented time value means, or None if it breaks the rule."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if RELATIVE_RULE.fullmatch(text):
        when = now + timedelta(seconds=int(text[:-1]) * UNIT_S[text[-1]])
    else:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            return None
        if when.tzinfo is None:
            return None
    return when.astimezone(UTC) if when - now <= MAX_AHEAD else None


def identity(change: Args) -> tuple[Any, ...]:
    """What a repeated idempotency key must match to count as the same change.

    Times count as asked: a relative one as written, an absolute one as its instant.
    """
    name = change.get("name")
    canonical = FOLDED_NAMES.get(name.strip().casefold(), name) if name is not None else None
    return (
        change["run_type"],
        canonical_run_id(change["run_id"]),
        canonical_state(change["state"]),
        change.get("message"),
        change.get("force", False),
        canonical,
        asked(change.get("scheduled_time")),
        asked(change.get("pause_timeout") or change.get("pause_expiration_time")),
        bool(change.get("pause_reschedule")) or canonical == "Suspended",
        change.get("pause_key"),
    )


def asked(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        return ("in", float(value))  # seconds: the tool's number type makes 60 and 60.0 one
    if RELATIVE_RULE.fullmatch(value.strip()):
        return ("in", value)
    return ("at", datetime.fromisoformat(value.strip()).astimezone(UTC))


def loc_of(text: str) -> Loc:
    """`changes[3].run_id` (the server's spelling) or `changes.3.run_id` (pydantic's)."""
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", text)]
    if text.endswith("."):
        parts.append("")  # an undeclared empty name: pydantic prints `changes.0.`
    return tuple(parts)


def blame(tool: str, text: str) -> tuple[str, set[Loc]]:
    """Read a tool error: ("invalid" or "schema", fields named) or ("unknown", {(job_id,)}).

    The SDK prefixes every tool error with "Error executing tool <name>: ", and
    answers an unexpected exception with that prefix alone and no reason.
    """
    reason = text.removeprefix(f"Error executing tool {tool}: ")
    assert reason != text, f"{tool} crashed (the SDK's generic answer) or gave no reason: {text!r}"
    if match := re.match(r"invalid ([\w.\[\]]+): \S", reason):
        return "invalid", {loc_of(match[1])}
    if match := re.match(r"\d+ validation errors? for \w+\n", reason):
        # pydantic: one unindented line per error with its location, details indented.
        # split("\n"), not splitlines(): a name may hold \x1e and such, which it splits at.
        lines = reason[match.end() :].split("\n")
        return "schema", {loc_of(line) for line in lines if line and not line[0].isspace()}
    if match := re.fullmatch(
        r"unknown job_id ([0-9a-f]{32}): no such job, or its record expired", reason
    ):
        return "unknown", {(match[1],)}
    raise AssertionError(f"{tool}: unclear error {text!r}")


def undeclared(args: Args, declared: set[str]) -> set[Loc]:
    """Arguments a tool does not declare: every tool refuses them."""
    return {(name,) for name in args if name not in declared}


def wait_faults(args: Args) -> tuple[set[Loc], set[Loc]]:
    """(faults, maybe) for get_job's `wait_s`. The SDK parses numbers leniently (True,
    "1.5") and a float cannot hold 10**400: those may pass, or fail blaming `wait_s`."""
    if "wait_s" not in args:
        return set(), set()
    value = args["wait_s"]
    if isinstance(value, bool | str):
        return set(), {("wait_s",)}
    if isinstance(value, int | float):
        if value < 0:
            return {("wait_s",)}, set()
        return (set(), set()) if value < 1e300 else (set(), {("wait_s",)})
    return {("wait_s",)}, set()


@dataclass
class Job:
    """What the model knows a ticketed job must hold."""

    run_type: str
    run_id: str
    state: str
    identity: tuple[Any, ...]
    status: str = "queued"


@dataclass
class Fuzzer:
    """Calls tools on one client session and checks each answer against the model."""

    portal: BlockingPortal
    client: Client
    stack: Stack
    jobs: dict[str, Job] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    calls: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tool, kind)
    largest_batch: int = 0  # most changes accepted in one call

    def call(self, tool: str, args: Args) -> tuple[dict[str, Any] | None, str]:
        """(structured result, "") on success, (None, error text) on a tool error.

        A rejected call must not have written anything: the database's key count
        is compared around it (no worker runs, so nothing else writes).
        """
        before = self.stack.redis.dbsize()
        result = self.portal.call(self.client.call_tool, tool, args)
        self.calls[tool] += 1
        if not result.is_error:
            assert result.structured_content is not None
            self.outcomes[tool, "ok"] += 1
            return dict(result.structured_content), ""
        text = " ".join(getattr(c, "text", "") for c in result.content)
        self.outcomes[tool, blame(tool, text)[0]] += 1
        assert self.stack.redis.dbsize() == before, f"{tool} failed but wrote keys: {text}"
        return None, text

    def expect_blame(self, tool: str, args: Args, text: str, culprits: set[Loc]) -> None:
        kind, named = blame(tool, text)
        assert kind != "unknown" and named, f"{tool}({args!r:.300}): {text}"
        assert named <= culprits, f"{tool}({args!r:.300}) blames {named}, not {culprits}: {text}"

    # State changes.

    def set_run_state(self, run_type: str, args: Args) -> None:
        id_field = f"{run_type}_run_id"
        faults = change_faults(args, id_field, (), batch=False, max_message=self.max_message)
        change = {**args, "run_type": run_type, "run_id": args.get(id_field)}
        self.submit(f"set_{run_type}_run_state", args, faults, [((), change)])

    def submit_batch(self, args: Args) -> None:
        changes = args.get("changes")
        faults = undeclared(args, {"changes"})
        items: list[tuple[Loc, Args]] = []
        if not isinstance(changes, list):
            faults.add(("changes",))
        else:
            if not 1 <= len(changes) <= self.stack.settings.max_batch_size:
                faults.add(("changes",))
            for index, change in enumerate(changes):
                at: Loc = ("changes", index)
                if not isinstance(change, dict):
                    faults.add(at)
                    continue
                faults |= change_faults(
                    change, "run_id", at, batch=True, max_message=self.max_message
                )
                items.append((at, change))
        self.submit("submit_state_changes", args, faults, items)

    def submit(
        self, tool: str, args: Args, faults: set[Loc], items: list[tuple[Loc, Args]]
    ) -> None:
        conflict = None if faults else self.conflict(items)
        found, text = self.call(tool, args)
        if found is None:
            culprits = faults | ({conflict} if conflict else set())
            assert culprits, f"{tool}({args!r:.300}) refused valid input: {text}"
            self.expect_blame(tool, args, text, culprits)
            return
        assert not faults, f"{tool}({args!r:.300}) accepted input breaking {faults}"
        assert conflict is None, f"{tool}({args!r:.300}) ignored a key conflict at {conflict}"
        tickets = found["jobs"] if tool == "submit_state_changes" else [found]
        self.check_tickets(items, tickets)
        self.largest_batch = max(self.largest_batch, len(items))

    def conflict(self, items: list[tuple[Loc, Args]]) -> Loc | None:
        """The idempotency key the server must refuse: first a repeat within the
        batch for a different change, then one already used for a different change."""
        first: dict[str, tuple[Any, ...]] = {}
        for at, change in items:
            key = change.get("idempotency_key")
            if key is not None and first.setdefault(key, identity(change)) != identity(change):
                return (*at, "idempotency_key")
        for at, change in items:
            key = change.get("idempotency_key")
            if key in self.keys and self.jobs[self.keys[key]].identity != identity(change):
                return (*at, "idempotency_key")
        return None

    def check_tickets(self, items: list[tuple[Loc, Args]], tickets: list[Any]) -> None:
        assert len(tickets) == len(items)
        new_keys: dict[str, str] = {}
        for (_, change), ticket in zip(items, tickets, strict=True):
            JobTicket.model_validate(ticket)
            job_id = ticket["job_id"]
            key = change.get("idempotency_key")
            earlier = self.keys.get(key, new_keys.get(key)) if key is not None else None
            if earlier is not None:
                assert ticket["deduplicated"] and job_id == earlier, (change, ticket)
            else:
                assert not ticket["deduplicated"], (change, ticket)
                assert JOB_ID_RULE.fullmatch(job_id) and job_id not in self.jobs, ticket
                self.jobs[job_id] = Job(
                    change["run_type"],
                    cast(str, canonical_run_id(change["run_id"])),
                    cast(str, canonical_state(change["state"])),
                    identity(change),
                )
                if key is not None:
                    new_keys[key] = job_id
            job = self.jobs[job_id]
            got = (ticket["run_type"], ticket["run_id"], ticket["state"], ticket["status"])
            assert got == (job.run_type, job.run_id, job.state, job.status), (change, ticket)
            assert job.identity == identity(change), (change, ticket)
        self.keys |= new_keys

    # Reading and cancelling jobs.

    def get_job(self, args: Args) -> None:
        faults, maybe = wait_faults(args)
        faults |= self.job_id_faults(args) | undeclared(args, {"job_id", "wait_s"})
        self.read("get_job", args, faults, maybe)

    def cancel_job(self, args: Args) -> None:
        faults = self.job_id_faults(args) | undeclared(args, {"job_id"})
        self.read("cancel_job", args, faults, set())

    def get_jobs(self, args: Args) -> None:
        ids = args.get("job_ids")
        faults: set[Loc] = undeclared(args, {"job_ids"})
        if not isinstance(ids, list):
            faults.add(("job_ids",))
        else:
            if not 1 <= len(ids) <= 1_000:
                faults.add(("job_ids",))
            for index, job_id in enumerate(ids):
                if not (isinstance(job_id, str) and JOB_ID_RULE.fullmatch(job_id)):
                    faults.add(("job_ids", index))
        self.read("get_jobs", args, faults, set())

    @staticmethod
    def job_id_faults(args: Args) -> set[Loc]:
        job_id = args.get("job_id")
        ok = isinstance(job_id, str) and JOB_ID_RULE.fullmatch(job_id)
        return set() if ok else {("job_id",)}

    def read(self, tool: str, args: Args, faults: set[Loc], maybe: set[Loc]) -> None:
        found, text = self.call(tool, args)
        # Without faults, the ids are well-formed strings.
        ids: list[str] = []
        if not faults:
            ids = args["job_ids"] if tool == "get_jobs" else [args["job_id"]]
        if found is None:
            kind, named = blame(tool, text)
            if kind == "unknown":
                # Only well-formed ids are looked up, and the first unknown one is reported.
                unknown = [job_id for job_id in ids if job_id not in self.jobs]
                assert not faults and unknown and named == {(unknown[0],)}, (args, text)
            else:
                culprits = faults | maybe
                assert named and named <= culprits, f"{tool}({args!r:.300}) blames {named}: {text}"
            return
        assert not faults, f"{tool}({args!r:.300}) accepted input breaking {faults}"
        statuses = found["jobs"] if tool == "get_jobs" else [found]
        assert len(statuses) == len(ids)
        for job_id, status in zip(ids, statuses, strict=True):
            JobStatus.model_validate(status)
            job = self.jobs[job_id]
            if tool == "cancel_job":
                job.status = "cancelled"  # queued jobs always can be; cancelled ones stay so
            got = (status["job_id"], status["run_type"], status["run_id"], status["state"])
            assert got == (job_id, job.run_type, job.run_id, job.state), status
            assert status["status"] == job.status, status

    @property
    def max_message(self) -> int:
        return self.stack.settings.max_message_chars


# Strategies. Hypothesis picks among sampled_from/one_of branches roughly evenly, so a
# value listed twice comes up about twice as often.

SHAPES = ["well-formed", "one thing wrong", "arbitrary"]
# Unknown names, and names of other tools' arguments: the reference judges whatever
# ends up in the arguments, so a collision with a real name is fine.
EXTRA_NAMES = ["extra", "run_type", "task_run_id", "flow_run_id", "job_id", "Message", "_meta"]
RUN_POOL = [str(uuid.UUID(int=n, version=4)) for n in range(1, 7)]  # shared runs get chained

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**100, -(10**400)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
# Any text but what pydantic or the blame parser give a meaning in a location: a
# newline ends the line, and `.`, `[`, `]` and backquotes are separators or quoting.
junk_keys = st.text(
    st.characters(exclude_characters="\n.[]`", exclude_categories=["Cs"]), max_size=6
)
junk = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(junk_keys, inner, max_size=3),
    max_leaves=6,
)
wrong_types = st.sampled_from([None, 0, 1, 7, 1.5, True, "", [], {}, {"a": 1}, ["x"]])

UUID_FORMS: list[Callable[[uuid.UUID], str]] = [
    str,
    lambda u: str(u).upper(),
    lambda u: u.hex,
    lambda u: "{" + str(u) + "}",
    lambda u: u.urn,
]


def near_miss_uuids(u: uuid.UUID) -> list[str]:
    text, hex_ = str(u), u.hex
    return [
        "",
        "not-a-uuid",
        "1234",
        text + "0",
        text[:-1],
        text + "\n",
        " " + hex_[:-1],  # one digit short: must not be read as another UUID
        "+" + hex_[:-1],
        hex_[:16] + "_" + hex_[17:],
        "{" + text,
        text.replace("-", ""),  # valid: hex form
        text[:8] + "-" + text[9:],
        "urn:uuid:",
        text.replace(text[0], "g", 1),
        "\u0663" * 32,  # ARABIC-INDIC DIGIT THREE: a digit, but no hex digit
        "\uff11" * 32,  # FULLWIDTH DIGIT ONE
    ]


good_run_id = st.one_of(
    st.sampled_from(RUN_POOL),
    st.builds(lambda u, form: form(u), st.uuids(), st.sampled_from(UUID_FORMS)),
)
bad_run_id = st.one_of(
    st.uuids().flatmap(lambda u: st.sampled_from(near_miss_uuids(u))),
    st.text(max_size=40),
    wrong_types,
)

STATE_FORMS: list[Callable[[str], str]] = [str.upper, str.lower, str.title, lambda s: f" {s}\t"]
good_state = st.builds(
    lambda s, form: form(s), st.sampled_from(sorted(STATES)), st.sampled_from(STATE_FORMS)
)
bad_state = st.one_of(
    st.sampled_from(["DONE", "", " ", "RUN NING", "Retrying", "Late", "RUNNING!", "RUNNING\x00"]),
    st.text(max_size=20),
    wrong_types,
)

good_message = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.text(st.characters(min_codepoint=0x80), max_size=20),
    st.sampled_from([3_999, 4_000]).map(lambda n: "é" * n),
)
bad_message = st.one_of(
    st.sampled_from([4_001, 10_000]).map(lambda n: "m" * n),
    st.sampled_from(["\ud800", "ok \udfff", "\udbff"]),  # lone surrogates
    wrong_types.filter(lambda v: v is not None),
)

KEY_POOL = ["k1", "k2", "retry:7", "a.b_c-d", "x" * 128]  # reused: repeats and conflicts
good_key = st.one_of(
    st.none(),
    st.sampled_from(KEY_POOL),
    st.from_regex(r"[A-Za-z0-9._:\-]{1,128}", fullmatch=True),
)
bad_key = st.one_of(
    st.sampled_from(["", "a b", "k" * 129, "key\n", "ключ", "a/b", "*", "k\x00"]),
    wrong_types.filter(lambda v: v is not None),
)

CUSTOM_NAMES = ["WaitingForApproval", "step 2 of 3", "x" * 64, "Ünïcode"]
good_name = st.one_of(
    st.none(),
    st.sampled_from(CUSTOM_NAMES),
    st.sampled_from(sorted(NAMED)).flatmap(lambda n: st.sampled_from([n, n.lower(), f" {n}"])),
)
bad_name = st.one_of(
    st.sampled_from(["", "   ", "x" * 65, "a\nb", "nul\x00", "del\x7f"]),
    wrong_types.filter(lambda v: v is not None and v != ""),
)
# Fixed instants well inside the 10-year window (until 2036), and well past ones.
good_time = st.one_of(
    st.none(),
    st.sampled_from(["10m", "90s", "2h", "1d", " 5m ", "0s", "2030-06-01T09:00:00Z"]),
    st.sampled_from(["2030-06-01T09:00:00+02:00", "2031-01-01T00:00:00.123456-05:00"]),
)
bad_time = st.one_of(
    st.sampled_from(["tomorrow", "10w", "2026-12-24T09:00:00", "99999d", "1.5m", "\u0663m"]),
    st.sampled_from(["2099-01-01T00:00:00Z", "", "10 m", "m10"]),
    wrong_types.filter(lambda v: v is not None and v != ""),
)
good_pause_timeout = st.none() | st.integers(1, 10**6) | st.floats(0.001, 1e6)
bad_pause_timeout = st.sampled_from([0, -1, -0.5, True, "60", 1e12, [], {}])
good_pause_expiry = st.none() | st.sampled_from(["10m", "1h", "2030-06-01T09:00:00Z"])
bad_pause_expiry = st.sampled_from(["0s", "2020-01-01T00:00:00Z", "soon", "5", 5, True])
good_pause_key = st.none() | st.text(min_size=1, max_size=64)
bad_pause_key = st.sampled_from(["", "k" * 65, 7, [], {}, True])

GOOD: dict[str, st.SearchStrategy[Any]] = {
    "run_type": st.sampled_from(["task", "flow"]),
    "state": good_state,
    "message": good_message,
    "force": st.booleans(),
    "idempotency_key": good_key,
    "name": good_name,
    "scheduled_time": good_time,
    "pause_timeout": good_pause_timeout,
    "pause_expiration_time": good_pause_expiry,
    "pause_reschedule": st.none() | st.booleans(),
    "pause_key": good_pause_key,
}
BAD: dict[str, st.SearchStrategy[Any]] = {
    "run_type": st.sampled_from(["TASK", "Task", "job", "", " task"]) | wrong_types,
    "state": bad_state,
    "message": bad_message,
    "force": st.sampled_from([0, 1, "true", "false", None, [], {}]),
    "idempotency_key": bad_key,
    "name": bad_name,
    "scheduled_time": bad_time,
    "pause_timeout": bad_pause_timeout,
    "pause_expiration_time": bad_pause_expiry,
    "pause_reschedule": st.sampled_from([0, 1, "true", [], {}]),
    "pause_key": bad_pause_key,
}
OPTIONAL = ("message", "force", "idempotency_key", *DETAIL_FIELDS)


@st.composite
def details_for(draw: st.DrawFn, state: str) -> Args:
    """State details that fit `state` (as the operations in the README use them)."""
    kind = canonical_state(state)
    fitting = [n for n, t in NAMED.items() if t == kind] + CUSTOM_NAMES
    details: Args = {"name": draw(st.sampled_from(fitting))}
    if kind == "SCHEDULED":
        details["scheduled_time"] = draw(good_time)
    elif kind == "PAUSED":
        if draw(st.booleans()):
            details["pause_timeout"] = draw(good_pause_timeout)
        else:
            details["pause_expiration_time"] = draw(good_pause_expiry)
        details["pause_key"] = draw(good_pause_key)
        if details["name"] != "Suspended":
            details["pause_reschedule"] = draw(st.none() | st.booleans())
    return details


def mutated(
    draw: st.DrawFn,
    shape: str,
    args: Args,
    good: dict[str, st.SearchStrategy[Any]],
    bad: dict[str, st.SearchStrategy[Any]],
    *,
    nullable: bool,
    extras: bool,
) -> Args:
    """Well-formed `args` as they are, with one thing wrong, or arbitrary, per `shape`."""
    if shape == "one thing wrong":
        name = draw(st.sampled_from(sorted(good)))
        hows = ["bad value", "junk", "null", "missing", "extra field"]
        how = draw(st.sampled_from(hows if nullable else [h for h in hows if h != "null"]))
        if how == "bad value":
            args[name] = draw(bad[name])
        elif how == "junk":
            args[name] = draw(junk)
        elif how == "null":
            args[name] = None
        elif how == "missing":
            args.pop(name, None)
        else:
            args[draw(st.sampled_from(EXTRA_NAMES))] = draw(junk)
    elif shape == "arbitrary":
        # Each argument independently valid, invalid, arbitrary JSON, or absent.
        args = {}
        for name in good:
            choice = draw(st.sampled_from(["good", "bad", "junk", "absent"]))
            if choice != "absent":
                args[name] = draw(
                    junk if choice == "junk" else {"good": good, "bad": bad}[choice][name]
                )
        if extras:
            for name in draw(st.lists(st.sampled_from(EXTRA_NAMES), max_size=2)):
                args[name] = draw(junk)
    return args


@st.composite
def change_args(draw: st.DrawFn, id_field: str, *, batch: bool = False, shape: str = "") -> Args:
    """Arguments of a state-change tool, or one item of a batch (`batch`)."""
    good = {id_field: good_run_id, **GOOD}
    bad = {id_field: bad_run_id, **BAD}
    if not batch:
        del good["run_type"], bad["run_type"]
    required = [name for name in good if name not in OPTIONAL]
    args = {name: draw(good[name]) for name in required}
    plain = [name for name in OPTIONAL if name not in DETAIL_FIELDS]
    args |= {name: draw(good[name]) for name in plain if draw(st.booleans())}
    if not draw(st.integers(0, 2)):  # a third of changes carry state details
        args |= draw(details_for(args["state"]))
    shape = shape or draw(st.sampled_from(SHAPES))
    return mutated(draw, shape, args, good, bad, nullable=True, extras=True)


@st.composite
def batch_args(draw: st.DrawFn) -> Args:
    item = change_args("run_id", batch=True, shape="well-formed")
    changes: Any = draw(st.lists(item, min_size=1, max_size=6))
    args: Args = {}
    shape = draw(st.sampled_from(SHAPES))
    if shape == "one thing wrong":
        how = draw(st.sampled_from(["item", "junk item", "empty", "extra argument"]))
        index = draw(st.integers(0, len(changes) - 1))
        if how == "item":
            changes[index] = draw(change_args("run_id", batch=True, shape="one thing wrong"))
        elif how == "junk item":
            changes[index] = draw(junk)
        elif how == "empty":
            changes = []
        else:
            args[draw(st.sampled_from(EXTRA_NAMES))] = draw(junk)
    elif shape == "arbitrary":
        any_item = change_args("run_id", batch=True) | junk
        changes = draw(junk | st.lists(any_item, max_size=6) | st.none())
        if changes is None:
            return args  # no `changes` at all
    args["changes"] = changes
    return args


@st.composite
def big_batch_args(draw: st.DrawFn) -> Args:
    """Around the 1,000-change limit, tiled from a few changes so that generation
    stays cheap; mostly valid, so that full batches are really stored."""
    size = draw(st.sampled_from([1_000, 1_000, 999, 1_001]))
    pattern = draw(
        st.lists(change_args("run_id", batch=True, shape="well-formed"), min_size=1, max_size=3)
    )
    # Without keys, so that a key used earlier for another change cannot refuse the lot.
    pattern = [{k: v for k, v in change.items() if k != "idempotency_key"} for change in pattern]
    changes = [pattern[i % len(pattern)] for i in range(size)]
    if not draw(st.integers(0, 3)):
        changes[draw(st.integers(0, size - 1))] = draw(
            change_args("run_id", batch=True, shape="one thing wrong")
        )
    return {"changes": changes}


def job_id_values(known: list[str]) -> st.SearchStrategy[Any]:
    """Job ids that are not (or not quite) known ones: unknown, near misses, junk."""
    near_misses = st.sampled_from(known).flatmap(
        lambda k: st.sampled_from([k.upper(), k + "\n", k[:-1], k + "0", " " + k, "g" + k[1:]])
    )
    unknown = st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
    return st.one_of(
        unknown, near_misses, st.sampled_from(["", "nope"]), st.text(max_size=40), junk
    )


good_wait = st.one_of(st.floats(0, 1e6), st.integers(0, 10**6))
bad_wait: st.SearchStrategy[Any] = st.sampled_from(
    [-1, -0.001, None, "soon", "1.5", True, [], {}, 10**400, -(10**400)]
)


@st.composite
def single_job_args(draw: st.DrawFn, known: list[str], *, wait: bool) -> Args:
    """get_job (`wait`) or cancel_job arguments."""
    good: dict[str, st.SearchStrategy[Any]] = {"job_id": st.sampled_from(known)}
    bad: dict[str, st.SearchStrategy[Any]] = {"job_id": job_id_values(known)}
    if wait:
        good["wait_s"], bad["wait_s"] = good_wait, bad_wait
    args = {"job_id": draw(good["job_id"])}
    if wait and draw(st.booleans()):
        args["wait_s"] = draw(good_wait)
    shape = draw(st.sampled_from(SHAPES))
    return mutated(draw, shape, args, good, bad, nullable=False, extras=False)


@st.composite
def many_job_args(draw: st.DrawFn, known: list[str], *, huge: bool = False) -> Args:
    """get_jobs arguments; `huge`: around the 1,000-id limit, tiled."""
    ids: Any = draw(st.lists(st.sampled_from(known), min_size=1, max_size=5))
    if huge:
        ids = [ids[i % len(ids)] for i in range(draw(st.sampled_from([1_000, 999, 1_001])))]
    shape = draw(st.sampled_from(SHAPES))
    if shape == "one thing wrong":
        if draw(st.integers(0, 9)):
            ids[draw(st.integers(0, len(ids) - 1))] = draw(job_id_values(known))
        else:
            ids = []
    elif shape == "arbitrary" and not huge:
        ids = draw(junk | st.lists(st.sampled_from(known) | job_id_values(known), max_size=6))
    return {"job_ids": ids}


def fuzz(check: Callable[[Args], None], strategy: st.SearchStrategy[Args], examples: int) -> None:
    """Run `check` on `examples` generated argument sets, deterministically."""

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
    )
    @given(args=strategy)
    def run(args: Args) -> None:
        check(args)

    run()


@pytest.fixture
def hypothesis_home(tmp_path: Path) -> Iterator[None]:
    """Even without an example database Hypothesis caches Unicode tables and source
    constants on disk: keep them in the test's temporary directory, not the checkout."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    try:
        yield
    finally:
        set_hypothesis_home_dir(None)


@pytest.mark.usefixtures("hypothesis_home")
def test_fuzz_every_tool(stack: Stack) -> None:
    # No worker runs: a long poll would always wait its full time, so cap it at 0.
    server = build_server(stack.settings.model_copy(update={"max_wait_s": 0.0}))
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(Client(server)) as client,
    ):
        # The session lives in the portal's event loop thread; hypothesis drives it from here.
        fuzzer = Fuzzer(portal, client, stack)
        fuzz(
            lambda a: fuzzer.set_run_state("task", a),
            change_args("task_run_id"),
            EXAMPLES["set_task_run_state"],
        )
        fuzz(
            lambda a: fuzzer.set_run_state("flow", a),
            change_args("flow_run_id"),
            EXAMPLES["set_flow_run_state"],
        )
        fuzz(fuzzer.submit_batch, batch_args(), EXAMPLES["submit_state_changes"])
        fuzz(
            fuzzer.submit_batch,
            big_batch_args(),
            EXAMPLES["submit_state_changes (1000-item batches)"],
        )
        known = sorted(fuzzer.jobs)
        fuzz(fuzzer.get_job, single_job_args(known, wait=True), EXAMPLES["get_job"])
        fuzz(fuzzer.get_jobs, many_job_args(known), EXAMPLES["get_jobs"])
        fuzz(fuzzer.get_jobs, many_job_args(known, huge=True), EXAMPLES["get_jobs (1000-id lists)"])
        fuzz(fuzzer.cancel_job, single_job_args(known, wait=False), EXAMPLES["cancel_job"])

        # The server survived all of it: a plain call on the same session still works.
        run_id = str(uuid.uuid4())
        ticket, text = fuzzer.call(
            "set_flow_run_state", {"flow_run_id": run_id, "state": "Running"}
        )
        assert ticket is not None, text
        fuzzer.check_tickets(
            [((), {"run_type": "flow", "run_id": run_id, "state": "Running"})], [ticket]
        )

    assert sum(fuzzer.calls.values()) >= 10_000, fuzzer.calls
    assert fuzzer.calls.keys() == {name.split()[0] for name in EXAMPLES}, fuzzer.calls
    # The mix is real: every tool both accepted and refused calls, and full batches went in.
    for tool in fuzzer.calls:
        assert 0 < fuzzer.outcomes[tool, "ok"] < fuzzer.calls[tool], fuzzer.outcomes
    assert fuzzer.largest_batch == stack.settings.max_batch_size
    check_store(stack, fuzzer)


def check_time(stored: datetime | None, asked: Any, accepted: datetime) -> None:
    """A stored time is UTC: the instant asked for, or acceptance plus the delay asked."""
    if asked is None:
        assert stored is None
        return
    assert stored is not None and stored.utcoffset() == timedelta(0), stored
    how, value = asked
    if how == "at":
        assert stored == value, (stored, value)
        return
    text = str(value).strip()
    seconds = value if isinstance(value, float) else int(text[:-1]) * UNIT_S[text[-1]]
    # Accepted a moment before the record's enqueued_at was taken: allow a second.
    assert abs((stored - accepted).total_seconds() - seconds) < 1.0, (stored, accepted, asked)


def check_store(stack: Stack, fuzzer: Fuzzer) -> None:
    """Every key is one the accepted jobs explain, and every record is valid."""
    redis = stack.redis
    records: set[str] = set()
    keys: dict[str, str] = {}
    for raw in redis.scan_iter(count=1_000):
        key = raw.decode()
        if key.startswith(JOB_KEY_PREFIX):
            records.add(key.removeprefix(JOB_KEY_PREFIX))
        elif key.startswith(IDEMPOTENCY_KEY_PREFIX + "local:"):
            keys[key.removeprefix(IDEMPOTENCY_KEY_PREFIX + "local:")] = cast(
                bytes, redis.get(key)
            ).decode()
        elif key.startswith(RUN_KEY_PREFIX):
            run_type, _, run_id = key.removeprefix(RUN_KEY_PREFIX).partition(":")
            assert run_type in ("task", "flow") and canonical_run_id(run_id) == run_id, key
            assert cast(bytes, redis.hget(key, "last")).decode() in fuzzer.jobs, key
        else:
            assert key in (
                QUEUE_KEY,
                STATS_KEY,
                RECENT_KEY,
                INFLIGHT_KEY,
            ), key
    assert records == set(fuzzer.jobs)
    # Every job's status, in one round trip.
    with redis.pipeline(transaction=False) as pipe:
        for job_id in fuzzer.jobs:
            pipe.hget(JOB_KEY_PREFIX + job_id, "status")
        status_of = {
            job_id: cast(bytes, status).decode()
            for job_id, status in zip(fuzzer.jobs, pipe.execute(), strict=True)
        }
    # The fleet counters agree with the records: each live count is its moves in less
    # its moves out (worker.fleet_stats).
    counts = FleetCounts.from_hash(cast(dict[bytes, bytes], redis.hgetall(STATS_KEY)))
    statuses = Counter(status_of.values())
    assert counts.live == {status: statuses[status] for status in LIVE}, (counts, statuses)
    assert counts.totals["cancelled"] == statuses["cancelled"]
    assert counts.totals["enqueued"] == len(fuzzer.jobs)
    # The sweeper's index holds exactly the jobs not terminal yet (no worker runs here).
    pending = {job_id for job_id, status in status_of.items() if status in ("queued", "waiting")}
    inflight = {m.decode() for m in cast(list[bytes], redis.zrange(INFLIGHT_KEY, 0, -1))}
    assert inflight == pending
    # The recent-jobs index holds the newest accepted jobs and nothing else.
    recent = {member.decode() for member in cast(list[bytes], redis.zrange(RECENT_KEY, 0, -1))}
    assert recent <= set(fuzzer.jobs)
    assert len(recent) == min(len(fuzzer.jobs), stack.settings.recent_jobs)
    assert keys == fuzzer.keys
    assert all(KEY_RULE.fullmatch(key) for key in keys)
    # The queue too: a cancelled job leaves it at once.
    queued = cast(list[bytes], redis.zrange(QUEUE_KEY, 0, -1))
    assert {member.decode() for member in queued} == pending

    job_ids = sorted(fuzzer.jobs)
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hgetall(JOB_KEY_PREFIX + job_id)
        rows = pipe.execute()
    for job_id, raw_record in zip(job_ids, rows, strict=True):
        record = JobRecord.from_hash({k.decode(): v.decode() for k, v in raw_record.items()})
        job = fuzzer.jobs[job_id]
        assert record.job_id == job_id
        got = (record.run_type.value, record.run_id, record.state.value, record.status.value)
        assert got == (job.run_type, job.run_id, job.state, job.status), record
        stored = (record.run_type, record.run_id, record.state, record.message, record.force)
        assert stored == job.identity[:5], record
        name, scheduled, pause, reschedule, pause_key = job.identity[5:]
        assert (record.state_name, record.pause_reschedule, record.pause_key) == (
            name,
            reschedule,
            pause_key,
        ), record
        check_time(record.scheduled_time, scheduled, record.enqueued_at)
        check_time(record.pause_expiration_time, pause, record.enqueued_at)
        assert record.idempotency_key is None or KEY_RULE.fullmatch(record.idempotency_key)
        assert record.message is None or len(record.message) <= fuzzer.max_message
