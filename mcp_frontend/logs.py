"""Process-wide logging for `pmq` commands: one JSON object per line on stderr.

Secrets are scrubbed from every line by value, whatever logged them: the
bearer tokens and their stored digests, Prefect's API key and auth string, a
Redis password. JWTs and `pmq token new` tokens are scrubbed by shape.
"""

import logging
import re
import sys
from collections.abc import Iterable

from pythonjsonlogger.json import JsonFormatter

REDACTED = "[redacted]"
# Scrubbed by shape, since no list names them: a JWS compact serialisation (base64url
# of a JSON header, '{"' being "eyJ", then payload and signature), and the tokens
# `pmq token new` makes, whose file holds only their digest.
BY_SHAPE = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*|pmq_[A-Za-z0-9_-]{43}"
)


class RedactSecrets(logging.Filter):
    """Replaces every known secret in a record's message and arguments."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is removed whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's copy of the message with ANSI colours: JSON lines would carry it.
        record.__dict__.pop("color_message", None)
        record.msg, record.args = self.scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
            record.exc_info = None  # formatters would render it again, unscrubbed
        return True

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return BY_SHAPE.sub(REDACTED, text)


def configure_logging(*, json_lines: bool, level: str, secrets: Iterable[str]) -> None:
    """Send every logger's records to stderr (stdout carries MCP over stdio)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # warnings become log lines too, not bare stderr text
    root.setLevel(level.upper())
    # Libraries that install their own handlers would bypass the filter.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "mcp", "prefect", "httpx"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
