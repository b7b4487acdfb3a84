"""Real OpenAI and Ollama Python clients against a running agent. Exits non-zero on failure."""
import sys

import ollama
import openai

base, model = sys.argv[1], sys.argv[2]

oa = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
r = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
assert r.choices[0].message.content, r
assert r.usage.completion_tokens >= 1, r.usage

chunks = list(oa.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
    stream=True, stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text, chunks
assert chunks[-1].usage and chunks[-1].usage.completion_tokens >= 1, chunks[-1]

try:
    oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404

try:
    oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=9)
    raise AssertionError("bad temperature accepted")
except openai.BadRequestError as e:
    assert "temperature" in str(e), e

assert [m.id for m in oa.models.list()] == [model]

ol = ollama.Client(host=base)
resp = ol.chat(model=model, messages=[{"role": "user", "content": "Say hi."}], options={"num_predict": 8})
assert resp.message.content, resp
assert resp.done and resp.eval_count >= 1, resp
streamed = list(ol.generate(model=model, prompt="Why is the sky blue?", stream=True, options={"num_predict": 8}))
assert streamed[-1].done and "".join(p.response for p in streamed), streamed
names = [m.model for m in ol.list().models]
assert f"{model}:latest" in names, names
assert ol.show(model).details.family == "llama"
try:
    ol.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except ollama.ResponseError as e:
    assert e.status_code == 404, e
print("clients ok")
