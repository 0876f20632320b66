"""End-to-end: the official `openai` SDK against a real exitserve on the tiny fixture.

Usage: python tests/e2e/openai_e2e.py BINARY
Starts BINARY on a free port, checks non-stream and stream completions in every mode against
the reference fixture ids, models.list, and that errors raise the matching SDK exceptions;
then chat completions (plain, streamed, logprobs, modes through extra_body, structured outputs
with `response_format` json_schema and the SDK's own `parse` from a pydantic model) and their
errors, with the shipped base-model template and without any template.
"""
import json
import os
import sys
from typing import List, Literal

import openai
import pydantic

from server import MODEL, ROOT, multi_exit, running

REFERENCE = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt-neo-multiexit.reference.json")
TEMPLATE = os.path.join(ROOT, "config", "chat-template-base.jinja")


def main():
    with running(sys.argv[1], "--chat-template", TEMPLATE) as port:
        run_checks(port)
        run_chat_checks(port)
    with running(sys.argv[1]) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
            raise AssertionError("a chat without a template must fail")
        except openai.BadRequestError as e:
            assert e.body["param"] == "messages" and "--chat-template" in e.body["message"], e.body
    print("openai e2e: all checks passed")


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["answer", "count", "tags"],
    "additionalProperties": False,
}


def check_schema(text, what):
    """The output parses and validates against SCHEMA."""
    v = json.loads(text)
    assert set(v) == {"answer", "count", "tags"}, (what, text)
    assert v["answer"] in ("yes", "no", "maybe"), (what, text)
    assert isinstance(v["count"], int) and 0 <= v["count"] <= 99, (what, text)
    assert isinstance(v["tags"], list) and len(v["tags"]) <= 3, (what, text)
    assert all(isinstance(t, str) and len(t) <= 8 for t in v["tags"]), (what, text)


class Answer(pydantic.BaseModel):
    answer: Literal["yes", "no"]
    count: int = pydantic.Field(ge=0, le=9)
    tags: List[Literal["a", "b"]] = pydantic.Field(max_length=2)


def run_chat_checks(port):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You answer questions."},
                {"role": "user", "content": "Is the sky blue?"}]
    rendered = "You answer questions.\n\nUser: Is the sky blue?\nAssistant:"

    # plain: the completion of the rendered prompt
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    plain = client.completions.create(model=MODEL, prompt=rendered, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens

    # streamed deltas reassemble the whole message
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, usage, finish, roles = "", None, None, 0
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += c.delta.role == "assistant"
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == chat.choices[0].message.content and finish == "length" and roles == 1
    assert usage.completion_tokens == 12

    # logprobs in the chat shape
    lp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                        logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].token == content[0].token
    assert "".join(t.token for t in content) == lp.choices[0].message.content

    # modes by extra_body and by model id
    by_id = client.chat.completions.create(model=f"{MODEL}:exit-2", messages=messages, max_tokens=6, temperature=0)
    by_body = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                             extra_body={"multi_exit": {"mode": "exit", "layer": 2}})
    assert by_id.choices[0].message.content == by_body.choices[0].message.content
    assert by_body.model_extra["multi_exit"] == {"mode": "exit", "name": "exit:2", "layer": 2}

    # structured outputs: json_schema in the original, exit, contrast and DoLa modes
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for mode in [{"mode": "original"}, {"mode": "exit", "layer": 1},
                 {"mode": "contrast", "upper": "original", "lower": 1},
                 {"mode": "dola", "layers": "low", "premature": "lm_head", "relative_top": 1e-5},
                 {"mode": "sled", "premature": "lm_head"}]:
        for seed in (None, 3):
            out = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=80, temperature=0 if seed is None else 1, seed=seed,
                response_format=response_format, extra_body={"multi_exit": mode})
            assert out.choices[0].finish_reason == "stop", (mode, out)
            check_schema(out.choices[0].message.content, mode)
    # streamed, the constrained deltas reassemble valid JSON too
    text = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, temperature=0,
                                                stream=True, response_format=response_format):
        for c in chunk.choices:
            text += c.delta.content or ""
    check_schema(text, "stream")
    # the SDK's own structured outputs: a pydantic model in, a parsed instance out
    parsed = client.chat.completions.parse(model=MODEL, messages=messages, max_tokens=60, temperature=0,
                                           response_format=Answer)
    assert isinstance(parsed.choices[0].message.parsed, Answer), parsed
    # vLLM's structured_outputs through extra_body
    choice = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            extra_body={"structured_outputs": {"choice": ["blue", "not blue"]}})
    assert choice.choices[0].message.content in ("blue", "not blue")

    # errors
    def expect(exc, **kw):
        try:
            client.chat.completions.create(model=MODEL, **kw)
        except exc as e:
            return e
        raise AssertionError(f"expected {exc.__name__} for {kw}")

    e = expect(openai.BadRequestError, messages=messages,
               response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
    assert e.body["param"] == "response_format.json_schema.schema", e.body
    e = expect(openai.BadRequestError, messages=messages, tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.body["param"] == "tools", e.body
    e = expect(openai.BadRequestError, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert e.body["param"].startswith("messages[0]"), e.body


def run_checks(port):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    cases = json.load(open(REFERENCE))["cases"]

    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == MODEL and f"{MODEL}:exit-2" in ids and f"{MODEL}:contrast-4-1" in ids, ids
    assert models.data[0].model_extra["exit_layers"] == [1, 2, 4]
    assert client.models.retrieve(f"{MODEL}:contrast-original-4").model_extra["multi_exit"]["upper"] == "original"

    # a plain client, without extra_body, picks every mode by model id alone
    for case in cases:
        model_id = MODEL + ":" + case["mode"].replace(":", "-").replace(",", "-")
        resp = client.completions.create(model=model_id, prompt=case["prompt"], max_tokens=24, temperature=0)
        assert resp.model == model_id
        assert resp.choices[0].text == case["greedy_text"], model_id

    checked = set()
    for case in cases:
        if case["mode"] in checked:
            continue
        checked.add(case["mode"])
        extra = {"multi_exit": multi_exit(case["mode"]), "return_token_ids": True}
        resp = client.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=24, temperature=0,
                                         extra_body=extra)
        choice = resp.choices[0]
        assert choice.model_extra["token_ids"] == case["greedy_ids"], case["mode"]
        assert choice.text == case["greedy_text"], case["mode"]
        assert choice.finish_reason == "length"
        assert resp.usage.completion_tokens == 24
        assert resp.usage.prompt_tokens == len(case["prompt_ids"])

        stream = client.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True}, extra_body=extra)
        text, usage, finish = "", None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        assert text == case["greedy_text"], (case["mode"], text)
        assert finish == "length"
        assert usage.total_tokens == len(case["prompt_ids"]) + 24
    assert len(checked) == 9, checked

    # the strategies across layers through extra_body and by model id: early exit at threshold 1
    # is the original text, with its usage extension; SLED decodes
    original = next(c for c in cases if c["mode"] == "original")
    early = client.completions.create(model=MODEL, prompt=original["prompt"], max_tokens=24, temperature=0,
                                      extra_body={"multi_exit": {"mode": "early_exit", "threshold": 1.0}})
    assert early.choices[0].text == original["greedy_text"]
    assert early.usage.model_extra["early_exit"]["tokens_by_layer"] == {"original": 24}, early.usage
    assert early.choices[0].model_extra["exit_layers"] == [4] * 24
    by_id = client.completions.create(model=f"{MODEL}:early-exit-1", prompt=original["prompt"], max_tokens=24,
                                      temperature=0)
    assert by_id.choices[0].text == original["greedy_text"]
    sled = client.completions.create(model=f"{MODEL}:sled", prompt=original["prompt"], max_tokens=8, temperature=0,
                                     logprobs=2)
    assert sled.model_extra["multi_exit"]["mode"] == "sled" and len(sled.choices[0].logprobs.tokens) == 8

    # sampling with a seed is reproducible; logprobs come back in the OpenAI shape
    a = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, seed=5, logprobs=2, n=2)
    b = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, seed=5, logprobs=2, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices[0].logprobs.token_logprobs) == 8

    def expect(exc, **kw):
        try:
            client.completions.create(**kw)
        except exc as e:
            return e
        raise AssertionError(f"expected {exc.__name__} for {kw}")

    e = expect(openai.BadRequestError, model=MODEL, prompt="x", extra_body={"multi_exit": {"mode": "exit", "layer": 3}})
    assert e.body["param"] == "multi_exit.layer", e.body
    assert "[1, 2, 4]" in e.body["message"]
    e = expect(openai.BadRequestError, model=MODEL, prompt="x", temperature=5)
    assert e.body["param"] == "temperature"
    e = expect(openai.NotFoundError, model="gpt-4", prompt="x")
    assert e.body["code"] == "model_not_found"
    bad_key = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    assert bad_key.models.list().data  # no --api-key: any key works


if __name__ == "__main__":
    main()
