"""Who may do what on the HTTP frontend: bearer tokens -> a client id and its rights.

Static tokens come from `PMQ_AUTH_TOKENS` and/or a file (`PMQ_AUTH_TOKENS_FILE`),
one `token:client_id[:role]` per line or comma, `#` comments. The token may be
stored as a digest (`hmac-sha256.<salt>.<digest>`, see `pmq token new`) so the
file never holds the secret. Identity-provider JWTs are checked by
`mcp_frontend.jwt_tokens`; their role comes from scopes (`pmq:agent`...).

The SDK's bearer middleware answers 401 to a missing or unknown token; tools and
routes then ask `require(right, ...)`, which reads the verified token. stdio and
in-process servers, and an HTTP frontend with no tokens configured (loopback
only), have no token: their caller is the local user, client id `local`, with
every right.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken

from mcp_frontend.jwt_tokens import JwtConfigError, JwtRules, JwtVerifier, looks_like_jwt
from worker.contract import LOCAL_CLIENT
from worker.settings import Settings

MIN_TOKEN_CHARS = 16
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
TOKEN_RE = re.compile(r"^[!-~]+$")  # printable ASCII, no spaces: what fits a header
DIGEST_SCHEME = "hmac-sha256"
DIGEST_RE = re.compile(rf"^{DIGEST_SCHEME}\.([A-Za-z0-9_-]{{22}})\.([A-Za-z0-9_-]{{43}})$")
ROLE_SCOPE_PREFIX = "pmq:"

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    AGENT = "agent"
    READER = "reader"
    OPERATOR = "operator"


class Right(enum.StrEnum):
    SUBMIT = "submit"  # queue state changes
    READ = "read"  # read its own client's jobs and tasks
    CANCEL = "cancel"  # cancel its own client's pending jobs and tasks
    DASHBOARD = "dashboard"  # /dashboard and its snapshot API: every client's jobs


RIGHTS: dict[Role, frozenset[Right]] = {
    Role.AGENT: frozenset({Right.SUBMIT, Right.READ, Right.CANCEL}),
    Role.READER: frozenset({Right.READ}),
    Role.OPERATOR: frozenset({Right.DASHBOARD}),
}


class TokenConfigError(ValueError):
    """The configured tokens are unusable; the message says which line and why."""


class Forbidden(Exception):
    """A verified caller asked for something outside its role."""

    def __init__(self, caller: Caller, right: Right, action: str) -> None:
        self.caller, self.right, self.action = caller, right, action
        super().__init__(
            f"forbidden: {caller.describe_roles()} lacks the right '{right}' that {action} needs"
        )


@dataclass(frozen=True)
class Caller:
    """The verified caller: whose jobs it works on, and what it may do."""

    client_id: str
    roles: frozenset[Role] | None  # None: the local user, no token, every right

    def may(self, right: Right) -> bool:
        return self.roles is None or any(right in RIGHTS[role] for role in self.roles)

    def describe_roles(self) -> str:
        if not self.roles:
            return "a token with no role (scopes pmq:agent, pmq:reader or pmq:operator)"
        names = ", ".join(f"'{role}'" for role in sorted(self.roles))
        return f"role {names}" if len(self.roles) == 1 else f"roles {names}"


LOCAL_CALLER = Caller(LOCAL_CLIENT, None)
NO_TOKEN_CALLER = Caller(LOCAL_CLIENT, frozenset())


def roles_of(scopes: Iterable[str]) -> frozenset[Role]:
    """The roles that scopes grant: `pmq:<role>` each; other scopes grant nothing."""
    known = {f"{ROLE_SCOPE_PREFIX}{role}": role for role in Role}
    return frozenset(known[scope] for scope in scopes if scope in known)


def caller_of(token: AccessToken | None) -> Caller:
    if token is None:
        return LOCAL_CALLER
    return Caller(token.client_id, roles_of(token.scopes))


def require(right: Right, action: str, *, token_required: bool = False) -> str:
    """The caller's client id, if its role has `right`; else `Forbidden`.

    `token_required` (auth is on): a request without a verified token has no
    rights at all. The SDK answers 401 before any tool runs; this holds should
    some path ever reach a tool without its token.
    """
    token = get_access_token()
    caller = NO_TOKEN_CALLER if token is None and token_required else caller_of(token)
    if not caller.may(right):
        raise Forbidden(caller, right, action)
    return caller.client_id


def current_client() -> str:
    """The caller's client id: from its verified token, else the local user."""
    return caller_of(get_access_token()).client_id


# --- static tokens -------------------------------------------------------------


@dataclass(frozen=True)
class TokenEntry:
    """One configured token: the secret itself, or a salted digest of it."""

    client_id: str
    role: Role
    where: str  # "<source> line N", for errors
    secret: bytes | None = None
    salt: bytes | None = None
    digest: bytes | None = None

    def matches(self, given: bytes) -> bool:
        if self.secret is not None:
            return hmac.compare_digest(given, self.secret)
        assert self.salt is not None and self.digest is not None
        return hmac.compare_digest(_digest(self.salt, given), self.digest)

    @property
    def stored_digest(self) -> str | None:
        """The digest as written in the file (for log scrubbing), if this entry is one."""
        if self.salt is None or self.digest is None:
            return None
        return f"{DIGEST_SCHEME}.{_b64(self.salt)}.{_b64(self.digest)}"


def _digest(salt: bytes, token: bytes) -> bytes:
    # Tokens are random and long (`pmq token new`: 256 bits), so a keyed hash is
    # enough: no password-stretching KDF, which every request would pay for.
    return hmac.new(salt, token, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_tokens(text: str, *, source: str) -> list[TokenEntry]:
    """`token:client_id[:role]` entries, one per line or separated by commas.

    A token cannot hold `:` (so a role suffix is never misread as part of it).
    Errors name the line (and the entry, when a line holds several) and the
    rule, never the token.
    """
    entries: list[TokenEntry] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        items = [item.strip() for item in line.split(",")]
        for item_no, item in enumerate(items, start=1):
            if not item or item.startswith("#"):
                continue
            where = f"{source} line {line_no}" + (f" entry {item_no}" if len(items) > 1 else "")
            entries.append(_parse_entry(item, where))
    return entries


def _parse_entry(item: str, where: str) -> TokenEntry:
    fields = item.split(":")
    if len(fields) not in (2, 3) or not all(fields):
        raise TokenConfigError(
            f"{where}: expected token:client_id or token:client_id:role "
            "(a token cannot contain ':')"
        )
    token, client_id = fields[0], fields[1]
    if not CLIENT_ID_RE.match(client_id):
        raise TokenConfigError(f"{where}: client id must be 1-64 of A-Z a-z 0-9 . _ -")
    role = _parse_role(fields[2] if len(fields) == 3 else Role.AGENT.value, where)
    return _entry(token, client_id, role, where)


def _parse_role(name: str, where: str) -> Role:
    try:
        return Role(name)
    except ValueError:
        roles = ", ".join(role.value for role in Role)
        raise TokenConfigError(
            f"{where}: unknown role {name!r:.40}; roles are {roles} (a token cannot "
            "contain ':': the third field is always a role)"
        ) from None


def _entry(token: str, client_id: str, role: Role, where: str) -> TokenEntry:
    if token.startswith(f"{DIGEST_SCHEME}."):
        found = DIGEST_RE.match(token)
        if not found:
            raise TokenConfigError(
                f"{where}: a digest must be {DIGEST_SCHEME}.<22-char salt>.<43-char digest>, "
                "as `pmq token new` prints it"
            )
        salt, digest = (_unb64(part) for part in found.groups())
        return TokenEntry(client_id, role, where, salt=salt, digest=digest)
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenConfigError(f"{where}: tokens must be at least {MIN_TOKEN_CHARS} characters")
    if not TOKEN_RE.match(token):
        raise TokenConfigError(f"{where}: tokens must be printable ASCII without spaces")
    return TokenEntry(client_id, role, where, secret=token.encode())


def load_tokens(inline: str, file: Path | None) -> list[TokenEntry]:
    entries = parse_tokens(inline, source="PMQ_AUTH_TOKENS")
    if file is not None:
        entries += parse_tokens(file.read_text(), source=str(file))
    seen: dict[bytes, str] = {}
    for entry in entries:
        if entry.secret is None:
            continue
        if entry.secret in seen:
            # Which line would win is an accident of order: refuse, naming both.
            raise TokenConfigError(f"{entry.where}: the same token as {seen[entry.secret]}")
        seen[entry.secret] = entry.where
    return entries


def token_secrets(entries: Iterable[TokenEntry]) -> list[str]:
    """What of the token configuration must never reach a log line."""
    values = []
    for entry in entries:
        if entry.secret is not None:
            values.append(entry.secret.decode())
        if entry.stored_digest is not None:
            values.append(entry.stored_digest)
    return values


@dataclass(frozen=True)
class NewToken:
    token: str
    line: str  # for the tokens file: the digest, not the token


def new_token(client_id: str, role: Role) -> NewToken:
    """A fresh random token and its tokens-file line (a salted digest of it)."""
    if not CLIENT_ID_RE.match(client_id):
        raise TokenConfigError("client id must be 1-64 of A-Z a-z 0-9 . _ -")
    token = "pmq_" + secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    stored = f"{DIGEST_SCHEME}.{_b64(salt)}.{_b64(_digest(salt, token.encode()))}"
    return NewToken(token, f"{stored}:{client_id}:{role}")


class StaticTokenVerifier:
    """Checks a bearer token against every configured token in constant time."""

    def __init__(self, entries: list[TokenEntry]) -> None:
        self._entries = entries

    async def verify_token(self, token: str) -> AccessToken | None:
        given = token.encode()
        found: list[TokenEntry] = []
        # Compare against all of them, so the time taken says nothing about which matched.
        for entry in self._entries:
            if entry.matches(given):
                found.append(entry)
        if len(found) != 1:
            if found:  # a token and a digest of it, say: no rule says which line wins
                log.warning("a bearer token matches %d token lines: refused", len(found))
            return None
        (entry,) = found
        return AccessToken(
            token=token, client_id=entry.client_id, scopes=[f"{ROLE_SCOPE_PREFIX}{entry.role}"]
        )


class BearerVerifier:
    """Static tokens first; then, for a token shaped like a JWT, the identity provider."""

    def __init__(self, entries: list[TokenEntry], jwt: JwtVerifier | None) -> None:
        self._static = StaticTokenVerifier(entries)
        self._jwt = jwt
        # A provider's subject named like a static client (or the local user)
        # would read and cancel that client's jobs: client ids are one namespace.
        self._taken = {entry.client_id for entry in entries} | {LOCAL_CLIENT}

    async def verify_token(self, token: str) -> AccessToken | None:
        found = await self._static.verify_token(token)
        if found is None and self._jwt is not None and looks_like_jwt(token):
            found = await self._jwt.verify(token)
            if found is not None and found.client_id in self._taken:
                log.warning(
                    "bearer JWT refused: its client id %r belongs to a static token or the "
                    "local user",
                    found.client_id,
                )
                return None
        return found


@dataclass(frozen=True)
class Auth:
    """What the HTTP frontend checks bearer tokens against."""

    entries: list[TokenEntry]
    jwt_rules: JwtRules | None = None
    jwt: JwtVerifier | None = None  # one per process: it caches the provider's keys

    @property
    def enabled(self) -> bool:
        return bool(self.entries) or self.jwt_rules is not None

    def verifier(self) -> BearerVerifier:
        return BearerVerifier(self.entries, self.jwt)

    def secrets(self) -> list[str]:
        return token_secrets(self.entries)


def load_auth(settings: Settings) -> Auth:
    """Tokens and JWT rules from settings; `TokenConfigError` names what is wrong."""
    entries = load_tokens(settings.auth_tokens, settings.auth_tokens_file)
    if not settings.jwt_jwks_url:
        return Auth(entries)
    assert settings.jwt_issuer and settings.jwt_audience  # Settings checks it
    try:
        rules = JwtRules(
            jwks_url=settings.jwt_jwks_url,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            client_claim=settings.jwt_client_claim,
            leeway_s=settings.jwt_leeway_s,
            algorithms=tuple(a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()),
        )
    except JwtConfigError as exc:
        raise TokenConfigError(f"JWT settings: {exc}") from None
    return Auth(entries, rules, JwtVerifier(rules))
