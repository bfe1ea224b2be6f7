"""A test double of vLLM's OpenAI API server (``python -m vllm.entrypoints.openai.api_server --port P ...``): the
OpenAISimulatorDouble on that port, behind ``VLLM_API_KEY`` as vLLM is, until SIGTERM. See ``vllm/__init__.py``."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from tests.fakes.openai_simulator import OpenAISimulatorDouble

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--model", default="-")
parser.add_argument("--served-model-name", default=None)
parser.add_argument("--ssl-certfile", default=None)
parser.add_argument("--ssl-keyfile", default=None)
args, _ = parser.parse_known_args()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
sim = OpenAISimulatorDouble(
    latency_s=float(os.environ.get("FAKE_VLLM_LATENCY_S", "0.05")), capacity=256, name=f"port-{args.port}",
    api_key=os.environ.get("VLLM_API_KEY"), port=args.port, host=args.host, ssl_certfile=args.ssl_certfile,
    ssl_keyfile=args.ssl_keyfile,
).start()  # fmt: skip
print(f"vLLM double serving {args.served_model_name or args.model} on port {args.port}", flush=True)
stop.wait()
sim.stop()
