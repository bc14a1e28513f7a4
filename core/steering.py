"""Steering: SAE clamps, decoder-direction and concept-vector addition, and what they change.

Interventions act on the activation ``x`` at a hook:

* ``clamp``: as in the SAE steering notebooks, ``x' = decode(f') + (x − decode(f))`` where ``f``
  is the SAE's encoding of ``x`` and ``f'`` is ``f`` with the chosen latents set to their values,
  so the SAE's error term is kept; with a linear decoder this is ``x + Σ (v_i − f_i) W_dec[i]``.
* ``add``: ``x' = x + α · unit(W_dec[i])``, α optionally times the latent's max activation.
* ``vector``: ``x' = x + α · v`` for a concept vector (CAV or CAA, see ``core.vectors``).

A :class:`Recipe` is a set of interventions plus where to apply them (every position, the prompt
only, or generated tokens only). Generation runs the baseline and every steered variant as one
batch from the same prompt, with the same sampling noise for every row (Gumbel-max with shared
noise), so where steering changes nothing the rows stay identical token for token.
"""

from __future__ import annotations

import base64
import inspect
import json
import math
import time
import zlib
from dataclasses import dataclass, replace
from typing import Iterator, Literal, Protocol

import numpy as np
import torch

from core.checks import is_finite_number
from core.hooks import hooked, resolve_hook
from core.models import LoadedModel
from core.saes import LoadedSAE, sae_input
from core.text import check_text, outside_nucleus, token_ids
from core.vectors import ConceptVector

MAX_STRENGTH = 1e5
MAX_NEW_TOKENS = 512
MAX_ROWS = 17
MAX_INTERVENTIONS = 32
"""Interventions in one recipe (each draws a slider and asks the index for its latent)."""
MAX_RECIPE_BYTES = 512 * 1024
"""A recipe's JSON, as uploaded or as decompressed from a link (room for 32 concept vectors of
an 8k-wide model in float16)."""
MAX_VECTOR_DIM = 65_536
MAX_NAME_CHARS = 100
VECTOR_KINDS = ("cav", "caa", "file")
Kind = Literal["clamp", "add", "vector"]
Positions = Literal["all", "prompt", "generated"]
POSITIONS = ("all", "prompt", "generated")


def _strength(value: float, what: str) -> float:
    """``value`` as a float within ±MAX_STRENGTH, else a ValueError naming ``what``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number; got {value!r}.") from None
    if not is_finite_number(value):
        raise ValueError(f"{what} is {value}; use a finite number (e.g. 0 to the latent's max "
                         "activation).")
    if abs(value) > MAX_STRENGTH:
        raise ValueError(f"{what} is {value:g}; the limit is ±{MAX_STRENGTH:g}. Residual norms "
                         "are far smaller; try the latent's max activation.")
    return value


@dataclass(frozen=True)
class Intervention:
    """One change to the activation at a hook."""

    kind: Kind
    value: float
    """Clamp value, or α for ``add`` / ``vector``."""
    latent: int | None = None
    """The SAE latent (``clamp`` and ``add``)."""
    scale_by_max: bool = False
    """``add`` only: multiply α by ``max_act`` (α = 1 adds one max activation's worth)."""
    max_act: float | None = None
    """The latent's max activation in the feature index, when known."""
    vector: ConceptVector | None = None
    """``vector`` only."""

    def __post_init__(self) -> None:
        if self.kind not in ("clamp", "add", "vector"):
            raise ValueError(f"Unknown intervention {self.kind!r}; use 'clamp', 'add' or 'vector'.")
        object.__setattr__(self, "value", _strength(self.value, f"The {self.kind} strength"))
        if self.kind == "vector":
            if self.vector is None:
                raise ValueError("A 'vector' intervention needs a concept vector; make one in "
                                 "the Concept vectors panel.")
        elif (not isinstance(self.latent, (int, np.integer)) or isinstance(self.latent, bool)
              or self.latent < 0):
            raise ValueError(f"A {self.kind!r} intervention needs a latent id ≥ 0; got "
                             f"{self.latent!r}.")
        if self.max_act is not None:
            value = _strength(self.max_act, "max_act (the latent's max activation)")
            if value < 0:
                raise ValueError(f"max_act is {value:g}; a max activation is ≥ 0 (leave it out "
                                 "and the index fills it in).")
            object.__setattr__(self, "max_act", value)
        if not isinstance(self.scale_by_max, bool):
            raise ValueError(f"scale_by_max must be true or false; got {self.scale_by_max!r}.")
        if self.scale_by_max and self.kind == "add" and not self.max_act:
            raise ValueError(f"Latent {self.latent} has no max activation from the feature "
                             "index; build the index or untick 'scale by max activation'.")

    @property
    def strength(self) -> float:
        """What is applied: the value, times the max activation when asked."""
        if self.kind == "add" and self.scale_by_max:
            return self.value * float(self.max_act)
        return self.value

    @property
    def label(self) -> str:
        if self.kind == "vector":
            return f"vector {self.vector.name} ×{self.value:g}"
        if self.kind == "clamp":
            return f"clamp #{self.latent} = {self.value:g}"
        return f"add #{self.latent} ×{self.value:g}" + (" max" if self.scale_by_max else "")


@dataclass(frozen=True)
class Recipe:
    """A set of interventions and where they apply; saved as JSON and encoded in links."""

    interventions: tuple[Intervention, ...] = ()
    positions: Positions = "all"
    """``all`` tokens, the ``prompt`` only, or ``generated`` tokens only (the KV cache keeps the
    prompt's unsteered keys and values)."""

    def __post_init__(self) -> None:
        if not isinstance(self.positions, str) or self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}; use one of {', '.join(POSITIONS)}.")
        object.__setattr__(self, "interventions", tuple(self.interventions))
        if len(self.interventions) > MAX_INTERVENTIONS:
            raise ValueError(f"The recipe has {len(self.interventions):,} interventions; the "
                             f"limit is {MAX_INTERVENTIONS}. Remove some.")

    def check(self, sae: LoadedSAE | None, lm: LoadedModel | None = None) -> None:
        """Refuse latents the SAE does not have, latent interventions without an SAE, and (with
        ``lm``) concept vectors whose hook or length do not fit the model."""
        for iv in self.interventions:
            if iv.kind == "vector":
                if lm is not None:
                    want = hook_width(lm, iv.vector.hook_name)
                    got = iv.vector.vector.numel()
                    if got != want:
                        raise ValueError(
                            f"Concept vector {iv.vector.name!r} has {got:,} values but "
                            f"{iv.vector.hook_name} of {lm.name} has {want:,}; make the vector "
                            "again on this model.")
                continue
            if sae is None:
                raise ValueError(f"{iv.label} needs an SAE; load one in the sidebar.")
            if not 0 <= int(iv.latent) < sae.d_sae:
                raise ValueError(f"Latent {iv.latent} is out of range: {sae.spec.label} has "
                                 f"latents 0 to {sae.d_sae - 1}.")

    # --- JSON and links ---------------------------------------------------------------------

    def to_dict(self, sae: LoadedSAE | None = None) -> dict:
        items = []
        for iv in self.interventions:
            d = {"kind": iv.kind, "value": iv.value, "latent": iv.latent,
                 "scale_by_max": iv.scale_by_max, "max_act": iv.max_act}
            d = {k: v for k, v in d.items() if v is not None}
            if iv.vector is not None:
                vec = iv.vector.vector.to(torch.float16).numpy().tobytes()
                d["vector"] = {"name": iv.vector.name, "hook": iv.vector.hook_name,
                               "kind": iv.vector.kind,
                               "fp16_b64": base64.b64encode(vec).decode()}
            items.append(d)
        out = {"version": 1, "positions": self.positions, "interventions": items}
        if sae is not None:
            out["sae"] = sae.spec.label
        return out

    def to_json(self, sae: LoadedSAE | None = None) -> str:
        return json.dumps(self.to_dict(sae), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Recipe":
        """Parse and check a recipe; every field's type and shape is checked here, and any
        fault is one ``ValueError`` naming the intervention, the field and the fix."""
        if len(text) > MAX_RECIPE_BYTES:
            raise ValueError(f"The recipe has {len(text):,} bytes; the limit is "
                             f"{MAX_RECIPE_BYTES:,}. Keep at most {MAX_INTERVENTIONS} "
                             "interventions.")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"The recipe is not valid JSON ({exc}). Save one with "
                             "'Download recipe' to see the format.") from exc
        if not isinstance(data, dict) or not isinstance(data.get("interventions"), list):
            raise ValueError("A recipe is a JSON object with an 'interventions' list and "
                             "'positions' ('all', 'prompt' or 'generated').")
        if len(data["interventions"]) > MAX_INTERVENTIONS:
            raise ValueError(f"The recipe has {len(data['interventions']):,} interventions; "
                             f"the limit is {MAX_INTERVENTIONS}. Remove some.")
        items = []
        for n, d in enumerate(data["interventions"], 1):
            try:
                items.append(_intervention_from_dict(d))
            except ValueError as exc:
                raise ValueError(f"Intervention {n} of the recipe: {exc}") from exc
        try:
            return cls(tuple(items), data.get("positions", "all"))
        except ValueError as exc:
            raise ValueError(f"The recipe's {exc}") from exc

    def to_param(self) -> str:
        """Compact, URL-safe form for ``?recipe=``."""
        raw = json.dumps(self.to_dict(), separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")

    @classmethod
    def from_param(cls, param: str) -> "Recipe":
        """The recipe of a ``?recipe=`` link; decompresses at most :data:`MAX_RECIPE_BYTES`."""
        if len(param) > 2 * MAX_RECIPE_BYTES:
            raise ValueError(f"The recipe in the link has {len(param):,} characters; the limit "
                             f"is {2 * MAX_RECIPE_BYTES:,}. Share the recipe as a JSON file.")
        try:
            packed = base64.urlsafe_b64decode(param + "=" * (-len(param) % 4))
            inflate = zlib.decompressobj()
            raw = inflate.decompress(packed, MAX_RECIPE_BYTES + 1)
        except (ValueError, zlib.error) as exc:
            raise ValueError("The recipe in the link is damaged; copy the link again or load "
                             "the recipe from its JSON file.") from exc
        if len(raw) > MAX_RECIPE_BYTES or inflate.unconsumed_tail:
            raise ValueError(f"The recipe in the link expands beyond {MAX_RECIPE_BYTES:,} bytes;"
                             f" a recipe holds at most {MAX_INTERVENTIONS} interventions. Share "
                             "the recipe as a JSON file.")
        return cls.from_json(raw)


_FIELDS = {"kind", "value", "latent", "scale_by_max", "max_act", "vector"}


def _number(d: dict, key: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must be a number; got {value!r}.")
    return value


def _intervention_from_dict(d) -> Intervention:
    """One intervention of a recipe's JSON, every field's type checked."""
    if not isinstance(d, dict):
        raise ValueError("it is not an object.")
    unknown = set(d) - _FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; allowed: {sorted(_FIELDS)}.")
    kind = d.get("kind")
    if kind not in ("clamp", "add", "vector"):
        raise ValueError(f"'kind' is {kind!r}; use 'clamp', 'add' or 'vector'.")
    kw = {"kind": kind, "value": _number(d, "value"), "max_act": _number(d, "max_act")}
    if kw["value"] is None:
        raise ValueError("'value' (the strength) is missing.")
    if "latent" in d and d["latent"] is not None:
        latent = d["latent"]
        if isinstance(latent, bool) or not isinstance(latent, int):
            raise ValueError(f"'latent' must be a whole number; got {latent!r}.")
        kw["latent"] = latent
    if "scale_by_max" in d:
        kw["scale_by_max"] = d["scale_by_max"]
    if "vector" in d:
        kw["vector"] = _vector_from_dict(d["vector"])
    return Intervention(**kw)


def _vector_from_dict(v) -> ConceptVector:
    if not isinstance(v, dict):
        raise ValueError("'vector' must be an object with name, hook, kind and fp16_b64.")
    for key in ("name", "hook", "fp16_b64"):
        if not isinstance(v.get(key), str):
            raise ValueError(f"the vector's '{key}' must be a string; got {v.get(key)!r}.")
    if len(v["name"]) > MAX_NAME_CHARS:
        raise ValueError(f"the vector's name has {len(v['name'])} characters; keep it under "
                         f"{MAX_NAME_CHARS}.")
    kind = v.get("kind", "file")
    if kind not in VECTOR_KINDS:
        raise ValueError(f"the vector's kind is {kind!r}; use one of {', '.join(VECTOR_KINDS)}.")
    try:
        raw = base64.b64decode(v["fp16_b64"], validate=True)
    except ValueError as exc:
        raise ValueError(f"the vector's fp16_b64 is not base64 ({exc}).") from None
    if not raw or len(raw) % 2 or len(raw) // 2 > MAX_VECTOR_DIM:
        raise ValueError(f"the vector's fp16_b64 holds {len(raw)} bytes; it must hold 1 to "
                         f"{MAX_VECTOR_DIM:,} float16 values (2 bytes each).")
    vec = torch.frombuffer(bytearray(raw), dtype=torch.float16).float()
    return ConceptVector(v["name"], v["hook"], vec, kind)


def hook_width(lm: LoadedModel, hook_name: str) -> int:
    """How many values the activation at ``hook_name`` has per token (a bad name is refused)."""
    resolve_hook(lm.model, hook_name)
    if hook_name.endswith("attn.hook_z"):
        cfg = lm.config
        heads = int(cfg.num_attention_heads)
        return heads * int(getattr(cfg, "head_dim", None) or lm.d_model // heads)
    return lm.d_model


# --- the hook ---------------------------------------------------------------------------------


@dataclass
class Readout:
    """What a steered pass saw at the SAE's hook, summed over generated positions per row."""

    target_pre: torch.Tensor
    """``[rows, n_targets]`` the model's own target activation before the intervention."""
    target_post: torch.Tensor
    """``[rows, n_targets]`` the target activation after it (what later layers see)."""
    latents_pre: torch.Tensor | None
    """``[rows, d_sae]`` every latent before the intervention (for side effects)."""
    count: torch.Tensor
    """``[rows]`` generated positions summed."""


class Steerer:
    """Hook functions applying one recipe per batch row (``None`` rows stay untouched).

    Tracks the absolute position of each call (prefill, then one token per cached step, or one
    teacher-forced pass) to tell prompt positions from generated ones."""

    def __init__(self, sae: LoadedSAE | None, recipes: list[Recipe | None], prompt_len: int,
                 targets: list[Intervention] = (), latent_stats: bool = True,
                 keep_post: bool = False):
        self.sae, self.recipes, self.prompt_len = sae, recipes, prompt_len
        self.seen = 0
        self.targets = list(targets)
        rows = len(recipes)
        n_t = len(self.targets)
        self.readout = Readout(torch.zeros(rows, n_t), torch.zeros(rows, n_t),
                               torch.zeros(rows, sae.d_sae) if (sae and latent_stats) else None,
                               torch.zeros(rows))
        latent_targets = any(iv.kind != "vector" for iv in self.targets)
        clamps = any(iv.kind == "clamp" for r in recipes if r for iv in r.interventions)
        # SAE encodings only when something uses them: clamps, readouts, or keep_post.
        self.encode_pre = sae is not None and (clamps or latent_stats or latent_targets
                                               or keep_post)
        self.encode_post = sae is not None and (latent_targets or keep_post)
        self.keep_post = keep_post
        self.last_post: torch.Tensor | None = None
        """With ``keep_post``: the post-intervention SAE latents ``[rows, pos, d_sae]`` of the
        latest call."""

    def hooks(self) -> dict:
        names = set()
        for recipe in self.recipes:
            for iv in (recipe.interventions if recipe else ()):
                names.add(iv.vector.hook_name if iv.kind == "vector" else self.sae.hook_name)
        if self.sae is not None:
            names.add(self.sae.hook_name)
        for iv in self.targets:
            if iv.kind == "vector":
                names.add(iv.vector.hook_name)
        return {name: self._fn(name) for name in sorted(names)}

    def advance(self, n: int) -> None:
        """After each forward pass: ``n`` more positions were read."""
        generated = self.seen + n - max(self.seen, self.prompt_len)
        self.readout.count += max(generated, 0)
        self.seen += n

    def _fn(self, hook_name: str):
        def fn(x: torch.Tensor) -> torch.Tensor | None:
            return self._apply(hook_name, x)

        return fn

    def _mask(self, recipe: Recipe, t: int, device) -> torch.Tensor:
        pos = torch.arange(self.seen, self.seen + t, device=device)
        if recipe.positions == "prompt":
            return pos < self.prompt_len
        if recipe.positions == "generated":
            return pos >= self.prompt_len
        return torch.ones(t, dtype=torch.bool, device=device)

    def _apply(self, hook_name: str, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        s = self.sae
        at_sae = s is not None and hook_name == s.hook_name
        new = x.clone()
        f = f_new = None
        if at_sae and self.encode_pre:
            f = s.sae.encode(sae_input(s, x).to(s.sae.dtype))
            f_new = f.clone()
        for row, recipe in enumerate(self.recipes):
            if recipe is None:
                continue
            mask = self._mask(recipe, t, x.device)
            if not mask.any():
                continue
            delta = torch.zeros_like(x[row])
            clamps = [iv for iv in recipe.interventions if iv.kind == "clamp"]
            if at_sae and clamps:
                for iv in clamps:
                    f_new[row, mask, iv.latent] = iv.strength
                recon = s.sae.decode(f[row])
                delta += (s.sae.decode(f_new[row]) - recon).to(x.dtype)
            for iv in recipe.interventions:
                if iv.kind == "add" and at_sae:
                    delta += iv.strength * _unit(s.sae.W_dec[iv.latent]).to(x.dtype)
                elif iv.kind == "vector" and iv.vector.hook_name == hook_name:
                    delta += iv.strength * iv.vector.vector.to(x.device, x.dtype)
            new[row] = torch.where(mask[:, None], x[row] + delta, x[row])
        self._record(hook_name, x, new, f)
        return new

    @torch.no_grad()
    def _record(self, hook_name: str, x: torch.Tensor, new: torch.Tensor, f_pre) -> None:
        gen = torch.arange(self.seen, self.seen + x.shape[1], device=x.device) >= self.prompt_len
        if f_pre is not None:
            s = self.sae
            f_post = None
            if self.encode_post:
                f_post = s.sae.encode(sae_input(s, new).to(s.sae.dtype)).float()
                if self.keep_post:
                    self.last_post = f_post.cpu()
            g = gen.float()[None, :, None]
            if self.readout.latents_pre is not None:
                self.readout.latents_pre += (f_pre.float() * g).sum(1).cpu()
            for j, iv in enumerate(self.targets):
                if iv.kind != "vector":
                    pre, post = f_pre.float()[..., iv.latent], f_post[..., iv.latent]
                    self.readout.target_pre[:, j] += (pre * g[..., 0]).sum(1).cpu()
                    self.readout.target_post[:, j] += (post * g[..., 0]).sum(1).cpu()
        for j, iv in enumerate(self.targets):
            if iv.kind == "vector" and iv.vector.hook_name == hook_name:
                u = _unit(iv.vector.vector).to(x.device, torch.float32)
                g = gen.float()[None, :]
                self.readout.target_pre[:, j] += ((x.float() @ u) * g).sum(1).cpu()
                self.readout.target_post[:, j] += ((new.float() @ u) * g).sum(1).cpu()


def _unit(v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(v.float(), dim=-1)


# --- generation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenConfig:
    """Sampling settings shared by the baseline and every steered row."""

    max_new_tokens: int = 40
    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 0.9
    seed: int = 0
    chat: bool = False
    """Wrap the prompt in the tokenizer's chat template (instruction-tuned models)."""

    def __post_init__(self) -> None:
        if not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; use 1 to {MAX_NEW_TOKENS}.")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 5):
            raise ValueError(f"temperature={self.temperature}; use 0 (greedy) to 5.")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p}; use a number in (0, 1].")


def prompt_ids(lm: LoadedModel, prompt: str, chat: bool, prepend_bos: bool = True) -> list[int]:
    check_text(prompt)
    if chat:
        if not getattr(lm.tokenizer, "chat_template", None):
            raise ValueError(f"{lm.name} has no chat template (a base model?); untick "
                             "'chat template' to complete the prompt as plain text.")
        prompt = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return token_ids(lm, prompt, prepend_bos)


@dataclass
class GenStep:
    """One generated token for every row (streamed to the page)."""

    step: int
    tokens: list[int]
    done: list[bool]


@dataclass
class GenResult:
    prompt_ids: list[int]
    rows: list[list[int]]
    """Generated token ids per row (row 0 is the baseline when the caller put it first)."""
    texts: list[str]
    readout: Readout
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return sum(len(r) for r in self.rows) / max(self.seconds, 1e-9)


def _sample(logits: torch.Tensor, cfg: GenConfig, noise: torch.Tensor) -> torch.Tensor:
    """Next tokens ``[rows]``; the Gumbel noise ``[vocab]`` is shared by every row."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    logp = torch.log_softmax(logits, dim=-1)
    if cfg.top_p < 1:
        logp = logp.masked_fill(outside_nucleus(logits, cfg.top_p), -math.inf)
    return (logp + noise.to(logp.device)).argmax(-1)


class PassHooks(Protocol):
    """What :func:`generate_rows` asks before and after each forward pass."""

    def hooks(self) -> dict:
        """Hook name -> fn for the next forward pass (``{}``: an untouched pass)."""

    def advance(self, n: int) -> None:
        """After each forward pass: ``n`` more positions were read."""


def generate_rows(lm: LoadedModel, ids: list[int], n_rows: int, patcher: PassHooks,
                  cfg: GenConfig, out: list | None = None) -> Iterator[GenStep]:
    """Generate ``n_rows`` continuations of the token ids ``ids`` as one batch, a token at a
    time, with a KV cache: the first pass reads the whole prompt, each later pass one token.

    ``patcher`` gives the hooks of each pass; they are installed for that pass only, never
    across a ``yield``, so other sessions run between tokens. When the generator is exhausted,
    ``out`` (if given) receives ``(rows, seconds)``."""
    gen = torch.Generator().manual_seed(int(cfg.seed))
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    eos_cfg = lm.model.generation_config.eos_token_id
    eos = {lm.tokenizer.eos_token_id, *(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg])}
    eos.discard(None)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids] * n_rows, device=lm.device)
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    past = None
    # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else (
        "past_key_values")
    start = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        with hooked(lm, patcher.hooks()), torch.no_grad():
            step_out = lm.model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                                **{cache_kw: past})
        patcher.advance(input_ids.shape[1])
        past = getattr(step_out, cache_kw)
        noise = -torch.log(-torch.log(torch.rand(vocab, generator=gen).clamp(1e-12, 1 - 1e-7)))
        nxt = _sample(step_out.logits[:, -1, :vocab], cfg, noise).cpu()
        for r in range(n_rows):
            if done[r]:
                nxt[r] = pad
            else:
                rows[r].append(int(nxt[r]))
                done[r] = int(nxt[r]) in eos
        yield GenStep(step, nxt.tolist(), list(done))
        if all(done):
            break
        input_ids = nxt[:, None].to(lm.device)
    if out is not None:
        out.append((rows, time.perf_counter() - start))


def stream(lm: LoadedModel, sae: LoadedSAE | None, prompt: str, recipes: list[Recipe | None],
           cfg: GenConfig, targets: list[Intervention] = (),
           result: list | None = None) -> Iterator[GenStep]:
    """Generate one row per recipe (``None`` = unsteered) as one batch, a token at a time
    (:func:`generate_rows`). When the generator is exhausted, ``result`` (if given) receives
    the :class:`GenResult`."""
    if not recipes or len(recipes) > MAX_ROWS:
        raise ValueError(f"Generate 1 to {MAX_ROWS} rows at once; got {len(recipes)}.")
    for recipe in recipes:
        if recipe is not None:
            recipe.check(sae, lm)
    ids = prompt_ids(lm, prompt, cfg.chat, sae.processing.prepend_bos if sae else True)
    steerer = Steerer(sae, recipes, len(ids), targets)
    out: list = []
    yield from generate_rows(lm, ids, len(recipes), steerer, cfg, out)
    if result is not None:
        rows, seconds = out[0]
        texts = [lm.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        result.append(GenResult(ids, rows, texts, steerer.readout, seconds))


def generate_steered(lm: LoadedModel, sae: LoadedSAE | None, prompt: str,
                     recipes: list[Recipe | None], cfg: GenConfig,
                     targets: list[Intervention] = ()) -> GenResult:
    """:func:`stream` run to the end."""
    result: list[GenResult] = []
    for _ in stream(lm, sae, prompt, recipes, cfg, targets, result):
        pass
    return result[0]


# --- what else moved --------------------------------------------------------------------------


@dataclass
class Scored:
    """Teacher-forced comparison of steered rows with the baseline on one token sequence."""

    kl: list[float]
    """Per steered row: mean KL(steered ‖ baseline) of the next-token distribution over the
    generated positions (and the last prompt position)."""
    logit_up: list[list[tuple[int, float]]]
    """Per steered row: tokens whose log-probability rose most (mean over positions)."""
    logit_down: list[list[tuple[int, float]]]


@torch.no_grad()
def score_on_text(lm: LoadedModel, sae: LoadedSAE | None, ids: list[int], prompt_len: int,
                  recipes: list[Recipe], top: int = 10) -> Scored:
    """Run ``ids`` unsteered and once per recipe; compare next-token distributions at positions
    ``prompt_len - 1`` onwards (those that predicted the generated tokens). One row at a time,
    so memory stays at two ``[positions, vocab]`` tensors."""
    for recipe in recipes:
        recipe.check(sae, lm)
    x = torch.tensor([ids], device=lm.device)
    keep = len(ids) - prompt_len + 1

    def logprobs(recipe: Recipe | None) -> torch.Tensor:
        steerer = Steerer(sae, [recipe], prompt_len, latent_stats=False)
        with hooked(lm, steerer.hooks() if recipe else {}):
            logits = lm.model(input_ids=x, use_cache=False, logits_to_keep=keep).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    base = logprobs(None)
    kls, ups, downs = [], [], []
    for recipe in recipes:
        lp = logprobs(recipe)
        kls.append(float((lp.exp() * (lp - base)).sum(-1).mean()))
        diff = (lp - base).mean(0)
        up, down = diff.topk(top), (-diff).topk(top)
        ups.append([(int(i), float(v)) for v, i in zip(up.values, up.indices)])
        downs.append([(int(i), -float(v)) for v, i in zip(down.values, down.indices)])
    return Scored(kls, ups, downs)


def latent_shifts(readout: Readout, row: int, top: int = 10,
                  exclude: set[int] = frozenset(), typical=None,
                  ) -> list[tuple[int, float, float, float]]:
    """Latents whose mean activation over generated tokens moved most between the baseline
    (row 0) and ``row``: (latent, baseline mean, steered mean, change in units of the latent's
    scale), the largest changes in those units first.

    ``typical`` (one value per latent, e.g. the index's mean activation when firing) sets each
    latent's scale, so a rare latent switching on outranks a dense one whose large activations
    wobble; latents without one (never fired where it was measured: NaN or 0) take the median
    of the others. Without ``typical`` the scale is 1: raw activation."""
    if readout.latents_pre is None:
        return []
    count = readout.count.clamp(min=1)
    base = readout.latents_pre[0] / count[0]
    steered = readout.latents_pre[row] / count[row]
    scale = torch.ones_like(base)
    if typical is not None:
        t = torch.tensor(np.asarray(typical, dtype=np.float64), dtype=base.dtype).flatten()
        if t.numel() != base.numel():
            raise ValueError(f"typical has {t.numel()} values for {base.numel()} latents.")
        known = torch.isfinite(t) & (t > 0)
        if known.any():
            scale = torch.where(known, t, t[known].median())
    change = (steered - base) / scale
    rank = change.abs()
    for i in exclude:
        rank[i] = -1
    order = rank.argsort(descending=True)[:top]
    return [(int(i), float(base[i]), float(steered[i]), float(change[i]))
            for i in order if rank[i] > 0]


# --- strength sweep ---------------------------------------------------------------------------


@dataclass
class Sweep:
    strengths: list[float]
    target_pre: list[float]
    """Mean over generated tokens of the target's activation before the intervention."""
    target_post: list[float]
    kl: list[float]
    texts: list[str]
    baseline: str


def sweep(lm: LoadedModel, sae: LoadedSAE | None, prompt: str, recipe: Recipe, index: int,
          strengths: list[float], cfg: GenConfig) -> Sweep:
    """Vary intervention ``index`` of ``recipe`` over ``strengths``: one batch of generations
    (baseline + one row per strength), then KL on the baseline's text."""
    if not recipe.interventions:
        raise ValueError("The recipe is empty; add an intervention to sweep.")
    if not 0 <= index < len(recipe.interventions):
        raise ValueError(f"Intervention {index} does not exist; the recipe has "
                         f"{len(recipe.interventions)}.")
    if not 2 <= len(strengths) <= MAX_ROWS - 1:
        raise ValueError(f"Sweep 2 to {MAX_ROWS - 1} strengths; got {len(strengths)}.")
    target = recipe.interventions[index]
    variants = []
    for s in strengths:
        ivs = list(recipe.interventions)
        ivs[index] = replace(target, value=_strength(s, "A sweep strength"))
        variants.append(replace(recipe, interventions=tuple(ivs)))
    res = generate_steered(lm, sae, prompt, [None, *variants], cfg, targets=[target])
    count = res.readout.count.clamp(min=1)
    full = res.prompt_ids + res.rows[0]
    scored = score_on_text(lm, sae, full, len(res.prompt_ids), variants)
    return Sweep(
        list(map(float, strengths)),
        (res.readout.target_pre[1:, 0] / count[1:]).tolist(),
        (res.readout.target_post[1:, 0] / count[1:]).tolist(),
        scored.kl, res.texts[1:], res.texts[0],
    )
