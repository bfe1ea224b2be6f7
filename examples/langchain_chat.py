"""LangChain's `ChatOpenAI` and `OpenAIEmbeddings` pointed at FIRST: invoke, stream, embed.

    .venv/bin/pip install langchain-openai     # already in the test extras
    .venv/bin/python examples/langchain_chat.py

`check_embedding_ctx_length=False` stops OpenAIEmbeddings from tokenizing with OpenAI's tokenizer first (it would
download it, and FIRST's models have their own).
"""

from __future__ import annotations

from _connect import EMBED_MODEL, MODEL, api_key, base_url
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

llm = ChatOpenAI(model=MODEL, base_url=base_url(), api_key=api_key(), max_tokens=16, temperature=0.2)
answer = llm.invoke([SystemMessage("You are terse."), HumanMessage("What is a GPU?")])
print("invoke:", repr(answer.content), answer.usage_metadata)

chunks = [chunk.content for chunk in llm.stream("Name three supercomputers.")]
print(f"stream: {len(chunks)} chunks")

embeddings = OpenAIEmbeddings(
    model=EMBED_MODEL, base_url=base_url(), api_key=api_key(), check_embedding_ctx_length=False
)
vectors = embeddings.embed_documents(["a GPU node", "a login node"])
print(f"embed: {len(vectors)} vectors of {len(vectors[0])} dimensions")
