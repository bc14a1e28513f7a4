"""Tiny random models and SAEs, built locally (no network), shared by the tests."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

# No test may reach the model hub: CI has none, and a hanging download is worse than a failure.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.models import LoadedModel, ModelSpec, load_model  # noqa: E402

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "def add(a, b):\n    return a + b\n"
    "Sparse autoencoders find features in the residual stream of language models. "
    "A latent fires on some tokens and not on others; steering adds its direction."
)


def plain(text: str) -> str:
    """What a person reads in a message the app escaped as text (``ui.safe_text.as_text``)."""
    return re.sub(r"\\(.)", r"\1", text).replace("  \n", "\n")


@pytest.fixture(autouse=True)
def _workbench_env(tmp_path_factory):
    """Tests may set the operator's SAE_WORKBENCH_* variables (see tests/test_app.py); each test
    starts from the same ones, with links allowed to name this run's temporary directories."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SAE_WORKBENCH_")}
    os.environ["SAE_WORKBENCH_ALLOWED_DIRS"] = str(tmp_path_factory.getbasetemp())
    yield
    for key in [k for k in os.environ if k.startswith("SAE_WORKBENCH_")]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with BOS/EOS/PAD tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def build_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(cfg).eval()


def build_gemma3(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
        max_position_embeddings=256, query_pre_attn_scalar=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(cfg).eval()


def save_model_dir(model, tokenizer, path: Path, name: str) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "workbench.json").write_text(json.dumps({"name": name}))
    return path


def build_sae(d_in: int, d_sae: int, hook_name: str, model_name: str, arch: str = "standard",
              **metadata):
    """A random sae_lens SAE; encoder and decoder weights scaled so latents fire."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens import TopKSAE, TopKSAEConfig

    meta = SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=True, **metadata)
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4, metadata=meta))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0 / d_in**0.5)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=-1))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny GPT-2 (model + tokenizer) and a tiny SAE on it, as the app would load them."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    save_model_dir(build_gpt2(tokenizer), tokenizer, root / "tiny-gpt2", "tiny-gpt2")
    save_model_dir(build_gemma3(tokenizer), tokenizer, root / "tiny-gemma3", "tiny-gemma3")
    build_sae(32, 64, "blocks.1.hook_resid_post", "tiny-gpt2").save_model(root / "sae-gpt2-l1")
    build_sae(32, 48, "blocks.1.hook_resid_post", "tiny-gemma3", arch="jumprelu").save_model(
        root / "sae-gemma3-l1"
    )
    return root


@pytest.fixture(scope="module")
def gpt2(tiny_dir) -> LoadedModel:
    return load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))


@pytest.fixture(scope="module")
def gemma3(tiny_dir) -> LoadedModel:
    return load_model(ModelSpec("local", str(tiny_dir / "tiny-gemma3"), device="cpu"))


# --- the app ----------------------------------------------------------------------------------

def leftover_hooks(model: torch.nn.Module) -> list[str]:
    """Names of modules that still carry forward hooks (should always be empty between calls)."""
    return [
        name or "<root>"
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks
    ]


INDEX_TEXTS = [CORPUS[i:] + " " + CORPUS[:i] for i in range(0, 320, 11)]


def make_index(tiny_dir) -> Path:
    """A small feature index of the tiny GPT-2's SAE, where the app looks for it (the cache
    directory ``SAE_WORKBENCH_CACHE`` names)."""
    from core.feature_index import index_location
    from core.index import IndexConfig, build_index
    from core.saes import SaeSpec, load_sae

    lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
    sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), lm)
    path, name = index_location(lm, sae)
    build_index(lm, {name: sae}, INDEX_TEXTS, path,
                IndexConfig(context_size=16, max_tokens=600, top_k=5, n_sample=16))
    return path


def tiny_page(tiny_dir, page: str, timeout: int = 120, **query):
    """AppTest of ``views/<page>.py`` with the tiny GPT-2 and its SAE loaded, plus ``query``."""
    from streamlit.testing.v1 import AppTest

    query = {"model": f"local:{tiny_dir / 'tiny-gpt2'}",
             "sae": f"local:{tiny_dir / 'sae-gpt2-l1'}", **query}
    serve(query["model"], query["sae"])
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    at.query_params.update(**query)
    at.run()
    return at.switch_page(f"views/{page}.py").run()


def serve(model: str, sae: str | None = None) -> None:
    """Start the "server" on ``model`` (and ``sae``) as its operator would: links load only
    what the server holds or its default, so a test's link names the default
    (``_workbench_env`` restores the variables after the test)."""
    from core.saes import parse_sae_param

    os.environ["SAE_WORKBENCH_MODEL"] = model
    os.environ.pop("SAE_WORKBENCH_SAE", None)
    try:
        if sae is not None and parse_sae_param(sae) is not None:
            os.environ["SAE_WORKBENCH_SAE"] = sae
    except ValueError:
        pass


# --- the app in a real browser ----------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run scripts/setup --browser (scripts/test does)")
    port = free_port()
    env = {
        **os.environ,
        "SAE_WORKBENCH_MODEL": f"local:{tiny_dir / 'tiny-gpt2'}",
        "SAE_WORKBENCH_SAE": f"local:{tiny_dir / 'sae-gpt2-l1'}",
        "HF_HUB_OFFLINE": "1",
    }
    cache = tmp_path_factory.mktemp("cache")
    env["SAE_WORKBENCH_CACHE"] = str(cache)
    os.environ["SAE_WORKBENCH_CACHE"] = str(cache)
    try:
        make_index(tiny_dir)
    finally:
        del os.environ["SAE_WORKBENCH_CACHE"]
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.headless", "true"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    return page


DEVICE_WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
                "is_nonzero", "equal"}
"""Operations that read a value off the device (``item``, ``int()``, ``bool()``) or size a
result by it: each makes a GPU wait for the host, and a CUDA stream being captured refuses them."""


def device_waits(fn):
    """Run ``fn`` and count the operations in :data:`DEVICE_WAITS` it dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func._overloadpacket.__name__ in DEVICE_WAITS
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, Count.n
