"""What dreaming maximises: an SAE latent's encoder pre-activation, the projection on its decoder
direction, or a concept vector, all read from the activation at one hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from core.models import LoadedModel
from core.saes import LoadedSAE, sae_input


@dataclass(frozen=True, eq=False)
class Objective:
    """What dreaming maximises, read at the last position of the prompt."""

    kind: Literal["encoder", "decoder", "vector"]
    """``encoder``: the SAE latent's pre-activation (before ReLU/JumpReLU/TopK);
    ``decoder``: the activation projected on the latent's unit decoder direction;
    ``vector``: the activation projected on a unit concept vector."""
    hook_name: str
    """Where the activation is read (``blocks.12.hook_resid_post``)."""
    sae: LoadedSAE | None = None
    """The SAE, for ``encoder`` and ``decoder`` (also gives the encoder/decoder comparison)."""
    latent: int | None = None
    """The latent, for ``encoder`` and ``decoder``."""
    vector: torch.Tensor | None = None
    """``[d_model]`` direction, for ``vector``; normalised here."""
    label: str = ""
    """How plots and exports name the objective."""

    def __post_init__(self) -> None:
        if self.kind not in ("encoder", "decoder", "vector"):
            raise ValueError(f"Unknown objective kind {self.kind!r}; use 'encoder', 'decoder' "
                             "or 'vector'.")
        if self.kind == "vector":
            if self.vector is None:
                raise ValueError("A 'vector' objective needs a vector (a [d_model] tensor).")
            v = torch.as_tensor(self.vector).detach().float().flatten().cpu()
            if not torch.isfinite(v).all():
                raise ValueError("The concept vector holds NaN or infinite values; rebuild it on "
                                 "the Steering page.")
            if v.norm() == 0:
                raise ValueError("The concept vector is all zeros; pick another one.")
            object.__setattr__(self, "vector", v / v.norm())
            return
        if self.sae is None or self.latent is None:
            raise ValueError(f"A {self.kind!r} objective needs an SAE and a latent; load an SAE "
                             "in the sidebar.")
        d_sae = self.sae.d_sae
        if isinstance(self.latent, bool) or not isinstance(self.latent, int) \
                or not 0 <= self.latent < d_sae:
            raise ValueError(f"Latent {self.latent!r} is out of range: {self.sae.spec.label} has "
                             f"latents 0 to {d_sae - 1}.")
        if self.kind == "encoder" and not _has_linear_encoder(self.sae):
            raise ValueError(f"SAE architecture {self.sae.architecture!r} has no single linear "
                             "encoder pre-activation; use the 'decoder' objective instead.")

    @classmethod
    def sae_latent(cls, sae: LoadedSAE, latent: int,
                   kind: Literal["encoder", "decoder"] = "encoder") -> Objective:
        return cls(kind, sae.hook_name, sae=sae, latent=latent,
                   label=f"{sae.spec.label} #{latent} ({kind})")

    @classmethod
    def concept(cls, name: str, hook_name: str, vector: torch.Tensor) -> Objective:
        return cls("vector", hook_name, vector=vector, label=f"concept {name!r}")


def _has_linear_encoder(sae: LoadedSAE) -> bool:
    return sae.architecture in ("standard", "jumprelu", "topk", "batchtopk") and \
        hasattr(sae.sae, "W_enc") and hasattr(sae.sae, "b_enc")


@dataclass
class ObjectiveWeights:
    """The objective's weights on the model's device, in float32."""

    direction: torch.Tensor | None  # [d] for decoder/vector objectives and the comparison
    w_enc: torch.Tensor | None  # [d]
    b_enc: float
    b_dec: torch.Tensor | None
    dec_norm: float


def objective_weights(lm: LoadedModel, obj: Objective) -> ObjectiveWeights:
    dev = lm.device
    if obj.kind == "vector":
        if obj.vector.numel() != lm.d_model:
            raise ValueError(f"The concept vector has {obj.vector.numel()} entries but "
                             f"{lm.name} has d_model {lm.d_model}; build it on this model.")
        return ObjectiveWeights(obj.vector.to(dev), None, 0.0, None, 1.0)
    s, i = obj.sae.sae, obj.latent
    w_dec = s.W_dec[i].detach().float()
    direction = (w_dec / w_dec.norm()).to(dev)
    if not _has_linear_encoder(obj.sae):
        return ObjectiveWeights(direction, None, 0.0, None, 1.0)
    b_dec = s.b_dec.detach().float().to(dev) if s.cfg.apply_b_dec_to_input else None
    rescale = bool(getattr(s.cfg, "rescale_acts_by_decoder_norm", False))
    return ObjectiveWeights(direction, s.W_enc[:, i].detach().float().to(dev),
                    float(s.b_enc[i].detach().float()), b_dec,
                    float(w_dec.norm()) if rescale else 1.0)


def read_objective(obj: Objective, r: ObjectiveWeights,
                   acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(objective, encoder pre-activation, decoder projection) for ``acts [batch, d]``; the last
    two are empty unless the objective is an SAE latent. Gradients flow."""
    acts = acts.float()
    empty = acts.new_zeros(0)
    if obj.kind == "vector":
        return acts @ r.direction, empty, empty
    x = sae_input(obj.sae, acts)
    decoder = x @ r.direction
    encoder = empty
    if r.w_enc is not None:
        norm = obj.sae.sae.cfg.normalize_activations
        if norm not in (None, "none"):
            x = obj.sae.sae.run_time_activation_norm_fn_in(x)
        if r.b_dec is not None:
            x = x - r.b_dec
        encoder = (x @ r.w_enc + r.b_enc) * r.dec_norm
    return (encoder if obj.kind == "encoder" else decoder), encoder, decoder
