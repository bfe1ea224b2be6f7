"""A test double of vLLM's batch runner (``python -m vllm.entrypoints.openai.run_batch -i IN -o OUT --model M``),
put first on PYTHONPATH by tests that cannot load a real model. It answers each chat line the way vLLM's runner
does (OpenAI's batch output line, with usage). A line whose first message is ``omit`` gets no answer, ``bad`` gets
a 400; ``FAKE_RUNNER_FAIL=1`` makes the run exit 1, ``FAKE_RUNNER_SLEEP_S`` makes it wait before answering, and
``FAKE_RUNNER_ARGS`` names a file where it writes the arguments it was given."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("-i", dest="input_file", required=True)
parser.add_argument("-o", dest="output_file", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--served-model-name", default=None)
args, rest = parser.parse_known_args()
if os.environ.get("FAKE_RUNNER_ARGS"):
    with open(os.environ["FAKE_RUNNER_ARGS"], "w") as fh:
        json.dump(sys.argv[1:], fh)
print("fake runner: reading", args.input_file, flush=True)
time.sleep(float(os.environ.get("FAKE_RUNNER_SLEEP_S", "0")))
if os.environ.get("FAKE_RUNNER_FAIL"):
    print("fake runner: CUDA out of memory (a stand-in failure)", flush=True)
    sys.exit(1)
out = []
with open(args.input_file) as fh:
    for n, raw in enumerate(fh):
        if not raw.strip():
            continue
        line = json.loads(raw)
        text = line["body"]["messages"][0]["content"]
        if text == "omit":
            continue
        if text == "bad":
            response = {
                "status_code": 400,
                "request_id": f"vllm-batch-{n}",
                "body": {"error": {"message": "bad line", "type": "BadRequestError", "code": 400}},
            }
        else:
            usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
            body = {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "model": args.served_model_name,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "ok " + text}, "finish_reason": "stop"}
                ],
                "usage": usage,
            }
            response = {"status_code": 200, "request_id": f"vllm-batch-{n}", "body": body}
        out.append({"id": f"vllm-{n}", "custom_id": line["custom_id"], "response": response, "error": None})
with open(args.output_file, "w") as fh:
    fh.writelines(json.dumps(doc) + "\n" for doc in out)
