"""Explain many latents from the command line, into the labels database the app reads.

    python -m core.explain patchscope --sae embedded:w4096 --latents 12,40 --norms 0.5,1,2
    python -m core.explain autointerp --sae embedded:w4096 --top 100 --concurrency 4
    python -m core.explain neuronpedia --sae release:gpt2-small-res-jb/blocks.8.hook_resid_pre
    python -m core.explain export --sae embedded:w4096 --out w4096-explanations.csv

Latents come from ``--latents`` or ``--top N`` (the N most often firing in the feature index).
Patch-scoping norms are multiples of the typical activation norm at the patched hook unless
``--absolute``. Autointerp reads the endpoint from the environment (``SAE_WORKBENCH_LLM_*``,
see core.autointerp), prints the cost estimate and asks before a run over 20 latents (``--yes``
skips the question); results already stored are not recomputed unless ``--redo``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.feature_index import index_location, open_index
from core.labels import LabelStore, auto_labels, explanation_table
from core.models import load_model, parse_model_param
from core.saes import load_sae, parse_sae_param

log = logging.getLogger(__name__)


def pick_latents(args, index, name: str) -> list[int]:
    if args.latents:
        try:
            latents = [int(x) for x in args.latents.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--latents {args.latents!r}: give latent ids separated by commas")
        return [index.check_latent(name, i) for i in latents]
    table = index.summary(name).sort_values("firing_count", ascending=False)
    return [int(i) for i in table["latent"].head(args.top)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Explain SAE latents (see module docstring).")
    parser.add_argument("what", choices=["patchscope", "autointerp", "neuronpedia", "export"])
    parser.add_argument("--model", default="embedded", help="embedded | hub:<id> | local:<path>")
    parser.add_argument("--sae", required=True,
                        help="embedded:<name> | release:<release>/<id> | np:<id> | local:<path>")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--latents", default="", help="comma-separated latent ids")
    parser.add_argument("--top", type=int, default=10, help="else the N most often firing")
    parser.add_argument("--labels", type=Path, default=None,
                        help="labels database (default: the app's, in the cache directory)")
    # patch scoping
    parser.add_argument("--preset", choices=["base", "chat"], default="base")
    parser.add_argument("--prompt", default=None, help="overrides the preset's prompt")
    parser.add_argument("--hook", default=None, help="where to patch (default: the SAE's hook)")
    parser.add_argument("--norms", default="0.5,1,2")
    parser.add_argument("--absolute", action="store_true", help="--norms are absolute norms")
    parser.add_argument("--tokens", type=int, default=16)
    # autointerp
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--yes", action="store_true")
    # export
    parser.add_argument("--out", type=Path, default=None, help=".csv or .json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    to_stdout = logging.StreamHandler(sys.stdout)  # the command's results, one per line
    log.addHandler(to_stdout)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        _run(args)
    finally:
        log.removeHandler(to_stdout)


def _run(args: argparse.Namespace) -> None:
    spec = parse_sae_param(args.sae)
    if spec is None:
        raise SystemExit("--sae none has no latents to explain")
    lm = load_model(parse_model_param(args.model, device=args.device))
    sae = load_sae(spec, lm)
    store = LabelStore(args.labels)
    scope = LabelStore.scope(lm.name, spec)

    if args.what == "neuronpedia":
        from core.neuronpedia import import_explanations

        if not sae.neuronpedia_id:
            raise SystemExit(f"{spec.label} has no Neuronpedia id (only sae_lens releases that "
                             "Neuronpedia hosts do).")
        stored, skipped = import_explanations(store, scope, sae.neuronpedia_id, sae.d_sae)
        log.info(f"stored {stored} Neuronpedia explanations ({skipped} records skipped)")
        return

    path, name = index_location(lm, sae)
    index = open_index(path)

    if args.what == "export":
        table = explanation_table(store.explanations(scope), auto_labels(index, name,
                                                                         lm.tokenizer))
        if args.out is None or args.out.suffix not in (".csv", ".json"):
            raise SystemExit("--out must name a .csv or .json file")
        if args.out.suffix == ".csv":
            table.to_csv(args.out, index=False)
        else:
            table.to_json(args.out, orient="records", indent=1)
        log.info(f"wrote {len(table)} explanations to {args.out}")
        return

    latents = pick_latents(args, index, name)
    if args.what == "patchscope":
        from core.patch_scoping import (PROMPTS, ScopeConfig, as_explanations, scope_many,
                                        typical_norm)

        prompt, prefix, chat = PROMPTS[args.preset]
        base = ScopeConfig(prompt=args.prompt or prompt, answer_prefix=prefix, chat=chat,
                           hook=args.hook, norms=(1.0,), max_new_tokens=args.tokens)
        factors = [float(x) for x in args.norms.split(",")]
        unit = 1.0 if args.absolute else typical_norm(lm, sae, base)
        cfg = ScopeConfig(prompt=base.prompt, answer_prefix=prefix, chat=chat, hook=args.hook,
                          norms=tuple(float(f"{f * unit:.3g}") for f in factors),
                          max_new_tokens=args.tokens)
        words = auto_labels(index, name, lm.tokenizer)

        def report(i, n, res):
            log.info(f"[{i}/{n}] #{res.latent} (fires on: {words.get(res.latent, '-')})")
            for norm, text in zip(res.norms, res.texts):
                log.info(f"    norm {norm:g}: {text}")
            store.put(scope, as_explanations(res, lm, sae, cfg))

        scope_many(lm, sae, latents, cfg, report)
        return

    from core.autointerp import AutoInterpConfig, Endpoint, estimate, explain_many

    ep = Endpoint.from_env()
    if ep is None:
        raise SystemExit("No autointerp endpoint: set SAE_WORKBENCH_LLM_BASE_URL (and _MODEL, "
                         "_API_KEY), or OPENAI_API_KEY for OpenAI.")
    cfg = AutoInterpConfig()
    est = estimate(index, name, latents, lm.tokenizer, cfg)
    log.info(f"{est.latents} latents, {est.requests} requests to {ep.where} ({ep.model}), about "
          f"{est.prompt_tokens:,} prompt and {est.completion_tokens:,} completion tokens")
    if len(latents) > 20 and not args.yes and input("go on? [y/N] ").strip().lower() != "y":
        return
    rep = explain_many(ep, index, name, latents, lm.tokenizer, cfg, store, scope,
                       redo=args.redo, concurrency=args.concurrency,
                       progress=lambda i, n, m: log.info(f"[{i}/{n}] {m}"))
    log.info(f"explained {len(rep.done)}, skipped {len(rep.skipped)} already explained, "
          f"failed {len(rep.failed)} in {rep.seconds:.1f} s")
    for latent, why in list(rep.failed.items())[:10]:
        log.info(f"  #{latent}: {why}")
    if rep.stopped:
        raise SystemExit(rep.stopped)


if __name__ == "__main__":
    main()
