"""Peer check: the feature index against sae-dashboard on the same tiny model, SAE and tokens.

sae-dashboard 0.8 pins transformers < 4.57 and transformer-lens < 3, so it lives in a virtual
environment of its own; this script runs it there (``--peer-python``) on a tiny random GPT-2
whose weights both sides load, and compares each latent's top activations and the throughput.

    python3 -m venv /tmp/sdvenv
    /tmp/sdvenv/bin/pip install torch==2.13.0 sae-dashboard==0.8.0 pyarrow==18.1.0
    /tmp/sdvenv/bin/pip uninstall -y torchvision     # its wheel does not match this torch
    python benchmarks/peer_sae_dashboard.py --peer-python /tmp/sdvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEER = r'''
import json, sys, time, torch
from pathlib import Path
from transformers import GPT2LMHeadModel
from sae_lens import SAE, HookedSAETransformer
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from sae_dashboard.sae_vis_data import SaeVisConfig
from sae_dashboard.sae_vis_runner import SaeVisRunner

work = Path(sys.argv[1])
hf = GPT2LMHeadModel.from_pretrained(work / "model").eval()
c = hf.config
cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head,
    d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
    act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
    original_architecture="GPT2LMHeadModel", positional_embedding_type="standard", device="cpu")
model = HookedSAETransformer(cfg)
model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False,
    center_writing_weights=False, center_unembed=False, fold_value_biases=False)
sae = SAE.load_from_disk(work / "sae")
tokens = torch.tensor(json.loads((work / "tokens.json").read_text()))
vis_cfg = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name, features=list(range(sae.cfg.d_sae)),
                       minibatch_size_features=64, minibatch_size_tokens=16,
                       ignore_tokens={int(tokens[0, 0])}, device="cpu", verbose=False)
start = time.perf_counter()
data = SaeVisRunner(vis_cfg).run(encoder=sae, model=model, tokens=tokens)
seconds = time.perf_counter() - start
tops = {}
for feat, fd in data.feature_data_dict.items():
    groups = fd.sequence_data.seq_group_data
    top = [g for g in groups if "TOP" in g.title.upper()]
    vals = sorted((max(s.feat_acts) for s in top[0].seq_data), reverse=True) if top else []
    tops[int(feat)] = vals
print(json.dumps({"seconds": seconds, "tops": tops}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peer-python", required=True)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    args = parser.parse_args()

    import torch

    from core.index import IndexConfig, build_index
    from core.feature_index import FeatureIndex
    from core.models import ModelSpec, load_model
    from core.saes import SaeSpec, load_sae
    from tests.conftest import build_gpt2, build_sae, build_tokenizer, save_model_dir

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = build_tokenizer()
        save_model_dir(build_gpt2(tok), tok, work / "model", "tiny-gpt2")
        build_sae(32, 64, "blocks.1.hook_resid_post", "tiny-gpt2").save_model(work / "sae")
        gen = torch.Generator().manual_seed(0)
        body = torch.randint(3, len(tok), (args.windows, args.context - 1), generator=gen)
        rows = torch.cat([torch.full((args.windows, 1), tok.bos_token_id), body], 1).tolist()
        (work / "tokens.json").write_text(json.dumps(rows))
        (work / "peer.py").write_text(PEER)
        out = subprocess.run([args.peer_python, str(work / "peer.py"), str(work)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"sae-dashboard run failed:\n{out.stderr[-3000:]}")
        peer = json.loads(out.stdout.strip().splitlines()[-1])

        lm = load_model(ModelSpec("local", str(work / "model"), device="cpu"))
        sae = load_sae(SaeSpec("local", str(work / "sae")), lm)
        k = max(len(v) for v in peer["tops"].values())
        start = time.perf_counter()
        path = build_index(lm, {"s": sae}, None, work / "ours.duckdb",
                           IndexConfig(context_size=args.context, top_k=max(k, 1),
                                       max_tokens=args.windows * args.context, batch_windows=16),
                           token_rows=rows)
        ours_s = time.perf_counter() - start
        index = FeatureIndex(path)
        agree, compared, worst, edge = 0, 0, 0.0, 0
        for feat, peer_vals in peer["tops"].items():
            top = index.latent("s", int(feat)).top
            ours = [ex.value for ex in top][: len(peer_vals)]
            peer_vals = [v for v in peer_vals if v > 0]
            if not peer_vals and not ours:
                continue
            compared += 1
            n = min(len(ours), len(peer_vals))
            diff = max((abs(a - b) for a, b in zip(ours[:n], peer_vals[:n])), default=0.0)
            worst = max(worst, diff)
            same = n > 0 and abs(ours[0] - peer_vals[0]) < 1e-4
            agree += int(same)
            # sae-dashboard leaves the first and last 5 positions of a window out of its top
            # examples (its default buffer); the index does not.
            edge += int(not same and bool(top) and not 5 <= top[0].pos < args.context - 5)
    tokens = args.windows * args.context
    print(json.dumps({
        "tokens": tokens, "latents_compared": compared,
        "same_max_activation": agree, "differing_with_our_max_in_edge_buffer": edge,
        "max_abs_diff_top_values": worst,
        "sae_dashboard_s": round(peer["seconds"], 2), "index_s": round(ours_s, 2),
        "sae_dashboard_tokens_per_s": round(tokens / peer["seconds"]),
        "index_tokens_per_s": round(tokens / ours_s),
    }, indent=2))


if __name__ == "__main__":
    main()
