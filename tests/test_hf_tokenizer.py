"""hf_tokenizer: a process that loads a folder's tokenizer after the first one gets, through the class
AutoTokenizer chose, the tokenizer AutoTokenizer gives (class, ids, chat text, special tokens), without
importing torch; the choice is kept per folder (its files) and transformers version, and asked again
when either changes; hub ids and remote code always go through AutoTokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import turbo_batch.hf_tokenizer as hf
from turbo_batch.hf_tokenizer import TokenizerClass, auto_tokenizer, cache_file, cached_class

load = hf.load_tokenizer.__wrapped__  # without the per-process memo, so that each call loads

TEXTS = [
    "great film",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n",
    "<start_of_turn>user\nnot a turn<end_of_turn> <bos><eos>",
    "<|im_start|>system\nalso text<|im_end|>",
    "émigré naïve café — ünïcödé, 日本語のテキスト, emoji 🎬🍿",
    "tabs\tand\u00a0no-break spaces " + "x" * 3000,
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Label this: fine."}]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def folder(request, tiny_model, tmp_path_factory):
    if request.param == "tiny":
        src = tiny_model
    else:
        from turbo_batch.testing.assets import smollm2_dir

        src = smollm2_dir()
    dst = tmp_path_factory.mktemp("tok") / request.param  # the tokenizer's files only: no weights
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".gguf", ".bin")):
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBO_BATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / hf.CACHE


@pytest.fixture
def asked(monkeypatch):
    """Calls that went through AutoTokenizer."""
    calls = []

    def counting(path, trust_remote_code=False):
        calls.append(path)
        return auto_tokenizer(path, trust_remote_code)

    monkeypatch.setattr(hf, "auto_tokenizer", counting)
    return calls


def _chat(tok, messages):
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # a template that refuses a system turn: the same refusal on both sides
        return tok.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False)


def test_the_second_load_is_autotokenizers_tokenizer_through_its_class(folder, cache, asked):
    auto = load(str(folder))  # the first: AutoTokenizer, and its class written down
    assert len(asked) == 1 and len(list(cache.glob("*.json"))) == 1
    assert cached_class(str(folder)) == TokenizerClass(type(auto).__module__, type(auto).__qualname__)
    direct = load(str(folder))
    assert len(asked) == 1  # the second: the class directly
    assert type(direct) is type(auto)
    for text in TEXTS:
        for special in (True, False):
            assert direct.encode(text, add_special_tokens=special) == auto.encode(
                text, add_special_tokens=special
            )
    assert _chat(direct, MESSAGES) == _chat(auto, MESSAGES)
    assert direct.chat_template == auto.chat_template
    assert direct.all_special_tokens == auto.all_special_tokens
    ids = lambda t: (t.bos_token_id, t.eos_token_id, t.pad_token_id)  # noqa: E731
    assert ids(direct) == ids(auto)
    assert direct.split_special_tokens == auto.split_special_tokens
    assert len(direct) == len(auto)


def test_the_choice_is_asked_again_when_the_folder_or_transformers_changes(
    folder, cache, asked, tmp_path, monkeypatch
):
    load(str(folder))
    load(str(folder))
    assert len(asked) == 1
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    load(str(edited))
    assert len(asked) == 2  # another folder
    cfg = json.loads((edited / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 1234
    (edited / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert cached_class(str(edited)) is None
    assert load(str(edited)).model_max_length == 1234 and len(asked) == 3  # a file changed
    monkeypatch.setattr(hf, "_transformers_version", lambda: "0.0.0-other")
    load(str(folder))
    assert len(asked) == 4  # another transformers version


def test_where_autotokenizer_is_always_used(folder, cache, asked, tmp_path):
    assert cache_file(str(folder), trust_remote_code=True) is None
    assert cache_file("google/gemma-4-31b-it") is None  # a hub id
    assert cache_file(str(tmp_path / "missing")) is None
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.gguf").write_bytes(b"GGUF")
    assert cache_file(str(bare)) is None  # no tokenizer files to key on
    load(str(folder), True)
    load(str(folder), True)
    assert len(asked) == 2 and not list(cache.glob("*.json"))  # remote code: never written, never direct
    # a recorded class that is gone (another install): AutoTokenizer, and the record made right
    f = cache_file(str(folder))
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(
        json.dumps({"module": "transformers.tokenization_utils_tokenizers", "name": "NoSuchTokenizer"})
    )
    tok = load(str(folder))
    assert len(asked) == 3 and cached_class(str(folder)).name == type(tok).__qualname__
    f.write_text("{half a fi")  # a torn or foreign file: ignored
    load(str(folder))
    assert len(asked) == 4


def test_a_render_worker_after_the_first_imports_no_torch(tiny_model, cache):
    hf.load_tokenizer.__wrapped__(str(tiny_model))  # the first process: AutoTokenizer, class recorded
    code = (
        "import sys\n"
        "from turbo_batch.batch.render import _builder\n"
        "from turbo_batch.prompt import PromptConfig\n"
        "cfg = PromptConfig(task={'type': 'classify', 'labels': ['a', 'b']}, text_columns=('text',))\n"
        f"b, _ = _builder(cfg, {str(tiny_model)!r}, False)\n"
        "print(len(b.encode('hello')), 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, torch_loaded, transformers_loaded = out.stdout.split()
    assert int(n) > 0 and transformers_loaded == "True"
    assert torch_loaded == "False"  # AutoTokenizer's import chain loads torch; the class alone does not
