"""Identity-provider JWTs: claims, keys from a real JWKS server, forgeries, refusals."""

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from mcp.server.auth.provider import AccessToken, TokenVerifier

from mcp_frontend import jwt_tokens
from mcp_frontend.jwt_tokens import JwtConfigError, JwtRules, JwtVerifier, looks_like_jwt
from tests.jwks_server import JwksServer, SigningKey, TokenFactory, new_ec_key, new_rsa_key

ISSUER = "https://idp.example.test/"
AUDIENCE = "https://mcp.example.test/mcp"
REFUSED = "bearer JWT refused: "
# assert_refused(verifier, token, reason)
AssertRefused = Callable[[JwtVerifier, str, str], Awaitable[None]]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return new_rsa_key("key-1")


@pytest.fixture(scope="module")
def stranger_key() -> SigningKey:
    """A key the provider never published."""
    return new_rsa_key("key-unknown")


@pytest.fixture
def idp(key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer(key) as server:
        yield server


@pytest.fixture
def tokens(key: SigningKey) -> TokenFactory:
    return TokenFactory(key, issuer=ISSUER, audience=AUDIENCE)


@pytest.fixture
def rules(idp: JwksServer) -> JwtRules:
    return JwtRules(jwks_url=idp.url, issuer=ISSUER, audience=AUDIENCE)


@pytest.fixture
async def verifier(rules: JwtRules) -> AsyncIterator[JwtVerifier]:
    async with JwtVerifier(rules) as verifier:
        yield verifier


@pytest.fixture
def warnings_seen(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The verifier's warnings so far, as logged lines."""
    caplog.set_level(logging.WARNING, logger=jwt_tokens.__name__)

    def seen() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == jwt_tokens.__name__]

    return seen


@pytest.fixture
def assert_refused(
    warnings_seen: Callable[[], list[str]], caplog: pytest.LogCaptureFixture
) -> AssertRefused:
    """Verifies `token`: None, and exactly one warning, naming `reason` and nothing of the token."""

    async def check(verifier: JwtVerifier, token: str, reason: str) -> None:
        caplog.clear()
        assert await verifier.verify(token) is None
        [line] = warnings_seen()
        assert line == REFUSED + reason
        assert_no_part_of(token, line)

    return check


def assert_no_part_of(token: str, line: str) -> None:
    assert token not in line
    for segment in token.split("."):
        # Shorter ones ("a" of "a.b.c") are in any sentence.
        assert len(segment) < 8 or segment not in line


def now() -> int:
    return int(time.time())


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- valid tokens -----------------------------------------------------------------------------


async def test_valid_token_gives_client_scopes_and_expiry(
    verifier: JwtVerifier,
    tokens: TokenFactory,
    idp: JwksServer,
    warnings_seen: Callable[[], list[str]],
) -> None:
    exp = now() + 120
    token = tokens.token(scope="queue:read queue:write", exp=exp)
    assert await verifier.verify(token) == AccessToken(
        token=token,
        client_id="client-1",
        scopes=["queue:read", "queue:write"],
        expires_at=exp + 30,  # the leeway is in it: the SDK checks expires_at with none
        resource=AUDIENCE,
        subject="client-1",
        claims={"iss": ISSUER},
    )
    assert await verifier.verify(tokens.token()) is not None
    assert idp.fetches == 1  # cached
    assert warnings_seen() == []


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({}, []),
        ({"scope": "a b"}, ["a", "b"]),
        ({"scp": ["queue:read", "queue:write"]}, ["queue:read", "queue:write"]),  # Okta
        ({"scp": "queue:read queue:write"}, ["queue:read", "queue:write"]),  # Azure AD
        ({"scope": "a", "scp": ["b"]}, ["a"]),  # RFC 9068's claim wins
    ],
)
async def test_scopes_from_scope_or_scp(
    verifier: JwtVerifier, tokens: TokenFactory, claims: dict[str, Any], scopes: list[str]
) -> None:
    access = await verifier.verify(tokens.token(**claims))
    assert access is not None
    assert access.scopes == scopes


async def test_audience_list_containing_ours_is_valid(
    verifier: JwtVerifier, tokens: TokenFactory
) -> None:
    access = await verifier.verify(tokens.token(aud=["https://other.example.test", AUDIENCE]))
    assert access is not None
    assert access.resource == AUDIENCE


async def test_es256_key_is_valid(idp: JwksServer, key: SigningKey, rules: JwtRules) -> None:
    ec_key = new_ec_key("ec-1")
    idp.publish(key, ec_key)
    token = TokenFactory(ec_key, issuer=ISSUER, audience=AUDIENCE).token()
    async with JwtVerifier(rules) as verifier:
        access = await verifier.verify(token)
    assert access is not None
    assert access.client_id == "client-1"


async def test_is_an_sdk_token_verifier(rules: JwtRules, tokens: TokenFactory) -> None:
    async with JwtVerifier(rules) as jwt_verifier:
        # Checked by mypy: the SDK takes it as its `TokenVerifier` as it is.
        verifier: TokenVerifier = jwt_verifier
        access = await verifier.verify_token(tokens.token())
    assert access is not None


# --- time claims ------------------------------------------------------------------------------


async def test_expired(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    await assert_refused(verifier, tokens.token(exp=now() - 120), "expired")


async def test_expired_within_leeway_is_valid(verifier: JwtVerifier, tokens: TokenFactory) -> None:
    exp = now() - 10  # leeway 30 s
    access = await verifier.verify(tokens.token(exp=exp))
    assert access is not None
    assert access.expires_at == exp + 30


async def test_no_leeway_refuses_just_expired(
    rules: JwtRules, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    strict = JwtRules(rules.jwks_url, ISSUER, AUDIENCE, leeway_s=0)
    async with JwtVerifier(strict) as verifier:
        await assert_refused(verifier, tokens.token(exp=now() - 2), "expired")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_not_yet_valid_beyond_leeway(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused, claim: str
) -> None:
    future: dict[str, Any] = {claim: now() + 120}  # leeway 30 s
    token = tokens.token(**future)
    await assert_refused(verifier, token, "not yet valid (nbf or iat in the future)")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_not_yet_valid_within_leeway_is_valid(
    verifier: JwtVerifier, tokens: TokenFactory, claim: str
) -> None:
    future: dict[str, Any] = {claim: now() + 10}  # leeway 30 s
    assert await verifier.verify(tokens.token(**future)) is not None


async def test_exp_as_string_refused(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    # PyJWT itself accepts "exp": "<digits>".
    await assert_refused(verifier, tokens.token(exp=str(now() + 60)), "exp is not a number")


# --- audience, issuer, required claims --------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": "https://other.example.test/mcp"}, "wrong audience"),
        ({"aud": ["https://a.example.test", "https://b.example.test"]}, "wrong audience"),
        ({"iss": "https://evil.example.test/"}, "wrong issuer"),
        ({"exp": None}, "missing claim 'exp'"),
        ({"iss": None}, "missing claim 'iss'"),
        ({"aud": None}, "missing claim 'aud'"),
        ({"scope": ["a"]}, "scope claim is not a string"),
        ({"scp": [1, 2]}, "scp claim is neither a string nor a list of strings"),
    ],
)
async def test_claims_refused(
    verifier: JwtVerifier,
    tokens: TokenFactory,
    assert_refused: AssertRefused,
    claims: dict[str, Any],
    reason: str,
) -> None:
    await assert_refused(verifier, tokens.token(**claims), reason)


# --- the client claim -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client_id", ["auth0|65f0c1d2e3", "svc-queue@clients", "a", "A.b_c-9", "x" * 128]
)
async def test_client_ids_accepted(
    verifier: JwtVerifier, tokens: TokenFactory, client_id: str
) -> None:
    access = await verifier.verify(tokens.token(sub=client_id))
    assert access is not None
    assert access.client_id == client_id


@pytest.mark.parametrize("client_id", ["", "has space", "alice\n", "x" * 129, "é", "a/b", "a:b"])
async def test_invalid_client_ids_refused(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused, client_id: str
) -> None:
    reason = "client claim 'sub' is not a valid client id"
    await assert_refused(verifier, tokens.token(sub=client_id), reason)


async def test_missing_client_claim_refused(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    await assert_refused(verifier, tokens.token(sub=None), "missing claim 'sub'")


async def test_non_string_sub_refused_by_pyjwt(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    await assert_refused(verifier, tokens.token(sub=12345), "sub is not a string")


async def test_other_client_claim(
    rules: JwtRules, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    azp_rules = JwtRules(rules.jwks_url, ISSUER, AUDIENCE, client_claim="azp")
    async with JwtVerifier(azp_rules) as verifier:
        access = await verifier.verify(tokens.token(azp="mcp-cli", sub="user-7"))
        assert access is not None
        assert (access.client_id, access.subject) == ("mcp-cli", "user-7")
        await assert_refused(verifier, tokens.token(), "missing claim 'azp'")
        await assert_refused(
            verifier, tokens.token(azp=["x"]), "client claim 'azp' is not a valid client id"
        )


# --- forgeries --------------------------------------------------------------------------------


@pytest.mark.parametrize("forge", ["alg_none_token", "hs256_with_public_pem_token"])
async def test_forged_alg_refused_before_fetching_keys(
    verifier: JwtVerifier,
    tokens: TokenFactory,
    idp: JwksServer,
    assert_refused: AssertRefused,
    forge: str,
) -> None:
    await assert_refused(verifier, getattr(tokens, forge)(), "alg not allowed")
    assert idp.fetches == 0


async def test_alg_outside_allow_list_refused(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    await assert_refused(verifier, tokens.token(alg="PS256"), "alg not allowed")


async def test_tampered_signature_refused(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    await assert_refused(verifier, tokens.tampered_signature_token(), "bad signature")


async def test_tampered_payload_refused(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    await assert_refused(verifier, tokens.tampered_payload_token(sub="admin"), "bad signature")


async def test_signed_by_another_key_under_our_kid_refused(
    verifier: JwtVerifier,
    tokens: TokenFactory,
    stranger_key: SigningKey,
    assert_refused: AssertRefused,
) -> None:
    token = tokens.token(key=stranger_key, kid="key-1")
    await assert_refused(verifier, token, "bad signature")


async def test_jwk_alg_must_match_header_alg(
    idp: JwksServer, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    two_algs = JwtRules(idp.url, ISSUER, AUDIENCE, algorithms=("RS256", "RS384"))
    async with JwtVerifier(two_algs) as verifier:
        # The JWK says RS256: an RS384 signature by the same key is refused.
        await assert_refused(
            verifier, tokens.token(alg="RS384"), "alg does not match the key's alg"
        )
        assert await verifier.verify(tokens.token()) is not None


async def test_jwk_without_alg_takes_its_key_types_default(
    idp: JwksServer, key: SigningKey, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    idp.publish(key.public_jwk(with_alg=False))  # as Azure AD publishes them
    two_algs = JwtRules(idp.url, ISSUER, AUDIENCE, algorithms=("RS256", "RS384"))
    async with JwtVerifier(two_algs) as verifier:
        assert await verifier.verify(tokens.token()) is not None
        await assert_refused(
            verifier, tokens.token(alg="RS384"), "alg does not match the key's alg"
        )


async def test_encryption_keys_are_not_signature_keys(
    idp: JwksServer, key: SigningKey, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    idp.publish(key.public_jwk() | {"use": "enc"})
    async with JwtVerifier(JwtRules(idp.url, ISSUER, AUDIENCE, refresh_min_s=0)) as verifier:
        await assert_refused(verifier, tokens.token(), "unknown key id")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-jwt", "malformed token"),
        ("a.b.c", "malformed token"),
        ("eyJhbGciOiJSUzI1NiJ9.e30", "malformed token"),  # two segments
    ],
)
async def test_malformed_tokens_refused(
    verifier: JwtVerifier, assert_refused: AssertRefused, token: str, reason: str
) -> None:
    await assert_refused(verifier, token, reason)


async def test_token_without_kid_refused(
    verifier: JwtVerifier, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    await assert_refused(verifier, tokens.token(omit_kid=True), "no key id (kid) in the header")


# --- the JWKS: cache, refetch, rotation, failures ---------------------------------------------


async def test_unknown_kids_refetch_at_most_once_per_refresh_min_s(
    idp: JwksServer,
    tokens: TokenFactory,
    stranger_key: SigningKey,
    assert_refused: AssertRefused,
) -> None:
    refresh_min_s = 0.5
    limited = JwtRules(idp.url, ISSUER, AUDIENCE, refresh_min_s=refresh_min_s)
    async with JwtVerifier(limited, refusal_log_every_s=0) as verifier:
        assert await verifier.verify(tokens.token()) is not None
        assert idp.fetches == 1
        # Within the window even the first unknown kid waits: the JWKS is that fresh.
        await assert_refused(verifier, tokens.token(key=stranger_key), "unknown key id")
        assert idp.fetches == 1
        await asyncio.sleep(refresh_min_s)  # the window itself is under test
        for n in range(20):
            token = tokens.token(key=stranger_key, kid=f"random-{n}")
            await assert_refused(verifier, token, "unknown key id")
        assert idp.fetches == 2
        assert await verifier.verify(tokens.token()) is not None
        assert idp.fetches == 2


async def test_rotated_key_accepted_after_one_refetch(
    idp: JwksServer, tokens: TokenFactory
) -> None:
    async with JwtVerifier(JwtRules(idp.url, ISSUER, AUDIENCE, refresh_min_s=0)) as verifier:
        assert await verifier.verify(tokens.token()) is not None
        new_key = idp.rotate("key-2")
        access = await verifier.verify(tokens.token(key=new_key))
        assert access is not None
        assert access.client_id == "client-1"
        assert idp.fetches == 2
        assert await verifier.verify(tokens.token()) is not None  # the old key still published
        assert await verifier.verify(tokens.token(key=new_key)) is not None
        assert idp.fetches == 2


async def test_withdrawn_key_refused_after_max_age(
    idp: JwksServer, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    max_age_s = 0.3
    rules = JwtRules(idp.url, ISSUER, AUDIENCE, refresh_min_s=0, jwks_max_age_s=max_age_s)
    async with JwtVerifier(rules) as verifier:
        assert await verifier.verify(tokens.token()) is not None
        idp.rotate("key-2", keep_old=False)
        assert await verifier.verify(tokens.token()) is not None  # cached, not yet stale
        await asyncio.sleep(max_age_s)  # the age itself is under test
        await assert_refused(verifier, tokens.token(), "unknown key id")
        assert idp.fetches == 2


async def test_failed_refresh_keeps_the_cached_keys(
    idp: JwksServer, tokens: TokenFactory, warnings_seen: Callable[[], list[str]]
) -> None:
    max_age_s = 0.3
    rules = JwtRules(idp.url, ISSUER, AUDIENCE, refresh_min_s=0, jwks_max_age_s=max_age_s)
    async with JwtVerifier(rules) as verifier:
        assert await verifier.verify(tokens.token()) is not None
        idp.status = 503
        await asyncio.sleep(max_age_s)
        assert await verifier.verify(tokens.token()) is not None
        [line] = warnings_seen()
        assert line.startswith(f"JWKS refresh from {idp.url} failed (HTTP 503); keeping the keys")
        assert idp.fetches == 2


async def test_concurrent_verifications_share_one_fetch(
    idp: JwksServer, tokens: TokenFactory
) -> None:
    idp.stall()
    async with JwtVerifier(JwtRules(idp.url, ISSUER, AUDIENCE, refresh_min_s=0)) as verifier:
        all_done = asyncio.gather(*(verifier.verify(tokens.token()) for _ in range(20)))
        await until(lambda: idp.fetches == 1)
        idp.release()
        results = await all_done
    assert all(access is not None for access in results)
    assert idp.fetches == 1


async def test_jwks_server_down_refuses_quickly(
    tokens: TokenFactory, key: SigningKey, warnings_seen: Callable[[], list[str]]
) -> None:
    with JwksServer(key) as gone:
        url = gone.url  # a port that now refuses connections
    async with JwtVerifier(JwtRules(url, ISSUER, AUDIENCE), refusal_log_every_s=0) as verifier:
        for _ in range(3):  # after the first attempt, refused at once until refresh_min_s
            started = time.monotonic()
            assert await verifier.verify(tokens.token()) is None
            assert time.monotonic() - started < 1.0
    lines = warnings_seen()
    assert len(lines) == 3
    assert all(line.startswith(REFUSED + "no keys from the JWKS (ConnectError") for line in lines)


async def test_stalled_jwks_refuses_after_the_timeout(
    idp: JwksServer,
    tokens: TokenFactory,
    rules: JwtRules,
    monkeypatch: pytest.MonkeyPatch,
    assert_refused: AssertRefused,
) -> None:
    monkeypatch.setattr(jwt_tokens, "JWKS_FETCH_TIMEOUT_S", 0.5)
    idp.stall()
    # A client whose own timeouts are long: the verifier's overall deadline still holds.
    async with httpx.AsyncClient(timeout=30) as http:
        verifier = JwtVerifier(rules, http=http)
        started = time.monotonic()
        await assert_refused(
            verifier, tokens.token(), "no keys from the JWKS (no answer within 0.5 s)"
        )
        assert time.monotonic() - started < 2.0
        await verifier.aclose()
        assert not http.is_closed  # not the verifier's to close


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (500, None, "HTTP 500"),
        (200, b"<html>", "JSONDecodeError: "),
        (200, b"[]", "ValueError: JWKS is not a JSON object"),
        (200, b'{"keys": []}', "PyJWKSetError: The JWK Set did not contain any keys"),
        (
            200,
            b'{"keys": [{"kty": "RSA"}]}',
            "PyJWKSetError: The JWK Set did not contain any usable",
        ),
    ],
)
async def test_broken_jwks_refuses(
    verifier: JwtVerifier,
    idp: JwksServer,
    tokens: TokenFactory,
    warnings_seen: Callable[[], list[str]],
    status: int,
    body: bytes | None,
    why: str,
) -> None:
    idp.status, idp.body = status, body
    token = tokens.token()
    assert await verifier.verify(token) is None
    [line] = warnings_seen()
    assert line.startswith(f"{REFUSED}no keys from the JWKS ({why}")
    assert_no_part_of(token, line)


async def test_oversized_jwks_refused(
    verifier: JwtVerifier, idp: JwksServer, tokens: TokenFactory, assert_refused: AssertRefused
) -> None:
    idp.body = b" " * (jwt_tokens.MAX_JWKS_BYTES + 1)
    reason = (
        f"no keys from the JWKS (ValueError: JWKS larger than {jwt_tokens.MAX_JWKS_BYTES} bytes)"
    )
    await assert_refused(verifier, tokens.token(), reason)


# --- looks_like_jwt ---------------------------------------------------------------------------


def test_looks_like_jwt(tokens: TokenFactory) -> None:
    assert looks_like_jwt(tokens.token())
    assert looks_like_jwt(tokens.alg_none_token())  # shaped like one: the verifier refuses it
    assert not looks_like_jwt("alice-token-0123456789abcdef")
    assert not looks_like_jwt("a.b.c")  # header not JSON
    assert not looks_like_jwt("e30.e30.sig")  # header JSON without alg
    assert not looks_like_jwt("WyJhbGciXQ.e30.sig")  # header a list
    assert not looks_like_jwt(tokens.token() + ".x")  # four segments
    assert not looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.e30.sig!")
    assert not looks_like_jwt("")


# --- rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"leeway_s": 301}, "leeway_s must be between 0 and 300"),
        ({"leeway_s": -1}, "leeway_s must be between 0 and 300"),
        ({"leeway_s": float("nan")}, "leeway_s must be between 0 and 300"),
        ({"algorithms": ("none",)}, "algorithms ['none'] refused"),
        ({"algorithms": ("RS256", "HS256")}, "algorithms ['HS256'] refused"),
        ({"algorithms": ("RS265",)}, "algorithms ['RS265'] refused"),
        ({"algorithms": ()}, "algorithms must name at least one algorithm"),
        ({"jwks_url": "http://idp.example.test/jwks"}, "jwks_url must be https://"),
        ({"issuer": ""}, "issuer must not be empty"),
        ({"refresh_min_s": -1}, "refresh_min_s must not be negative"),
        ({"jwks_max_age_s": 10}, "jwks_max_age_s must be at least refresh_min_s"),
    ],
)
def test_rules_refused(changes: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {
        "jwks_url": "https://idp.example.test/jwks",
        "issuer": ISSUER,
        "audience": AUDIENCE,
    }
    with pytest.raises(JwtConfigError, match=re.escape(message)):
        JwtRules(**settings | changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"leeway_s": 0},
        {"leeway_s": 300},
        {"algorithms": ("PS256", "EdDSA")},
        {"jwks_url": "http://127.0.0.1:8080/jwks.json"},
        {"jwks_url": "http://localhost/jwks.json"},
    ],
)
def test_rules_accepted(changes: dict[str, Any]) -> None:
    JwtRules(
        **{"jwks_url": "https://idp.example.test/jwks", "issuer": ISSUER, "audience": AUDIENCE}
        | changes
    )


async def test_refusals_are_logged_once_per_reason_per_interval(
    rules: JwtRules, tokens: TokenFactory, warnings_seen: Callable[[], list[str]]
) -> None:
    # Any request can carry a junk token: the log must not grow with them.
    async with JwtVerifier(rules, refusal_log_every_s=0.2) as verifier:
        for _ in range(5):
            assert await verifier.verify(tokens.token(exp=now() - 120)) is None
        assert warnings_seen() == ["bearer JWT refused: expired"]
        await asyncio.sleep(0.2)  # the interval itself is under test
        assert await verifier.verify(tokens.token(exp=now() - 120)) is None
    assert warnings_seen()[-1] == (
        "bearer JWT refused: expired (and 4 more like it in the last 0.2 s)"
    )
