"""sae_lens hook names mapped onto Hugging Face modules, and the only place hooks are installed.

Hooks on a model shared by every browser session are global state. Every hook here lives inside a
context manager that

* holds the model's lock for its whole life, so forward passes that go through this module are
  serialized and no other session's pass runs while the hooks are in place;
* fires only for the thread that installed it (a pass from another thread goes through untouched,
  even one that skipped the lock);
* removes its handles in ``finally``, also when the body raises.

Supported hook names (``L`` is the layer index), with what they mean on the HF model:

================================  ==========================================================
``blocks.L.hook_resid_pre``       input of decoder layer ``L`` (the residual stream)
``blocks.L.hook_resid_post``      output of decoder layer ``L`` (before the final norm)
``blocks.L.hook_attn_out``        what attention writes to the residual stream (Gemma: after
                                  ``post_attention_layernorm``)
``blocks.L.hook_mlp_out``         what the MLP writes to the residual stream (Gemma: after
                                  ``post_feedforward_layernorm``)
``blocks.L.attn.hook_z``          input of the attention output projection, heads flattened to
                                  ``n_heads * d_head``
================================  ==========================================================
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping

import torch

from core.models import LoadedModel

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Receives the activation ``[batch, pos, d]``; returns a replacement or ``None`` to keep it."""

HOOK_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_z")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + r")$")

# Where each family keeps its decoder layers, and the sub-modules that produce each write.
_LAYER_PATHS = ("model.layers", "transformer.h", "model.language_model.layers", "gpt_neox.layers")
_FAMILIES: dict[str, dict[str, str]] = {
    "gpt2": {"attn_out": "attn", "mlp_out": "mlp", "z": "attn.c_proj"},
    "gemma2": {
        "attn_out": "post_attention_layernorm",
        "mlp_out": "post_feedforward_layernorm",
        "z": "self_attn.o_proj",
    },
    "llama": {"attn_out": "self_attn", "mlp_out": "mlp", "z": "self_attn.o_proj"},
}
_FAMILY_OF = {
    "gpt2": "gpt2",
    "gemma2": "gemma2",
    "gemma3": "gemma2",
    "gemma3_text": "gemma2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
}


@dataclass(frozen=True)
class HookSite:
    """Where a sae_lens hook name lives on the HF model."""

    name: str
    layer: int
    module: str
    """Dotted path for ``model.get_submodule``."""
    io: Literal["input", "output"]
    """Whether the activation is the module's first input or its (first) output."""


def layers_path(model: torch.nn.Module) -> str:
    for path in _LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList):
            return path
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)}. Supported families: GPT-2, Gemma 2/3, Llama-like."
    )


def family(model: torch.nn.Module) -> dict[str, str]:
    model_type = getattr(model.config, "model_type", "")
    if model_type not in _FAMILY_OF:
        raise ValueError(
            f"Model type {model_type!r} has no hook map yet; supported: "
            f"{', '.join(sorted(_FAMILY_OF))}. Add it to core/hooks.py (_FAMILY_OF)."
        )
    return _FAMILIES[_FAMILY_OF[model_type]]


def resolve_hook(model: torch.nn.Module, name: str) -> HookSite:
    """Map a sae_lens hook name onto a module of ``model``; a typo is an error, not a warning."""
    match = _HOOK_RE.match(name)
    if not match:
        raise ValueError(
            f"Unsupported hook name {name!r}. Use blocks.L.<kind> with kind one of "
            f"{', '.join(HOOK_KINDS)} (for example 'blocks.6.hook_resid_post')."
        )
    layer, kind = int(match.group(1)), match.group(2)
    n_layers = int(model.config.num_hidden_layers)
    if layer >= n_layers:
        raise ValueError(
            f"Hook {name!r} asks for layer {layer} but the model has {n_layers} layers "
            f"(0 to {n_layers - 1}). Pick an SAE trained on this model."
        )
    base = f"{layers_path(model)}.{layer}"
    fam = family(model)
    if kind == "hook_resid_pre":
        site = HookSite(name, layer, base, "input")
    elif kind == "hook_resid_post":
        site = HookSite(name, layer, base, "output")
    elif kind == "hook_attn_out":
        site = HookSite(name, layer, f"{base}.{fam['attn_out']}", "output")
    elif kind == "hook_mlp_out":
        site = HookSite(name, layer, f"{base}.{fam['mlp_out']}", "output")
    else:
        site = HookSite(name, layer, f"{base}.{fam['z']}", "input")
    model.get_submodule(site.module)  # fail here, by name, if the family map is wrong
    return site


class _StopForward(Exception):
    """Raised by a capture hook once every requested activation is in hand."""


def _output_hook(fn: HookFn, owner: int):
    def hook(module, args, output):
        if threading.get_ident() != owner:
            return None
        act = output[0] if isinstance(output, tuple) else output
        new = fn(act)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _input_hook(fn: HookFn, owner: int):
    def hook(module, args, kwargs):
        if threading.get_ident() != owner:
            return None
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


@contextmanager
def hooked(lm: LoadedModel, hooks: Mapping[str, HookFn]) -> Iterator[None]:
    """Run the body with ``hooks`` (hook name -> fn) installed for the calling thread only."""
    sites = [(resolve_hook(lm.model, name), fn) for name, fn in hooks.items()]
    owner = threading.get_ident()
    with lm.lock:
        handles = []
        try:
            for site, fn in sites:
                module = lm.model.get_submodule(site.module)
                if site.io == "output":
                    handles.append(module.register_forward_hook(_output_hook(fn, owner)))
                else:
                    handles.append(
                        module.register_forward_pre_hook(_input_hook(fn, owner), with_kwargs=True)
                    )
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def capture(
    lm: LoadedModel, names: list[str] | tuple[str, ...], stop: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the activation at each hook name into the yielded dict (detached). With ``stop``,
    the forward pass ends (raising :class:`_StopForward`) once every name is captured."""
    store: dict[str, torch.Tensor] = {}
    wanted = set(names)

    def saver(name: str) -> HookFn:
        def fn(act: torch.Tensor) -> None:
            store[name] = act.detach()
            if stop and wanted <= store.keys():
                raise _StopForward

        return fn

    with hooked(lm, {name: saver(name) for name in names}):
        yield store


def run_to_hooks(
    lm: LoadedModel,
    names: list[str] | tuple[str, ...],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Activations at ``names``; the forward pass stops as soon as the last one is captured."""
    with capture(lm, names, stop=True) as store, torch.no_grad():
        try:
            lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return store


def forward(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """A plain forward pass that waits for any hooked pass on the shared model to finish."""
    with lm.lock, torch.no_grad():
        return lm.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
