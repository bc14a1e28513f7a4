"""The embedded family's model card: metrics per width, settings, corpus, density histogram."""

from __future__ import annotations

import json
from pathlib import Path

from core.density import DEAD_LOG10, DENSE_RATE, load_firing_counts, log10_density
from core.pipeline.evaluation import SaeMetrics, evaluate_family, heldout_splits

FIRING_COUNTS = "firing_counts.safetensors"
"""Beside the card: every latent's firing count on the density sample (``tokens`` in metadata);
``python -m core.index --density`` loads it so the app's dead/alive figures are these."""

TARGETS = {"fve": 0.88, "l0": 64, "dead_fraction": 0.02, "ce_increase": 0.25}


def density_plot(results: list[SaeMetrics], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    bins = [x / 4 for x in range(-28, 1)]
    for r in results:
        alive = [d for d in r.log10_density if d > DEAD_LOG10]
        ax.hist(alive, bins=bins, histtype="step", linewidth=1.6,
                label=f"{r.name} ({r.dead_fraction:.1%} dead)")
    ax.axvline(-1, color="grey", linestyle="--", linewidth=1)
    ax.text(-0.95, ax.get_ylim()[1] * 0.9, f"dense (>{DENSE_RATE:g})", fontsize=8, color="grey")
    ax.set_xlabel(f"log10 firing rate on {results[0].tokens:,} tokens never trained on")
    ax.set_ylabel("latents")
    ax.set_title("Feature density, embedded SAE family (layer 12 resid_post)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _verdict(r: SaeMetrics) -> list[str]:
    missed = []
    if r.fve < TARGETS["fve"]:
        missed.append(f"FVE {r.fve:.3f} < {TARGETS['fve']}")
    if r.l0 > TARGETS["l0"]:
        missed.append(f"L0 {r.l0:.1f} > {TARGETS['l0']}")
    if r.dead_fraction > TARGETS["dead_fraction"]:
        missed.append(f"dead {r.dead_fraction:.1%} > {TARGETS['dead_fraction']:.0%}")
    if r.ce_increase > TARGETS["ce_increase"]:
        missed.append(f"CE increase {r.ce_increase:.3f} > {TARGETS['ce_increase']}")
    return missed


def save_firing_counts(path: Path, results: list[SaeMetrics]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({r.name: torch.tensor(r.fires, dtype=torch.int64) for r in results}, str(path),
              metadata={"tokens": str(results[0].tokens)})


def write_card(out_dir: Path, results: list[SaeMetrics], train_cfg: dict, manifest: dict,
               device: str, seconds: float, notes: str = "", eval_device: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    density_plot(results, out_dir / "density.png")
    save_firing_counts(out_dir / FIRING_COUNTS, results)
    eval_device = eval_device or device
    (out_dir / "metrics.json").write_text(json.dumps(
        {"results": [r.summary() for r in results], "training": train_cfg,
         "device": device, "training_seconds": seconds, "evaluation_device": eval_device},
        indent=2))
    rows = "\n".join(
        f"| {r.name} | {r.d_sae:,} | {r.fve:.3f} | {r.l0:.1f} | {r.dead_fraction:.1%} | "
        f"{r.dense_fraction:.1%} | {r.ce_clean:.3f} | {r.ce_spliced:.3f} | {r.ce_zero:.3f} | "
        f"{r.ce_increase:+.3f} | {r.ce_recovered:.1%} |" for r in results
    )
    corpus_rows = "\n".join(
        f"| {split} | {source} | {v['documents']:,} | {v['tokens']:,} |"
        for split, sources in manifest.get("splits", {}).items()
        for source, v in sorted(sources.items())
    )
    widest = max(results, key=lambda r: r.d_sae)
    missed = _verdict(widest)
    verdict = ("all targets met." if not missed else "missed: " + "; ".join(missed) + ".")
    settings = "\n".join(f"- `{k}`: {v}" for k, v in train_cfg.items())
    if (out_dir / "PROVENANCE.md").exists():
        notes = ("## How this family was made\n\nThe exact commands, machine and versions, and how "
                 "to rebuild it: [PROVENANCE.md](PROVENANCE.md).\n\n" + notes)
    text = f"""# Embedded SAE family for Gemma 3 270M

Four SAEs at `blocks.12.hook_resid_post` (the output of decoder layer 12 of 18, the hook Gemma
Scope 2 uses for this model), trained together on one activation stream with sae_lens's
`MultiSAETrainer`. Load any of them with `SAE.load_from_disk("data/saes/w4096")`; the app offers
them as the default SAE source. Weights are float16.

## Metrics on text never trained on

FVE, L0, dead and dense on **{results[0].tokens:,} tokens** never trained on (the corpus's
held-out split, then its `unseen` split: documents past the end of the train split, with train's
source mix); CE loss (next-token cross-entropy in nats) on the first {results[0].ce_tokens:,}
held-out tokens. Dead: never fired on those {results[0].tokens:,} tokens; dense: fired on more
than one token in {1 / DENSE_RATE:g}. BOS positions (window starts and document separators) are
excluded everywhere and kept clean when splicing (the SAEs are not trained on them). Evaluated on
{eval_device}. Definitions: `core/pipeline/evaluation.py`, `core/density.py`; per-latent firing counts in
`{FIRING_COUNTS}`.

| SAE | width | FVE | L0 | dead | dense | CE clean | CE spliced | CE zero-abl. | CE increase | CE recovered |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{rows}

Targets for the 4096-wide SAE (FVE ≥ {TARGETS['fve']} at L0 ≤ {TARGETS['l0']}, dead ≤
{TARGETS['dead_fraction']:.0%}, CE increase ≤ {TARGETS['ce_increase']} nats): {verdict}

![density](density.png)

## Architecture

BatchTopK (k = {train_cfg.get('k')}) during training, saved as JumpReLU with the learned global
threshold, as sae_lens does. Reasons: L0 is set directly instead of tuned through an L1
coefficient, which matters when every width must land near the same sparsity from one short run;
the auxiliary top-k loss revives latents that would otherwise die on a small token budget; and the
JumpReLU form keeps inference per-token (no batch dependence) for the pages.

## Training

Trained on {device or "an unrecorded device"} in {seconds / 60:.1f} min. Settings:

{settings}

## Corpus

Built by `python -m core.pipeline.corpus` (sources and licences in `data/NOTICE.md`):

| split | source | documents | tokens |
| --- | --- | ---: | ---: |
{corpus_rows}

{notes}
"""
    path = out_dir / "README.md"
    path.write_text(text)
    return path


def merged_manifest(corpus_dir: Path, extra_corpora=()) -> dict:
    """A corpus's manifest, with each extra corpus's train split added as ``train (NAME)``."""
    def read(corpus: Path) -> dict:
        path = Path(corpus) / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else {}

    manifest = read(corpus_dir)
    for extra in extra_corpora:
        train = read(extra).get("splits", {}).get("train")
        if train:
            manifest.setdefault("splits", {})[f"train ({Path(extra).resolve().name})"] = train
    return manifest


def saved_metrics(saes_dir: Path) -> list[SaeMetrics]:
    """The metrics a card was written from (``metrics.json`` plus the firing counts)."""
    rows = json.loads((saes_dir / "metrics.json").read_text())["results"]
    counts, tokens = load_firing_counts(saes_dir / FIRING_COUNTS)
    out = []
    for row in rows:
        fires = counts[row["name"]]
        row = {k: v for k, v in row.items() if k != "ce_increase"}
        out.append(SaeMetrics(**row, fires=fires.tolist(),
                              log10_density=log10_density(fires, tokens)))
    return out


def main(argv: list[str] | None = None) -> None:
    """Re-evaluate a saved family and rewrite its model card (training settings kept)."""
    import argparse
    import logging

    from core.models import ModelSpec, load_model
    from core.saes import EMBEDDED_SAE_DIR, SaeSpec, load_sae

    parser = argparse.ArgumentParser(description="Evaluate an SAE family and write its card.")
    parser.add_argument("--corpus", type=Path, required=True,
                        help="corpus directory (heldout.jsonl, optionally unseen.jsonl)")
    parser.add_argument("--saes", type=Path, default=EMBEDDED_SAE_DIR)
    parser.add_argument("--extra-corpus", type=Path, action="append", default=[],
                        help="a corpus whose train split the family was also trained on "
                             "(its rows join the card's corpus table)")
    parser.add_argument("--density-tokens", type=int, default=2_000_000,
                        help="tokens for FVE, L0 and density (held-out, then unseen)")
    parser.add_argument("--ce-tokens", type=int, default=32_768)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--notes", type=Path, default=None,
                        help="a Markdown file appended to the card (e.g. how the family was made)")
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite the card from the saved metrics and firing counts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dirs = sorted((p for p in args.saes.iterdir() if (p / "cfg.json").exists()),
                  key=lambda p: json.loads((p / "cfg.json").read_text())["d_sae"])
    old = args.saes / "metrics.json"
    saved = json.loads(old.read_text()) if old.exists() else {}
    if args.card_only:
        results = saved_metrics(args.saes)
        eval_device = saved.get("evaluation_device", "")
    else:
        lm = load_model(ModelSpec("embedded", device=args.device, dtype=args.dtype))
        saes = {p.name: load_sae(SaeSpec("local", str(p)), lm) for p in dirs}
        results = evaluate_family(lm, saes, heldout_splits(args.corpus),
                                  max_tokens=args.density_tokens, ce_tokens=args.ce_tokens)
        eval_device = f"{lm.device} ({lm.dtype})"
    meta = json.loads((dirs[-1] / "cfg.json").read_text())["metadata"]
    trained_on = saved.get("device") or meta.get("training_device", "")
    settings = {k: v for k, v in meta.get("training_config", {}).items()
                if k not in ("corpus_dir", "out_dir")}
    manifest = merged_manifest(args.corpus, args.extra_corpus)
    notes = args.notes.read_text() if args.notes else ""
    card = write_card(args.saes, results, settings, manifest, trained_on,
                      meta.get("training_seconds", 0.0), notes, eval_device=eval_device)
    logging.getLogger(__name__).info("model card: %s", card)


if __name__ == "__main__":
    main()
