"""GPU smoke check (run on a machine with an NVIDIA GPU): the tiny model the project builds loads and
generates under CUDA with Hugging Face transformers, and `make` picks the CUDA vLLM package there.

vLLM itself is not installed by this check (it needs the network); this covers the model artifact and
the install choice, the parts of the CUDA path that FIRST owns. Prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute.tiny_model import build_tiny_model


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out: dict[str, object] = {"cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    make = subprocess.run(
        ["make", "-s", "-f", "Makefile", "--eval", "print-pkg:\n\t@echo $(VLLM_PACKAGE)", "print-pkg"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    out["make_vllm_package"] = make.stdout.strip() or make.stderr.strip()[-200:]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = build_tiny_model(Path(d) / "tiny", seed=0)
        out["build_s"] = round(time.perf_counter() - t0, 2)
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(prompt, return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                logits = model(ids).logits
                t0 = time.perf_counter()
                gen = model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            out[str(dtype).split(".")[-1]] = {
                "finite_logits": bool(torch.isfinite(logits).all()),
                "new_tokens": int(gen.shape[1] - ids.shape[1]),
                "tokens_per_s": round((gen.shape[1] - ids.shape[1]) / dt, 1),
                "sample": tok.decode(gen[0, ids.shape[1] : ids.shape[1] + 8]),
            }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
