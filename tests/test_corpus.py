"""The corpus builder: deterministic for a seed, held-out disjoint from train, sources parsed."""

from __future__ import annotations

import json

import pytest

from core.corpus import (
    CorpusConfig,
    Document,
    _HtmlText,
    build_corpus,
    gather,
    local_documents,
    split_long,
)


def docs(n: int = 60) -> list[Document]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [Document("local", f"d{i}", " ".join(words[(i + j) % 10] for j in range(40 + i)))
            for i in range(n)]


def build(tmp_path, tokenizer, seed: int, name: str):
    cfg = CorpusConfig(out_dir=tmp_path / name, seed=seed, train_tokens=1500, heldout_tokens=400,
                       sources=())
    return cfg, build_corpus(cfg, tokenizer, docs())


def test_same_seed_same_files_other_seed_other_order(tmp_path, gpt2):
    _, a = build(tmp_path, gpt2.tokenizer, 0, "a")
    _, b = build(tmp_path, gpt2.tokenizer, 0, "b")
    _, c = build(tmp_path, gpt2.tokenizer, 1, "c")
    assert a.sha256 == b.sha256
    assert a.sha256["train"] != c.sha256["train"]


def test_splits_are_disjoint_and_sized(tmp_path, gpt2):
    cfg, manifest = build(tmp_path, gpt2.tokenizer, 0, "a")
    ids = {s: {json.loads(l)["id"] for l in (cfg.out_dir / f"{s}.jsonl").open()}
           for s in ("train", "heldout")}
    assert ids["train"] and ids["heldout"] and not ids["train"] & ids["heldout"]
    assert manifest.splits["heldout"]["local"]["tokens"] >= 400
    assert 1500 <= manifest.splits["train"]["local"]["tokens"] < 1500 + 200
    assert "local" in manifest.licences


def test_long_documents_split_at_paragraphs():
    doc = Document("local", "x", "\n\n".join(["word " * 50] * 10))
    pieces = split_long(doc, 600)
    assert len(pieces) > 1 and all(len(p.text) <= 600 for p in pieces)
    assert "".join(p.text for p in pieces).replace("\n", "") == doc.text.replace("\n", "")


def test_html_to_text_keeps_prose_and_drops_navigation():
    parser = _HtmlText()
    parser.feed("<html><head><title>t</title></head><body><nav>Menu</nav><h1>Title¶</h1>"
                "<p>First paragraph.</p><script>x=1</script><p>Second.</p></body></html>")
    text = parser.text()
    assert "Title" in text and "First paragraph." in text and "Second." in text
    assert "Menu" not in text and "x=1" not in text and "¶" not in text


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": ""}\n{"text": "two"}\n')
    found = list(local_documents((str(tmp_path / "b.jsonl"), str(tmp_path / "a.txt"))))
    assert [d.text for d in found] == ["plain text document", "one", "two"]


def test_bad_config_messages(tmp_path):
    with pytest.raises(ValueError, match="Unknown corpus source"):
        CorpusConfig(out_dir=tmp_path, sources=("wikipedia",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CorpusConfig(out_dir=tmp_path, local_files=(str(tmp_path / "missing.txt"),))
    with pytest.raises(ValueError, match="needs the model"):
        gather(CorpusConfig(out_dir=tmp_path, sources=("samples",)))


def test_hf_dataset_offline_is_a_clear_message(tmp_path):
    cfg = CorpusConfig(out_dir=tmp_path, sources=(), hf_dataset="monology/pile-uncopyrighted")
    with pytest.raises(ValueError, match="hub is unreachable"):
        gather(cfg)


def test_samples_refuse_a_model_that_writes_garbage(tmp_path, gpt2):
    cfg = CorpusConfig(out_dir=tmp_path, sources=("samples",), sample_tokens=10)
    with pytest.raises(ValueError, match="probably loaded wrongly"):
        gather(cfg, gpt2)


def test_source_shares_are_capped(tmp_path, gpt2):
    mixed = docs(60) + [Document("python-source", f"c{i}", "def f(x):\n    return x * 2\n" * 8)
                        for i in range(60)]
    cfg = CorpusConfig(out_dir=tmp_path, train_tokens=1500, heldout_tokens=400, sources=(),
                       max_share=(("python-source", 0.3),))
    manifest = build_corpus(cfg, gpt2.tokenizer, mixed)
    code = manifest.splits["train"]["python-source"]["tokens"]
    one_doc = len(gpt2.tokenizer(mixed[-1].text)["input_ids"])
    assert 0 < code <= 0.3 * 1500 + one_doc
    assert manifest.splits["train"]["local"]["tokens"] > code
