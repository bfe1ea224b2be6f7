"""The official `openai` client against FIRST: a chat completion, the same streamed, and a text completion.

    make run                                  # in another shell
    .venv/bin/python examples/openai_chat.py  # or set OPENAI_BASE_URL / OPENAI_API_KEY for another gateway

`tiny` has random weights: the text is gibberish, the path (auth, routing, vLLM, streaming, usage) is real.
"""

from __future__ import annotations

from _connect import MODEL, api_key, base_url
from openai import OpenAI

client = OpenAI(base_url=base_url(), api_key=api_key())

# A chat completion; the usage is what your usage row records.
chat = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Say hello to HPC."}], max_tokens=16
)
print("chat:", repr(chat.choices[0].message.content), chat.usage)

# The same, streamed: the chunks arrive as vLLM makes them.
pieces = []
stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
print(f"stream: {len(pieces)} chunks:", repr("".join(pieces)))

# A (legacy) text completion.
completion = client.completions.create(model=MODEL, prompt="The fastest computer is", max_tokens=8)
print("completion:", repr(completion.choices[0].text))

# Which cluster served it, and the request's id (the key of its usage row), from the raw response.
raw = client.chat.completions.with_raw_response.create(
    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
)
print("served by:", raw.headers.get("x-first-cluster"), "request id:", raw.headers.get("x-request-id"))
