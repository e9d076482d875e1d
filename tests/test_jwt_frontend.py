"""Identity-provider JWTs on a real HTTP frontend, keys from a real JWKS over HTTP.

tests/test_jwt_tokens.py checks the verifier rule by rule; this checks what a
client sees: 401 for every bad token, roles from scopes, the OAuth metadata
that points OAuth-aware clients at the provider, and no JWT in the log.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from mcp_frontend.auth import Auth
from mcp_frontend.devstack import Service, free_port
from mcp_frontend.jwt_tokens import JwtRules
from mcp_frontend.server import _auth_options
from tests.conftest import Stack
from tests.jwks_server import JwksServer, SigningKey, TokenFactory, new_rsa_key
from tests.prefect_runs import PrefectRuns
from tests.tasks_client import TasksClient
from tests.test_auth import INITIALIZE, start_frontend

ISSUER = "https://idp.example.test/realms/pmq"
STATIC = "static-token-0123456789abcdef"


@dataclass
class Secured:
    base: str
    frontend: Service
    tokens: TokenFactory
    other_key: SigningKey  # signs tokens the provider never published


@pytest.fixture
def secured(stack: Stack) -> Iterator[Secured]:
    key = new_rsa_key("k1")
    with JwksServer(key) as idp:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        frontend = start_frontend(
            stack,
            port,
            PMQ_JWT_JWKS_URL=idp.url,
            PMQ_JWT_ISSUER=ISSUER,
            PMQ_JWT_AUDIENCE=f"{base}/mcp",
            PMQ_AUTH_TOKENS=f"{STATIC}:scripts:reader",  # static tokens work beside JWTs
        )
        tokens = TokenFactory(key, issuer=ISSUER, audience=f"{base}/mcp", client_id="fleet-a")
        yield Secured(base, frontend, tokens, new_rsa_key("k1"))


def _initialize(base: str, token: str) -> httpx.Response:
    return httpx.post(
        f"{base}/mcp",
        json=INITIALIZE,
        headers={
            "Accept": "application/json, text/event-stream",
            "Authorization": f"Bearer {token}",
        },
        timeout=10,
    )


def test_every_bad_token_is_401_and_the_valid_one_is_not(secured: Secured) -> None:
    tokens, now = secured.tokens, int(time.time())
    bad = {
        "expired": tokens.token(exp=now - 120),
        "not yet valid": tokens.token(nbf=now + 600),
        "wrong audience": tokens.token(aud="https://elsewhere.example.test/mcp"),
        "wrong issuer": tokens.token(iss="https://evil.example.test/"),
        "unknown key": tokens.token(kid="k-never-published"),
        "alg none": tokens.alg_none_token(),
        "tampered signature": tokens.tampered_signature_token(),
        "another key under our kid": tokens.token(key=secured.other_key),
    }
    for name, token in bad.items():
        refused = _initialize(secured.base, token)
        assert refused.status_code == 401, name
        assert "Bearer" in refused.headers["WWW-Authenticate"], name
    assert _initialize(secured.base, tokens.token(scope="pmq:agent")).status_code == 200
    assert _initialize(secured.base, STATIC).status_code == 200
    log = secured.frontend.log_path.read_text()
    for token in bad.values():
        assert token not in log and token.split(".")[1] not in log


def test_oauth_metadata_names_the_provider(secured: Secured) -> None:
    refused = httpx.post(
        f"{secured.base}/mcp",
        json=INITIALIZE,
        headers={"Accept": "application/json, text/event-stream"},
        timeout=10,
    )
    assert refused.status_code == 401
    metadata_url = f"{secured.base}/.well-known/oauth-protected-resource/mcp"
    assert f'resource_metadata="{metadata_url}"' in refused.headers["WWW-Authenticate"]
    metadata = httpx.get(metadata_url, timeout=10).json()
    assert metadata["resource"] == f"{secured.base}/mcp"
    assert metadata["authorization_servers"] == [ISSUER]


async def test_roles_come_from_scopes(secured: Secured, prefect: PrefectRuns) -> None:
    flow_run = await prefect.flow_run()
    change = {"flow_run_id": flow_run, "state": "RUNNING"}
    agent = secured.tokens.token(scope="openid pmq:agent")
    reader = secured.tokens.token(scp=["pmq:reader"])
    bare = secured.tokens.token(scope="openid profile")
    async with TasksClient(f"{secured.base}/mcp", token=agent) as client:
        ticket = (await client.call_tool("set_flow_run_state", change, tasks=False)).result
        job_id = ticket["structuredContent"]["job_id"]
    async with TasksClient(f"{secured.base}/mcp", token=reader) as client:
        # The same client id (the `sub` claim): the reader sees the agent's job.
        read = (await client.call_tool("get_job", {"job_id": job_id}, tasks=False)).result
        assert not read.get("isError") and read["structuredContent"]["job_id"] == job_id
        refused = (await client.call_tool("set_flow_run_state", change, tasks=False)).result
        assert refused["isError"]
        assert "forbidden: role 'reader' lacks the right 'submit'" in str(refused["content"])
    async with TasksClient(f"{secured.base}/mcp", token=bare) as client:
        refused = (await client.call_tool("get_job", {"job_id": job_id}, tasks=False)).result
        assert "forbidden: a token with no role" in str(refused["content"])
    operator = secured.tokens.token(scope="pmq:operator", sub="ops")
    both = secured.tokens.token(scope="pmq:reader pmq:operator")  # the rights of both
    async with TasksClient(f"{secured.base}/mcp", token=both) as client:
        read = (await client.call_tool("get_job", {"job_id": job_id}, tasks=False)).result
        assert not read.get("isError")
    dashboard = f"{secured.base}/dashboard/api/snapshot"
    for token, status in ((operator, 200), (both, 200), (agent, 403), (reader, 403)):
        got = httpx.get(dashboard, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert got.status_code == status
    expired = secured.tokens.token(scope="pmq:operator", exp=int(time.time()) - 120)
    got = httpx.get(dashboard, headers={"Authorization": f"Bearer {expired}"}, timeout=10)
    assert got.status_code == 401


def test_a_jwt_cannot_take_a_static_clients_or_the_local_users_id(secured: Secured) -> None:
    for taken in ("scripts", "local"):  # `scripts`: the static token's client
        token = secured.tokens.token(scope="pmq:agent", sub=taken)
        assert _initialize(secured.base, token).status_code == 401, taken
    assert "belongs to a static token or the local user" in secured.frontend.log_path.read_text()


def test_an_issuer_without_a_path_is_advertised_exactly_as_configured() -> None:
    # RFC 8414 compares issuers character for character: no slash may be added.
    rules = JwtRules(
        jwks_url="http://127.0.0.1:9/jwks.json",
        issuer="https://idp.example.test",
        audience="http://127.0.0.1:8000/mcp",
    )
    options = _auth_options(Auth([], rules, None), "http://127.0.0.1:8000")
    assert str(options["auth"].issuer_url) == "https://idp.example.test"
    assert str(options["auth"].resource_server_url) == "http://127.0.0.1:8000/mcp"
