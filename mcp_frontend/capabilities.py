"""Advertise what the server has: tools and the tasks extension, no prompts or resources.

MCPServer registers prompt and resource handlers whether or not there are any,
and the SDK derives the advertised capabilities from the registered handlers:
clients were told of prompts and resources (and, at 2026-07-28, of
`listChanged` for both and of resource subscriptions, because
`subscriptions/listen` is served for tasks). MCPServer offers no switch for
either, so this middleware, the SDK's public seam, answers those methods as
a server without them does (-32601) and takes them out of the capabilities that
`initialize` and `server/discover` report. The tool list never changes, so
`tools.listChanged` is false in both eras.
"""

from __future__ import annotations

from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import METHOD_NOT_FOUND

ABSENT_PREFIXES = ("prompts/", "resources/")
REPORTS_CAPABILITIES = frozenset({"initialize", "server/discover"})


class AdvertiseWhatExists:
    """A `ServerMiddleware`: no prompts, no resources, a tool list that never changes."""

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.method.startswith(ABSENT_PREFIXES):
            raise MCPError(code=METHOD_NOT_FOUND, message=f"Method not found: {ctx.method}")
        result = await call_next(ctx)
        if ctx.method in REPORTS_CAPABILITIES:
            _only_what_exists(result)
        return result


def _only_what_exists(result: Any) -> None:
    """Edit the capabilities in `result`, a wire dict or a result model, in place."""
    if isinstance(result, dict):
        capabilities = result.get("capabilities")
        if isinstance(capabilities, dict):
            capabilities.pop("prompts", None)
            capabilities.pop("resources", None)
            if isinstance(capabilities.get("tools"), dict):
                capabilities["tools"]["listChanged"] = False
        return
    capabilities = getattr(result, "capabilities", None)
    if capabilities is not None:
        capabilities.prompts = None
        capabilities.resources = None
        if capabilities.tools is not None:
            capabilities.tools.list_changed = False
