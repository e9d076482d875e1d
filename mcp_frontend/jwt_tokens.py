"""Bearer tokens issued by an identity provider: JWTs checked against its JWKS.

The provider's public keys are fetched from `JwtRules.jwks_url` and cached. A token
signed with a key id the cache does not know triggers one refetch (key rotation), at
most every `refresh_min_s`, so tokens with made-up key ids cannot make us hammer the
provider. A refused token logs one warning with the reason and nothing of the token.
"""

import asyncio
import base64
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import jwt
from jwt import PyJWK, PyJWKSet
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from mcp.server.auth.provider import AccessToken

log = logging.getLogger(__name__)

# Asymmetric algorithms only: with HS* the JWKS's public key could serve as an HMAC secret.
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
        *("ES256", "ES256K", "ES384", "ES512", "EdDSA"),
    }
)
MAX_LEEWAY_S = 300.0
JWKS_FETCH_TIMEOUT_S = 5.0
MAX_JWKS_BYTES = 1 << 20
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._@|-]{1,128}")
_BASE64URL_SEGMENTS_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class JwtConfigError(ValueError):
    """The JWT rules are unusable; the message says which setting and why."""


@dataclass(frozen=True)
class JwtRules:
    """What a token must satisfy, and where the provider's public keys are."""

    jwks_url: str
    issuer: str
    audience: str
    client_claim: str = "sub"  # the claim that holds the caller's client id
    leeway_s: float = 30.0  # clock skew allowed on exp, nbf and iat
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    refresh_min_s: float = 30.0  # least time between two JWKS fetches, whatever the cause
    # Keys the provider withdrew stop verifying after this long; a failed refresh keeps them.
    jwks_max_age_s: float = 3600.0

    def __post_init__(self) -> None:
        url = urlsplit(self.jwks_url)
        if url.scheme != "https" and not (url.scheme == "http" and url.hostname in _LOOPBACK_HOSTS):
            raise JwtConfigError("jwks_url must be https:// (plain http only on loopback)")
        for name in ("issuer", "audience", "client_claim"):
            if not getattr(self, name):
                raise JwtConfigError(f"{name} must not be empty")
        if not 0 <= self.leeway_s <= MAX_LEEWAY_S:
            raise JwtConfigError(f"leeway_s must be between 0 and {MAX_LEEWAY_S:g}")
        if not self.algorithms:
            raise JwtConfigError("algorithms must name at least one algorithm")
        refused = [alg for alg in self.algorithms if alg not in ASYMMETRIC_ALGORITHMS]
        if refused:
            raise JwtConfigError(
                f"algorithms {refused} refused: only {sorted(ASYMMETRIC_ALGORITHMS)} are allowed"
            )
        if not self.refresh_min_s >= 0:
            raise JwtConfigError("refresh_min_s must not be negative")
        if not self.jwks_max_age_s >= self.refresh_min_s:
            raise JwtConfigError("jwks_max_age_s must be at least refresh_min_s")


class _Refused(Exception):
    """A token is not accepted; the message is the reason, and safe to log."""


# Most specific first: InvalidSignatureError is a DecodeError, all are InvalidTokenError.
_DECODE_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid (nbf or iat in the future)"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "alg not allowed"),
    (jwt.InvalidIssuedAtError, "iat is not a number"),
    (InvalidSubjectError, "sub is not a string"),
    (InvalidJTIError, "jti is not a string"),
    (jwt.InvalidKeyError, "the provider's key is unusable (too short?)"),
    (jwt.DecodeError, "malformed token"),
)


class RefusalLog:
    """One warning per reason per `every_s`, with how many it stands for.

    The SDK checks a bearer token on every route, /healthz included, so anyone
    could otherwise fill the log with junk tokens.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, reason: str) -> None:
        now = time.monotonic()
        held = self._held.pop(reason, 0)
        if now - self._last.get(reason, -self.every_s) < self.every_s:
            self._held[reason] = held + 1
            return
        self._last[reason] = now
        more = f" (and {held} more like it in the last {self.every_s:g} s)" if held else ""
        log.warning("bearer JWT refused: %s%s", reason, more)


class JwtVerifier:
    """Verifies bearer JWTs against `rules`; an MCP SDK `TokenVerifier`.

    Owns an httpx client unless given one; close it with `aclose()` or `async with`.
    """

    def __init__(
        self,
        rules: JwtRules,
        *,
        http: httpx.AsyncClient | None = None,
        refusal_log_every_s: float = 10.0,
    ) -> None:
        self._rules = rules
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT_S)
        self._keys: dict[str, PyJWK] | None = None  # by kid
        self._fetched_at_s = 0.0  # time.monotonic() of the last successful fetch
        self._attempted_at_s: float | None = None
        self._fetch_error: str | None = None  # why the last fetch failed, if it did
        self._fetch_lock = asyncio.Lock()
        self._refusals = RefusalLog(refusal_log_every_s)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the httpx client if this verifier created it."""
        if self._owns_http:
            await self._http.aclose()

    async def verify_token(self, token: str) -> AccessToken | None:
        """The SDK's `TokenVerifier` protocol: same as `verify`."""
        return await self.verify(token)

    async def verify(self, token: str) -> AccessToken | None:
        """The token's access if it is valid under the rules, else None (and a warning)."""
        try:
            return await self._verify(token)
        except _Refused as refused:
            self._refusals.report(str(refused))
            return None

    async def _verify(self, token: str) -> AccessToken:
        rules = self._rules
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _Refused("malformed token") from None
        alg = header.get("alg")
        # Before any key is looked at: `none`, and HS256 keyed with our RSA public key, end here.
        if alg not in rules.algorithms:
            raise _Refused("alg not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _Refused("no key id (kid) in the header")
        key = await self._key_for(kid)
        # A JWK without `alg` gets PyJWT's default for its key type (RS256 for RSA).
        if key.algorithm_name != alg:
            raise _Refused("alg does not match the key's alg")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(rules.algorithms),
                audience=rules.audience,
                issuer=rules.issuer,
                leeway=rules.leeway_s,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.MissingRequiredClaimError as missing:
            raise _Refused(f"missing claim {missing.claim!r}") from None
        except jwt.PyJWTError as error:
            raise _Refused(_decode_refusal(error)) from None
        return _access_token(token, claims, rules)

    async def _key_for(self, kid: str) -> PyJWK:
        if self._needs_fetch(kid):
            async with self._fetch_lock:
                # Another verification may have fetched while this one waited.
                if self._needs_fetch(kid):
                    await self._fetch_jwks()
        if self._keys is None:
            raise _Refused(f"no keys from the JWKS ({self._fetch_error})")
        key = self._keys.get(kid)
        if key is None:
            failed = f" (last JWKS fetch failed: {self._fetch_error})" if self._fetch_error else ""
            raise _Refused(f"unknown key id{failed}")
        return key

    def _needs_fetch(self, kid: str) -> bool:
        now_s = time.monotonic()
        if (
            self._attempted_at_s is not None
            and now_s - self._attempted_at_s < self._rules.refresh_min_s
        ):
            return False
        if self._keys is None or kid not in self._keys:
            return True
        return now_s - self._fetched_at_s >= self._rules.jwks_max_age_s

    async def _fetch_jwks(self) -> None:
        self._attempted_at_s = time.monotonic()
        try:
            # httpx's timeout is per read, so a server that trickles bytes needs this too.
            async with asyncio.timeout(JWKS_FETCH_TIMEOUT_S):
                body = await self._download()
            keys = _signing_keys(body)
        except TimeoutError:
            self._fetch_error = f"no answer within {JWKS_FETCH_TIMEOUT_S:g} s"
        except httpx.HTTPStatusError as error:
            self._fetch_error = f"HTTP {error.response.status_code}"
        except (httpx.HTTPError, ValueError, RecursionError, jwt.PyJWTError) as error:
            self._fetch_error = f"{type(error).__name__}: {error}"
        else:
            self._keys, self._fetched_at_s, self._fetch_error = keys, time.monotonic(), None
            return
        if self._keys is not None:
            age_s = time.monotonic() - self._fetched_at_s
            log.warning(
                "JWKS refresh from %s failed (%s); keeping the keys fetched %.0f s ago",
                self._rules.jwks_url,
                self._fetch_error,
                age_s,
            )

    async def _download(self) -> bytes:
        async with self._http.stream("GET", self._rules.jwks_url) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
            return bytes(body)


def _signing_keys(body: bytes) -> dict[str, PyJWK]:
    """The JWKS document's usable signature keys, by kid (the first of a repeated kid)."""
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("JWKS is not a JSON object")
    keys: dict[str, PyJWK] = {}
    for key in PyJWKSet.from_dict(document):  # skips keys PyJWT cannot use
        if key.key_id is not None and key.public_key_use in (None, "sig"):
            keys.setdefault(key.key_id, key)
    return keys


def _decode_refusal(error: jwt.PyJWTError) -> str:
    for error_type, reason in _DECODE_REFUSALS:
        if isinstance(error, error_type):
            return reason
    return f"invalid token ({type(error).__name__})"


def _access_token(token: str, claims: dict[str, Any], rules: JwtRules) -> AccessToken:
    exp = claims["exp"]
    # PyJWT accepts a numeric string; RFC 7519 says a JSON number.
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise _Refused("exp is not a number")
    if rules.client_claim not in claims:
        raise _Refused(f"missing claim {rules.client_claim!r}")
    client_id = claims[rules.client_claim]
    if not isinstance(client_id, str) or not CLIENT_ID_RE.fullmatch(client_id):
        raise _Refused(f"client claim {rules.client_claim!r} is not a valid client id")
    subject = claims.get("sub")
    return AccessToken(
        token=token,
        client_id=client_id,
        scopes=_scopes(claims),
        # The SDK's bearer middleware refuses a token past expires_at with no
        # leeway of its own: the clock-skew allowance has to be in it.
        expires_at=int(exp + rules.leeway_s),
        resource=rules.audience,  # verified above: the token's aud contains it
        subject=subject if isinstance(subject, str) else None,
        claims={"iss": claims["iss"]},  # with sub, how the SDK tells principals apart
    )


def _scopes(claims: dict[str, Any]) -> list[str]:
    """`scope` (RFC 9068: space-separated) else `scp` (Okta, Azure: a list or a string)."""
    if "scope" in claims:
        scope = claims["scope"]
        if not isinstance(scope, str):
            raise _Refused("scope claim is not a string")
        return scope.split()
    scp = claims.get("scp", [])
    if isinstance(scp, str):
        return scp.split()
    if isinstance(scp, list) and all(isinstance(s, str) for s in scp):
        return list(scp)
    raise _Refused("scp claim is neither a string nor a list of strings")


def looks_like_jwt(token: str) -> bool:
    """Whether `token` has a JWT's shape: three base64url segments, a JSON header with alg.

    Says nothing about validity; it tells a provider's JWT from a static token.
    """
    if not _BASE64URL_SEGMENTS_RE.fullmatch(token):
        return False
    header_segment = token.split(".", 1)[0]
    try:
        header = json.loads(
            base64.urlsafe_b64decode(header_segment + "=" * (-len(header_segment) % 4))
        )
    except (ValueError, RecursionError):  # binascii.Error is a ValueError
        return False
    return isinstance(header, dict) and "alg" in header
