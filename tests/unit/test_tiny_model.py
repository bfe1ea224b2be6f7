"""Tests for compute.tiny_model: the offline tiny Llama builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from compute import tiny_model
from compute.tiny_model import build_tiny_model

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    messages: list[str] = []
    out = build_tiny_model(tmp_path_factory.mktemp("a") / "tiny", seed=0, progress=messages.append)
    return out, messages


@pytest.fixture(scope="module")
def model_dir(built: tuple[Path, list[str]]) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_writes_expected_files_and_reports_progress(built: tuple[Path, list[str]]) -> None:
    out, messages = built
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert len(messages) >= 4
    assert all(isinstance(m, str) and m for m in messages)
    # Nothing left behind beside the output directory.
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_same_seed_gives_identical_bytes_and_replaces_atomically(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("from an older build")

    assert build_tiny_model(out, seed=0) == out

    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    for name in sorted(EXPECTED_FILES):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_different_seed_changes_only_weights(model_dir: Path, tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "tiny", seed=1)
    assert (out / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    for name in sorted(EXPECTED_FILES - {"model.safetensors"}):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), name

    a = load_file(str(model_dir / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert not np.array_equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    np.testing.assert_array_equal(a["model.norm.weight"], b["model.norm.weight"])


def test_failed_build_leaves_existing_model_and_no_temp_dir(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "keep.txt").write_text("previous model")

    def boom() -> None:
        raise RuntimeError("training failed")

    monkeypatch.setattr(tiny_model, "_train_tokenizer", boom)
    with pytest.raises(RuntimeError, match="training failed"):
        build_tiny_model(out)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
    assert (out / "keep.txt").read_text() == "previous model"


def test_config_shapes(model_dir: Path, tokenizer: Tokenizer) -> None:
    config = _read_json(model_dir / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 128
    assert config["intermediate_size"] == 256
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["max_position_embeddings"] == 512
    # vLLM's CPU attention supports head_dim 32, 64, 80 and up; not 16.
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    assert config["head_dim"] == 32
    assert config["vocab_size"] == tokenizer.get_vocab_size() == 2048
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"
    assert config["bos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert config["pad_token_id"] == tokenizer.token_to_id("<|pad|>")

    gen = _read_json(model_dir / "generation_config.json")
    assert gen["eos_token_id"] == config["eos_token_id"]
    assert gen["bos_token_id"] == config["bos_token_id"]


def test_weights_have_hf_llama_names_shapes_and_init(model_dir: Path) -> None:
    config = _read_json(model_dir / "config.json")
    vocab, hidden, inter = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]

    expected = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        expected |= {
            f"{p}.self_attn.q_proj.weight": (q_dim, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
        }

    weights = load_file(str(model_dir / "model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == expected
    assert all(v.dtype == np.float32 for v in weights.values())
    # Channel 0 of the embeddings and of the output head is the blank-token bias (checked below); the rest is random.
    for name, value in weights.items():
        if name.endswith("norm.weight"):
            np.testing.assert_array_equal(value, np.ones_like(value))
        else:
            rest = value[:, 1:] if name in ("model.embed_tokens.weight", "lm_head.weight") else value
            assert abs(float(rest.mean())) < 0.002, name
            assert 0.018 < float(rest.std()) < 0.022, name
    assert not np.array_equal(weights["model.embed_tokens.weight"], weights["lm_head.weight"])


def test_blank_tokens_are_pushed_down_through_a_constant_bias_channel(model_dir: Path) -> None:
    """Every embedding carries the constant channel; only whitespace-only tokens weigh it negatively, so a JSON
    grammar's free whitespace never wins a greedy choice."""
    weights = load_file(str(model_dir / "model.safetensors"))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"][:, 0], 1.0)
    head = weights["lm_head.weight"][:, 0]
    blank = [i for i in range(len(head)) if (t := tokenizer.decode([i], skip_special_tokens=False)) and not t.strip()]
    assert {tokenizer.decode([i]) for i in blank} >= {" ", "\n", "    "}
    assert (head[blank] == -2.0).all()
    others = np.delete(head, blank)
    assert float(np.abs(others).max()) < 0.2  # random, like the rest of the head


@pytest.mark.parametrize(
    "text",
    [
        "def main():\n    return 42\n",
        "Hello, world! Größe, naïve café, 東京, emoji 🙂.",
        "  leading spaces\ttabs\r\nand CRLF  ",
        "",
    ],
)
def test_tokenizer_round_trips(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_compresses_python_source(tokenizer: Tokenizer) -> None:
    text = "import os\n\ndef function(self, value):\n    return self.value\n"
    assert len(tokenizer.encode(text).ids) < len(text.encode()) / 2


def test_chat_special_tokens_are_single_tokens(tokenizer: Tokenizer) -> None:
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"):
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None
        assert tokenizer.encode(token).ids == [token_id]

    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n").ids
    assert ids[0] == start
    assert ids.count(start) == 1
    assert ids.count(end) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_tokenizer_config_and_special_tokens_map(model_dir: Path, tokenizer: Tokenizer) -> None:
    cfg = _read_json(model_dir / "tokenizer_config.json")
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["bos_token"] == "<|endoftext|>"
    assert cfg["eos_token"] == "<|im_end|>"
    assert cfg["pad_token"] == "<|pad|>"
    assert "add_generation_prompt" in cfg["chat_template"]
    decoder = {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()}
    assert decoder == {tokenizer.token_to_id(tok): tok for tok in decoder.values()}
    assert set(decoder.values()) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"}
    assert all(v["special"] for v in cfg["added_tokens_decoder"].values())

    stm = _read_json(model_dir / "special_tokens_map.json")
    for key in ("bos_token", "eos_token", "pad_token"):
        assert stm[key] == cfg[key]


def test_chat_template_renders_chatml(model_dir: Path) -> None:
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(_read_json(model_dir / "tokenizer_config.json")["chat_template"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert template.render(messages=messages, add_generation_prompt=False) == expected
    assert template.render(messages=messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
