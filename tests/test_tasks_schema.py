"""The hand-written schema for the MCP tasks extension, checked against the spec's own examples.

The examples are copied from docs/specification/draft/tasks.mdx in
modelcontextprotocol/experimental-ext-tasks (see the schema's `$comment` for the commit), in the
order they appear there. The two partial `jsonc` snippets under "Capability Negotiation" are not
whole messages and are left out; the full request in "Example Message Flow" covers the first.
"""

from typing import Any

import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from tests.tasks_schema import assert_valid, schema, validator_for

Json = dict[str, Any]

# --- Capability Negotiation -------------------------------------------------------------------

MISSING_CAPABILITY_ERROR: Json = {
    "jsonrpc": "2.0",
    "id": 1,
    "error": {
        "code": -32003,
        "message": "Missing required client capability",
        "data": {"requiredCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}}},
    },
}

# --- Task Creation ----------------------------------------------------------------------------

GET_WEATHER_REQUEST: Json = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "get_weather", "arguments": {"city": "New York"}},
}

GET_WEATHER_CREATE_TASK_RESPONSE: Json = {
    "jsonrpc": "2.0",
    "id": 1,
    "result": {
        "resultType": "task",
        "taskId": "786512e2-9e0d-44bd-8f29-789f320fe840",
        "status": "working",
        "statusMessage": "The operation is now in progress.",
        "createdAt": "2025-11-25T10:30:00Z",
        "lastUpdatedAt": "2025-11-25T10:40:00Z",
        "ttlMs": 60000,
        "pollIntervalMs": 5000,
    },
}

# --- Task Status Notifications ----------------------------------------------------------------

LISTEN_MISSING_CAPABILITY_ERROR: Json = {
    "jsonrpc": "2.0",
    "id": 12,
    "error": {
        "code": -32003,
        "message": "Missing required client capability",
        "data": {"requiredCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}}},
    },
}

COMPLETED_NOTIFICATION: Json = {
    "jsonrpc": "2.0",
    "method": "notifications/tasks",
    "params": {
        "taskId": "786512e2-9e0d-44bd-8f29-789f320fe840",
        "status": "completed",
        "createdAt": "2025-11-25T10:30:00Z",
        "lastUpdatedAt": "2025-11-25T10:50:00Z",
        "ttlMs": 60000,
        "pollIntervalMs": 5000,
        "result": {
            "content": [{"type": "text", "text": "Operation completed successfully."}],
            "isError": False,
        },
    },
}

# --- Example Message Flow ---------------------------------------------------------------------

HELLO_WORLD_REQUEST: Json = {
    "jsonrpc": "2.0",
    "id": 2,
    "method": "tools/call",
    "params": {
        "name": "hello_world",
        "arguments": {},
        "_meta": {
            "io.modelcontextprotocol/clientCapabilities": {
                "extensions": {"io.modelcontextprotocol/tasks": {}},
            },
        },
    },
}

HELLO_WORLD_CREATE_TASK_RESPONSE: Json = {
    "jsonrpc": "2.0",
    "id": 2,
    "result": {
        "resultType": "task",
        "taskId": "786512e2-9e0d-44bd-8f29-789f320fe840",
        "status": "working",
        "createdAt": "2025-11-25T10:30:00Z",
        "lastUpdatedAt": "2025-11-25T10:50:00Z",
        "ttlMs": 3600000,
        "pollIntervalMs": 5000,
    },
}

# The flow polls five times (ids 3, 4, 5, 7, 8) with otherwise identical requests.
GET_REQUESTS: list[Json] = [
    {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tasks/get",
        "params": {"taskId": "786512e2-9e0d-44bd-8f29-789f320fe840"},
    }
    for request_id in (3, 4, 5, 7, 8)
]

WORKING_RESPONSE: Json = {
    "jsonrpc": "2.0",
    "id": 3,
    "result": {
        "resultType": "complete",
        "taskId": "786512e2-9e0d-44bd-8f29-789f320fe840",
        "status": "working",
        "createdAt": "2025-11-25T10:30:00Z",
        "lastUpdatedAt": "2025-11-25T10:50:00Z",
        "ttlMs": 3600000,
        "pollIntervalMs": 5000,
    },
}

INPUT_REQUIRED_RESPONSE: Json = {
    "id": 4,
    "jsonrpc": "2.0",
    "result": {
        "resultType": "complete",
        "taskId": "786512e2-9e0d-44bd-8f29-789f320fe840",
        "status": "input_required",
        "createdAt": "2025-11-25T10:30:00Z",
        "lastUpdatedAt": "2025-11-25T10:50:00Z",
        "ttlMs": 3600000,
        "pollIntervalMs": 5000,
        "inputRequests": {
            "name": {
                "method": "elicitation/create",
                "params": {
                    "mode": "form",
                    "message": "Please enter your name.",
                    "requestedSchema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}},
                        "required": ["name"],
                    },
                },
            }
        },
    },
}

# The repeated poll before the user answers gets the same response under id 5.
INPUT_REQUIRED_AGAIN_RESPONSE: Json = {**INPUT_REQUIRED_RESPONSE, "id": 5}

UPDATE_REQUEST: Json = {
    "jsonrpc": "2.0",
    "id": 6,
    "method": "tasks/update",
    "params": {
        "taskId": "786512e2-9e0d-44bd-8f29-789f320fe840",
        "inputResponses": {"name": {"action": "accept", "content": {"input": "Luca"}}},
    },
}

UPDATE_ACK: Json = {"jsonrpc": "2.0", "id": 6, "result": {"resultType": "complete"}}

# Back to working after the update: the id-3 response again, under id 7.
WORKING_AGAIN_RESPONSE: Json = {**WORKING_RESPONSE, "id": 7}

COMPLETED_RESPONSE: Json = {
    "jsonrpc": "2.0",
    "id": 8,
    "result": {
        "resultType": "complete",
        "taskId": "786512e2-9e0d-44bd-8f29-789f320fe840",
        "status": "completed",
        "createdAt": "2025-11-25T10:30:00Z",
        "lastUpdatedAt": "2025-11-25T10:50:00Z",
        "ttlMs": 3600000,
        "pollIntervalMs": 5000,
        "result": {"content": [{"type": "text", "text": "Hello, Luca!"}], "isError": False},
    },
}

# --- Error Handling ---------------------------------------------------------------------------

TASK_NOT_FOUND: Json = {
    "jsonrpc": "2.0",
    "id": 70,
    "error": {"code": -32602, "message": "Failed to retrieve task: Task not found"},
}

TASK_EXPIRED: Json = {
    "jsonrpc": "2.0",
    "id": 71,
    "error": {"code": -32602, "message": "Failed to retrieve task: Task has expired"},
}

# These two say resultType "task" although the text calls them tasks/get responses (whose
# resultType MUST be "complete"); see test_error_handling_examples_say_task_not_complete.
FAILED_EXECUTION_EXAMPLE: Json = {
    "jsonrpc": "2.0",
    "id": 4,
    "result": {
        "resultType": "task",
        "taskId": "786512e2-9e0d-44bd-8f29-789f820fe840",
        "status": "failed",
        "createdAt": "2025-11-25T10:30:00Z",
        "lastUpdatedAt": "2025-11-25T10:40:00Z",
        "ttlMs": 3600000,
        "statusMessage": "Tool execution failed: API rate limit exceeded",
        "error": {"code": -32603, "message": "API rate limit exceeded"},
    },
}

TOOL_ERROR_EXAMPLE: Json = {
    "jsonrpc": "2.0",
    "id": 5,
    "result": {
        "resultType": "task",
        "taskId": "786512e2-9e0d-44bd-8f29-789f820fe840",
        "status": "completed",
        "createdAt": "2025-11-25T10:30:00Z",
        "lastUpdatedAt": "2025-11-25T10:40:00Z",
        "ttlMs": 3600000,
        "result": {
            "content": [{"type": "text", "text": "Failed to process request: invalid input"}],
            "isError": True,
        },
    },
}

SPEC_EXAMPLES = [
    pytest.param("MissingRequiredClientCapabilityError", MISSING_CAPABILITY_ERROR, id="-32003"),
    pytest.param("CallToolRequest", GET_WEATHER_REQUEST, id="get_weather-request"),
    pytest.param("CreateTaskResponse", GET_WEATHER_CREATE_TASK_RESPONSE, id="get_weather-task"),
    pytest.param(
        "MissingRequiredClientCapabilityError", LISTEN_MISSING_CAPABILITY_ERROR, id="listen-32003"
    ),
    pytest.param("TaskStatusNotification", COMPLETED_NOTIFICATION, id="notification"),
    pytest.param(
        "CallToolResult", COMPLETED_NOTIFICATION["params"]["result"], id="notification-result"
    ),
    pytest.param("CallToolRequestWithTasksCapability", HELLO_WORLD_REQUEST, id="hello-request"),
    pytest.param("CreateTaskResponse", HELLO_WORLD_CREATE_TASK_RESPONSE, id="hello-task"),
    *(
        pytest.param("GetTaskRequest", request, id=f"tasks/get-{request['id']}")
        for request in GET_REQUESTS
    ),
    pytest.param("GetTaskResponse", WORKING_RESPONSE, id="working-3"),
    pytest.param("GetTaskResponse", INPUT_REQUIRED_RESPONSE, id="input_required-4"),
    pytest.param("GetTaskResponse", INPUT_REQUIRED_AGAIN_RESPONSE, id="input_required-5"),
    pytest.param("UpdateTaskRequest", UPDATE_REQUEST, id="tasks/update-6"),
    pytest.param("UpdateTaskResponse", UPDATE_ACK, id="update-ack-6"),
    pytest.param("GetTaskResponse", WORKING_AGAIN_RESPONSE, id="working-7"),
    pytest.param("GetTaskResponse", COMPLETED_RESPONSE, id="completed-8"),
    pytest.param("CallToolResult", COMPLETED_RESPONSE["result"]["result"], id="completed-8-tool"),
    pytest.param("TaskNotFoundError", TASK_NOT_FOUND, id="not-found-70"),
    pytest.param("TaskNotFoundError", TASK_EXPIRED, id="expired-71"),
    # resultType "task" makes these CreateTaskResults; the inlined task still fits its variant.
    pytest.param("CreateTaskResponse", FAILED_EXECUTION_EXAMPLE, id="failed-execution"),
    pytest.param("FailedTask", FAILED_EXECUTION_EXAMPLE["result"], id="failed-execution-task"),
    pytest.param("CreateTaskResponse", TOOL_ERROR_EXAMPLE, id="tool-error"),
    pytest.param("CompletedTask", TOOL_ERROR_EXAMPLE["result"], id="tool-error-task"),
    pytest.param("CallToolResult", TOOL_ERROR_EXAMPLE["result"]["result"], id="tool-error-tool"),
]


@pytest.mark.parametrize(("name", "message"), SPEC_EXAMPLES)
def test_spec_example_is_valid(name: str, message: Json) -> None:
    assert_valid(name, message)


# --- Hand-made cases --------------------------------------------------------------------------


def changed(base: Json, **changes: Any) -> Json:
    return {**base, **changes}


def without(base: Json, *keys: str) -> Json:
    return {key: value for key, value in base.items() if key not in keys}


CREATE_RESULT: Json = HELLO_WORLD_CREATE_TASK_RESPONSE["result"]
WORKING_TASK: Json = without(WORKING_RESPONSE["result"], "resultType")
WORKING_RESULT: Json = WORKING_RESPONSE["result"]
INPUT_REQUIRED_RESULT: Json = INPUT_REQUIRED_RESPONSE["result"]
COMPLETED_RESULT: Json = COMPLETED_RESPONSE["result"]
COMPLETED_TASK: Json = without(COMPLETED_RESULT, "resultType")
FAILED_TASK: Json = without(FAILED_EXECUTION_EXAMPLE["result"], "resultType")
TOOL_RESULT: Json = COMPLETED_RESULT["result"]
CANCEL_REQUEST: Json = {
    "jsonrpc": "2.0",
    "id": 9,
    "method": "tasks/cancel",
    "params": {"taskId": "786512e2-9e0d-44bd-8f29-789f320fe840"},
}

# The spec gives the listen request and its acknowledgement as TypeScript only; the core
# revision requires the subscription id on every frame of the stream.
SUBSCRIPTION = {"io.modelcontextprotocol/subscriptionId": 12}
LISTEN_REQUEST: Json = {
    "jsonrpc": "2.0",
    "id": 12,
    "method": "subscriptions/listen",
    "params": {
        "notifications": {"taskIds": ["786512e2-9e0d-44bd-8f29-789f320fe840"]},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {
                "extensions": {"io.modelcontextprotocol/tasks": {}}
            },
        },
    },
}
LISTEN_ACK: Json = {
    "jsonrpc": "2.0",
    "method": "notifications/subscriptions/acknowledged",
    "params": {
        "notifications": {"taskIds": ["786512e2-9e0d-44bd-8f29-789f320fe840"]},
        "_meta": SUBSCRIPTION,
    },
}
LISTENED_NOTIFICATION: Json = changed(
    COMPLETED_NOTIFICATION, params={**COMPLETED_NOTIFICATION["params"], "_meta": SUBSCRIPTION}
)
LISTEN_CLOSED: Json = {
    "jsonrpc": "2.0",
    "id": 12,
    "result": {"resultType": "complete", "_meta": SUBSCRIPTION},
}

# The spec has no tasks/cancel example, nor one of a cancelled task or of an unlimited TTL.
HAND_MADE_VALID = [
    pytest.param("CancelTaskRequest", CANCEL_REQUEST, id="tasks/cancel"),
    pytest.param(
        "CancelTaskResponse",
        {"jsonrpc": "2.0", "id": 9, "result": {"resultType": "complete"}},
        id="cancel-ack",
    ),
    pytest.param("GetTaskResult", changed(WORKING_RESULT, status="cancelled"), id="cancelled"),
    pytest.param("Task", changed(WORKING_TASK, ttlMs=None), id="ttl-unlimited"),
    pytest.param("Task", without(WORKING_TASK, "pollIntervalMs"), id="no-poll-interval"),
    pytest.param("GetTaskResult", changed(WORKING_RESULT, _meta={"x": 1}), id="result-meta"),
    pytest.param("SubscriptionsListenRequest", LISTEN_REQUEST, id="listen"),
    pytest.param("SubscriptionsAcknowledgedNotification", LISTEN_ACK, id="listen-ack"),
    pytest.param(
        "SubscriptionsAcknowledgedNotification",
        changed(LISTEN_ACK, params={"notifications": {}, "_meta": SUBSCRIPTION}),
        id="listen-ack-none",
    ),
    pytest.param("ListenedTaskStatusNotification", LISTENED_NOTIFICATION, id="listened"),
    pytest.param("SubscriptionsListenResultResponse", LISTEN_CLOSED, id="listen-closed"),
]


@pytest.mark.parametrize(("name", "message"), HAND_MADE_VALID)
def test_hand_made_message_is_valid(name: str, message: Json) -> None:
    assert_valid(name, message)


# Each case starts from a valid message and changes one thing, so the failure is that change's.
NEGATIVES = [
    pytest.param(
        "CreateTaskResult",
        CREATE_RESULT,
        without(CREATE_RESULT, "resultType"),
        id="create-without-resultType",
    ),
    pytest.param(
        "CreateTaskResult",
        CREATE_RESULT,
        changed(CREATE_RESULT, resultType="complete"),
        id="create-resultType-complete",
    ),
    pytest.param(
        "GetTaskResult",
        COMPLETED_RESULT,
        without(COMPLETED_RESULT, "result"),
        id="get-completed-without-result",
    ),
    pytest.param(
        "GetTaskResult",
        WORKING_RESULT,
        changed(WORKING_RESULT, resultType="task"),
        id="get-resultType-task",
    ),
    pytest.param(
        "GetTaskResult",
        INPUT_REQUIRED_RESULT,
        without(INPUT_REQUIRED_RESULT, "inputRequests"),
        id="get-input_required-without-inputRequests",
    ),
    pytest.param(
        "FailedTask", FAILED_TASK, without(FAILED_TASK, "error"), id="failed-without-error"
    ),
    pytest.param(
        "FailedTask",
        FAILED_TASK,
        changed(FAILED_TASK, error={"message": "no code"}),
        id="failed-error-without-code",
    ),
    pytest.param(
        "FailedTask", FAILED_TASK, changed(FAILED_TASK, result=TOOL_RESULT), id="failed-with-result"
    ),
    pytest.param(
        "CompletedTask",
        COMPLETED_TASK,
        changed(COMPLETED_TASK, error=FAILED_TASK["error"]),
        id="completed-with-error",
    ),
    pytest.param(
        "WorkingTask",
        WORKING_TASK,
        changed(WORKING_TASK, result=TOOL_RESULT),
        id="working-with-result",
    ),
    pytest.param(
        "WorkingTask",
        WORKING_TASK,
        changed(WORKING_TASK, error=FAILED_TASK["error"]),
        id="working-with-error",
    ),
    pytest.param("Task", WORKING_TASK, changed(WORKING_TASK, ttlMs="60000"), id="ttlMs-string"),
    pytest.param(
        "DetailedTask",
        WORKING_TASK,
        changed(WORKING_TASK, ttlMs="60000"),
        id="detailed-ttlMs-string",
    ),
    pytest.param("Task", WORKING_TASK, changed(WORKING_TASK, ttlMs=1.5), id="ttlMs-fraction"),
    pytest.param("Task", WORKING_TASK, without(WORKING_TASK, "ttlMs"), id="ttlMs-missing"),
    pytest.param(
        "Task", WORKING_TASK, changed(WORKING_TASK, pollIntervalMs=-1), id="pollIntervalMs-negative"
    ),
    pytest.param("Task", WORKING_TASK, changed(WORKING_TASK, status="done"), id="status-done"),
    pytest.param(
        "DetailedTask",
        WORKING_TASK,
        changed(WORKING_TASK, status="done"),
        id="detailed-status-done",
    ),
    pytest.param(
        "Task",
        WORKING_TASK,
        changed(WORKING_TASK, createdAt="yesterday"),
        id="createdAt-not-date-time",
    ),
    pytest.param("CancelTaskResult", {"resultType": "complete"}, {}, id="cancel-ack-empty"),
    pytest.param(
        "UpdateTaskRequest",
        UPDATE_REQUEST,
        changed(UPDATE_REQUEST, params={"taskId": "t"}),
        id="update-without-inputResponses",
    ),
    pytest.param(
        "GetTaskRequest",
        GET_REQUESTS[0],
        changed(GET_REQUESTS[0], params={}),
        id="get-without-taskId",
    ),
    pytest.param(
        "TaskNotFoundError",
        TASK_NOT_FOUND,
        changed(TASK_NOT_FOUND, error={"code": -32603, "message": "Internal error"}),
        id="not-found-wrong-code",
    ),
    pytest.param(
        "TaskStatusNotification",
        COMPLETED_NOTIFICATION,
        changed(COMPLETED_NOTIFICATION, method="notifications/tasks/status"),
        id="notification-schema-ts-method",
    ),
    pytest.param(
        "TaskStatusNotification",
        COMPLETED_NOTIFICATION,
        changed(COMPLETED_NOTIFICATION, id=1),
        id="notification-with-id",
    ),
    pytest.param(
        "CallToolResult",
        TOOL_RESULT,
        changed(TOOL_RESULT, resultType="task"),
        id="tool-result-resultType-task",
    ),
    pytest.param(
        "CallToolResult",
        TOOL_RESULT,
        changed(TOOL_RESULT, content=[{"type": "text"}]),
        id="tool-result-text-without-text",
    ),
    pytest.param(
        "CallToolRequestWithTasksCapability",
        HELLO_WORLD_REQUEST,
        changed(HELLO_WORLD_REQUEST, params={"name": "hello_world", "arguments": {}}),
        id="tools/call-without-capability",
    ),
    pytest.param(
        "SubscriptionsListenRequest",
        LISTEN_REQUEST,
        changed(LISTEN_REQUEST, params={"notifications": {"taskIds": "786512e2"}}),
        id="listen-taskIds-not-a-list",
    ),
    pytest.param(
        "SubscriptionsListenRequest",
        LISTEN_REQUEST,
        changed(LISTEN_REQUEST, params={"_meta": LISTEN_REQUEST["params"]["_meta"]}),
        id="listen-without-notifications",
    ),
    pytest.param(
        "SubscriptionsAcknowledgedNotification",
        LISTEN_ACK,
        changed(LISTEN_ACK, params=without(LISTEN_ACK["params"], "_meta")),
        id="ack-without-subscription-id",
    ),
    pytest.param(
        "SubscriptionsAcknowledgedNotification",
        LISTEN_ACK,
        changed(LISTEN_ACK, id=12),
        id="ack-with-id",
    ),
    pytest.param(
        "ListenedTaskStatusNotification",
        LISTENED_NOTIFICATION,
        changed(LISTENED_NOTIFICATION, params={**LISTENED_NOTIFICATION["params"], "_meta": {}}),
        id="listened-without-subscription-id",
    ),
    pytest.param(
        "SubscriptionsListenResultResponse",
        LISTEN_CLOSED,
        changed(LISTEN_CLOSED, result={"resultType": "complete"}),
        id="listen-closed-without-subscription-id",
    ),
]


@pytest.mark.parametrize(("name", "valid", "invalid"), NEGATIVES)
def test_one_change_makes_it_invalid(name: str, valid: Json, invalid: Json) -> None:
    assert_valid(name, valid)
    with pytest.raises(AssertionError):
        assert_valid(name, invalid)


# --- The spec's own inconsistencies, pinned so a fix upstream shows up here --------------------


@pytest.mark.parametrize("example", [FAILED_EXECUTION_EXAMPLE, TOOL_ERROR_EXAMPLE])
def test_error_handling_examples_say_task_not_complete(example: Json) -> None:
    """The text calls these tasks/get responses, but GetTaskResult MUST say "complete"."""
    assert not validator_for("GetTaskResult").is_valid(example["result"])
    assert_valid("GetTaskResult", changed(example["result"], resultType="complete"))


def test_notification_example_lacks_the_subscription_id() -> None:
    """The core revision wants the listen's id on each frame of its stream; the example has none."""
    assert_valid("TaskStatusNotification", COMPLETED_NOTIFICATION)
    assert not validator_for("ListenedTaskStatusNotification").is_valid(COMPLETED_NOTIFICATION)


def test_task_creation_example_request_lacks_the_capability() -> None:
    """A CreateTaskResult answers it, yet a server MUST NOT send one without the capability."""
    assert_valid("CallToolRequest", GET_WEATHER_REQUEST)
    assert not validator_for("CallToolRequestWithTasksCapability").is_valid(GET_WEATHER_REQUEST)


# --- The schema file and the helpers ----------------------------------------------------------


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(schema())


def test_schema_says_where_it_comes_from() -> None:
    comment = schema()["$comment"]
    for needle in (
        "io.modelcontextprotocol/tasks",
        "SEP-2663",
        "2026-07-28",
        "2026-11-29",
        "modelcontextprotocol/experimental-ext-tasks",
        "docs/specification/draft/tasks.mdx",
        "schema/draft/schema.ts",
        "notifications/tasks/status",
        "subscriptions/listen",
        "-32021",
        "schema/draft/spec.types.ts",
    ):
        assert needle in comment


def test_assert_valid_lists_every_error_with_its_path() -> None:
    invalid = changed(CREATE_RESULT, resultType="complete", ttlMs="60000")
    with pytest.raises(AssertionError) as raised:
        assert_valid("CreateTaskResult", invalid)
    message = str(raised.value)
    assert "$.resultType: 'task' was expected" in message
    assert "$.ttlMs: '60000' is not of type 'integer', 'null'" in message


def test_assert_valid_explains_a_failed_one_of() -> None:
    """Only the variant matching the status is blamed, not the four others."""
    with pytest.raises(AssertionError) as raised:
        assert_valid("GetTaskResult", without(COMPLETED_RESULT, "result"))
    causes = [line for line in str(raised.value).splitlines() if "because" in line]
    assert causes == ["    because $: 'result' is a required property"]


def test_validator_for_unknown_name() -> None:
    with pytest.raises(KeyError, match="NoSuchThing"):
        validator_for("NoSuchThing")
