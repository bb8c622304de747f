"""Tests for turbo_batch.tiny: determinism, tokenizer, chat template, and loading with transformers.

vLLM is not started here (the session-wide engine fixtures do that); these tests use transformers only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from turbo_batch.testing.tiny import END_OF_TURN_ID, LABEL_WORDS, SPECIAL_TOKENS, write_tiny_gemma4

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _hashes(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma4(tmp_path_factory.mktemp("tiny") / "gemma4")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_writes_expected_files(tiny_dir: Path) -> None:
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(FILES)


def test_same_seed_is_byte_identical_even_in_another_process(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_gemma4(tmp_path / "again")
    assert _hashes(again) == _hashes(tiny_dir)
    # A fresh interpreter (different hash seeds in Python and in the tokenizers Rust code) too.
    code = f"from turbo_batch.testing.tiny import write_tiny_gemma4; write_tiny_gemma4({str(tmp_path / 'sub')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert _hashes(tmp_path / "sub") == _hashes(tiny_dir)


def test_other_seed_changes_only_the_weights(tiny_dir: Path, tmp_path: Path) -> None:
    other = _hashes(write_tiny_gemma4(tmp_path / "seed1", seed=1))
    base = _hashes(tiny_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in base.items() if k != "model.safetensors"
    }


def test_config_loads_with_autoconfig(tiny_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "gemma4_text"
    assert config.architectures == ["Gemma4ForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 64, 512)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    assert config.max_position_embeddings >= 2048
    # Full-attention layers must not get a different head size (vLLM 0.26 + transformers 5.17).
    assert {config.per_layer_config[i].head_dim for i in range(2)} == {config.head_dim}
    assert json.loads((tiny_dir / "config.json").read_text())["global_head_dim"] == config.head_dim
    assert not config.hidden_size_per_layer_input


def test_special_token_ids(tokenizer) -> None:
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token == "<unk>"
    assert len(tokenizer) == 512


def test_label_words_have_distinct_first_tokens(tokenizer) -> None:
    required = [" positive", " negative", " neutral", " spam", " ham", " fresh", " rotten", " sports"]
    required += [" business", " yes", " no"]
    assert set(required) <= set(LABEL_WORDS)
    first = {w: tokenizer(w, add_special_tokens=False).input_ids[0] for w in LABEL_WORDS}
    assert len(set(first.values())) == len(LABEL_WORDS), first
    # BPE learnt each label word whole, so one-pass scoring sees the full word.
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in LABEL_WORDS)


@pytest.mark.parametrize(
    "text", ["héllo wörld", "日本語のテキスト", "emoji 🎉🔥", "\x00\x01 tab\tnew\nline", "\ud7ff\ufffd"]
)
def test_any_unicode_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_bos_added_once(tokenizer) -> None:
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id
    assert tokenizer("hello").input_ids.count(tokenizer.bos_token_id) == 1


def test_chat_template_gemma_style(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Is this spam?"},
        {"role": "assistant", "content": "No"},
        {"role": "user", "content": "  And this?  "},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nAnswer in one word.\n\nIs this spam?<end_of_turn>\n"
        "<start_of_turn>model\nNo<end_of_turn>\n"
        "<start_of_turn>user\nAnd this?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<bos><start_of_turn>user\nIs this spam?<end_of_turn>\n"
    ids = tokenizer.apply_chat_template(messages[1:2], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert END_OF_TURN_ID in ids


def test_chat_template_rejects_non_alternating_roles(tokenizer) -> None:
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


def test_generation_config_stops_at_end_of_turn(tiny_dir: Path) -> None:
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, END_OF_TURN_ID]


def test_transformers_loads_and_runs_forward(tiny_dir: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == "Gemma4ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([tokenizer("The movie was great.").input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.1  # random, not degenerate


@pytest.mark.parametrize(
    "kwargs", [{"num_layers": 0}, {"hidden_size": 48}, {"hidden_size": 0}, {"vocab_size": 300}]
)
def test_rejects_bad_sizes(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_tiny_gemma4(tmp_path, **kwargs)
