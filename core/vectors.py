"""Concept vectors for steering: CAVs (a linear classifier's normal) and CAA mean differences.

* **CAV**: the mean activation of each labelled text at the hook (BOS excluded), then
  scikit-learn's ``LinearSVC`` separating the positive label from the rest; the vector is the
  classifier's normal, in raw activation space, scaled to the mean activation norm so that
  strength 1 moves a token about as far as a typical residual vector is long.
* **CAA** (contrastive activation addition): the mean over contrast pairs of
  activation(positive) − activation(negative) at each text's last token, used as it is.

A small labelled set ships in ``data/steering/sentiment.csv`` for offline use.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.hooks import run_to_hooks
from core.models import LoadedModel
from core.saes import DATA_DIR
from core.text import check_text, tokenize

EXAMPLE_SETS = DATA_DIR / "steering"
MAX_ROWS = 2_000


@dataclass(frozen=True, eq=False)
class ConceptVector:
    """A steering direction at one hook."""

    name: str
    hook_name: str
    vector: torch.Tensor
    """float32 ``[d_model]`` on the CPU, in raw activation space."""
    kind: str = "cav"
    """``cav``, ``caa`` or ``file`` (loaded from a recipe)."""
    info: dict = field(default_factory=dict)
    """How it was made: sizes, accuracy, norms."""

    def __post_init__(self) -> None:
        if self.vector.dim() != 1 or not torch.isfinite(self.vector).all():
            raise ValueError(f"Concept vector {self.name!r} must be a finite 1-D vector; "
                             f"got shape {tuple(self.vector.shape)}.")


def read_labelled(source: str | Path | bytes) -> tuple[list[str], list[str]]:
    """``text,label`` rows from CSV text, bytes or a path; refuses what a CAV cannot use."""
    import pandas as pd

    if isinstance(source, Path):
        raw = source.read_bytes()
    elif isinstance(source, str):
        raw = source.encode()
    else:
        raw = source
    try:
        df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several parser error types
        raise ValueError(f"Could not read the labelled rows as CSV ({exc}). Use a header line "
                         "'text,label' and one quoted text per row.") from exc
    df.columns = [str(c).strip().lower() for c in df.columns]
    if not {"text", "label"} <= set(df.columns):
        raise ValueError(f"The CSV needs columns 'text' and 'label'; it has "
                         f"{', '.join(df.columns) or 'none'}.")
    df = df[df.text.str.strip() != ""]
    if len(df) > MAX_ROWS:
        raise ValueError(f"{len(df):,} rows is too many; use at most {MAX_ROWS:,}.")
    counts = df.label.value_counts()
    if len(counts) < 2 or counts.min() < 2:
        raise ValueError("A CAV needs at least two labels with two texts each; got "
                         + (", ".join(f"{k!r}: {v}" for k, v in counts.items()) or "no rows") + ".")
    return df.text.tolist(), df.label.str.strip().tolist()


def example_sets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(EXAMPLE_SETS.glob("*.csv"))}


@torch.no_grad()
def mean_activations(lm: LoadedModel, hook_name: str, texts: list[str], batch_size: int = 16,
                     last_only: bool = False, max_tokens: int = 128) -> torch.Tensor:
    """``[n, d_model]`` float32: each text's mean activation (BOS excluded) or its last token's."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = [check_text(t, "text") for t in texts[start:start + batch_size]]
        batch = tokenize(lm, chunk, max_length=max_tokens)
        acts = run_to_hooks(lm, [hook_name], batch.input_ids, batch.attention_mask)[hook_name]
        mask = batch.attention_mask.clone()
        mask[:, 0] = 0  # BOS: same activation for every text, carries no concept
        if last_only:
            last = batch.attention_mask.sum(1) - 1
            out.append(acts[torch.arange(len(chunk)), last].float().cpu())
        else:
            m = mask.unsqueeze(-1).to(acts.dtype)
            out.append(((acts * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
    return torch.cat(out)


def train_cav(lm: LoadedModel, hook_name: str, texts: list[str], labels: list[str],
              positive: str, name: str = "") -> ConceptVector:
    """A LinearSVC on mean activations: ``positive`` against every other label."""
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if positive not in labels:
        raise ValueError(f"Label {positive!r} is not in the rows; labels: "
                         f"{', '.join(sorted(set(labels)))}.")
    x = mean_activations(lm, hook_name, texts)
    y = np.array([lab == positive for lab in labels])
    scaler = StandardScaler().fit(x.numpy())
    svc = LinearSVC(C=1.0, max_iter=10_000).fit(scaler.transform(x.numpy()), y)
    n_folds = int(min(5, y.sum(), (~y).sum()))
    acc = float("nan")
    if n_folds >= 2:
        pipe = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=10_000))
        acc = float(cross_val_score(pipe, x.numpy(), y, cv=n_folds).mean())
    # Back to raw activation space: w·((x-mu)/sigma) = (w/sigma)·x + const.
    normal = torch.tensor(svc.coef_[0] / scaler.scale_, dtype=torch.float32)
    norm = float(x.norm(dim=1).mean())
    vector = torch.nn.functional.normalize(normal, dim=0) * norm
    return ConceptVector(name or f"cav:{positive}", hook_name, vector, "cav", {
        "texts": len(texts), "positive": int(y.sum()), "cv_accuracy": acc,
        "mean_norm": norm, "train_accuracy": float(svc.score(scaler.transform(x.numpy()), y)),
    })


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """Contrast pairs, one per line: ``positive text | negative text``."""
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        pos, sep, neg = line.partition("|")
        if not sep or not pos.strip() or not neg.strip():
            raise ValueError(f"Line {n} ({line[:40]!r}) is not 'positive text | negative text'.")
        pairs.append((pos.strip(), neg.strip()))
    if not pairs:
        raise ValueError("Type at least one contrast pair: 'I love it | I hate it'.")
    if len(pairs) > MAX_ROWS:
        raise ValueError(f"{len(pairs):,} pairs is too many; use at most {MAX_ROWS:,}.")
    return pairs


def caa_vector(lm: LoadedModel, hook_name: str, pairs: list[tuple[str, str]],
               name: str = "") -> ConceptVector:
    """Mean of activation(positive) − activation(negative) at each text's last token."""
    pos = mean_activations(lm, hook_name, [p for p, _ in pairs], last_only=True)
    neg = mean_activations(lm, hook_name, [n for _, n in pairs], last_only=True)
    vector = (pos - neg).mean(0)
    return ConceptVector(name or f"caa:{pairs[0][0][:20]}", hook_name, vector, "caa", {
        "pairs": len(pairs), "norm": float(vector.norm()),
        "mean_norm": float(torch.cat([pos, neg]).norm(dim=1).mean()),
    })
