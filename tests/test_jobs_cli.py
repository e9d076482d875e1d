"""`pmq jobs` as an operator runs it: a real process against real Redis, workers and Prefect."""

import json
import subprocess
from pathlib import Path
from typing import Any

from mcp import Client

from mcp_frontend.devstack import BIN_DIR
from mcp_frontend.server import build_server
from tests.conftest import Stack
from tests.mcp_calls import error, ok
from tests.prefect_runs import PrefectRuns

UNKNOWN_RUN = "00000000-0000-4000-8000-000000000000"


def pmq_jobs(
    stack: Stack, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN_DIR / "pmq"), "jobs", *args],
        env=stack.env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _jsonl(tmp_path: Path, changes: list[dict[str, Any]], extra: str = "") -> Path:
    path = tmp_path / "changes.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in changes) + "\n" + extra)
    return path


async def test_a_bad_line_names_itself_and_nothing_is_queued(
    worked_stack: Stack, prefect: PrefectRuns, tmp_path: Path
) -> None:
    run = await prefect.task_run(await prefect.flow_run("RUNNING"))
    good = {"run_type": "task", "run_id": run, "state": "RUNNING"}
    keys_before = worked_stack.redis.dbsize()
    cases = {
        "invalid line 2: state: must be one of": [good, {**good, "state": "DONE"}, good],
        "invalid line 3: run_id: must be a UUID": [good, good, {**good, "run_id": "nope"}],
    }
    for message, changes in cases.items():
        result = pmq_jobs(worked_stack, "submit", "--file", str(_jsonl(tmp_path, changes)))
        assert result.returncode == 2, result
        assert message in result.stderr and "nothing was queued" in result.stderr, result.stderr
    not_json = pmq_jobs(worked_stack, "submit", "--file", "-", stdin=json.dumps(good) + "\n{oops\n")
    assert not_json.returncode == 2 and "invalid line 2: not JSON" in not_json.stderr
    assert worked_stack.redis.dbsize() == keys_before


async def test_submit_then_wait_exits_0_with_json(
    worked_stack: Stack, prefect: PrefectRuns, tmp_path: Path
) -> None:
    flow_run = await prefect.flow_run("RUNNING")
    runs = [await prefect.task_run(flow_run) for _ in range(3)]
    changes = [{"run_type": "task", "run_id": run, "state": "COMPLETED"} for run in runs]
    submitted = pmq_jobs(worked_stack, "submit", "--file", str(_jsonl(tmp_path, changes)))
    assert submitted.returncode == 0, submitted
    job_ids = submitted.stdout.split()
    assert len(job_ids) == 3

    waited = pmq_jobs(worked_stack, "wait", *job_ids, "--timeout", "60", "--json")
    assert waited.returncode == 0, waited
    jobs = json.loads(waited.stdout)
    assert [job["job_id"] for job in jobs] == job_ids
    assert {job["status"] for job in jobs} == {"applied"}
    for run in runs:
        assert (await prefect.state("task", run))["type"] == "COMPLETED"

    plain = pmq_jobs(worked_stack, "wait", *job_ids)  # not a terminal: a line per job
    assert plain.returncode == 0
    lines = plain.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [[j, "applied"] for j in job_ids]
    assert lines[-1] == "total 3 applied=3"


async def test_failed_job_exits_1_is_listed_and_retried(
    worked_stack: Stack, prefect: PrefectRuns
) -> None:
    args = ["--run-type", "flow", "--run-id", UNKNOWN_RUN, "--state", "RUNNING"]
    submitted = pmq_jobs(worked_stack, "submit", *args, "--client", "ops")
    assert submitted.returncode == 0, submitted
    (job_id,) = submitted.stdout.split()
    waited = pmq_jobs(worked_stack, "wait", job_id, "--timeout", "60", "--json")
    assert waited.returncode == 1, waited
    assert json.loads(waited.stdout)[0]["error"]["code"] == "run_not_found"

    listed = pmq_jobs(worked_stack, "list", "--status", "failed", "--client", "ops", "--json")
    assert listed.returncode == 0, listed
    failed = json.loads(listed.stdout)
    assert [job["job_id"] for job in failed] == [job_id]
    by_run = pmq_jobs(worked_stack, "list", "--run", UNKNOWN_RUN, "--since", "10m", "--json")
    assert job_id in [job["job_id"] for job in json.loads(by_run.stdout)]

    retried = pmq_jobs(worked_stack, "retry", job_id, "--json")
    assert retried.returncode == 0, retried
    (ticket,) = json.loads(retried.stdout)
    assert ticket["job_id"] != job_id and ticket["run_id"] == UNKNOWN_RUN
    again = pmq_jobs(worked_stack, "wait", ticket["job_id"], "--timeout", "60", "--json")
    assert again.returncode == 1
    (job,) = json.loads(again.stdout)
    assert job["retry_of"] == job_id and job["error"]["code"] == "run_not_found"

    # Only what was rejected or failed can be retried; an unknown id is a usage error.
    run = await prefect.task_run(await prefect.flow_run("RUNNING"))
    fine = pmq_jobs(
        worked_stack, "submit", "--run-type", "task", "--run-id", run, "--state", "RUNNING"
    )
    (fine_id,) = fine.stdout.split()
    assert pmq_jobs(worked_stack, "wait", fine_id, "--timeout", "60").returncode == 0
    refused = pmq_jobs(worked_stack, "retry", fine_id)
    assert refused.returncode == 2 and "only rejected or failed" in refused.stderr
    unknown = pmq_jobs(worked_stack, "status", "f" * 32)
    assert unknown.returncode == 2 and "unknown job id" in unknown.stderr


async def test_wait_times_out_with_exit_3(worked_stack: Stack, prefect: PrefectRuns) -> None:
    # Scheduled a minute ahead: Prefect answers WAIT, so the job stays unfinished.
    flow_run = await prefect.flow_run("SCHEDULED", scheduled_in_s=60)
    args = ["--run-type", "flow", "--run-id", flow_run, "--state", "RUNNING"]
    (job_id,) = pmq_jobs(worked_stack, "submit", *args).stdout.split()
    waited = pmq_jobs(worked_stack, "wait", job_id, "--timeout", "1", "--json")
    assert waited.returncode == 3, waited
    assert json.loads(waited.stdout)[0]["status"] in ("queued", "running", "waiting")
    assert pmq_jobs(worked_stack, "status", job_id).returncode == 3
    async with Client(build_server(worked_stack.settings)) as client:
        await ok(client, "cancel_job", job_id=job_id)


async def test_watch_once_shows_the_fleet(worked_stack: Stack) -> None:
    watched = pmq_jobs(worked_stack, "watch", "--once")
    assert watched.returncode == 0, watched
    line = watched.stdout.strip()
    assert " depth=" in line and " workers=1 " in line and " applied/s=- " in line, line


async def test_list_jobs_tool_sees_only_the_callers_jobs(
    worked_stack: Stack, prefect: PrefectRuns
) -> None:
    args = ["--run-type", "task", "--run-id", UNKNOWN_RUN, "--state", "RUNNING"]
    (foreign,) = pmq_jobs(worked_stack, "submit", *args, "--client", "someone-else").stdout.split()
    async with Client(build_server(worked_stack.settings)) as client:
        ticket = await ok(client, "set_task_run_state", task_run_id=UNKNOWN_RUN, state="COMPLETED")
        assert (
            pmq_jobs(worked_stack, "wait", ticket["job_id"], foreign, "--timeout", "60").returncode
            == 1
        )
        mine = await ok(client, "list_jobs", status=["failed"], run_id=UNKNOWN_RUN)
        ids = [job["job_id"] for job in mine["jobs"]]
        assert ticket["job_id"] in ids and foreign not in ids
        assert mine["jobs"][0]["error"]["code"] == "run_not_found"
        bad = await error(client, "list_jobs", status=["done"])
        assert "invalid status: must be one of" in bad, bad
        bad_since = await error(client, "list_jobs", since="yesterday")
        assert "invalid since: must be like 15m" in bad_since, bad_since


async def test_named_states_with_details_from_a_file_and_from_options(
    worked_stack: Stack, prefect: PrefectRuns, tmp_path: Path
) -> None:
    flow_run = await prefect.deployment_flow_run("RUNNING")
    task_run = await prefect.task_run(await prefect.flow_run("RUNNING"), state="RUNNING")
    retry = {
        "run_type": "task",
        "run_id": task_run,
        "state": "SCHEDULED",
        "name": "AwaitingRetry",
        "scheduled_time": "2m",
    }
    from_file = pmq_jobs(worked_stack, "submit", "--file", str(_jsonl(tmp_path, [retry])))
    from_options = pmq_jobs(
        worked_stack,
        "submit",
        "--run-type",
        "flow",
        "--run-id",
        flow_run,
        "--state",
        "paused",
        "--name",
        "Suspended",
        "--pause-timeout",
        "600",
    )
    job_ids = [*from_file.stdout.split(), *from_options.stdout.split()]
    assert len(job_ids) == 2, (from_file, from_options)
    waited = pmq_jobs(worked_stack, "wait", *job_ids, "--json")
    jobs = json.loads(waited.stdout)
    assert [job["status"] for job in jobs] == ["applied", "applied"], jobs
    assert [job["state_name"] for job in jobs] == ["AwaitingRetry", "Suspended"]
    task_state = await prefect.state("task", task_run)
    assert (task_state["type"], task_state["name"]) == ("SCHEDULED", "AwaitingRetry")
    flow_state = await prefect.state("flow", flow_run)
    assert flow_state["name"] == "Suspended" and flow_state["state_details"]["pause_reschedule"]
    bad = pmq_jobs(
        worked_stack, "submit", "--file", str(_jsonl(tmp_path, [{**retry, "scheduled_time": 5}]))
    )
    assert bad.returncode == 2
    assert "invalid line 1: scheduled_time: must be a string; nothing was queued" in bad.stderr
