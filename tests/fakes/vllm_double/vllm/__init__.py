"""Test doubles of vLLM's entry points, put first on PYTHONPATH by tests that cannot load a real model.

- ``vllm.entrypoints.openai.api_server``: vLLM's OpenAI server, as the OpenAISimulatorDouble on the ``--port`` it
  is given (``FAKE_VLLM_LATENCY_S`` per request; its ``system_fingerprint`` names the port, so that a test can tell
  instances apart). It needs the repository on PYTHONPATH too.
- ``vllm.entrypoints.openai.run_batch``: vLLM's batch runner (``-i IN -o OUT --model M``).
"""
