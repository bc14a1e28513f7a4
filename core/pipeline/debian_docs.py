"""Text sources for the corpus: Debian documentation packages and the converters that turn
their files (HTML, reStructuredText, AsciiDoc, POD, roff, Info, dictd, WML) into plain text.

Files are found through dpkg's file lists, so every document belongs to a package, and are read
in sorted order. ``core.pipeline.corpus`` assembles the splits; ``data/NOTICE.md`` lists each
source and its licence.
"""

from __future__ import annotations

import gzip
import html.parser
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str
    text: str



class _HtmlText(html.parser.HTMLParser):
    """Visible text of a documentation page's main body, paragraphs kept; scripts, styles and
    navigation (``<nav>``, menus, headers, footers, sidebars, tables of contents) left out."""

    SKIP = frozenset({"script", "style", "nav", "head", "footer", "svg"})
    BLOCK = frozenset({"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "dt", "dd", "tr", "br",
                       "section"})
    BOILERPLATE = frozenset({"nav", "global-nav", "navheader", "navfooter", "navigation", "menu",
                             "mainmenu", "submenu", "searchmenu", "tagline", "banner", "docnav",
                             "hd", "ft", "header", "footer", "sidebar", "sphinxsidebar",
                             "related", "breadcrumbs", "toc", "search", "contentinfo"})
    """class, id or role words of navigation blocks (Sphinx, DocBook, SQLite, Django pages)."""
    CONTAINERS = frozenset({"div", "ul", "ol", "dl", "table", "section", "header", "aside", "span"})
    """Tags skipped by those words: always closed, unlike <p>, <li> or void tags like <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip_tag = ""
        self.skip = 0
        """How deep we are inside the skipped element (only its own tag name is counted)."""

    def handle_starttag(self, tag, attrs):
        if self.skip:
            self.skip += tag == self.skip_tag
            return
        words = {w for name, value in attrs if name in ("class", "id", "role") and value
                 for w in value.split()}
        if tag in self.SKIP or tag in self.CONTAINERS and words & self.BOILERPLATE:
            self.skip_tag, self.skip = tag, 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if not self.skip and tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip:
            self.skip -= tag == self.skip_tag
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        raw = "".join(self.parts).replace("¶", "")
        raw = re.sub(r"[ \t]+\n", "\n", raw)
        return re.sub(r"\n{3,}", "\n\n", raw).strip()


DPKG_INFO = Path("/var/lib/dpkg/info")
"""Where dpkg keeps each installed package's file list (``<package>.list``)."""

Kind = Literal["html", "rst", "asciidoc", "pod", "man", "info", "fortune", "dict", "bible",
               "wml"]


@dataclass(frozen=True)
class DebianDocs:
    """A corpus source read from the files of installed Debian packages (all from Debian main)."""

    name: str
    """Source name in the manifest, in ``sources`` and in ``max_share``."""
    packages: tuple[str, ...]
    """Debian packages that provide it; their files are found through dpkg's file lists."""
    kind: Kind
    """How a file becomes text."""
    pattern: str
    """Regular expression (``re.search``) a file's path must match to be read."""
    licence: str
    """Licence of the text, as stated in ``/usr/share/doc/<package>/copyright``."""


WESNOTH = ("wesnoth-1.16-data", *(f"wesnoth-1.16-{c}" for c in (
    "did", "dm", "dw", "ei", "httt", "l", "low", "nr", "sof", "sota", "sotbe", "thot", "trow",
    "tsg", "ttb", "utbs")))
_SPHINX_PAGES = r"/(?!_|genindex|py-modindex|search)[^/]+(/[^/]+)*\.html$"
DEBIAN_DOCS: tuple[DebianDocs, ...] = (
    DebianDocs("python-docs", ("python3.11-doc",), "html", r"/python3\.11/html" + _SPHINX_PAGES,
               "Python 3.11 documentation; PSF License v2."),
    DebianDocs("linux-doc", ("linux-doc-6.1",), "rst",
               r"/html/_sources/(?!translations/).*\.rst\.txt$",
               "Linux kernel 6.1 documentation (reStructuredText); GPL-2."),
    DebianDocs("perl-doc", ("perl-doc",), "pod", r"/pod/[^/]+\.pod$",
               "Perl 5.36 documentation (POD); GPL-1+ or Artistic License."),
    DebianDocs("postgresql-doc", ("postgresql-doc-15",), "html",
               r"/postgresql-doc-15/html/(?!bookindex)[^/]+\.html$",
               "PostgreSQL 15 manual; PostgreSQL Licence (BSD-style)."),
    DebianDocs("django-doc", ("python-django-doc",), "html",
               r"/python-django-doc/html" + _SPHINX_PAGES,
               "Django 3.2 documentation; BSD-3-Clause."),
    DebianDocs("sqlite-doc", ("sqlite3-doc",), "html",
               r"/doc/sqlite3/(?!capi3ref|doc_\w+_crossref|keyword_index|sitemap|syntaxdiagrams"
               r"|toc)[^ ]*\.html$",
               "SQLite documentation; public domain."),
    DebianDocs("git-doc", ("git-doc",), "asciidoc", r"/doc/git-doc/.*\.txt$",
               "Git documentation (AsciiDoc sources); GPL-2."),
    DebianDocs("debian-handbook", ("debian-handbook",), "html", r"/html/en-US/[^/]+\.html$",
               "The Debian Administrator's Handbook (English); GPL-2+ or CC-BY-SA-3.0."),
    DebianDocs("debian-manuals",
               ("debian-reference-en", "debian-policy", "developers-reference", "maint-guide",
                "debian-faq", "debian-history"), "html",
               r"(/debian-reference/.*\.en\.html|/debian-policy/[^/]+\.html/[^_/][^/]*\.html"
               r"|/developers-reference/(?!genindex|search)[^_/][^/]*\.html"
               r"|/maint-guide/html/[^/]+\.en\.html|/doc/debian/FAQ/[^/]+\.en\.html"
               r"|/debian-history/docs/[^/]+\.en\.html)$",
               "Debian Reference, Debian Policy Manual, Developer's Reference, New Maintainers' "
               "Guide, A Brief History of Debian: GPL-2+ (the guide also MIT); Debian FAQ: "
               "verbatim and modified copying permitted."),
    DebianDocs("gnu-standards", ("gnu-standards",), "html", r"/gnu-standards/[^/]+\.html$",
               "GNU Coding Standards and Information for Maintainers of GNU Software; GFDL-1.3+ "
               "with no invariant sections."),
    DebianDocs("manpages", ("manpages", "manpages-dev"), "man", r"/man/man\d/[^/]+\.gz$",
               "Linux man-pages project (sections 2-7); GPL-2+, single pages under the "
               "Linux-man-pages-copyleft (verbatim copying) licence, BSD, Expat or GPL variants "
               "as listed in /usr/share/doc/manpages/copyright."),
    DebianDocs("gcide", ("dict-gcide",), "dict", r"/gcide\.dict\.dz$",
               "GNU Collaborative International Dictionary of English (Webster's 1913 and "
               "additions); GPL-2+."),
    DebianDocs("wordnet", ("dict-wn",), "dict", r"/wn\.dict\.dz$",
               "WordNet 3.0 glosses and examples; WordNet 3.0 licence (permissive, BSD-style)."),
    DebianDocs("devils-dictionary", ("dict-devil",), "dict", r"/devil\.dict\.dz$",
               "Ambrose Bierce, The Devil's Dictionary (1911); public domain."),
    DebianDocs("jargon", ("jargon",), "info", r"/jargon\.info\.gz$",
               "The Jargon File 4.0.0; public domain."),
    DebianDocs("cfi", ("cfi-en",), "html", r"/cfi-en/html/[^/]+\.html?$",
               "Linus Walleij, Copyright Does Not Exist (English translation); public domain."),
    DebianDocs("fortunes", ("fortunes-min", "fortunes"), "fortune",
               r"/games/fortunes/(?!ascii-art$)[a-z-]+$",
               "BSD fortune cookie files (quotations, jokes, poems); BSD licence."),
    DebianDocs("wesnoth", WESNOTH, "wml",
               r"/wesnoth/1\.16/data/(campaigns|core/units)/.*\.cfg$",
               "Battle for Wesnoth 1.16: the story, dialogue and objectives of its 18 campaigns "
               "and its unit descriptions (translatable strings of the WML files); GPL-2+."),
    DebianDocs("kjv-bible", ("bible-kjv", "bible-kjv-text"), "bible", r"/bible\.data$",
               "King James Version of the Bible (1611); public domain (copyright expired)."),
)
DEBIAN_SOURCES = {d.name: d for d in DEBIAN_DOCS}


def _dpkg_list(package: str, dpkg_info: Path) -> list[str] | None:
    """Paths dpkg installed for ``package``, or None if it is not installed."""
    for name in [f"{package}.list", *sorted(p.name for p in dpkg_info.glob(f"{package}:*.list"))]:
        if (dpkg_info / name).is_file():
            return (dpkg_info / name).read_text().splitlines()
    return None


def missing_packages(specs: list[DebianDocs], dpkg_info: Path | None = None) -> list[str]:
    info = DPKG_INFO if dpkg_info is None else dpkg_info
    return [p for s in specs for p in s.packages if _dpkg_list(p, info) is None]


def debian_documents(spec: DebianDocs, dpkg_info: Path | None = None) -> Iterator[Document]:
    """The documents of one Debian source, files read in sorted path order."""
    dpkg_info = DPKG_INFO if dpkg_info is None else dpkg_info
    missing = missing_packages([spec], dpkg_info)
    if missing:
        raise FileNotFoundError(
            f"Corpus source {spec.name!r} needs the Debian package(s) {', '.join(missing)}: "
            f"run `apt-get install {' '.join(missing)}` or leave {spec.name!r} out of the sources."
        )
    pattern = re.compile(spec.pattern)
    listed = {line for p in spec.packages for line in _dpkg_list(p, dpkg_info) or []}
    paths = [Path(p) for p in sorted(listed) if pattern.search(p)]
    paths = [p for p in paths if p.is_file() and not p.is_symlink()]
    if not paths:
        raise FileNotFoundError(
            f"Corpus source {spec.name!r}: the package(s) {', '.join(spec.packages)} are "
            "installed but none of their text files is on disk; dpkg may be set to leave out "
            "/usr/share/doc or /usr/share/man (see /etc/dpkg/dpkg.cfg.d/): drop that rule and "
            f"run `apt-get install --reinstall {' '.join(spec.packages)}`."
        )
    for path in paths:
        for doc_id, text in _CONVERTERS[spec.kind](path):
            if len(text) > 200:
                yield Document(spec.name, doc_id, text)


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _doc_id(path: Path) -> str:
    return path.as_posix().removeprefix("/usr/share/")


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_text(src: str) -> str:
    parser = _HtmlText()
    parser.feed(src)
    return parser.text()


_RST_RULES = [
    # directives, comments, targets and their options; title underlines and table rules
    (re.compile(r"^\s*\.\.(\s.*)?$|^\s*:[\w-]+:(\s.*)?$|^\s*::\s*$", re.MULTILINE), ""),
    (re.compile(r"^\s*([=\-~^\"'`#*+:_])\1{3,}[\s=\-+|]*$", re.MULTILINE), ""),
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r":[\w:.+-]+:`([^`<]*?)\s*(<[^>`]*>)?`"), r"\1"),  # :ref:`text <target>`
    (re.compile(r"`([^`<]+?)\s*<[^>`]+>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),
    (re.compile(r"\*\*([^*\n]+)\*\*"), r"\1"),
    (re.compile(r"(\S)::$", re.MULTILINE), r"\1:"),
]


def rst_to_text(src: str) -> str:
    """reStructuredText with markup removed: directives, title rules and roles go, text stays."""
    for rule, repl in _RST_RULES:
        src = rule.sub(repl, src)
    return _tidy(src)


_ADOC_RULES = [
    (re.compile(r"linkgit:([\w.-]+)\[(\d)\]"), r"\1(\2)"),
    (re.compile(r"^(([-=~^+.*_/])\2{3,}|\+|\[\[.*\]\]|\[[\w\"' ,=]*\]|:[\w-]+:.*"
                r"|(include|ifdef|ifndef|endif)::.*)\n", re.MULTILINE), ""),
    (re.compile(r"`([^`\n]+)`"), r"\1"),
]


def asciidoc_to_text(src: str) -> str:
    """AsciiDoc (Git's manual pages) with delimiters, attributes and link macros removed."""
    for rule, repl in _ADOC_RULES:
        src = rule.sub(repl, src)
    return _tidy(src)


_POD_ESCAPES = {"lt": "\ue000", "gt": "\ue001", "verbar": "|", "sol": "/", "quot": '"',
                "amp": "&", "apos": "'"}


def _pod_escape(name: str) -> str:
    if name in _POD_ESCAPES:
        return _POD_ESCAPES[name]
    try:
        return chr(int(name, 16) if name.lower().startswith("0x") else int(name))
    except ValueError:
        return ""


def pod_to_text(src: str) -> str:
    """Perl POD: headings and items kept as lines, other commands dropped, B<>, C<>, L<>…
    unwrapped."""
    lines = []
    for line in src.splitlines():
        command = re.match(r"=(\w+)\s*(.*)", line)
        if command is None:
            lines.append(line)
        elif command[1].startswith("head") or command[1] == "item":
            lines.append(command[2])
    text = "\n".join(lines)
    text = re.sub(r"E<([^<>]*)>", lambda m: _pod_escape(m[1]), text)
    text = re.sub(r"[XZ]<[^<>]*>", "", text)
    text = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", text, flags=re.DOTALL)
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"L<(?:([^<>|]*)\|)?([^<>]*)>", lambda m: m[1] or m[2], text)
        text = re.sub(r"[BCFIS]<([^<>]*)>", r"\1", text)
    return _tidy(text.replace("\ue000", "<").replace("\ue001", ">"))


_ROFF_CHARS = {"(em": "—", "(en": "–", "(aq": "'", "(cq": "'", "(oq": "'", "(lq": '"',
               "(rq": '"', "(dq": '"', "*(lq": '"', "*(rq": '"', "(bu": "•", "(co": "©",
               "(rg": "®", "(mu": "×", "(>=": "≥", "(<=": "≤", "(->": "→", "(ti": "~",
               "(ha": "^", "(ga": "`", "(rs": "\\", "(dg": "†", "(de": "°", "-": "-", "e": "\\",
               "\\": "\\", " ": " ", "~": " ", "0": " ", ".": ".", "'": "'", "`": "`"}
_ROFF_ESCAPE = re.compile(r"\\(\*?\(..|\*?\[[^\]]*\]|f\(..|f.|s[+-]?\d+|.)")
_ROFF_BREAK = {"PP", "LP", "P", "sp", "TP", "IP", "HP", "SH", "SS", "RS", "RE", "EX", "EE",
               "nf", "fi", "br"}


def _roff_args(rest: str) -> list[str]:
    return [m[2] if m[1] is None else m[1].replace('""', '"')
            for m in re.finditer(r'"((?:[^"]|"")*)"|(\S+)', rest)]


def man_to_text(src: str) -> str:
    """A man page's roff source as plain text: filled lines joined, ``.nf`` blocks kept as they
    are, requests, table layouts and font escapes removed."""
    out: list[str] = []
    fill, join, table_layout = True, False, False
    for line in src.splitlines():
        if table_layout:  # a tbl layout runs up to the line ending in "."
            table_layout = not line.rstrip().endswith(".")
            continue
        heading = False
        if line.startswith((".", "'")):
            name, rest = re.match(r"[.']\s*(\S*)\s*(.*)", line).groups()
            if name == "so":
                return ""  # a link to another page
            fill = {"nf": False, "EX": False, "TS": False, "fi": True, "EE": True, "TE": True}.get(
                name, fill)
            table_layout = name == "TS"
            if name in _ROFF_BREAK:
                out.append("")
                join = False
            heading = name in {"SH", "SS"}
            if heading or name in {"B", "I", "SM", "SB"}:
                line = " ".join(_roff_args(rest))
            elif name == "IP" and rest:
                line = _roff_args(rest)[0]
            elif len(name) == 2 and set(name) <= set("BIR"):  # .BR .IR …: alternating fonts
                line = "".join(_roff_args(rest))
            else:
                continue
        elif not line.strip():
            out.append("")
            join = False
            continue
        line = re.sub(r"^T\{$|^T\}", "", line)
        if join and out:
            out[-1] += " " + line
        else:
            out.append(line)
        join = fill and not heading
    text = _ROFF_ESCAPE.sub(lambda m: _ROFF_CHARS.get(m[1], ""), "\n".join(out))
    return _tidy(text)


def info_to_text(src: str) -> str:
    """An Info manual: node separators and ``File: … Node: …`` header lines removed."""
    return _tidy(re.sub(r"\x1f\n?(File: .*\n)?", "\n\n", src))


def fortunes_to_text(src: str) -> str:
    parts = re.split(r"^%\s*$", src, flags=re.MULTILINE)
    return _tidy("\n\n".join(part.strip("\n") for part in parts))


_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64_number(digits: str) -> int:
    n = 0
    for c in digits:
        n = n * 64 + _B64[c]
    return n


def dict_entries(dict_path: Path) -> list[str]:
    """Entries of a dictd database (``.dict.dz`` + ``.index``), metadata entries left out."""
    data = gzip.decompress(dict_path.read_bytes()) if dict_path.suffix == ".dz" \
        else dict_path.read_bytes()
    index = dict_path.with_name(dict_path.name.split(".")[0] + ".index")
    spans = set()
    for line in index.read_text(errors="replace").splitlines():
        word, offset, length = line.split("\t")[:3]
        if not word.startswith(("00-database", "00database")):
            spans.add((_b64_number(offset), _b64_number(length)))
    return [data[o:o + n].decode("utf-8", errors="replace").strip() for o, n in sorted(spans)]


def kjv_chapters(listing: str) -> Iterator[tuple[str, str]]:
    """Verses printed by ``bible -f`` (``Ge1:1 In the beginning …``) grouped into chapters."""
    chapters: dict[str, list[str]] = {}
    for line in listing.splitlines():
        verse = re.match(r"([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)", line)
        if verse:
            chapters.setdefault(f"{verse[1]} {verse[2]}", []).append(f"{verse[3]} {verse[4]}")
    for ref, verses in chapters.items():
        yield f"kjv:{ref}", "\n".join(verses)


def _bible(path: Path) -> Iterator[tuple[str, str]]:
    listing = subprocess.run(["bible", "-p", str(path.parent), "-f", "Gen1:1-Rev22:21"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
    yield from kjv_chapters(listing.stdout)


_WML_STRING = re.compile(r'\b_\s*"((?:[^"]|"")*)"')


def wml_to_text(src: str) -> str:
    """Translatable strings (``_ "…"``) of a Wesnoth WML file with a few words or more, in order:
    campaign story, dialogue, objectives and unit descriptions. Markup and context prefixes go."""
    texts = []
    for match in _WML_STRING.finditer(src):
        text = re.sub(r"^[\w ]+\^", "", match[1].replace('""', '"'))
        text = re.sub(r"</?(b|i|u|big|small|span|tt)\b[^>]*>", "", text)
        if len(text.split()) >= 4:
            texts.append(text.strip())
    return _tidy("\n\n".join(texts))


def _whole(convert):
    return lambda path: [(_doc_id(path), convert(_read(path)))]


_CONVERTERS = {
    "html": _whole(html_to_text), "rst": _whole(rst_to_text),
    "asciidoc": _whole(asciidoc_to_text), "pod": _whole(pod_to_text),
    "man": _whole(man_to_text), "info": _whole(info_to_text),
    "fortune": _whole(fortunes_to_text),
    "dict": lambda path: [(_doc_id(path), "\n\n".join(dict_entries(path)))],
    "bible": _bible, "wml": _whole(wml_to_text),
}
