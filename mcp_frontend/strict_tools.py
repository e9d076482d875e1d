"""Tools that refuse arguments they do not declare.

The SDK validates a call against the tool function's signature and drops any
argument it does not know, so an agent's typo (`nmae`) or a field it expects
(`scheduled_time` on a server without it) silently did something else. Here
each tool's argument model, and each batch item, refuses unknown names with
an error naming them, and its JSON schema says `additionalProperties: false`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

from mcp.server.mcpserver.tools import Tool
from mcp.types import ToolAnnotations
from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError


class RefusesUnknown(BaseModel):
    """A model whose unknown keys are errors at their own names:
    `nmae: unknown argument 'nmae'; <outcome>`."""

    model_config = ConfigDict(extra="forbid")
    unknown_outcome: ClassVar[str] = "nothing was done"

    @model_validator(mode="wrap")
    @classmethod
    def _name_unknown(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            if not any(error["type"] == "extra_forbidden" for error in exc.errors()):
                raise
            # Only the text changes: pydantic's "Extra inputs are not permitted" says
            # neither that the name is unknown nor what became of the call.
            errors = [_reworded(error, cls.unknown_outcome) for error in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, errors) from None


def _reworded(error: ErrorDetails, outcome: str) -> Any:
    """The error as `from_exception_data` takes it, an unknown name's reworded."""
    if error["type"] == "extra_forbidden":
        # repr: a name with control characters must not break the message's lines.
        name, outcome = repr(str(error["loc"][-1])), outcome
    elif error["type"] == "unknown_argument":  # a batch item's, reworded already
        name, outcome = error["ctx"]["name"], error["ctx"]["outcome"]
    else:
        return error  # pydantic's own types rebuild from their dicts
    return InitErrorDetails(
        type=PydanticCustomError(
            "unknown_argument",
            "unknown argument {name}; {outcome}",
            {"name": name, "outcome": outcome},
        ),
        loc=error["loc"],
        input=error["input"],
    )


def strict_tool(
    fn: Callable[..., Any], *, annotations: ToolAnnotations, outcome: str = "nothing was done"
) -> Tool:
    """`fn` as an MCPServer tool whose arguments must all be declared ones."""
    tool = Tool.from_function(fn, annotations=annotations)
    loose = tool.fn_metadata.arg_model
    strict = cast(
        Any, create_model(loose.__name__, __base__=(RefusesUnknown, loose), __module__=__name__)
    )
    strict.unknown_outcome = outcome
    tool.fn_metadata.arg_model = strict
    tool.parameters = strict.model_json_schema(by_alias=True)
    return tool
