"""Logs are JSON lines that name the job, run and client, and never carry a secret."""

import base64
import json
import logging
from pathlib import Path

import pytest

from mcp_frontend.auth import Role, new_token, parse_tokens, token_secrets
from mcp_frontend.devstack import RedisServer, free_port, pmq_service
from mcp_frontend.logs import REDACTED, configure_logging
from tests.conftest import Services, Stack
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from tests.test_auth import ALICE, as_client
from worker.settings import Settings

REDIS_PASSWORD = "redis-pass-5f3a9c1e7d"
PREFECT_KEY = "pnu_prefect-key-0a1b2c3d4e5f"
PREFECT_AUTH = "admin:prefect-auth-9z8y7x"


def test_uvicorns_coloured_copy_of_a_message_stays_out_of_json_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(json_lines=True, level="INFO", secrets=[])
    try:
        # What uvicorn logs on start, seen in `docker compose logs` with ANSI escapes.
        # (Not through uvicorn's own logger: a uvicorn started by another test may
        # have raised its level.)
        logging.getLogger("pmq.test.uvicorn").warning(
            "Uvicorn running on %s",
            "http://0.0.0.0:8000",
            extra={"color_message": "Uvicorn running on \x1b[1m%s\x1b[0m"},
        )
        line = json.loads(capsys.readouterr().err)
    finally:
        logging.getLogger().handlers.clear()
        logging.captureWarnings(False)
    assert line["message"] == "Uvicorn running on http://0.0.0.0:8000"
    assert "color_message" not in line


def test_secrets_are_scrubbed_from_messages_and_tracebacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(json_lines=True, level="INFO", secrets=[ALICE, PREFECT_KEY])
    log = logging.getLogger("pmq.test")
    try:
        log.info("token %s and key %s", ALICE, PREFECT_KEY, extra={"job_id": "j1"})
        try:
            raise RuntimeError(f"bad key {PREFECT_KEY}")
        except RuntimeError:
            log.exception("failed")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        logging.getLogger().handlers.clear()
        logging.captureWarnings(False)
    assert lines[0]["message"] == f"token {REDACTED} and key {REDACTED}"
    assert lines[0]["job_id"] == "j1" and lines[0]["level"] == "INFO"
    assert PREFECT_KEY not in json.dumps(lines) and ALICE not in json.dumps(lines)
    assert "RuntimeError" in lines[1]["exc_info"]


async def test_service_logs_are_json_with_ids_and_no_secrets(
    services: Services, prefect: PrefectRuns, tmp_path: Path
) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.argv += ["--requirepass", REDIS_PASSWORD]
    redis.start_and_wait()
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
    stack = Stack(services, 0, Settings(redis_url=url, heartbeat_s=1.0), services.prefect.api_url)
    env = {"PREFECT_API_KEY": PREFECT_KEY, "PREFECT_API_AUTH_STRING": PREFECT_AUTH}
    port = free_port()
    frontend = pmq_service(
        "frontend",
        ["serve", "--transport", "http", "--port", str(port)],
        env={**stack.env(), **env, "PMQ_AUTH_TOKENS": f"{ALICE}:alice"},
        log_path=tmp_path / "frontend.log",
    )
    try:
        worker = stack.start_worker(extra_env=env)
        frontend.start()
        stack.workers.append(frontend)
        frontend.wait_ready(lambda: "Uvicorn running" in frontend.log_path.read_text(), 30)
        flow_run = await prefect.flow_run()
        async with as_client(f"http://127.0.0.1:{port}/mcp", ALICE) as client:
            ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
            job = await wait_terminal(client, ticket["job_id"])
        assert job["status"] == "applied"
    finally:
        stack.stop()
        redis.stop()
    texts = {"frontend": frontend.log_path.read_text(), "worker": worker.log_path.read_text()}
    for name, text in texts.items():
        for secret in (REDIS_PASSWORD, PREFECT_KEY, PREFECT_AUTH, ALICE):
            assert secret not in text, f"{name} log leaks a secret"
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert records, f"{name} logged nothing"
    accepted = [json.loads(x) for x in texts["frontend"].splitlines() if ticket["job_id"] in x]
    assert any(
        r["message"] == "change accepted" and r["client_id"] == "alice" and r["run_id"] == flow_run
        for r in accepted
    )
    finished = [json.loads(x) for x in texts["worker"].splitlines() if ticket["job_id"] in x]
    assert any(
        r["message"] == "job applied" and r["client_id"] == "alice" and r["run_id"] == flow_run
        for r in finished
    )


def test_jwts_and_token_digests_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    made = new_token("alice", Role.AGENT)
    digest = made.line.split(":")[0]
    entries = parse_tokens(made.line, source="file")
    # Any JWT, whoever logs it: an identity provider's tokens are not in any list.
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"k1"}').decode().rstrip("=")
    jwt = f"{header}.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
    configure_logging(json_lines=True, level="INFO", secrets=token_secrets(entries))
    try:
        logging.getLogger("pmq.test").warning("got %s and %s from %s", jwt, digest, "alice")
        # The server never holds a digest-stored token itself: its shape gives it away.
        logging.getLogger("pmq.test").warning("presented %s", made.token)
        try:
            raise ValueError(f"Bearer {jwt}")
        except ValueError:
            logging.getLogger("pmq.test").exception("refused")
        text = capsys.readouterr().err
    finally:
        logging.getLogger().handlers.clear()
        logging.captureWarnings(False)
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["message"] == f"got {REDACTED} and {REDACTED} from alice"
    assert lines[1]["message"] == f"presented {REDACTED}"
    assert "ValueError: Bearer [redacted]" in lines[2]["exc_info"]
    assert jwt not in text and digest not in text and made.token not in text
