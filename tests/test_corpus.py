"""The corpus builder: deterministic for a seed, held-out disjoint from train, sources parsed."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from core.pipeline import corpus, debian_docs
from core.pipeline.corpus import (
    CorpusConfig,
    build_corpus,
    gather,
    local_documents,
    split_long,
    stream_windows,
    token_stream,
)
from core.pipeline.debian_docs import (
    DEBIAN_DOCS,
    DEBIAN_SOURCES,
    DebianDocs,
    Document,
    _HtmlText,
    asciidoc_to_text,
    debian_documents,
    dict_entries,
    fortunes_to_text,
    info_to_text,
    kjv_chapters,
    man_to_text,
    pod_to_text,
    rst_to_text,
    wml_to_text,
)


def docs(n: int = 60) -> list[Document]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [Document("local", f"d{i}", " ".join(words[(i + j) % 10] for j in range(40 + i)))
            for i in range(n)]


def build(tmp_path, tokenizer, seed: int, name: str, unseen: int = 0):
    cfg = CorpusConfig(out_dir=tmp_path / name, seed=seed, train_tokens=1500, heldout_tokens=400,
                       unseen_tokens=unseen, sources=())
    return cfg, build_corpus(cfg, tokenizer, docs(), tokenizer_name="tiny/gpt2")


def test_unseen_split_follows_train_and_leaves_it_unchanged(tmp_path, gpt2):
    _, plain = build(tmp_path, gpt2.tokenizer, 0, "plain")
    cfg, more = build(tmp_path, gpt2.tokenizer, 0, "more", unseen=600)
    assert more.sha256["train"] == plain.sha256["train"]
    assert more.sha256["heldout"] == plain.sha256["heldout"]
    ids = {s: {json.loads(l)["id"] for l in (cfg.out_dir / f"{s}.jsonl").open()}
           for s in ("train", "heldout", "unseen")}
    assert ids["unseen"] and not ids["unseen"] & (ids["train"] | ids["heldout"])
    assert more.splits["unseen"]["local"]["tokens"] >= 600
    assert more.tokenizer == "tiny/gpt2"  # a name, never the tokenizer's local cache path


def test_token_files_hold_each_split_joined_by_bos(tmp_path, gpt2):
    cfg, manifest = build(tmp_path, gpt2.tokenizer, 0, "a", unseen=300)
    bos = gpt2.tokenizer.bos_token_id
    for split in ("heldout", "train", "unseen"):
        want: list[int] = []
        for line in (cfg.out_dir / f"{split}.jsonl").open():
            if want:
                want.append(bos)
            want += gpt2.tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        ids = token_stream(cfg.out_dir / f"{split}.jsonl")
        assert ids.tolist() == want
        assert len(ids) - ids.tolist().count(bos) == sum(
            v["tokens"] for v in manifest.splits[split].values())
    windows = stream_windows(token_stream(cfg.out_dir / "train.jsonl"), bos, 16, max_tokens=100)
    assert windows.shape == (7, 16) and (windows[:, 0] == bos).all()
    assert windows[:, 1:].flatten().tolist() == token_stream(cfg.out_dir / "train.jsonl")[:105].tolist()


def test_missing_token_file_names_the_fix(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="rebuild the corpus"):
        token_stream(tmp_path / "train.jsonl")


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
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        CorpusConfig(out_dir=tmp_path, max_share=(("gcide", 20.0),))
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


def test_caps_of_the_only_sources_scale_up_so_train_still_fills(tmp_path, gpt2):
    """Sources whose caps add up to less than a split (python-source alone is capped at 5%)
    still fill held-out and then train, in the caps' proportions; a source without a cap
    keeps the caps as set."""
    from core.pipeline.corpus import DEFAULT_SHARES, effective_shares

    assert effective_shares(DEFAULT_SHARES, {"python-source"}) == {"python-source": 1.0}
    both = effective_shares(DEFAULT_SHARES, {"gcide", "wordnet"})
    assert both == pytest.approx({"gcide": 2 / 3, "wordnet": 1 / 3})
    assert effective_shares(DEFAULT_SHARES, {"gcide", "local"}) == {"gcide": 0.2, "local": 1.0}

    code = [Document("python-source", f"c{i}", f"def f{i}(x):\n    return x * {i}\n" * 8)
            for i in range(80)]
    cfg = CorpusConfig(out_dir=tmp_path / "code", train_tokens=1500, heldout_tokens=400,
                       sources=())
    manifest = build_corpus(cfg, gpt2.tokenizer, code)
    assert manifest.splits["heldout"]["python-source"]["tokens"] >= 400
    assert manifest.splits["train"]["python-source"]["tokens"] >= 1500
    assert token_stream(tmp_path / "code" / "train.jsonl").size > 1500

    words = [Document("gcide", f"g{i}", "noun. a word of the dictionary " * 6) for i in range(80)]
    words += [Document("wordnet", f"w{i}", "a gloss of a synset and its example " * 6)
              for i in range(80)]
    manifest = build_corpus(CorpusConfig(out_dir=tmp_path / "dict", train_tokens=1500,
                                         heldout_tokens=400, sources=()), gpt2.tokenizer, words)
    train = manifest.splits["train"]
    share = train["gcide"]["tokens"] / (train["gcide"]["tokens"] + train["wordnet"]["tokens"])
    assert 0.55 < share < 0.75  # two thirds, within a document


def test_sources_that_run_out_before_train_name_the_fix(tmp_path, gpt2):
    few = docs(5)
    cfg = CorpusConfig(out_dir=tmp_path, train_tokens=1500, heldout_tokens=100_000, sources=())
    with pytest.raises(ValueError, match="train split is empty. Add sources or lower "
                                         "--heldout-tokens"):
        build_corpus(cfg, gpt2.tokenizer, few)


# --- Debian sources, on fake packages: files under tmp_path, listed in a fake dpkg info dir ------

PROSE = "Words make sentences and sentences make paragraphs of plain English text. " * 4


def fake_package(tmp_path, package: str, files: dict[str, str | bytes]):
    """Write ``files`` under tmp_path/root and list them in tmp_path/dpkg/<package>.list."""
    info = tmp_path / "dpkg"
    info.mkdir(exist_ok=True)
    listed = [str(tmp_path / "root")]
    for rel, content in files.items():
        path = tmp_path / "root" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        listed.append(str(path))
    (info / f"{package}.list").write_text("\n".join(listed) + "\n")
    return info


def test_debian_html_pages_are_read_in_path_order_and_tagged(tmp_path):
    page = "<html><head><title>t</title></head><body><nav>Menu</nav><p>{}</p></body></html>"
    info = fake_package(tmp_path, "demo-doc", {
        "doc/html/b.html": page.format("Second page. " + PROSE),
        "doc/html/a.html": page.format("First page. " + PROSE),
        "doc/html/genindex.html": page.format("Index. " + PROSE),
        "doc/html/style.css": "p { color: red }",
        "doc/html/short.html": page.format("Too short to keep."),
    })
    spec = DebianDocs("demo", ("demo-doc",), "html", r"/html/(?!genindex)[^/]+\.html$", "PD.")
    found = list(debian_documents(spec, info))
    assert [d.text.split(".")[0] for d in found] == ["First page", "Second page"]
    assert {d.source for d in found} == {"demo"}
    assert found[0].doc_id.endswith("doc/html/a.html")
    assert "Menu" not in found[0].text


def test_missing_debian_package_names_the_install_command(tmp_path, monkeypatch):
    spec = DebianDocs("demo", ("demo-doc", "demo-data"), "html", r"\.html$", "PD.")
    fake_package(tmp_path, "demo-data", {})
    with pytest.raises(FileNotFoundError, match=r"apt-get install demo-doc` or leave 'demo'"):
        list(debian_documents(spec, tmp_path / "dpkg"))
    monkeypatch.setattr(debian_docs, "DPKG_INFO", tmp_path / "dpkg")
    cfg = CorpusConfig(out_dir=tmp_path / "out", sources=("gcide", "kjv-bible"))
    with pytest.raises(FileNotFoundError,
                       match="apt-get install --no-install-recommends dict-gcide bible-kjv "
                             "bible-kjv-text"):
        gather(cfg)


def test_installed_package_without_files_on_disk_is_an_error(tmp_path):
    info = fake_package(tmp_path, "demo-doc", {})
    (info / "demo-doc.list").write_text("/nonexistent/doc/page.html\n")
    spec = DebianDocs("demo", ("demo-doc",), "html", r"\.html$", "PD.")
    with pytest.raises(FileNotFoundError, match="dpkg may be set to leave out"):
        list(debian_documents(spec, info))


def test_real_patterns_pick_english_pages_only():
    def picks(name, path):
        return re.search(DEBIAN_SOURCES[name].pattern, path) is not None

    kernel = "/usr/share/doc/linux-doc-6.1/html/_sources/"
    assert picks("linux-doc", kernel + "admin-guide/README.rst.txt")
    assert not picks("linux-doc", kernel + "translations/zh_CN/index.rst.txt")
    assert picks("python-docs", "/usr/share/doc/python3.11/html/library/os.html")
    assert not picks("python-docs", "/usr/share/doc/python3.11/html/genindex-A.html")
    assert not picks("python-docs", "/usr/share/doc/python3.11/html/_static/x.html")
    assert picks("debian-handbook", "/usr/share/doc/debian-handbook/html/en-US/apt.html")
    assert not picks("debian-handbook", "/usr/share/doc/debian-handbook/html/fr-FR/apt.html")
    assert picks("debian-manuals", "/usr/share/doc/debian/FAQ/basic-defs.en.html")
    assert not picks("debian-manuals", "/usr/share/doc/debian/FAQ/basic-defs.html")
    assert picks("fortunes", "/usr/share/games/fortunes/literature")
    assert not picks("fortunes", "/usr/share/games/fortunes/literature.dat")
    assert set(corpus.LICENCES) >= set(DEBIAN_SOURCES)


def test_pod_to_text():
    pod = ("=head1 NAME\n\nperlfoo - B<bold>, C<< $a <=> $b >>, L<the manual|perlfunc> and "
           "C<$x E<gt> 1>X<index>\n\n=over 4\n\n=item * first item\n\n=back\n\n=cut\n")
    text = pod_to_text(pod)
    assert text.startswith("NAME\n\nperlfoo - bold, $a <=> $b, the manual and $x > 1")
    assert "* first item" in text
    assert "=over" not in text and "=cut" not in text and "index" not in text


def test_rst_to_text():
    rst = (".. SPDX-License-Identifier: GPL-2.0\n\n.. _label:\n\nA Title\n=======\n\n"
           "See :ref:`the guide <guide>` and ``make htmldocs`` or `the site <https://x>`_.\n\n"
           ".. note::\n   :class: small\n\n   Keep this note.\n\nExample::\n\n    code\n")
    text = rst_to_text(rst)
    assert text.startswith("A Title\n\nSee the guide and make htmldocs or the site.")
    assert "Keep this note." in text and "Example:\n" in text and "    code" in text
    assert "SPDX" not in text and "===" not in text and ":class:" not in text


def test_asciidoc_to_text():
    adoc = "git-add(1)\n==========\n\nNAME\n----\ngit-add - add `files`, see linkgit:git-rm[1]\n"
    assert asciidoc_to_text(adoc) == "git-add(1)\n\nNAME\ngit-add - add files, see git-rm(1)"


def test_man_to_text():
    roff = ('.\\" a comment\n.TH FOO 1 2020\n.SH NAME\nfoo \\- do things\n.SH DESCRIPTION\n'
            ".B foo\nreads\n.I files\nand \\fBwrites\\fR them \\(em quickly.\n.PP\n"
            ".BR bar (1)\nis related.\n.nf\nline one\nline two\n.fi\n")
    text = man_to_text(roff)
    assert text == ("NAME\nfoo - do things\n\nDESCRIPTION\nfoo reads files and writes them — "
                    "quickly.\n\nbar(1) is related.\n\nline one\nline two")
    assert man_to_text(".so man3/other.3\n") == ""


def b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def test_dictd_entries_come_from_the_index_without_metadata(tmp_path):
    entries = ["00-database-short\n   A test dictionary", "Apple \\Ap\"ple\\, n.\n   A fruit.",
               "Banana\n   Another fruit, long and yellow."]
    data, index, offset = b"", [], 0
    for word, entry in zip(["00-database-short", "apple", "banana"], entries):
        raw = (entry + "\n\n").encode()
        index.append(f"{word}\t{b64(offset)}\t{b64(len(raw))}")
        data, offset = data + raw, offset + len(raw)
    index.append(f"pomme\t{b64(len(entries[0]) + 2)}\t{b64(len(entries[1]) + 2)}")  # same entry
    (tmp_path / "demo.dict.dz").write_bytes(gzip.compress(data))
    (tmp_path / "demo.index").write_text("\n".join(sorted(index)) + "\n")
    assert dict_entries(tmp_path / "demo.dict.dz") == entries[1:]


def test_fortune_info_bible_and_wml_text():
    assert fortunes_to_text("One saying.\n%\nAnother one.\n\t-- Someone\n%\n") == (
        "One saying.\n\nAnother one.\n\t-- Someone")
    assert info_to_text("Info file\n\x1f\nFile: j.info, Node: Top, Up: (dir)\nText.\n") == (
        "Info file\n\nText.")
    chapters = list(kjv_chapters("Ge1:1 In the beginning\nGe1:2 And the earth\n2Ki3:1 Now\n"))
    assert chapters == [("kjv:Ge 1", "1 In the beginning\n2 And the earth"), ("kjv:2Ki 3", "1 Now")]
    wml = ('name= _ "Short"\nstory=_ "The <i>long</i> winter came, and ""snow"" fell."\n'
           'user_team_name= _ "teamname^The Northern Alliance"\nid=x # _ "not"\n')
    assert wml_to_text(wml) == 'The long winter came, and "snow" fell.'


def test_debian_sources_build_a_deterministic_capped_corpus(tmp_path, gpt2):
    pods = {f"usr/share/perl/pod/perl{i:02d}.pod": f"=head1 NAME\n\nPart {i}. {PROSE}\n"
            for i in range(30)}
    man = ".TH X 1\n.SH NAME\nSection {i}. " + PROSE + "\n"
    pages = {f"usr/share/man/man1/x{i:02d}.1.gz": gzip.compress(man.format(i=i).encode(), mtime=0)
             for i in range(30)}
    info = fake_package(tmp_path, "perl-doc", pods)
    fake_package(tmp_path, "manpages", pages)
    fake_package(tmp_path, "manpages-dev", {})
    documents = [d for name in ("perl-doc", "manpages")
                 for d in debian_documents(DEBIAN_SOURCES[name], info)]
    assert len(documents) == 60

    def build(seed, name):
        cfg = CorpusConfig(out_dir=tmp_path / name, seed=seed, train_tokens=1500,
                           heldout_tokens=300, sources=(), max_share=(("perl-doc", 0.4),))
        return build_corpus(cfg, gpt2.tokenizer, documents)

    a, b, c = build(0, "a"), build(0, "b"), build(1, "c")
    assert a.sha256 == b.sha256 and a.sha256["train"] != c.sha256["train"]
    train = a.splits["train"]
    one_doc = max(len(gpt2.tokenizer(d.text)["input_ids"]) for d in documents)
    assert 0 < train["perl-doc"]["tokens"] <= 0.4 * 1500 + one_doc
    assert train["manpages"]["tokens"] > train["perl-doc"]["tokens"]
    assert "perl-doc" in a.licences["perl-doc"] and "GPL" in a.licences["perl-doc"]


def test_notice_lists_every_debian_source_and_package():
    notice = (Path(__file__).resolve().parent.parent / "data" / "NOTICE.md").read_text()
    install = notice[notice.index("apt-get install"):]
    for spec in DEBIAN_DOCS:
        assert f"| `{spec.name}` |" in notice
        assert all(re.search(rf"(^|\s){re.escape(p)}(\s|$)", install) for p in spec.packages)
        assert all(re.search(rf"(^|\s){re.escape(p)}(\s|$)", corpus.__doc__) for p in spec.packages)


def test_html_to_text_drops_menus_headers_and_tables_of_contents():
    page = ('<body><div id="hd"><div class="nav">Home | Index</div></div>'
            '<div class="menu mainmenu"><a>About</a></div><div class="tagline">Small. Fast.</div>'
            '<div class="body"><h1>Security</h1><div class="toc"><div>One</div><div>Two</div>'
            '</div><p>Real text.<br/>More text.</p><div><div>Nested kept.</div></div></div>'
            '<div class="related" role="navigation">next | previous</div></body>')
    text = debian_docs.html_to_text(page)
    assert text == "Security\n\nReal text.\nMore text.\n\nNested kept."
