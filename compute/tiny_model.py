"""Build a tiny, random-weight Llama model that vLLM can serve offline.

The model is meant for end-to-end tests and the embedded default backend: it
needs no model hub, no torch and no transformers. It consists of

* a byte-level BPE tokenizer (2,048 tokens) trained with ``tokenizers`` on the
  running interpreter's own standard library sources, with ChatML special
  tokens and chat template, and
* a 2-layer ``LlamaForCausalLM`` (hidden 128, head_dim 32) with random float32
  weights written as ``model.safetensors``.

The output is deterministic: the same seed (and the same Python standard
library) gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["CHAT_TEMPLATE", "MODEL_SHAPE", "SPECIAL_TOKENS", "build_tiny_model"]

VOCAB_SIZE = 2048
# Stop reading stdlib sources once this many characters are collected.
TRAINING_TEXT_BUDGET = 4_000_000
INIT_STD = 0.02

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids: 0..3.
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END, PAD_TOKEN)
EOS_TOKEN = IM_END

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
}


def _noop(_msg: str) -> None:
    pass


def _training_texts() -> list[str]:
    """A deterministic subset of the stdlib's top-level ``.py`` files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py"), key=lambda p: p.name):
        text = path.read_bytes().decode("utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= TRAINING_TEXT_BUDGET:
            break
    if not texts:
        raise RuntimeError(f"no .py files found in the standard library at {root}")
    return texts


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_texts(), trainer=trainer)
    return tokenizer


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_files(tokenizer: Tokenizer, out: Path) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Returns the special token ids by content.
    """
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    if any(i is None for i in ids.values()):
        raise RuntimeError(f"special tokens missing from the trained vocabulary: {ids}")

    # tokenizers serialises deterministically (vocab in id order); keep its layout.
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")

    added_tokens_decoder = {
        str(ids[tok]): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": [IM_START, IM_END],
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MODEL_SHAPE["max_position_embeddings"],
            "split_special_tokens": False,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": [IM_START, IM_END],
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
        },
    )
    return ids


def _model_config(vocab_size: int, ids: dict[str, int]) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        **MODEL_SHAPE,
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
    }


# A constant first channel in every token embedding: the residual stream keeps it, so it acts as a bias the
# output head can read. With it blank tokens (spaces, newlines only) score far below every other token.
BIAS_CHANNEL = 1.0
BLANK_TOKEN_PENALTY = 2.0


def _blank_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the tokens that decode to whitespace only."""
    blank = []
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i], skip_special_tokens=False)
        if text and not text.strip():
            blank.append(i)
    return blank


def _random_weights(vocab_size: int, seed: int, blank_ids: list[int] | None = None) -> dict[str, np.ndarray]:
    """Random Llama weights, except for one thing: blank tokens never win a greedy choice.

    A JSON grammar (a forced tool call, ``response_format``) allows free whitespace between tokens; random weights
    that like a blank token fill ``max_tokens`` with it before the JSON closes. Real models don't.
    """
    rng = np.random.default_rng(seed)
    hidden = MODEL_SHAPE["hidden_size"]
    inter = MODEL_SHAPE["intermediate_size"]
    head_dim = MODEL_SHAPE["head_dim"]
    q_dim = MODEL_SHAPE["num_attention_heads"] * head_dim
    kv_dim = MODEL_SHAPE["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # Insertion order fixes the order in which the generator is consumed.
    weights: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for i in range(MODEL_SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights[f"{p}.self_attn.q_proj.weight"] = normal(q_dim, hidden)
        weights[f"{p}.self_attn.k_proj.weight"] = normal(kv_dim, hidden)
        weights[f"{p}.self_attn.v_proj.weight"] = normal(kv_dim, hidden)
        weights[f"{p}.self_attn.o_proj.weight"] = normal(hidden, q_dim)
        weights[f"{p}.mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[f"{p}.mlp.up_proj.weight"] = normal(inter, hidden)
        weights[f"{p}.mlp.down_proj.weight"] = normal(hidden, inter)
        weights[f"{p}.input_layernorm.weight"] = ones(hidden)
        weights[f"{p}.post_attention_layernorm.weight"] = ones(hidden)
    weights["model.norm.weight"] = ones(hidden)
    weights["lm_head.weight"] = normal(vocab_size, hidden)
    if blank_ids:
        weights["model.embed_tokens.weight"][:, 0] = BIAS_CHANNEL
        weights["lm_head.weight"][blank_ids, 0] = -BLANK_TOKEN_PENALTY
    return weights


EMBED_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}


def _embed_config(vocab_size: int, ids: dict[str, int]) -> dict[str, object]:
    """A BERT encoder (``BertModel``: vLLM serves it as an embedding model, ``/v1/embeddings``)."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        **EMBED_SHAPE,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "initializer_range": INIT_STD,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "pad_token_id": ids[PAD_TOKEN],
        # Its vectors may be cut to these lengths (renormalised): `dimensions` in an embeddings request.
        "matryoshka_dimensions": [32, 64, 128],
    }


def _embed_weights(vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, inter = EMBED_SHAPE["hidden_size"], EMBED_SHAPE["intermediate_size"]

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": np.ones(hidden, dtype=np.float32), f"{prefix}.bias": zeros(hidden)}

    weights: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": normal(vocab_size, hidden),
        "embeddings.position_embeddings.weight": normal(EMBED_SHAPE["max_position_embeddings"], hidden),
        "embeddings.token_type_embeddings.weight": normal(2, hidden),
        **norm("embeddings.LayerNorm"),
    }
    for i in range(EMBED_SHAPE["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            weights[f"{p}.attention.self.{name}.weight"] = normal(hidden, hidden)
            weights[f"{p}.attention.self.{name}.bias"] = zeros(hidden)
        weights[f"{p}.attention.output.dense.weight"] = normal(hidden, hidden)
        weights[f"{p}.attention.output.dense.bias"] = zeros(hidden)
        weights.update(norm(f"{p}.attention.output.LayerNorm"))
        weights[f"{p}.intermediate.dense.weight"] = normal(inter, hidden)
        weights[f"{p}.intermediate.dense.bias"] = zeros(inter)
        weights[f"{p}.output.dense.weight"] = normal(hidden, inter)
        weights[f"{p}.output.dense.bias"] = zeros(hidden)
        weights.update(norm(f"{p}.output.LayerNorm"))
    return weights


def _sentence_transformers_files(out: Path) -> None:
    """Mean pooling and L2 normalisation, as sentence-transformers models declare them (vLLM reads these)."""
    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])  # fmt: skip
    (out / "1_Pooling").mkdir()
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": EMBED_SHAPE["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    })  # fmt: skip
    (out / "2_Normalize").mkdir()
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": False})


def build_tiny_model(
    out_dir: Path,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    kind: str = "generate",
) -> Path:
    """Write a HuggingFace-format tiny model directory to ``out_dir``: a Llama for text generation, or with
    ``kind="embed"`` a BERT encoder with mean pooling for embeddings (the same tokenizer).

    The directory is built beside ``out_dir`` and renamed into place, replacing
    any existing ``out_dir``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    report = progress or _noop
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        report("training tokenizer (byte-level BPE on stdlib sources)")
        tokenizer = _train_tokenizer()
        vocab_size = tokenizer.get_vocab_size()

        report("writing tokenizer files")
        ids = _tokenizer_files(tokenizer, tmp)

        if kind == "embed":
            report("writing config.json and the pooling files (BERT, mean pooling, normalised)")
            _write_json(tmp / "config.json", _embed_config(vocab_size, ids))
            _sentence_transformers_files(tmp)
            weights = _embed_weights(vocab_size, seed)
        else:
            report("writing config.json and generation_config.json")
            _write_json(tmp / "config.json", _model_config(vocab_size, ids))
            _write_json(
                tmp / "generation_config.json",
                {
                    "bos_token_id": ids[BOS_TOKEN],
                    "eos_token_id": ids[EOS_TOKEN],
                    "pad_token_id": ids[PAD_TOKEN],
                },
            )
            weights = _random_weights(vocab_size, seed, _blank_token_ids(tokenizer))

        report(f"writing random weights (seed {seed})")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # mkdtemp makes the directory 0700 and safetensors writes the file 0600.
        os.chmod(tmp / "model.safetensors", 0o644)
        os.chmod(tmp, 0o755)

        report(f"moving model into place at {out_dir}")
        old = None
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            old.rmdir()
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"done: {out_dir}")
    return out_dir
