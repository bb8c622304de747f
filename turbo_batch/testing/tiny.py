"""Write a tiny, deterministic, random-weight Gemma 4 text checkpoint for fast tests.

`write_tiny_gemma4(out_dir)` writes a complete `Gemma4ForCausalLM` folder that both transformers
(`AutoModelForCausalLM.from_pretrained`) and vLLM load: `config.json` (a transformers `Gemma4TextConfig`,
`model_type` `gemma4_text`), `generation_config.json`, `model.safetensors` with seeded random bf16 weights,
and a byte-level BPE tokenizer (`tokenizer.json` + `tokenizer_config.json` with a Gemma-style chat
template). The same arguments give byte-identical files on every run and machine with the same
transformers/tokenizers versions: weights come from NumPy's seeded PCG64 generator and the safetensors
file is written here in a fixed tensor order; the tokenizer is trained on a fixed corpus embedded below.

Shape: 2 layers (one sliding-window, one full-attention, as Gemma 4 mixes them), hidden 64, 2 query heads
and 1 KV head of size 32, vocabulary 512 by default. `global_head_dim == head_dim` on purpose (a different
head size for full-attention layers trips vLLM 0.26 with transformers 5.17), and per-layer embeddings
(PLE) are off (`hidden_size_per_layer_input=0`) like the dense Gemma 4 models.

What it does not do: it has learnt nothing — greedy decoding mostly repeats the last prompt token (the
embeddings dominate the residual stream) — so use it for plumbing, speed and determinism tests, never
for accuracy. The embedded corpus carries label words (" positive", " spam", " fresh", ...) so each is
one token with a distinct first token, as one-pass classification needs. It does not download anything and does not start vLLM.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["LABEL_WORDS", "SPECIAL_TOKENS", "write_tiny_gemma4"]

# Ids 0..5, in this order, before the 256 byte-level symbols and the learnt merges.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID, START_OF_TURN_ID, END_OF_TURN_ID = range(6)

# Label words (as they follow a prompt, leading space included) whose FIRST tokens must all differ, so
# one-pass classification can score them from a single next-token distribution.
LABEL_WORDS: tuple[str, ...] = (
    " positive",
    " negative",
    " neutral",
    " spam",
    " ham",
    " fresh",
    " rotten",
    " sports",
    " business",
    " world",
    " science",
    " yes",
    " no",
)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# A fixed little English corpus: reviews, e-mails, news and instructions, in the shapes the tests and the
# demo prompt with. The label lines are repeated while training so BPE learns every label word whole.
_CORPUS = """\
Classify the sentiment of the review as positive, negative or neutral.
Is this message spam or ham? Answer with one word.
Is the critic's review fresh or rotten? Answer fresh or rotten.
Which topic fits the article best: world, sports, business or science?
Answer yes or no. The answer is yes. The answer is no.
The movie was a delight from start to finish, with a warm story and a cast that clearly had fun.
A tired, joyless sequel that forgets everything that made the first film worth watching.
The plot is thin, but the jokes land and the music carries the slow parts.
It is neither good nor bad; the film simply exists and then it ends.
Congratulations! You have won a free prize. Click the link below to claim your reward today.
Hi Sam, are we still meeting for lunch on Friday? Let me know what time works for you.
Your account has been suspended. Send your password now to restore access.
Please find attached the notes from this morning's meeting and the plan for next week.
The central bank raised interest rates again, and markets fell as investors worried about growth.
The home team won the final game of the season with a late goal in extra time.
Scientists found water ice near the south pole of the moon, which could help future missions.
Leaders from several countries met this week to talk about trade, climate and security.
Shares of the company rose after it reported strong sales and raised its forecast for the year.
The new phone has a better camera, a bigger battery and a screen that is easy to read in the sun.
I would not recommend this product to anyone; it broke after two days and support never replied.
What a wonderful place to stay: clean rooms, kind staff and a great view of the sea.
The service was slow, the food was cold and the prices were far too high for what we got.
She said the book was long but worth it, and that the ending made her cry.
Review: an honest, funny and moving picture about family, home and growing older.
Label: positive. Label: negative. Label: neutral.
Answer: fresh. Answer: rotten. Answer: spam. Answer: ham.
Topic: sports. Topic: business. Topic: world. Topic: science.
The quick brown fox jumps over the lazy dog while the children watch from the window.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in dates, prices and scores.
Write a short summary of the text in one sentence, then give a title for it.
You are a helpful assistant. Answer the question as well as you can, and keep it short.
user
model
"""

_LABEL_LINE = " ".join(w.strip() for w in LABEL_WORDS)
_LABEL_REPEATS = 40


def _train_tokenizer(vocab_size: int) -> str:
    """Train the byte-level BPE on the embedded corpus; return tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = _CORPUS.splitlines() + [_LABEL_LINE] * _LABEL_REPEATS
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B",
        special_tokens=[("<bos>", BOS_ID)],
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"tokenizer put {name!r} at id {tok.token_to_id(name)}, expected {i}")
    return tok.to_str(pretty=True)


def _layer_types(num_layers: int) -> list[str]:
    """Gemma's 5:1 pattern (every sixth layer full attention), with the last layer always full."""
    return [
        "full_attention" if (i + 1) % 6 == 0 or i == num_layers - 1 else "sliding_attention"
        for i in range(num_layers)
    ]


def _config_dict(num_layers: int, hidden_size: int, vocab_size: int, head_dim: int = 32) -> dict:
    from transformers import Gemma4TextConfig

    config = Gemma4TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        global_head_dim=head_dim,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=vocab_size,
        max_position_embeddings=4096,
        sliding_window=128,
        layer_types=_layer_types(num_layers),
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        final_logit_softcapping=30.0,
    )
    config.architectures = ["Gemma4ForCausalLM"]
    config.dtype = "bfloat16"
    out = config.to_diff_dict()
    # transformers reads `per_layer_config` (written as {} = no overrides); older readers look for
    # `global_head_dim`, whose default (512) would not match the weights, so write it out as well.
    out["global_head_dim"] = head_dim
    return out


def _tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every stored tensor, in file order. lm_head is tied to embed_tokens."""
    h = config["hidden_size"]
    inter = config["intermediate_size"]
    heads, kv_heads, head_dim = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    specs: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (config["vocab_size"], h), "embed")
    ]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "layer_scalar", (1,), "one"),
            (p + "mlp.down_proj.weight", (h, inter), "linear"),
            (p + "mlp.gate_proj.weight", (inter, h), "linear"),
            (p + "mlp.up_proj.weight", (inter, h), "linear"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "post_feedforward_layernorm.weight", (h,), "norm"),
            (p + "pre_feedforward_layernorm.weight", (h,), "norm"),
            (p + "self_attn.k_norm.weight", (head_dim,), "norm"),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, h), "linear"),
            (p + "self_attn.o_proj.weight", (h, heads * head_dim), "linear"),
            (p + "self_attn.q_norm.weight", (head_dim,), "norm"),
            (p + "self_attn.q_proj.weight", (heads * head_dim, h), "linear"),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, h), "linear"),
        ]
    specs.append(("model.norm.weight", (h,), "norm"))
    return specs


def _to_bf16_bytes(x: np.ndarray) -> bytes:
    """float32 -> bfloat16 (round to nearest even), little-endian bytes."""
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def _safetensors_bytes(specs: list[tuple[str, tuple[int, ...], str]], seed: int) -> bytes:
    """Draw every tensor from one seeded generator, in order, and lay out a safetensors file."""
    rng = np.random.default_rng(seed)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name, shape, init in specs:
        if init == "embed":
            # Large enough that the tied output layer gives peaked (not uniform) next-token distributions.
            x = rng.normal(0.0, 0.4, size=shape)
        elif init == "linear":
            x = rng.normal(0.0, shape[1] ** -0.5, size=shape)
        elif init == "norm":
            x = 1.0 + rng.normal(0.0, 0.1, size=shape)
        else:
            x = np.ones(shape)
        blob = _to_bf16_bytes(x.astype(np.float32))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def _tokenizer_config(model_max_length: int) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": model_max_length,
        "pad_token": "<pad>",
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_tiny_gemma4(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    vocab_size: int = 512,
    head_dim: int = 32,
) -> Path:
    """Write the tiny random Gemma 4 checkpoint into `out_dir` (created if missing); return its path.

    `seed` only changes the weights; the tokenizer and config depend on the sizes alone. `hidden_size`
    must be a multiple of `head_dim` (32 by default; GPU attention kernels want 64 or more); `vocab_size` must leave room for the 6 special tokens,
    256 byte symbols and the label words (>= 384). If the corpus runs out of merges before `vocab_size`,
    the tokenizer is smaller than the embedding table, as in many real checkpoints.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if head_dim < 8 or hidden_size < head_dim or hidden_size % head_dim:
        raise ValueError(f"hidden_size must be a positive multiple of head_dim {head_dim}, got {hidden_size}")
    if vocab_size < 384:
        raise ValueError(f"vocab_size must be >= 384, got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    config = _config_dict(num_layers, hidden_size, vocab_size, head_dim)
    generation_config = {
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, END_OF_TURN_ID],
        "pad_token_id": PAD_ID,
        "transformers_version": config["transformers_version"],
    }
    _write(out / "tokenizer.json", _train_tokenizer(vocab_size).encode())
    _write(out / "tokenizer_config.json", _json_bytes(_tokenizer_config(config["max_position_embeddings"])))
    _write(out / "generation_config.json", _json_bytes(generation_config))
    _write(out / "model.safetensors", _safetensors_bytes(_tensor_specs(config), seed))
    _write(out / "config.json", _json_bytes(config))
    return out
