"""The official OpenAI Python client against OpenClaw's gateway.

Run by tests/llm_gateway.rs: python3 openai_client.py BASE_URL MODEL
Prints one `ok NAME` line per check that passed; an assertion that fails
exits non-zero with its message. Greedy decoding (temperature 0) makes
the streamed and the whole answer comparable.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
ask = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


def ok(name):
    print("ok", name, flush=True)


ids = [m.id for m in client.models.list().data]
assert model in ids, f"{model} not in {ids}"
ok("models_list")

whole = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=24)
text = whole.choices[0].message.content
assert text, "empty answer"
assert whole.choices[0].finish_reason in ("stop", "length"), whole.choices[0].finish_reason
assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0, whole.usage
assert whole.object == "chat.completion", whole.object
ok("chat")

pieces = []
finish = None
usage = None
stream = client.chat.completions.create(
    model=model, messages=ask, temperature=0, max_tokens=24, stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert len(pieces) > 1, f"the answer came in {len(pieces)} piece(s), not streamed"
assert "".join(pieces) == text, f"streamed {''.join(pieces)!r} != whole {text!r}"
assert finish == whole.choices[0].finish_reason, (finish, whole.choices[0].finish_reason)
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
ok("chat_stream")

try:
    client.chat.completions.create(model="no-such-model", messages=ask)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e.status_code
    assert "no-such-model" in e.message, e.message
    assert e.code == "model_not_found", e.code
ok("unknown_model_404")

try:
    client.chat.completions.create(model=model, messages=ask, temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "temperature" in e.message, (e.status_code, e.message)
    assert e.param == "temperature", e.param
ok("bad_parameter_400")

try:
    client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "x"}])
    raise AssertionError("role robot was accepted")
except openai.BadRequestError as e:
    assert "messages[0].role" in e.message, e.message
ok("malformed_message_400")

long = [{"role": "user", "content": "tok " * 6000}]
for streamed in (False, True):
    try:
        r = client.chat.completions.create(model=model, messages=long, max_tokens=4, stream=streamed)
        if streamed:
            list(r)
        raise AssertionError("a prompt over the context was accepted")
    except openai.BadRequestError as e:
        msg = e.message
        assert "context" in msg and "tokens" in msg, msg
        nums = [int(w) for w in msg.replace(",", " ").split() if w.isdigit()]
        assert len(nums) >= 2 and max(nums) > min(nums), f"two numbers wanted: {msg}"
ok("prompt_over_context_400")
