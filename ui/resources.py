"""Cached resources the pages share: feature indexes, user labels and automatic labels.

Every page asks :func:`index_for` for the index of its SAE, so a missing, damaged or old index
reads the same everywhere: ``index`` is ``None`` and ``problem`` says why and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from core.feature_index import FeatureIndex, index_location
from core.labels import LabelStore, auto_labels
from core.models import LoadedModel, cache_dir
from core.saes import LoadedSAE


@st.cache_resource(show_spinner=False, max_entries=8)
def open_index(path: str, mtime: float) -> FeatureIndex:
    return FeatureIndex(path)


def load_index(path: Path) -> FeatureIndex | None:
    """The index at ``path`` (reopened when the file changes), or ``None`` if there is none.
    Raises ``ValueError`` when the file is damaged or has another schema version."""
    if not path.exists():
        return None
    return open_index(str(path), path.stat().st_mtime)


@dataclass(frozen=True)
class SaeIndex:
    """The feature index of one SAE, as far as there is one."""

    path: Path
    """Where the index of this SAE lives (or would be built)."""
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
    """The feature index of ``sae`` on ``lm``: the shipped one or one built in the cache."""
    return index_at(*index_location(lm, sae))


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
    """(user labels, automatic labels) of one SAE in the index."""
    auto = cached_auto_labels(str(index.path), index.path.stat().st_mtime, sae_name, index,
                              tokenizer)
    try:
        user = label_store().all(scope)
    except ValueError:
        user = {}
    return user, auto
