"""Load SAEs with sae_lens and check they fit the loaded model.

Sources: the embedded family in ``data/saes`` (sae_lens directories), any local sae_lens
directory, a pretrained release from sae_lens's directory (release + sae_id), or a Neuronpedia id
that sae_lens maps to a release.

Activation processing. An SAE sees the activation at its hook after the processing its config
asks for:

* ``normalize_activations`` (``constant_norm_rescale``, ``layer_norm``) and ``apply_b_dec_to_input``
  run inside ``sae.encode``/``sae.decode``; ``expected_average_only_in`` is folded into the weights
  by sae_lens for pretrained releases and refused when a local SAE still carries it unfolded.
* ``prepend_bos``: token sequences start with exactly one BOS when the SAE was trained that way.
* TransformerLens weight processing. SAEs trained on a TransformerLens model loaded with
  ``center_writing_weights=True`` (``gpt2-small-res-jb`` and its siblings say so in
  ``model_from_pretrained_kwargs``) saw a residual stream whose every write had its mean over
  ``d_model`` removed. On the HF model that is the same as subtracting each position's mean over
  ``d_model`` from the activation, which is what :func:`sae_input` does. ``fold_ln``,
  ``fold_value_biases`` and ``center_unembed`` leave residual-stream activations unchanged; kwargs
  that do change them at other hooks (``refactor_factored_attn_matrices`` with ``hook_z``) are
  refused.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

import torch

from core.density import log10_density
from core.hooks import resolve_hook
from core.models import LoadedModel, hub_reachable, offline_message

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EMBEDDED_SAE_DIR = DATA_DIR / "saes"

# model_from_pretrained_kwargs keys that do not change activations at any supported hook.
_HARMLESS_KWARGS = {
    "fold_ln",
    "center_unembed",
    "fold_value_biases",
    "n_devices",
    "dtype",
    "torch_dtype",
    "device",
    "device_map",
    "first_n_layers",
    "trust_remote_code",
    "default_prepend_bos",
    "move_to_device",
}


@dataclass(frozen=True)
class SaeSpec:
    """Which SAE to load."""

    source: Literal["embedded", "local", "release", "neuronpedia"] = "embedded"
    """``embedded``: a directory of data/saes; ``local``: any sae_lens directory;
    ``release``: sae_lens release + sae_id; ``neuronpedia``: a Neuronpedia id."""
    name: str = ""
    """Embedded SAE name, local path, release name, or Neuronpedia id (``gpt2-small/0-res-jb``)."""
    sae_id: str = ""
    """The SAE inside a release (``blocks.8.hook_resid_pre``); only for ``release``."""

    def __post_init__(self) -> None:
        if self.source not in ("embedded", "local", "release", "neuronpedia"):
            raise ValueError(
                f"Unknown SAE source {self.source!r}; use 'embedded', 'local', 'release' or "
                "'neuronpedia'."
            )
        if not self.name.strip():
            raise ValueError(f"SAE source {self.source!r} needs a name (see the SAE picker).")
        if self.source == "release" and not self.sae_id.strip():
            raise ValueError(
                f"Release {self.name!r} needs an sae_id; list them with "
                "core.saes.release_sae_ids(release)."
            )

    @property
    def label(self) -> str:
        if self.source == "release":
            return f"{self.name}/{self.sae_id}"
        return Path(self.name).name if self.source == "local" else self.name


@dataclass(frozen=True)
class SaeProcessing:
    """What happens to a hook activation before ``sae.encode``."""

    center: bool
    """Subtract each position's mean over d_model (TransformerLens ``center_writing_weights``)."""
    prepend_bos: bool
    """Sequences start with exactly one BOS token."""


@dataclass(eq=False)
class LoadedSAE:
    """An SAE with the facts the pages show about it."""

    sae: torch.nn.Module
    spec: SaeSpec
    hook_name: str
    processing: SaeProcessing
    neuronpedia_id: str | None
    warnings: list[str] = field(default_factory=list)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def architecture(self) -> str:
        return self.sae.cfg.architecture()

    @property
    def model_name(self) -> str | None:
        return self.sae.cfg.metadata.model_name

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.sae.parameters())

    def encode(self, acts: torch.Tensor) -> torch.Tensor:
        """Latent activations for raw hook activations ``[..., d_in]``."""
        return self.sae.encode(sae_input(self, acts))


def sae_input(loaded: LoadedSAE, acts: torch.Tensor) -> torch.Tensor:
    """Apply the processing the SAE was trained with to raw HF hook activations."""
    if loaded.processing.center:
        acts = acts - acts.mean(dim=-1, keepdim=True)
    return acts


def parse_sae_param(value: str) -> SaeSpec | None:
    """``none``, ``embedded:<name>``, ``release:<release>/<sae_id>``, ``np:<id>``, ``local:<path>``."""
    if value == "none":
        return None
    source, sep, rest = value.partition(":")
    if not sep:
        raise ValueError(
            f"sae={value!r} is not understood; use 'embedded:<name>', 'release:<release>/<id>', "
            "'np:<neuronpedia id>', 'local:<path>' or 'none'."
        )
    if source == "release":
        release, _, sae_id = rest.partition("/")
        return SaeSpec("release", release, sae_id)
    if source == "np":
        return SaeSpec("neuronpedia", rest)
    if source in ("embedded", "local"):
        return SaeSpec(source, rest)
    raise ValueError(f"sae={value!r}: unknown source {source!r}.")


def sae_param(spec: SaeSpec | None) -> str:
    if spec is None:
        return "none"
    if spec.source == "release":
        return f"release:{spec.name}/{spec.sae_id}"
    return f"{'np' if spec.source == 'neuronpedia' else spec.source}:{spec.name}"


# --- the sae_lens directory -------------------------------------------------------------------


@cache
def _directory():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def all_releases() -> list[str]:
    return sorted(_directory())


def model_aliases(name: str) -> set[str]:
    """Every spelling of a model name: hub id, its basename and TransformerLens aliases."""
    from transformer_lens.supported_models import MODEL_ALIASES

    names = {name.lower(), name.split("/")[-1].lower()}
    for official, aliases in MODEL_ALIASES.items():
        group = {official.lower(), official.split("/")[-1].lower(), *(a.lower() for a in aliases)}
        if names & group:
            names |= group
    return names


def releases_for_model(model_name: str) -> list[str]:
    """Releases in sae_lens's directory trained on ``model_name`` (any alias)."""
    aliases = model_aliases(model_name)
    return sorted(
        release for release, info in _directory().items() if info.model.lower() in aliases
        or info.model.split("/")[-1].lower() in aliases
    )


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=5, cutoff=0.5)
    if not close:
        close = [c for c in choices if word.lower() in c.lower()][:5]
    return ", ".join(close) if close else "none"


def release_sae_ids(release: str) -> list[str]:
    directory = _directory()
    if release not in directory:
        raise ValueError(
            f"Unknown SAE release {release!r}. Close matches: {_closest(release, list(directory))}."
            " The picker lists the releases for the loaded model."
        )
    return list(directory[release].saes_map)


def neuronpedia_to_release(neuronpedia_id: str) -> tuple[str, str]:
    """Map a Neuronpedia id (``gpt2-small/0-res-jb``) to (release, sae_id)."""
    known: dict[str, tuple[str, str]] = {}
    for release, info in _directory().items():
        for sae_id, np_id in info.neuronpedia_id.items():
            if np_id:
                known[np_id] = (release, sae_id)
    if neuronpedia_id not in known:
        raise ValueError(
            f"sae_lens knows no SAE with Neuronpedia id {neuronpedia_id!r}. Close matches: "
            f"{_closest(neuronpedia_id, list(known))}."
        )
    return known[neuronpedia_id]


def embedded_saes() -> list[str]:
    """Names of the SAE directories shipped in data/saes, narrowest first."""
    if not EMBEDDED_SAE_DIR.is_dir():
        return []
    dirs = [p for p in EMBEDDED_SAE_DIR.iterdir()
            if (p / "cfg.json").exists() and not p.name.startswith(".")]
    return [p.name for p in sorted(dirs, key=lambda p: (len(p.name), p.name))]


CARD_METRICS = "metrics.json"
"""Beside a family's SAE directories: the figures its card was written from
(``core.pipeline.report``)."""
CARD_METRICS_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class CardFigures:
    """One SAE's figures from its family's card: measured on held-out text the SAE never saw."""

    tokens: int
    """Tokens FVE, L0 and dead were measured on."""
    fve: float
    l0: float
    dead_fraction: float
    ce_tokens: int
    """Tokens the cross-entropy figures were measured on."""
    ce_clean: float
    ce_spliced: float
    """The model's next-token cross-entropy with the reconstruction spliced in at the hook."""
    ce_recovered: float
    """(CE with the hook zeroed − spliced CE) / (CE zeroed − clean CE)."""

    @property
    def ce_increase(self) -> float:
        return self.ce_spliced - self.ce_clean


def card_figures(spec: SaeSpec) -> CardFigures | None:
    """The card's figures for an embedded SAE, or a local one trained by ``core.pipeline``
    (``metrics.json`` in the directory above the SAE's); None when there is no card, it does not
    name this SAE, or it cannot be read."""
    if spec.source == "embedded":
        directory = EMBEDDED_SAE_DIR / spec.name
    elif spec.source == "local":
        directory = Path(spec.name).expanduser()
    else:
        return None
    path = directory.parent / CARD_METRICS
    try:
        stat = path.stat()
        if stat.st_size > CARD_METRICS_MAX_BYTES:
            return None
        rows = _card_rows(str(path), stat.st_mtime_ns, stat.st_size)
        row = next(r for r in rows if isinstance(r, dict) and r.get("name") == directory.name)
        return CardFigures(
            tokens=int(row["tokens"]), fve=float(row["fve"]), l0=float(row["l0"]),
            dead_fraction=float(row["dead_fraction"]), ce_tokens=int(row["ce_tokens"]),
            ce_clean=float(row["ce_clean"]), ce_spliced=float(row["ce_spliced"]),
            ce_recovered=float(row["ce_recovered"]))
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


@lru_cache(maxsize=16)
def _card_rows(path: str, mtime_ns: int, size: int) -> list:
    """The ``results`` of a card's ``metrics.json``, read once per version of the file (pages
    ask on every rerun); the file's time and size are the key."""
    return json.loads(Path(path).read_text())["results"]


# --- loading ----------------------------------------------------------------------------------


def _load_local(path: Path, device: str, dtype: str):
    from sae_lens import SAE

    if not (path / "cfg.json").exists():
        raise FileNotFoundError(
            f"No sae_lens SAE at {path}: the directory must hold cfg.json and "
            "sae_weights.safetensors (as written by SAE.save_model)."
        )
    return SAE.load_from_disk(str(path), device=device, dtype=dtype)


def _load_release(release: str, sae_id: str, device: str, dtype: str):
    from sae_lens import SAE

    ids = release_sae_ids(release)
    if sae_id not in ids:
        raise ValueError(
            f"Release {release!r} has no sae_id {sae_id!r}. Close matches: {_closest(sae_id, ids)}."
        )
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except Exception as exc:  # hub errors come in many types; keep the cause
        if not hub_reachable():
            raise ValueError(offline_message(f"SAE {release}/{sae_id}")) from exc
        raise ValueError(f"Could not load SAE {release}/{sae_id}: {exc}") from exc


def load_sae(spec: SaeSpec, lm: LoadedModel) -> LoadedSAE:
    """Load the SAE named by ``spec`` onto the model's device and check it fits ``lm``."""
    device = str(lm.device)
    dtype = str(lm.dtype).removeprefix("torch.")
    neuronpedia_id = None
    if spec.source == "embedded":
        if spec.name not in embedded_saes():
            raise ValueError(
                f"No embedded SAE named {spec.name!r}; data/saes holds: "
                f"{', '.join(embedded_saes()) or 'nothing yet'}."
            )
        sae = _load_local(EMBEDDED_SAE_DIR / spec.name, device, dtype)
    elif spec.source == "local":
        sae = _load_local(Path(spec.name).expanduser(), device, dtype)
    else:
        release, sae_id = spec.name, spec.sae_id
        if spec.source == "neuronpedia":
            release, sae_id = neuronpedia_to_release(spec.name)
        sae = _load_release(release, sae_id, device, dtype)
        neuronpedia_id = _directory()[release].neuronpedia_id.get(sae_id)
    if neuronpedia_id is None:
        neuronpedia_id = sae.cfg.metadata.neuronpedia_id
    loaded = LoadedSAE(
        sae=sae.eval().requires_grad_(False),
        spec=spec,
        hook_name=str(sae.cfg.metadata.hook_name),
        processing=_processing(sae),
        neuronpedia_id=neuronpedia_id,
    )
    loaded.warnings.extend(check_compatible(lm, loaded))
    return loaded


def _processing(sae) -> SaeProcessing:
    meta = sae.cfg.metadata
    hook = str(meta.hook_name)
    if sae.cfg.normalize_activations == "expected_average_only_in":
        raise ValueError(
            "This SAE still asks for normalize_activations='expected_average_only_in' with no "
            "folded scaling factor. Fold it first (sae.fold_activation_norm_scaling_factor(f)) "
            "and save the SAE again."
        )
    kwargs = dict(meta.model_from_pretrained_kwargs or {})
    center = bool(kwargs.pop("center_writing_weights", False))
    if kwargs.pop("refactor_factored_attn_matrices", False) and hook.endswith("hook_z"):
        raise ValueError(
            "This SAE was trained on a TransformerLens model with refactor_factored_attn_matrices, "
            "which changes hook_z; the HF model cannot reproduce it. Pick another SAE."
        )
    unknown = {k: v for k, v in kwargs.items() if k not in _HARMLESS_KWARGS and v}
    if unknown:
        log.warning("Ignoring model_from_pretrained_kwargs %s of SAE at %s", unknown, hook)
    prepend_bos = meta.prepend_bos
    return SaeProcessing(
        center=center and not hook.endswith("hook_z"),
        prepend_bos=True if prepend_bos is None else bool(prepend_bos),
    )


def check_compatible(lm: LoadedModel, loaded: LoadedSAE) -> list[str]:
    """Refuse an SAE that cannot run on ``lm`` (ValueError); return warnings for doubtful fits."""
    hook = loaded.hook_name
    site = resolve_hook(lm.model, hook)  # unsupported name or layer out of range: ValueError
    expected = lm.d_model
    if hook.endswith("hook_z"):
        cfg = lm.config
        expected = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        expected *= int(cfg.num_attention_heads)
    if loaded.d_in != expected:
        raise ValueError(
            f"SAE {loaded.spec.label} expects d_in={loaded.d_in} at {hook} but {lm.name} has "
            f"{expected} there; pick an SAE trained on this model."
        )
    warnings = []
    sae_model = loaded.model_name
    if not sae_model:
        warnings.append(f"SAE {loaded.spec.label} does not say which model it was trained on.")
    elif not (model_aliases(sae_model) & model_aliases(lm.name)):
        warnings.append(
            f"SAE {loaded.spec.label} was trained on {sae_model!r}, not {lm.name!r}: d_in fits "
            f"but its latents may mean nothing on this model."
        )
    log.debug("SAE %s hooks %s", loaded.spec.label, site.module)
    return warnings


@dataclass
class ReconstructionStats:
    """Streaming FVE, L0 and firing counts of one SAE (shared by evaluation and the index)."""

    d_in: int
    d_sae: int
    n: int = 0
    sq_err: float = 0.0
    sum_sq: float = 0.0
    active: float = 0.0
    sum_x: torch.Tensor = field(default=None)  # type: ignore[assignment]
    fires: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.fires = torch.zeros(self.d_sae, dtype=torch.long)

    def update(self, x: torch.Tensor, feats: torch.Tensor, recon: torch.Tensor) -> None:
        """``x`` processed SAE inputs [n, d_in], ``feats`` latents, ``recon`` reconstructions.

        Sums are taken per token, then added exactly (``math.fsum``): a whole-tensor sum splits
        over threads, and its rounding would depend on how many the process has."""
        self.sq_err += math.fsum((x.float() - recon.float()).pow(2).sum(-1).tolist())
        xd = x.double()
        self.sum_x += xd.sum(0).cpu()
        self.sum_sq += math.fsum(xd.pow(2).sum(-1).tolist())
        active = feats > 0
        self.active += active.sum().item()
        self.fires += active.sum(0).cpu()
        self.n += x.shape[0]

    def merge(self, other: ReconstructionStats) -> None:
        """Add the sums of ``other`` (the same SAE on other tokens)."""
        self.n += other.n
        self.sq_err += other.sq_err
        self.sum_sq += other.sum_sq
        self.active += other.active
        self.sum_x += other.sum_x
        self.fires += other.fires

    @property
    def fve(self) -> float:
        total_var = self.sum_sq - self.sum_x.pow(2).sum().item() / self.n
        return 1 - self.sq_err / total_var

    @property
    def l0(self) -> float:
        return self.active / self.n

    def log10_density(self) -> list[float]:
        return log10_density(self.fires, self.n)
