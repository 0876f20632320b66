"""End-to-end: the official `openai` SDK against a real exitserve on the tiny fixture.

Usage: python tests/e2e/openai_e2e.py BINARY
Starts BINARY on a free port, checks non-stream and stream completions in every mode against
the reference fixture ids, models.list, and that errors raise the matching SDK exceptions.
"""
import json
import os
import sys

import openai

from server import MODEL, ROOT, multi_exit, running

REFERENCE = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt-neo-multiexit.reference.json")


def main():
    with running(sys.argv[1]) as port:
        run_checks(port)
    print("openai e2e: all checks passed")


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
