"""Latent labels and explanations: automatic ones from the feature index, the user's own, and
those written by patch scoping, autointerp or imported from Neuronpedia; searchable.

* **Automatic**: the tokens a latent's top activating examples sit on, most frequent first
  ("fires on: small · tiny · little"), read from the index with one query per SAE (never stored:
  they follow the index).
* **Stored explanations**: the user's label (typed on the Lookup page), patch-scoping outputs,
  autointerp explanations with their detection score and Neuronpedia's explanations, kept in one
  table of a small DuckDB file in the cache directory (``labels.duckdb``) with their source,
  parameters and date, keyed by model, SAE (a local SAE by its full path), latent, source and
  parameters; shared by every session of the server, by other servers on the same cache
  directory and by later runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.feature_index import FeatureIndex
from core.models import cache_dir

if TYPE_CHECKING:
    from core.saes import SaeSpec

MAX_LABEL_CHARS = 200
MAX_EXPLANATION_CHARS = 400
"""Longer explanations (from an LLM, a model's continuation or an import) are cut to this."""
SOURCES = ("user", "autointerp", "neuronpedia", "patchscope", "tokens")
"""Where an explanation comes from, in the order the best one is picked. ``tokens`` (what the
latent fires on) is read from the index, never stored."""
SOURCE_NAMES = {"user": "your label", "autointerp": "autointerp", "neuronpedia": "Neuronpedia",
                "patchscope": "patch scoping", "tokens": "fires on"}
STORED_SOURCES = SOURCES[:4]


def auto_labels(index: FeatureIndex, sae: str, tokenizer, n: int = 3) -> dict[int, str]:
    """latent -> its most frequent top-activation tokens, for every latent that fired."""
    counts: dict[int, Counter] = {}
    for latent, tok, count in index.top_token_counts(sae):
        word = visible(tokenizer.decode([tok]))
        counts.setdefault(latent, Counter())[word] += count
    out = {}
    for latent, counter in counts.items():
        seen, words = set(), []
        for word, _ in counter.most_common():
            if word.lower() not in seen:
                seen.add(word.lower())
                words.append(word)
            if len(words) == n:
                break
        out[latent] = " · ".join(words)
    return out


def token_text(tokenizer, ids, n: int = 6) -> str:
    """The first ``n`` tokens of ``ids`` as one readable string ("small · Small · tiny"); token
    ids when there is no tokenizer."""
    def show(t: int) -> str:
        text = tokenizer.decode([int(t)]) if tokenizer is not None else f"#{int(t)}"
        return repr(text.replace("\n", "↵"))[1:-1] if text.strip() else repr(text)

    return " · ".join(show(t) for t in list(ids)[:n])


@dataclass(frozen=True)
class LatentName:
    """Every name a latent has, each said as what it is."""

    label: str = ""
    """The user's own label ('' when none)."""
    fires_on: str = ""
    """The tokens its top activating examples sit on (what it reads)."""
    logit_lens: str = ""
    """Its top logit-lens tokens (what its decoder direction promotes)."""
    explanation: str = ""
    """Its best stored explanation other than the user's label, said with its source
    ("autointerp 0.83: ...")."""

    def __str__(self) -> str:
        parts = [f"your label: {self.label}"] if self.label else []
        if self.explanation:
            parts.append(self.explanation)
        if self.fires_on:
            parts.append(f"fires on: {self.fires_on}")
        if self.logit_lens:
            parts.append(f"logit lens: {self.logit_lens}")
        return "; ".join(parts) or "no names (not in the index)"


def latent_names(index: FeatureIndex, sae: str, latents, tokenizer, user_labels: dict[int, str],
                 auto_labels: dict[int, str], n: int = 3,
                 explained: dict[int, str] | None = None) -> dict[int, LatentName]:
    """How the pages name each of ``latents``: the user's label, the tokens it fires on, its
    top logit-lens tokens (the two automatic names often differ: one is what the latent reads,
    the other what it writes) and its best stored explanation (``explained``, from
    :func:`best_explanations` with ``skip_user``)."""
    rows = index.summary(sae, [int(i) for i in latents])
    explained = explained or {}
    return {int(i): LatentName(user_labels.get(int(i), ""), auto_labels.get(int(i), ""),
                               token_text(tokenizer, ids, n), explained.get(int(i), ""))
            for i, ids in zip(rows["latent"], rows["logit_pos_ids"])}


def visible(text: str) -> str:
    """A token as a label word: stripped, or its whitespace drawn when it is only that."""
    return text.strip() or text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣") or "∅"


@dataclass(frozen=True)
class Explanation:
    """One explanation of one latent, as stored."""

    latent: int
    source: str
    """One of :data:`SOURCES`."""
    text: str
    score: float | None = None
    """Autointerp: the detection score (accuracy, 0 to 1); Neuronpedia: its score when the
    export has one; else ``None``."""
    params: dict = field(default_factory=dict)
    """How it was made (prompt, norm, explainer model, ...); never an endpoint key."""
    created_at: float = 0.0
    """Unix time."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"Unknown explanation source {self.source!r}; use one of "
                             f"{', '.join(SOURCES)}.")
        if self.score is not None and not (isinstance(self.score, (int, float))
                                           and math.isfinite(self.score)):
            raise ValueError(f"An explanation's score must be a finite number or None; got "
                             f"{self.score!r}.")

    @property
    def key(self) -> str:
        """Identifies it among the latent's explanations of its source: the user's label has
        one slot; others one per set of parameters (a rerun with the same ones replaces it)."""
        return params_key(self.params) if self.source != "user" else ""

    @property
    def said(self) -> str:
        """Its text with its source (and score): 'autointerp 0.83: the word "the"'."""
        score = f" {self.score:.2f}" if self.score is not None else ""
        return f"{SOURCE_NAMES[self.source]}{score}: {self.text}"


def params_key(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clean_text(text: str, limit: int = MAX_EXPLANATION_CHARS) -> str:
    """One line, at most ``limit`` characters (cut with an ellipsis)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


class LabelsBusy(ValueError):
    """Another process holds the label file's lock."""


class LabelStore:
    """User labels and every stored explanation in one DuckDB file, shared by every session and
    by other server processes on the same cache directory: each operation opens the file, works
    in one transaction and closes it, so processes take turns instead of locking each other
    out. A file from before explanations were kept has its labels copied into the new table
    (in one transaction) the first time it opens; its old table is left as it was."""

    def __init__(self, path: Path | str | None = None, wait_s: float = 2.0,
                 read_wait_s: float = 0.25):
        self.path = Path(path) if path else cache_dir() / "labels.duckdb"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wait_s = wait_s
        """How long a change waits for another process to let go of the file."""
        self.read_wait_s = read_wait_s
        """How long a read waits (pages read labels on every rerun, so not long)."""
        self._lock = threading.Lock()
        with self._open() as con:
            con.begin()
            try:
                tables = {r[0] for r in con.execute(
                    "SELECT table_name FROM information_schema.tables").fetchall()}
                con.execute("""CREATE TABLE IF NOT EXISTS explanations (
                    scope VARCHAR, latent INTEGER, source VARCHAR, key VARCHAR, text VARCHAR,
                    score DOUBLE, params VARCHAR, created_at DOUBLE,
                    PRIMARY KEY (scope, latent, source, key))""")
                if "labels" in tables and "explanations" not in tables:
                    # labels kept before explanations were: copied once, losing none; the old
                    # table stays for older versions of the app on the same cache directory
                    con.execute("""INSERT INTO explanations
                        SELECT scope, latent, 'user', '', label, NULL, '{}', updated
                        FROM labels""")
                con.commit()
            except BaseException:
                con.rollback()
                raise

    @contextmanager
    def _open(self, wait_s: float | None = None):
        import duckdb

        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        with self._lock:
            while True:
                try:
                    con = duckdb.connect(str(self.path))
                    break
                except duckdb.Error as exc:
                    if "lock" not in str(exc).lower():
                        raise ValueError(
                            f"The label file {self.path} is not a label database ({exc}). "
                            "Nothing was changed in it: rename it to keep it (a new label file "
                            "starts in its place), or set SAE_WORKBENCH_CACHE to another "
                            "directory.") from exc
                    if time.monotonic() >= deadline:
                        raise LabelsBusy(
                            f"The label file {self.path} is held by another process (a second "
                            "server or a DuckDB shell on the same cache directory); try again "
                            "in a moment. Your labels are safe.") from exc
                    time.sleep(0.05)
            try:
                yield con
            finally:
                con.close()

    @staticmethod
    def scope(model_name: str, sae: "SaeSpec | str") -> str:
        """The key labels are kept under: the model and the SAE. A local SAE is keyed by its
        full resolved path (two directories named ``layer6`` are two SAEs); others by label."""
        if isinstance(sae, str):
            return f"{model_name}|{sae}"
        if sae.source == "local":
            return f"{model_name}|local:{Path(sae.name).expanduser().resolve()}"
        return f"{model_name}|{sae.label}"

    def set(self, scope: str, latent: int, label: str) -> None:
        """Save (or, with an empty label, remove) the user's label for a latent."""
        label = " ".join(label.split())
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"The label has {len(label)} characters; keep it under "
                             f"{MAX_LABEL_CHARS}.")
        if label:
            self.put(scope, [Explanation(int(latent), "user", label, created_at=time.time())])
        else:
            self.delete(scope, int(latent), "user")

    def all(self, scope: str) -> dict[int, str]:
        """latent -> the user's label."""
        with self._open(self.read_wait_s) as con:
            rows = con.execute("SELECT latent, text FROM explanations WHERE scope = ? AND "
                               "source = 'user'", [scope]).fetchall()
        return {int(lat): lab for lat, lab in rows}

    def put(self, scope: str, items: list[Explanation]) -> None:
        """Store explanations (one transaction: all or none); each replaces the one of the same
        latent, source and parameters. Texts are cut to one line of
        :data:`MAX_EXPLANATION_CHARS`; an empty text is refused."""
        rows = []
        for e in items:
            if e.source not in STORED_SOURCES:
                raise ValueError(f"{SOURCE_NAMES.get(e.source, e.source)!r} explanations come "
                                 "from the index and are not stored.")
            text = clean_text(e.text)
            if not text:
                raise ValueError(f"The {SOURCE_NAMES[e.source]} explanation of latent "
                                 f"{e.latent} is empty; nothing was stored.")
            rows.append([scope, int(e.latent), e.source, e.key, text,
                         None if e.score is None else float(e.score),
                         json.dumps(e.params, sort_keys=True, default=str),
                         e.created_at or time.time()])  # DuckDB checks the type
        if not rows:
            return
        import pandas as pd

        incoming = pd.DataFrame(rows, columns=["scope", "latent", "source", "key", "text",
                                               "score", "params", "created_at"])
        incoming = incoming.drop_duplicates(["scope", "latent", "source", "key"], keep="last")
        with self._open() as con:
            con.begin()
            try:
                con.register("incoming", incoming)
                con.execute("""DELETE FROM explanations e USING incoming i
                    WHERE e.scope = i.scope AND e.latent = i.latent AND e.source = i.source
                      AND e.key = i.key""")
                con.execute("INSERT INTO explanations SELECT scope, latent, source, key, text, "
                            "score, params, created_at FROM incoming")
                con.commit()
            except BaseException:
                con.rollback()
                raise

    def delete(self, scope: str, latent: int, source: str, key: str | None = None) -> None:
        """Remove the latent's explanations of ``source`` (only the one with ``key`` if
        given)."""
        sql = "DELETE FROM explanations WHERE scope = ? AND latent = ? AND source = ?"
        params = [scope, int(latent), source]
        if key is not None:
            sql += " AND key = ?"
            params.append(key)
        with self._open() as con:
            con.execute(sql, params)

    def explanations(self, scope: str, latents=None,
                     sources: tuple[str, ...] | None = None) -> list[Explanation]:
        """Stored explanations of the SAE (of ``latents`` and ``sources`` when given), by
        latent, newest first."""
        sql = ("SELECT latent, source, text, score, params, created_at FROM explanations "
               "WHERE scope = ?")
        params: list = [scope]
        if latents is not None:
            latents = [int(i) for i in latents]
            if not latents:
                return []
            sql += f" AND latent IN ({','.join('?' * len(latents))})"
            params += latents
        if sources is not None:
            sql += f" AND source IN ({','.join('?' * len(sources))})"
            params += list(sources)
        with self._open(self.read_wait_s) as con:
            rows = con.execute(sql + " ORDER BY latent, created_at DESC", params).fetchall()
        return [Explanation(int(lat), src, text, score, json.loads(par or "{}"), float(t))
                for lat, src, text, score, par, t in rows]

    def explained(self, scope: str, source: str, params: dict) -> set[int]:
        """Latents that already have an explanation of ``source`` made with ``params`` (a batch
        skips them unless asked to redo them)."""
        with self._open(self.read_wait_s) as con:
            rows = con.execute("SELECT latent FROM explanations WHERE scope = ? AND source = ? "
                               "AND key = ?", [scope, source, params_key(params)]).fetchall()
        return {int(r[0]) for r in rows}


def rank(e: Explanation) -> tuple:
    """Sort key, best first: by source (:data:`SOURCES` order), then score, then newest."""
    return (SOURCES.index(e.source), -(e.score if e.score is not None else -1.0),
            -e.created_at)


def best_explanations(explanations: list[Explanation], auto_labels: dict[int, str] | None = None,
                      skip_user: bool = False) -> dict[int, Explanation]:
    """latent -> its best explanation: the user's label, else the autointerp explanation with
    the highest detection score, else Neuronpedia's, else patch scoping's, else (from
    ``auto_labels``) the tokens it fires on. ``skip_user`` leaves labels out (for pages that
    show them apart)."""
    best: dict[int, Explanation] = {}
    for e in explanations:
        if skip_user and e.source == "user":
            continue
        if e.latent not in best or rank(e) < rank(best[e.latent]):
            best[e.latent] = e
    for latent, words in (auto_labels or {}).items():
        best.setdefault(int(latent), Explanation(int(latent), "tokens", words))
    return best


def explanation_table(explanations: list[Explanation], auto_labels: dict[int, str] | None = None):
    """Every explanation as a table to export (CSV or JSON): ``latent``, ``source``, ``text``,
    ``score``, ``params`` (JSON), ``created_at`` (ISO, UTC), best first within a latent;
    ``auto_labels`` add the ``tokens`` rows."""
    import pandas as pd

    items = list(explanations) + [Explanation(int(i), "tokens", w)
                                  for i, w in (auto_labels or {}).items()]
    items.sort(key=lambda e: (e.latent, rank(e)))
    return pd.DataFrame({
        "latent": [e.latent for e in items],
        "source": [e.source for e in items],
        "text": [e.text for e in items],
        "score": [e.score for e in items],
        "params": [json.dumps(e.params, sort_keys=True) for e in items],
        "created_at": [pd.Timestamp(e.created_at, unit="s", tz="UTC").isoformat()
                       if e.created_at else "" for e in items],
    })


def search_labels(labels: dict[int, str], text: str) -> list[int]:
    """Latents whose label contains ``text`` (case-insensitive)."""
    needle = text.strip().lower()
    return sorted(lat for lat, lab in labels.items() if needle and needle in lab.lower())


def search_latents(index: FeatureIndex, sae: str, text: str, tokenizer,
                   user_labels: dict[int, str], auto_labels: dict[int, str], limit: int = 50,
                   explanations: list[Explanation] = ()):
    """Latents matching ``text`` by label (yours first, then stored explanations, then the
    automatic "fires on" summary of their top activating tokens) or by their top logit-lens or
    activating tokens: label, explanation and "fires on" matches first, then by max activation.
    Columns ``latent``, ``match``, ``firing_rate``, ``max_act``."""
    import pandas as pd

    found = index.search_tokens(sae, text, tokenizer, limit=limit)
    hits = {lat: "your label" for lat in search_labels(user_labels, text)}
    needle = text.strip().lower()
    for e in explanations:
        if e.source != "user" and needle and needle in e.text.lower() and e.latent not in hits:
            hits[e.latent] = f"{SOURCE_NAMES[e.source]} label"
    hits.update({lat: "fires on" for lat in search_labels(auto_labels, text) if lat not in hits})
    if not hits:
        return found
    rows = index.summary(sae, list(hits))
    rows["match"] = [hits[int(i)] for i in rows["latent"]]
    merged = pd.concat([rows[["latent", "match", "firing_rate", "max_act"]], found])
    merged = merged.groupby("latent", as_index=False).agg(
        match=("match", lambda m: ", ".join(dict.fromkeys(m))),
        firing_rate=("firing_rate", "max"), max_act=("max_act", "max"))
    merged["by_label"] = merged["match"].str.contains("label|fires on")
    merged = merged.sort_values(["by_label", "max_act"], ascending=[False, False])
    return merged.drop(columns="by_label").reset_index(drop=True)
