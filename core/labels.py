"""Latent labels: automatic ones from the feature index, and the user's own, searchable.

* **Automatic**: the tokens a latent's top activating examples sit on, most frequent first
  ("fires on: small · tiny · little"), read from the index with one query per SAE.
* **User labels**: what a researcher types on the Lookup page, kept in a small DuckDB file in the
  cache directory (``labels.duckdb``), keyed by model, SAE (a local SAE by its full path) and
  latent, shared by every session of the server, by other servers on the same cache directory
  and by later runs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.feature_index import FeatureIndex
from core.models import cache_dir

if TYPE_CHECKING:
    from core.saes import SaeSpec

MAX_LABEL_CHARS = 200


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

    def __str__(self) -> str:
        parts = [f"your label: {self.label}"] if self.label else []
        if self.fires_on:
            parts.append(f"fires on: {self.fires_on}")
        if self.logit_lens:
            parts.append(f"logit lens: {self.logit_lens}")
        return "; ".join(parts) or "no names (not in the index)"


def latent_names(index: FeatureIndex, sae: str, latents, tokenizer, user_labels: dict[int, str],
                 auto_labels: dict[int, str], n: int = 3) -> dict[int, LatentName]:
    """How the pages name each of ``latents``: the user's label, the tokens it fires on and its
    top logit-lens tokens (the two automatic names often differ: one is what the latent reads,
    the other what it writes)."""
    rows = index.summary(sae, [int(i) for i in latents])
    return {int(i): LatentName(user_labels.get(int(i), ""), auto_labels.get(int(i), ""),
                               token_text(tokenizer, ids, n))
            for i, ids in zip(rows["latent"], rows["logit_pos_ids"])}


def visible(text: str) -> str:
    """A token as a label word: stripped, or its whitespace drawn when it is only that."""
    return text.strip() or text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "␣") or "∅"


class LabelsBusy(ValueError):
    """Another process holds the label file's lock."""


class LabelStore:
    """User labels in one DuckDB file, shared by every session and by other server processes
    on the same cache directory: each operation opens the file, works in one transaction and
    closes it, so processes take turns instead of locking each other out."""

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
            con.execute("""CREATE TABLE IF NOT EXISTS labels (
                scope VARCHAR, latent INTEGER, label VARCHAR, updated DOUBLE,
                PRIMARY KEY (scope, latent))""")

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
        with self._open() as con:
            con.begin()
            try:
                con.execute("DELETE FROM labels WHERE scope = ? AND latent = ?",
                            [scope, int(latent)])
                if label:
                    con.execute("INSERT INTO labels VALUES (?, ?, ?, ?)",
                                [scope, int(latent), label, time.time()])
                con.commit()
            except BaseException:
                con.rollback()
                raise

    def all(self, scope: str) -> dict[int, str]:
        with self._open(self.read_wait_s) as con:
            rows = con.execute("SELECT latent, label FROM labels WHERE scope = ?",
                               [scope]).fetchall()
        return {int(lat): lab for lat, lab in rows}


def search_labels(labels: dict[int, str], text: str) -> list[int]:
    """Latents whose label contains ``text`` (case-insensitive)."""
    needle = text.strip().lower()
    return sorted(lat for lat, lab in labels.items() if needle and needle in lab.lower())


def search_latents(index: FeatureIndex, sae: str, text: str, tokenizer,
                   user_labels: dict[int, str], auto_labels: dict[int, str], limit: int = 50):
    """Latents matching ``text`` by label (yours first, then automatic ones) or by their top
    logit-lens or activating tokens: label matches first, then by max activation. Columns
    ``latent``, ``match``, ``firing_rate``, ``max_act``."""
    import pandas as pd

    found = index.search_tokens(sae, text, tokenizer, limit=limit)
    hits = {lat: "your label" for lat in search_labels(user_labels, text)}
    hits.update({lat: "label" for lat in search_labels(auto_labels, text) if lat not in hits})
    if not hits:
        return found
    rows = index.summary(sae, list(hits))
    rows["match"] = [hits[int(i)] for i in rows["latent"]]
    merged = pd.concat([rows[["latent", "match", "firing_rate", "max_act"]], found])
    merged = merged.groupby("latent", as_index=False).agg(
        match=("match", lambda m: ", ".join(dict.fromkeys(m))),
        firing_rate=("firing_rate", "max"), max_act=("max_act", "max"))
    merged["by_label"] = merged["match"].str.contains("label")
    merged = merged.sort_values(["by_label", "max_act"], ascending=[False, False])
    return merged.drop(columns="by_label").reset_index(drop=True)
