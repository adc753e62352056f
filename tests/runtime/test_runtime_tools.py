"""Tool calling: the parser of <tool_call> blocks, request checks, and forced calls by the real bundled model
with a Hermes-style chat template given through the runtime's chat_template_file option."""

from __future__ import annotations

import json
import pathlib

import grpc
import pytest
from clowder.controller.v1 import resources_pb2
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from google.protobuf import struct_pb2

from clowder_common.errors import InvalidArgument, from_rpc_error
from clowder_runtime.app import create_runtime
from clowder_runtime.chat_template import ChatTemplate
from clowder_runtime.config import RuntimeConfig
from clowder_runtime.generation import ChatTurn, ToolCall, ToolMode
from clowder_runtime.tools import ToolCallParser, template_messages
from clowder_runtime.validation import build_job

HERMES_TEMPLATE = pathlib.Path(__file__).with_name("hermes_tools.jinja")
MODE = runtime_pb2.ToolChoice
QUESTION = "What is the weather in Paris?"


def tool(name: str, description: str, properties: dict, required: tuple[str, ...] = ()) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update({
        "type": "function",
        "function": {"name": name, "description": description,
                     "parameters": {"type": "object", "properties": properties, "required": list(required)}},
    })
    return struct


TOOLS = [
    tool("get_weather", "Current weather in a city", {"city": {"type": "string"}}, required=("city",)),
    tool("add", "Add two numbers", {"a": {"type": "number"}, "b": {"type": "number"}}, required=("a", "b")),
]


def request(mode: int = MODE.MODE_AUTO, function: str = "", tools=TOOLS, messages=None, **sampling):
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", 160)
    return runtime_pb2.GenerateRequest(
        request_id="tools",
        chat=runtime_pb2.ChatInput(
            messages=messages or [runtime_pb2.ChatMessage(role="user", content=QUESTION)],
            tools=tools,
            tool_choice=runtime_pb2.ToolChoice(mode=mode, function_name=function),
        ),
        sampling=runtime_pb2.SamplingParams(**sampling),
    )


def stream_through(parser: ToolCallParser, text: str) -> str:
    """Feed one character at a time: the worst split a tokenizer could make."""
    return "".join(parser.feed(ch) for ch in text) + parser.finish()


# -- the parser ----------------------------------------------------------------------


@pytest.mark.unit
def test_calls_are_taken_out_of_the_text_with_their_arguments_as_json():
    parser = ToolCallParser()
    text = stream_through(parser, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                  '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n')
    assert text == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert all(c.id.startswith("call_") for c in parser.calls)
    assert len({c.id for c in parser.calls}) == 2


@pytest.mark.unit
def test_text_that_only_looks_like_a_tag_is_returned_whole_and_in_order():
    parser = ToolCallParser()
    text = "a <tool b <tool_call>not json</tool_call> and <tool_call>[1]</tool_call> end <tool_ca"
    assert stream_through(parser, text) == text
    assert parser.calls == []


@pytest.mark.unit
def test_a_possible_tag_is_held_until_it_is_known():
    parser = ToolCallParser()
    assert parser.feed("Hello <tool_") == "Hello"
    assert parser.feed("c") == ""
    assert parser.feed("x> world") == " <tool_cx> world"
    assert parser.finish() == ""


@pytest.mark.unit
def test_a_call_missing_its_closing_tag_at_the_end_still_counts():
    parser = ToolCallParser()
    assert stream_through(parser, '<tool_call>\n{"name": "add", "parameters": {"a": 1}}') == ""
    assert [(c.name, c.arguments) for c in parser.calls] == [("add", '{"a": 1}')]


@pytest.mark.unit
def test_trailing_whitespace_is_kept_when_there_is_no_call():
    assert stream_through(ToolCallParser(), "line one\n\n") == "line one\n\n"


# -- request checks -------------------------------------------------------------------


def fields(request_: runtime_pb2.GenerateRequest) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        build_job(request_, resources_pb2.ImageConfiguration())
    return [v.field for v in caught.value.violations]


@pytest.mark.unit
def test_tools_and_tool_choice_reach_the_job():
    job = build_job(request(MODE.MODE_FUNCTION, "add"), resources_pb2.ImageConfiguration())
    assert job.tool_names == ("get_weather", "add")
    assert job.tool_choice.mode is ToolMode.FUNCTION and job.tool_choice.function == "add"
    assert build_job(request(tools=[]), resources_pb2.ImageConfiguration()).tools == ()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (request(MODE.MODE_FUNCTION, "nope"), "tool_choice"),
        (request(MODE.MODE_REQUIRED, tools=[]), "tool_choice"),
        (request(tools=[tool("bad name!", "", {})]), "tools[0].function.name"),
        (request(MODE.MODE_FUNCTION, "add", response_format=runtime_pb2.RESPONSE_FORMAT_JSON_OBJECT),
         "response_format"),
        (request(messages=[runtime_pb2.ChatMessage(role="user", content="x", tool_calls=[
            runtime_pb2.ToolCall(id="c", name="add", arguments="{}")])]), "messages[0].tool_calls"),
    ],
)
def test_bad_tool_requests_name_the_field(request_, field):
    assert fields(request_) == [field]


@pytest.mark.unit
def test_tool_turns_reach_the_template_as_openai_shaped_messages():
    turns = (
        ChatTurn("user", QUESTION),
        ChatTurn("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatTurn("tool", "sunny, 21 C", tool_call_id="call_1", name="get_weather"),
    )
    messages = template_messages(turns)
    assert messages[1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1", "name": "get_weather"}
    rendered = ChatTemplate(HERMES_TEMPLATE.read_text(), "", "").render(messages, [{"type": "function"}])
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in rendered


# -- the real model ---------------------------------------------------------------------


async def serve(config: RuntimeConfig):
    app = await create_runtime(config, resources_pb2.ImageConfiguration())
    await app.start()
    return app


@pytest.fixture(scope="module")
async def hermes(model_path):
    app = await serve(RuntimeConfig(model_path=str(model_path), context_size=1024, threads=1, slots=2,
                                    chat_template_file=str(HERMES_TEMPLATE)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield runtime_pb2_grpc.RuntimeServiceStub(channel)
    await app.stop()


@pytest.fixture(scope="module")
async def bundled(model_path):
    app = await serve(RuntimeConfig(model_path=str(model_path), context_size=512, threads=1, slots=1))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield runtime_pb2_grpc.RuntimeServiceStub(channel)
    await app.stop()


async def generate(stub, request_):
    return [r async for r in stub.Generate(request_)]


@pytest.mark.inprocess
async def test_a_named_function_is_called_with_arguments_that_follow_its_schema_and_no_text(hermes):
    responses = await generate(hermes, request(MODE.MODE_FUNCTION, "get_weather"))
    last = responses[-1]
    assert last.finish_reason == runtime_pb2.FINISH_REASON_TOOL_CALLS
    assert [c.name for c in last.tool_calls] == ["get_weather"]
    arguments = json.loads(last.tool_calls[0].arguments)
    assert list(arguments) == ["city"] and isinstance(arguments["city"], str)
    assert last.tool_calls[0].id.startswith("call_")
    assert "".join(r.text for r in responses) == ""
    assert all(not r.tool_calls for r in responses[:-1])
    assert last.usage.completion_tokens > 5


@pytest.mark.inprocess
async def test_the_named_function_decides_which_tool_is_called(hermes):
    responses = await generate(hermes, request(MODE.MODE_FUNCTION, "add"))
    assert [c.name for c in responses[-1].tool_calls] == ["add"]
    arguments = json.loads(responses[-1].tool_calls[0].arguments)
    assert sorted(arguments) == ["a", "b"]
    assert all(isinstance(v, (int, float)) for v in arguments.values())


@pytest.mark.inprocess
async def test_required_makes_calls_to_known_tools_only(hermes):
    responses = await generate(hermes, request(MODE.MODE_REQUIRED, max_tokens=400))
    last = responses[-1]
    assert last.finish_reason == runtime_pb2.FINISH_REASON_TOOL_CALLS
    assert 1 <= len(last.tool_calls)
    assert {c.name for c in last.tool_calls} <= {"get_weather", "add"}
    assert all(isinstance(json.loads(c.arguments), dict) for c in last.tool_calls)
    assert "<tool_call>" not in "".join(r.text for r in responses)


@pytest.mark.inprocess
async def test_none_and_auto_answer_in_text_when_the_model_does_not_call(hermes):
    for mode in (MODE.MODE_NONE, MODE.MODE_AUTO):
        responses = await generate(hermes, request(mode, max_tokens=24))
        assert responses[-1].finish_reason in (runtime_pb2.FINISH_REASON_STOP, runtime_pb2.FINISH_REASON_LENGTH)
        assert not responses[-1].tool_calls
        assert "".join(r.text for r in responses).strip()


@pytest.mark.inprocess
async def test_a_conversation_with_tool_results_is_accepted(hermes):
    messages = [
        runtime_pb2.ChatMessage(role="user", content=QUESTION),
        runtime_pb2.ChatMessage(role="assistant", tool_calls=[
            runtime_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
        runtime_pb2.ChatMessage(role="tool", content="sunny, 21 C", tool_call_id="call_1", name="get_weather"),
    ]
    short = await generate(hermes, request(messages=messages[:1], max_tokens=1))
    responses = await generate(hermes, request(messages=messages, max_tokens=8))
    assert responses[-1].usage.prompt_tokens > short[-1].usage.prompt_tokens + 20


@pytest.mark.inprocess
async def test_a_template_without_tools_refuses_them_unless_tool_choice_is_none(bundled):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(bundled, request())
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgument)
    assert error.reason == "TOOLS_UNSUPPORTED"
    assert "template" in str(error)
    responses = await generate(bundled, request(MODE.MODE_NONE, max_tokens=4))
    assert responses[-1].usage.completion_tokens == 4


@pytest.mark.inprocess
async def test_chat_template_options_are_checked_at_start(model_path, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    cases = [
        (RuntimeConfig(model_path=str(model_path), chat_template_file=str(broken)), "chat_template_file"),
        (RuntimeConfig(model_path=str(model_path), chat_template_file=str(tmp_path / "missing")), "chat_template_file"),
        (RuntimeConfig(model_path=str(model_path), chat_template="{{", chat_template_file=str(HERMES_TEMPLATE)),
         "chat_template_file"),
        (RuntimeConfig(model_path=str(model_path), chat_template="{{ x"), "chat_template"),
    ]
    for config, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            await create_runtime(config)
        assert caught.value.violations[0].field == field
