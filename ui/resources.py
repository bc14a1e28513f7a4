"""Cached resources the pages share: feature indexes, user labels and automatic labels.

Every page asks :func:`index_for` for the index of its SAE, so a missing, damaged or old index
reads the same everywhere: ``index`` is ``None`` and ``problem`` says why and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from core.feature_index import FeatureIndex, built_index_location, index_candidates, open_index
from core.labels import (
    Explanation,
    LabelStore,
    LatentName,
    auto_labels,
    best_explanations,
    latent_names,
)
from core.models import LoadedModel, cache_dir
from core.saes import LoadedSAE
from ui.safe_text import as_text


def load_index(path: Path) -> FeatureIndex | None:
    """The index at ``path``, one connection per file shared by every session and reopened when
    a build replaced the file (``core.feature_index.open_index``), or ``None`` if there is none.
    Raises ``ValueError`` when the file is damaged or has another schema version."""
    if not path.exists():
        return None
    return open_index(path)


@dataclass(frozen=True)
class SaeIndex:
    """The feature index of one SAE, as far as there is one."""

    path: Path
    """Where the index of this SAE lives, or where the app would build it (always the cache
    directory: shipped files are never written by the app)."""
    name: str
    """The SAE's name inside the index."""
    index: FeatureIndex | None
    """Open and holding this SAE, else ``None``."""
    problem: str | None = None
    """Why a file at ``path`` cannot serve (damaged, old schema): a message naming the fix.
    ``None`` when the index is there, or simply not built yet."""


def index_at(path: Path, name: str) -> SaeIndex:
    """The index at ``path`` when it holds the SAE ``name``."""
    try:
        index = load_index(path)
    except (ValueError, FileNotFoundError) as exc:
        return SaeIndex(path, name, None, str(exc))
    if index is None or name not in index.saes:
        return SaeIndex(path, name, None)
    return SaeIndex(path, name, index)


def index_for(lm: LoadedModel, sae: LoadedSAE) -> SaeIndex:
    """The feature index of ``sae`` on ``lm``: the shipped one, else one built in the cache.
    Without one, ``path`` is where a build goes and ``problem`` names what was wrong with the
    files that are there."""
    problems = []
    for path, name in index_candidates(lm, sae):
        found = index_at(path, name)
        if found.index is not None:
            return found
        if found.problem:
            problems.append(found.problem)
    path, name = built_index_location(lm, sae)
    return SaeIndex(path, name, None, " ".join(problems) or None)


@st.cache_resource(show_spinner=False)
def _label_store(path: str) -> LabelStore:
    return LabelStore(path)


def label_store() -> LabelStore:
    """User labels, shared by every session of this server."""
    return _label_store(str(cache_dir() / "labels.duckdb"))


@st.cache_data(show_spinner=False, max_entries=16)
def cached_auto_labels(index_path: str, mtime: float, sae_name: str, _index: FeatureIndex,
                       _tokenizer) -> dict[int, str]:
    return auto_labels(_index, sae_name, _tokenizer)


def labels_for(index: FeatureIndex, sae_name: str, tokenizer, scope: str
               ) -> tuple[dict[int, str], dict[int, str]]:
    """(user labels, automatic labels) of one SAE in the index. When the label file cannot be
    read now (another process holds it), a warning says so and user labels are left out."""
    auto = cached_auto_labels(str(index.path), index.path.stat().st_mtime, sae_name, index,
                              tokenizer)
    try:
        user = label_store().all(scope)
    except ValueError as exc:
        st.warning(as_text(f"Your labels are not shown: {exc}"))
        user = {}
    return user, auto


def explanations_for(scope: str, latents=None) -> list[Explanation]:
    """Stored explanations of the SAE (of ``latents`` when given); when the label file cannot
    be read now, a warning says so and none are shown."""
    try:
        return label_store().explanations(scope, latents)
    except ValueError as exc:
        st.warning(as_text(f"Stored explanations are not shown: {exc}"))
        return []


def best_said(explanations: list[Explanation]) -> dict[int, str]:
    """latent -> its best stored explanation other than the user's label, with its source."""
    return {i: e.said for i, e in best_explanations(explanations, skip_user=True).items()}


def names_of(index: FeatureIndex | None, name: str, lm: LoadedModel, sae: LoadedSAE | None,
             latents) -> dict[int, LatentName]:
    """What each latent fires on, its top logit-lens tokens, your label and its best stored
    explanation, from the index (empty names without one)."""
    latents = [int(i) for i in latents]
    if index is None or sae is None:
        return {i: LatentName() for i in latents}
    scope = LabelStore.scope(lm.name, sae.spec)
    user, auto = labels_for(index, name, lm.tokenizer, scope)
    found = latent_names(index, name, latents, lm.tokenizer, user, auto,
                         explained=best_said(explanations_for(scope, latents)))
    return {i: found.get(i, LatentName()) for i in latents}
