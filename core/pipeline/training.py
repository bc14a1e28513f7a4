"""Train the embedded SAE family: several widths from one activation stream, with sae_lens.

The stream reads the corpus's token ids (``train.tokens.u32``, written once by ``core.pipeline.corpus``),
takes windows in a seeded random order, runs big batches of them through the same hook code the
app uses (``core.hooks.run_to_hooks``), so the SAEs see exactly the activations the pages will
feed them, and keeps and shuffles the activation buffer on the model's device: no tokenizing, no
host round trip in the loop. Every window starts with one BOS; BOS positions are left out of
training (Gemma's BOS residual is an outlier hundreds of times larger than other tokens) and the
pages mark them as such.
sae_lens's ``MultiSAETrainer`` trains every width in lockstep on the same batches.

    python -m core.pipeline.training --corpus ~/.cache/sae-workbench/corpus --tokens 20000000

runs on any CUDA machine (or the CPU, slowly) with no network, given the model package and
the corpus; it writes sae_lens directories to ``data/saes`` (``SAE.load_from_disk``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Iterator

import torch

from core.pipeline.corpus import TOKENS_SUFFIX, stream_windows, token_stream
from core.hooks import run_to_hooks
from core.models import EMBEDDED_MODEL_NAME, LoadedModel
from core.saes import EMBEDDED_SAE_DIR

PROJECT_ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """One training run of a family of widths at one hook."""

    corpus_dir: Path
    """Holds train.jsonl (from ``python -m core.pipeline.corpus``)."""
    extra_corpora: tuple[Path, ...] = ()
    """Further corpora whose train splits join the stream (e.g. one built with ``--sources
    samples``: the model's own text); their held-out splits are not used."""
    out_dir: Path = EMBEDDED_SAE_DIR
    """Each width goes to ``out_dir/w<width>``."""
    hook_name: str = "blocks.12.hook_resid_post"
    widths: tuple[int, ...] = (512, 1024, 2048, 4096)
    k: float = 32
    """Average active latents per token (BatchTopK); the saved JumpReLU keeps L0 close to it."""
    training_tokens: int = 20_000_000
    context_size: int = 128
    batch_tokens: int = 4096
    lr: float = 4e-4
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    """Linear decay to lr/10 over the last fraction of steps."""
    aux_loss_coefficient: float = 1 / 32
    dead_window_tokens: int = 2_000_000
    """A latent that has not fired for this many training tokens counts as dead, and the
    auxiliary loss trains it to reconstruct what the live latents miss. The card counts a latent
    dead when it never fires in 2M held-out tokens, so training uses the same span; a window
    tied to the run's length (a quarter of its steps, as the shipped family had: 4.2M tokens)
    would leave a 100M-token run blind to silent latents for 25M tokens at a time."""
    windows_per_forward: int = 128
    """Windows per forward pass of the stream (128 × 128 tokens: big batches keep a GPU busy)."""
    shuffle_tokens: int = 131_072
    """Activations are mixed in a buffer of this many tokens before batching."""
    norm_batches: int = 16
    """Batches used to estimate the activation scale (expected_average_only_in, folded at save)."""
    save_dtype: str = "float16"
    seed: int = 0

    def __post_init__(self) -> None:
        for corpus in (self.corpus_dir, *self.extra_corpora):
            if not (Path(corpus) / f"train{TOKENS_SUFFIX}").exists():
                raise FileNotFoundError(
                    f"{corpus}/train{TOKENS_SUFFIX} is missing: build the corpus first "
                    "(python -m core.pipeline.corpus --out DIR); it writes the token ids beside "
                    "the text."
                )
        if self.save_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"save_dtype {self.save_dtype!r}: use float16, bfloat16 or float32.")
        if self.dead_window_tokens <= 0:
            raise ValueError(f"dead_window_tokens={self.dead_window_tokens} must be positive.")
        if any(w <= 0 for w in self.widths) or self.k <= 0:
            raise ValueError(f"widths {self.widths} and k={self.k} must be positive.")




def activation_batches(
    lm: LoadedModel, ids, hook_name: str, context_size: int, batch_tokens: int,
    windows_per_forward: int = 128, shuffle_tokens: int = 131_072, seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Shuffled ``[batch_tokens, d]`` float32 activations at ``hook_name`` on the model's device.

    ``ids`` is a token stream (:func:`core.pipeline.corpus.token_stream`); windows of ``context_size``
    (one BOS, then ``context_size - 1`` tokens) are taken in a seeded random order, a new order
    each pass; BOS positions (window starts and document separators) are dropped. Half of each
    shuffled buffer is handed out, the rest mixes with the next harvest.
    """
    import numpy as np

    device = lm.device
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    bos = lm.tokenizer.bos_token_id
    body = context_size - 1
    n_windows = len(ids) // body
    if n_windows < windows_per_forward:
        raise ValueError(f"The corpus holds {n_windows} windows of {context_size} tokens, fewer "
                         f"than one forward pass takes ({windows_per_forward}): build a larger "
                         "corpus or lower windows_per_forward.")
    order, at, epoch = rng.permutation(n_windows), 0, 0
    pool = torch.empty(0, lm.d_model, device=device)
    while True:
        parts, have = [pool], pool.shape[0]
        while have < shuffle_tokens:
            if at + windows_per_forward > n_windows:
                epoch += 1
                log.warning("corpus exhausted: starting pass %d over its windows", epoch + 1)
                order, at = rng.permutation(n_windows), 0
            take = np.sort(order[at:at + windows_per_forward])
            at += windows_per_forward
            batch = stream_windows(ids, bos, context_size, which=take).to(device)
            acts = run_to_hooks(lm, [hook_name], batch)[hook_name]
            parts.append(acts[batch != bos].float())
            have += parts[-1].shape[0]
        pool = torch.cat(parts)
        pool = pool[torch.randperm(pool.shape[0], generator=gen, device=device)]
        n_out = max(pool.shape[0] // 2 // batch_tokens, 1) * batch_tokens
        out, pool = pool[:n_out], pool[n_out:]
        yield from out.split(batch_tokens)


def _logged(batches: Iterator[dict], every: int = 25) -> Iterator[dict]:
    """Pass batches through, logging the rate (sae_lens's own bar moves every 100 steps)."""
    start = time.perf_counter()
    for i, batch in enumerate(batches, 1):
        if i % every == 0:
            log.info("batch %d, %.1f s per batch", i, (time.perf_counter() - start) / i)
        yield batch


def portable(path: Path) -> str:
    """A path as shipped artifacts record it: relative to the project, else its last part."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return path.name


def recorded(cfg: TrainConfig) -> dict:
    """``cfg`` as shipped files record it: paths as :func:`portable` names, and the number of
    passes over the training text."""
    out = {}
    for k, v in asdict(cfg).items():
        if isinstance(v, Path):
            v = portable(v)
        elif k == "extra_corpora":
            v = [portable(p) for p in v]
        out[k] = v
    out["passes_over_text"] = round(passes(cfg), 2)
    return out


@cache
def _device_threshold_sae():
    """sae_lens's BatchTopK training SAE with its threshold update and auxiliary loss kept on
    the device.

    sae_lens updates the running threshold (the average smallest positive activation, saved as
    the JumpReLU threshold) behind ``if positive_mask.any()`` and a boolean-mask index, and sizes
    the auxiliary loss with ``int(dead_neuron_mask.sum())``: three host syncs on a GPU, for every
    SAE at every step. This computes the same threshold with ``torch.where`` and, on a GPU, the
    same loss with the dead count kept as a tensor (:func:`device_aux_loss`), so the host can
    keep queueing work (the next batch's forward pass, the other widths) while the GPU runs."""
    from sae_lens import BatchTopKTrainingSAE

    class DeviceThresholdBatchTopK(BatchTopKTrainingSAE):
        @torch.no_grad()
        def update_topk_threshold(self, acts_topk: torch.Tensor) -> None:
            lr = self.cfg.topk_threshold_lr
            with torch.autocast(self.topk_threshold.device.type, enabled=False):
                positive = acts_topk > 0
                smallest = torch.where(positive, acts_topk, torch.inf).min()
                updated = (1 - lr) * self.topk_threshold + lr * smallest.to(
                    self.topk_threshold.dtype)
                self.topk_threshold = torch.where(positive.any(), updated,
                                                  self.topk_threshold)

        def calculate_topk_aux_loss(self, sae_in, sae_out, hidden_pre, dead_neuron_mask):
            if dead_neuron_mask is None or sae_in.device.type == "cpu":  # a CPU never waits
                return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre,
                                                       dead_neuron_mask)
            return self.cfg.aux_loss_coefficient * device_aux_loss(
                sae_in, sae_out, hidden_pre, dead_neuron_mask, self.W_dec,
                self.cfg.rescale_acts_by_decoder_norm)

    return DeviceThresholdBatchTopK


def device_aux_loss(sae_in: torch.Tensor, sae_out: torch.Tensor, hidden_pre: torch.Tensor,
                    dead: torch.Tensor, w_dec: torch.Tensor, rescale: bool) -> torch.Tensor:
    """sae_lens's TopK auxiliary loss (before its coefficient) without reading the dead count.

    The dead latents' top ``k_aux = d_in // 2`` pre-activations reconstruct the residual, scaled
    by ``min(dead / k_aux, 1)``. sae_lens takes the top ``min(k_aux, dead)``, a size it must
    read from the GPU; this takes the top ``k_aux`` of the dead latents' pre-activations with
    the living ones at -inf and zeroes the -inf picks, which selects the same latents. With no
    dead latent the scale is 0 and so is the loss, as sae_lens's early return gives.
    """
    from sae_lens.saes.topk_sae import act_times_W_dec

    k_aux = min(sae_in.shape[-1] // 2, hidden_pre.shape[-1])
    n_dead = dead.sum()
    scale = (n_dead / (sae_in.shape[-1] // 2)).clamp(max=1.0)
    masked = torch.where(dead[None], hidden_pre, -torch.inf)
    top = masked.topk(k_aux, sorted=False)
    values = torch.where(torch.isfinite(top.values), top.values, 0.0)
    acts = torch.zeros_like(hidden_pre).scatter_(-1, top.indices, values)
    residual = (sae_in - sae_out).detach()
    recons = act_times_W_dec(acts, w_dec, rescale)
    return scale * (recons - residual).pow(2).sum(dim=-1).mean()


def build_training_saes(cfg: TrainConfig, d_in: int, device: str) -> dict[str, torch.nn.Module]:
    from sae_lens import BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    saes = {}
    for width in cfg.widths:
        meta = SAEMetadata(
            model_name=EMBEDDED_MODEL_NAME, hook_name=cfg.hook_name, prepend_bos=True,
            context_size=cfg.context_size, dataset_path=portable(cfg.corpus_dir),
            exclude_special_tokens=True, model_from_pretrained_kwargs={},
        )
        sae_cfg = BatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=width, k=cfg.k, device=device, dtype="float32",
            normalize_activations="expected_average_only_in",
            aux_loss_coefficient=cfg.aux_loss_coefficient, metadata=meta,
        )
        saes[f"w{width}"] = _device_threshold_sae()(sae_cfg)
    return saes


def train_family(cfg: TrainConfig, lm: LoadedModel) -> dict[str, Path]:
    """Train every width on one stream and save sae_lens inference directories."""
    start = time.perf_counter()
    trained = fit_family(cfg, lm)
    seconds = time.perf_counter() - start
    log.info("trained %s on %d tokens in %.0f s", list(trained), cfg.training_tokens, seconds)
    return save_family(cfg, trained, seconds, device_name(lm.device))


def device_name(device: torch.device) -> str:
    """What the card says a family was trained on, e.g. ``NVIDIA H200 (cuda)``."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    return device.type


def train_ids(cfg: TrainConfig, bos: int):
    """The token stream trained on: the corpus's train split, then each extra corpus's, joined
    by one ``bos`` as documents are (a memmap for one corpus, else an array in memory)."""
    import numpy as np

    streams = [token_stream(Path(c) / "train.jsonl") for c in (cfg.corpus_dir, *cfg.extra_corpora)]
    if len(streams) == 1:
        return streams[0]
    joint = [np.asarray(streams[0])]
    for more in streams[1:]:
        joint += [np.array([bos], dtype="<u4"), np.asarray(more)]
    return np.concatenate(joint)


def passes(cfg: TrainConfig) -> float:
    """How many times the run goes over its training text (above 1: repeated epochs)."""
    text = sum(len(token_stream(Path(c) / "train.jsonl")) for c in (cfg.corpus_dir, *cfg.extra_corpora))
    return cfg.training_tokens / text


def stream(cfg: TrainConfig, lm: LoadedModel) -> Iterator[torch.Tensor]:
    """The training activation stream of ``cfg``'s corpora."""
    return activation_batches(
        lm, train_ids(cfg, lm.tokenizer.bos_token_id), cfg.hook_name, cfg.context_size,
        cfg.batch_tokens, cfg.windows_per_forward, cfg.shuffle_tokens, cfg.seed,
    )


def fit_family(cfg: TrainConfig, lm: LoadedModel, batches: Iterator[torch.Tensor] | None = None,
               ) -> dict[str, torch.nn.Module]:
    """Train every width in lockstep on one stream (``batches``, default :func:`stream`)."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    torch.manual_seed(cfg.seed)
    device = str(lm.device)
    if lm.device.type == "cuda":  # TF32 tensor cores for the SAEs' float32 matrix products
        torch.backends.cuda.matmul.allow_tf32 = True
    saes = build_training_saes(cfg, lm.d_model, device)
    steps = cfg.training_tokens // cfg.batch_tokens
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.training_tokens, train_batch_size_samples=cfg.batch_tokens,
        lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name="constant",
        lr_warm_up_steps=cfg.warmup_steps, lr_decay_steps=int(steps * cfg.decay_fraction),
        device=device, dead_feature_window=dead_window_steps(cfg),
        feature_sampling_window=max(steps // 4, 10), n_batches_for_norm_estimate=cfg.norm_batches,
        logger=LoggingConfig(log_to_wandb=False),
    )
    batches = stream(cfg, lm) if batches is None else batches
    provider = _logged({cfg.hook_name: batch} for batch in batches)
    trainer = MultiSAETrainer(cfg=trainer_cfg, saes=saes,
                              hook_names={name: cfg.hook_name for name in saes},
                              data_provider=provider)
    return trainer.fit()


def dead_window_steps(cfg: TrainConfig) -> int:
    """``cfg.dead_window_tokens`` in training steps (at least 10), whatever the run's length."""
    return max(cfg.dead_window_tokens // cfg.batch_tokens, 10)


def save_family(cfg: TrainConfig, trained: dict, seconds: float, device: str = ""
                ) -> dict[str, Path]:
    """Save each SAE as an inference model (BatchTopK → JumpReLU) in ``save_dtype``."""
    from sae_lens import SAE

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, sae in trained.items():
        tmp = cfg.out_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(str(tmp), device="cpu")
        inference.cfg.metadata.training_tokens = cfg.training_tokens
        inference.cfg.metadata.training_seconds = round(seconds, 1)
        inference.cfg.metadata.training_device = device
        inference.cfg.metadata.training_config = recorded(cfg)
        inference = inference.to(dtype=getattr(torch, cfg.save_dtype))
        final = cfg.out_dir / name
        shutil.rmtree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        inference.save_model(final)
        paths[name] = final
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded SAE family.")
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--extra-corpus", type=Path, action="append", default=[],
                        help="another corpus whose train split joins the stream (repeatable), "
                             "e.g. one built with --sources samples")
    parser.add_argument("--out", type=Path, default=EMBEDDED_SAE_DIR)
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--widths", default="512,1024,2048,4096")
    parser.add_argument("--k", type=float, default=32)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--dead-window-tokens", type=int, default=2_000_000,
                        help="training tokens without firing after which a latent counts as "
                             "dead and the auxiliary loss trains it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: bf16 on CUDA)")
    parser.add_argument("--no-eval", action="store_true", help="skip evaluation and model card")
    parser.add_argument("--notes", default="", help="text appended to the model card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from core.pipeline.corpus import check_model_writes_text
    from core.models import ModelSpec, load_model

    lm = load_model(ModelSpec("embedded", device=args.device, dtype=args.dtype))
    check_model_writes_text(lm)
    cfg = TrainConfig(
        corpus_dir=args.corpus, extra_corpora=tuple(args.extra_corpus), out_dir=args.out,
        training_tokens=args.tokens,
        widths=tuple(int(w) for w in args.widths.split(",")), k=args.k,
        batch_tokens=args.batch_tokens, lr=args.lr, dead_window_tokens=args.dead_window_tokens,
    )
    start = time.perf_counter()
    paths = train_family(cfg, lm)
    seconds = time.perf_counter() - start
    for name, path in paths.items():
        log.info("saved %s to %s", name, path)
    if not args.no_eval:
        evaluate_and_report(cfg, lm, paths, seconds, args.notes)


def evaluate_and_report(cfg: TrainConfig, lm: LoadedModel, paths: dict[str, Path],
                        seconds: float, notes: str = "", density_tokens: int = 2_000_000) -> Path:
    """Evaluate the saved SAEs on the corpus's held-out split and write the model card."""
    from core.pipeline.evaluation import evaluate_family, heldout_splits
    from core.pipeline.report import merged_manifest, write_card
    from core.saes import SaeSpec, load_sae

    saes = {name: load_sae(SaeSpec("local", str(path)), lm) for name, path in paths.items()}
    results = evaluate_family(lm, saes, heldout_splits(Path(cfg.corpus_dir)),
                              context_size=cfg.context_size, max_tokens=density_tokens)
    manifest = merged_manifest(Path(cfg.corpus_dir), cfg.extra_corpora)
    settings = {k: v for k, v in recorded(cfg).items() if k not in ("corpus_dir", "out_dir")}
    card = write_card(cfg.out_dir, results, settings, manifest, str(lm.device), seconds, notes)
    log.info("model card: %s", card)
    return card


if __name__ == "__main__":
    main()
