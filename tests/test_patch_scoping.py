"""Patch scoping on the tiny random model: exactly the placeholder positions of the first pass are
patched, nothing after, and no hook is left behind."""

from __future__ import annotations

import threading

import pytest
import torch

from core.patch_scoping import (
    MAX_NORMS,
    PROMPTS,
    ScopeConfig,
    as_explanations,
    patch_scope,
    prompt_with_positions,
    scope_many,
    typical_norm,
)
from core.saes import SaeSpec, load_sae
from tests.conftest import leftover_hooks

PROMPT = 'The quick brown fox. The word "<unk>" means'


@pytest.fixture(scope="module")
def sae(gpt2, tiny_dir):
    return load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)


def test_placeholder_positions(gpt2):
    cfg = ScopeConfig(prompt=PROMPT, answer_prefix=' "<unk>" is', norms=(1.0,))
    ids, positions = prompt_with_positions(gpt2, cfg)
    assert ids[0] == gpt2.tokenizer.bos_token_id and ids.count(ids[0]) == 1
    text = gpt2.tokenizer.decode(ids[1:])
    assert text == PROMPT + ' "<unk>" is'
    # both occurrences, and only tokens that overlap them
    runs = [[positions[0]]]
    for p in positions[1:]:
        if p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    assert len(runs) == 2
    for run in runs:
        assert "<unk>" in gpt2.tokenizer.decode([ids[p] for p in run])
        assert "<unk>" not in gpt2.tokenizer.decode([ids[p] for p in run[1:]])
        assert "<unk>" not in gpt2.tokenizer.decode([ids[p] for p in run[:-1]])


def test_only_the_first_pass_is_patched_at_the_placeholder(gpt2, sae):
    latent, norms = 5, (3.0, 7.5)
    cfg = ScopeConfig(prompt=PROMPT, hook="blocks.0.hook_resid_post", norms=norms,
                      max_new_tokens=4, cut_at_newline=False)
    _, positions = prompt_with_positions(gpt2, cfg)
    before, after = [], []  # layer 0's output as computed, and as layer 1 reads it
    layers = gpt2.model.transformer.h
    h0 = layers[0].register_forward_hook(lambda m, a, out: before.append(
        (out[0] if isinstance(out, tuple) else out).clone()))

    def read(module, args, kwargs):
        after.append((args[0] if args else kwargs["hidden_states"]).clone())

    h1 = layers[1].register_forward_pre_hook(read, with_kwargs=True)
    try:
        res = patch_scope(gpt2, sae, latent, cfg)
    finally:
        h0.remove()
        h1.remove()
    assert leftover_hooks(gpt2.model) == []
    assert res.positions == positions and res.norms == list(norms)
    assert len(before) == len(after) and 2 <= len(before) <= cfg.max_new_tokens
    first_pre, first_post = before[0], after[0]
    assert first_pre.shape == (len(norms), len(res.prompt_ids), 32)
    changed = (first_pre != first_post).any(-1)  # [rows, pos]
    for row in range(len(norms)):
        assert changed[row].nonzero().flatten().tolist() == positions
    direction = torch.nn.functional.normalize(sae.sae.W_dec[latent].float(), dim=-1)
    for row, norm in enumerate(norms):
        for p in positions:
            assert torch.allclose(first_post[row, p], norm * direction, atol=1e-5)
            assert first_post[row, p].norm().item() == pytest.approx(norm, rel=1e-5)
    assert len(before) > 1  # later passes ran, one token each, untouched
    for pre, post in zip(before[1:], after[1:]):
        assert pre.shape[1] == 1 and torch.equal(pre, post)


def test_patching_changes_the_output_and_is_deterministic(gpt2, sae):
    cfg = ScopeConfig(prompt=PROMPT, norms=(0.01, 50.0), max_new_tokens=3,
                      hook="blocks.0.hook_resid_post")  # later layers carry it to the end
    logits = []
    head = gpt2.model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out.clone()))
    try:
        one = patch_scope(gpt2, sae, 3, cfg)
    finally:
        head.remove()
    assert not torch.allclose(logits[0][0], logits[0][1])  # the norm reaches the output
    assert patch_scope(gpt2, sae, 3, cfg).raw == one.raw  # greedy: a rerun gives the same
    stored = as_explanations(one, gpt2, sae, cfg)
    assert {e.params["norm"] for e in stored} <= {0.01, 50.0}
    assert all(e.source == "patchscope" and e.params["hook"] == cfg.hook for e in stored)


def test_concurrent_unpatched_pass_is_untouched(gpt2, sae):
    """Another session's plain pass while patch scoping runs sees no patch."""
    from core.hooks import forward

    ids = torch.tensor([gpt2.tokenizer("The quick brown fox")["input_ids"]])
    solo = forward(gpt2, ids).logits
    results = []

    def other():
        for _ in range(5):
            results.append(forward(gpt2, ids).logits)

    t = threading.Thread(target=other)
    t.start()
    patch_scope(gpt2, sae, 1, ScopeConfig(prompt=PROMPT, norms=(100.0,), max_new_tokens=5))
    t.join()
    assert all(torch.equal(r, solo) for r in results)
    assert leftover_hooks(gpt2.model) == []


def test_config_checks_name_the_fix(gpt2, sae):
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        ScopeConfig(prompt="no placeholder here")
    with pytest.raises(ValueError, match=f"1 to {MAX_NORMS} norms"):
        ScopeConfig(norms=tuple(range(1, MAX_NORMS + 2)))
    with pytest.raises(ValueError, match="Norm 0"):
        ScopeConfig(norms=(0,))
    with pytest.raises(ValueError, match="Norm nan"):
        ScopeConfig(norms=(float("nan"),))
    with pytest.raises(ValueError, match="max_new_tokens=500"):
        ScopeConfig(max_new_tokens=500)
    with pytest.raises(ValueError, match="no chat template"):
        prompt_with_positions(gpt2, ScopeConfig(prompt=PROMPTS["chat"][0],
                                                answer_prefix=PROMPTS["chat"][1], chat=True))
    with pytest.raises(ValueError, match="out of range"):
        patch_scope(gpt2, sae, 10_000, ScopeConfig(prompt=PROMPT))
    with pytest.raises(ValueError, match="Unsupported hook name"):
        patch_scope(gpt2, sae, 1, ScopeConfig(prompt=PROMPT, hook="blocks.0.resid"))
    with pytest.raises(ValueError, match="1 to 256 latents"):
        scope_many(gpt2, sae, [], ScopeConfig(prompt=PROMPT))
    assert leftover_hooks(gpt2.model) == []
    assert typical_norm(gpt2, sae, ScopeConfig(prompt=PROMPT)) > 0


def test_command_line_stores_and_exports(tiny_dir, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from core.explain import main
    from core.labels import LabelStore
    from tests.conftest import make_index

    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    make_index(tiny_dir)
    labels = tmp_path / "explained.duckdb"
    common = ["--model", f"local:{tiny_dir / 'tiny-gpt2'}", "--sae",
              f"local:{tiny_dir / 'sae-gpt2-l1'}", "--device", "cpu", "--labels", str(labels)]
    main(["patchscope", *common, "--latents", "3,4", "--prompt", PROMPT, "--tokens", "3",
          "--norms", "1,2"])
    assert "[2/2] #4" in capsys.readouterr().out
    scope = LabelStore.scope("tiny-gpt2", SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")))
    stored = LabelStore(labels).explanations(scope, sources=("patchscope",))
    assert {e.latent for e in stored} <= {3, 4} and stored
    main(["export", *common, "--out", str(tmp_path / "all.csv")])
    table = pd.read_csv(tmp_path / "all.csv")
    assert {"patchscope", "tokens"} <= set(table["source"])
    with pytest.raises(SystemExit, match="No autointerp endpoint"):
        for name in ("SAE_WORKBENCH_LLM_BASE_URL", "OPENAI_BASE_URL",
                     "SAE_WORKBENCH_LLM_API_KEY", "OPENAI_API_KEY"):
            monkeypatch.delenv(name, raising=False)
        main(["autointerp", *common, "--latents", "3"])
    with pytest.raises(SystemExit, match="no Neuronpedia id"):
        main(["neuronpedia", *common])


def test_chat_prompt_goes_through_the_template(gpt2):
    import copy
    from types import SimpleNamespace

    tok = copy.deepcopy(gpt2.tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<model>{% endif %}")
    lm = SimpleNamespace(tokenizer=tok, config=gpt2.config, name="tiny-chat")
    prompt, prefix, chat = PROMPTS["chat"]
    cfg = ScopeConfig(prompt=prompt, answer_prefix=prefix, chat=chat, norms=(1.0,))
    ids, positions = prompt_with_positions(lm, cfg)
    text = tok.decode(ids[1:])
    assert text == f"<user>{prompt}\n<model>{prefix}"
    assert tok.decode([ids[p] for p in positions]).count("<unk>") == 2  # question and answer
