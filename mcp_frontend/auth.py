"""Static bearer tokens for the HTTP frontend: token -> client id.

Tokens come from `PMQ_AUTH_TOKENS` and/or a file (`PMQ_AUTH_TOKENS_FILE`, one
`token:client_id` per line, `#` comments). The SDK's bearer middleware answers
401 to a missing or unknown token; tools read the caller's client id from the
verified token. stdio and in-process servers have no token: their caller is
the local user, client id `local`.
"""

import hmac
import re
from pathlib import Path

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken

from worker.contract import LOCAL_CLIENT

MIN_TOKEN_CHARS = 16
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class TokenConfigError(ValueError):
    """The configured tokens are unusable; the message says which line and why."""


def parse_tokens(text: str, *, source: str) -> dict[str, str]:
    """`token:client_id` entries separated by commas or newlines -> {token: client_id}."""
    tokens: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for number, entry in enumerate(entries, start=1):
        if not entry or entry.startswith("#"):
            continue
        token, sep, client_id = entry.rpartition(":")
        if not sep or not token:
            raise TokenConfigError(f"{source} entry {number}: expected token:client_id")
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenConfigError(
                f"{source} entry {number}: tokens must be at least {MIN_TOKEN_CHARS} characters"
            )
        if not CLIENT_ID_RE.match(client_id):
            raise TokenConfigError(
                f"{source} entry {number}: client id must be 1-64 of A-Z a-z 0-9 . _ -"
            )
        tokens[token] = client_id
    return tokens


def load_tokens(inline: str, file: Path | None) -> dict[str, str]:
    tokens = parse_tokens(inline, source="PMQ_AUTH_TOKENS")
    if file is not None:
        tokens |= parse_tokens(file.read_text(), source=str(file))
    return tokens


class StaticTokenVerifier:
    """Checks a bearer token against every configured token in constant time."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = [(token.encode(), client_id) for token, client_id in tokens.items()]

    async def verify_token(self, token: str) -> AccessToken | None:
        given = token.encode()
        found: str | None = None
        # Compare against all of them, so the time taken says nothing about which matched.
        for known, client_id in self._tokens:
            if hmac.compare_digest(given, known):
                found = client_id
        if found is None:
            return None
        return AccessToken(token=token, client_id=found, scopes=[])


def current_client() -> str:
    """The caller's client id: from its verified token, else the local user."""
    token = get_access_token()
    return token.client_id if token is not None else LOCAL_CLIENT
