"""Dreaming: search for fluent text that drives a latent as high as it goes, and watch it."""

import json
import random
import time
from dataclasses import fields

import streamlit as st

from core.dreaming import DreamConfig, Objective, default_config, dream
from ui.dreaming_view import (
    alive_latents,
    best_html,
    buffer_table,
    corpus_max,
    enc_dec_figure,
    history_csv,
    history_json,
    pareto_figure,
    progress_figure,
    reference,
)
from ui.resources import index_for
from ui.state import changed_query_param, current, link_params, page_guard, set_query_param
from ui.tokens import TOKEN_CSS

page_guard()
st.title("Dreaming")
st.markdown(TOKEN_CSS, unsafe_allow_html=True)

lm, sae = current()
if lm is None:
    st.info("Load a model in the sidebar to dream.")
    st.stop()
vectors = st.session_state.get("steer_vectors") or {}
KINDS = {"encoder": "SAE latent · encoder pre-activation",
         "decoder": "SAE latent · decoder direction",
         "vector": "Concept vector (from Steering)"}
kinds = (["encoder", "decoder"] if sae is not None else []) + (["vector"] if vectors else [])
if not kinds:
    st.info("Load an SAE in the sidebar (or build a concept vector on the Steering page) to "
            "choose what to dream about.")
    st.stop()

# --- what to optimise -------------------------------------------------------------------------

param = changed_query_param("latent", "dream_qp") if sae is not None else None
if param is not None:
    try:
        if not param.strip().lstrip("-").isdigit():
            raise ValueError("use a whole number.")
        st.session_state.dream_latent = Objective.sae_latent(sae, int(param)).latent
    except ValueError as exc:
        st.warning(f"Ignored latent={param!r}: {exc}")
found_index = index_for(lm, sae) if sae is not None else None
if found_index is not None and found_index.problem:
    st.warning(f"Feature index unavailable ({found_index.problem}); no corpus reference or "
               "alive latents until it is rebuilt.")
alive = alive_latents(found_index)
if sae is not None and not 0 <= st.session_state.get("dream_latent", -1) < sae.d_sae:
    # first visit, or a narrower SAE was loaded: start on a latent that fires
    st.session_state.dream_latent = alive[0] if alive else 0

# DreamConfig's fields that have a number input of their own (xe_max and init_prompt can be off)
SETTINGS = [f.name for f in fields(DreamConfig) if f.name not in ("xe_max", "init_prompt", "stop")]
defaults = default_config(lm.device)
for name in SETTINGS:
    st.session_state.setdefault(f"dream_{name}", getattr(defaults, name))
st.session_state.setdefault("dream_xe_max", 0.0)
st.session_state.setdefault("dream_init", "")
# Settings that differ from the defaults travel in the URL as ?dream={"iters": 120, ...}.
BASE = {**{n: getattr(defaults, n) for n in SETTINGS}, "xe_max": 0.0, "init": ""}
sent = changed_query_param("dream", "dream_qp_settings")
if sent is not None:
    try:
        wanted = json.loads(sent)
        if not isinstance(wanted, dict) or set(wanted) - set(BASE):
            raise ValueError(f"use a JSON object with keys among {', '.join(BASE)}")
        wanted = {k: type(BASE[k])(v) for k, v in wanted.items()}
        merged = {**{k: st.session_state[f"dream_{k}"] for k in BASE}, **wanted}
        DreamConfig(**{n: merged[n] for n in SETTINGS}, xe_max=merged["xe_max"] or None,
                    init_prompt=merged["init"] or None)  # refuses bad values with the fix
    except (ValueError, TypeError) as exc:
        st.warning(f"Ignored the dreaming settings in the link: {exc}.")
    else:
        for k, v in wanted.items():
            st.session_state[f"dream_{k}"] = v



def set_latent(value: int) -> None:
    st.session_state.dream_latent = value


top = st.columns([2, 1.2, 0.8], vertical_alignment="bottom")
kind = top[0].radio("Objective", kinds, format_func=KINDS.get, horizontal=True,
                    key="dream_objective", persist_state="session")
if kind == "vector":
    vname = top[1].selectbox("Concept vector", sorted(vectors), key="dream_vector",
                             persist_state="session")
else:
    latent = top[1].number_input(f"Latent (0 to {sae.d_sae - 1})", 0, sae.d_sae - 1,
                                 key="dream_latent", persist_state="session")
    top[2].button("Random alive latent", key="dream_random", disabled=not alive,
                  on_click=lambda: set_latent(random.choice(alive)), width="stretch",
                  help=None if alive else "Needs the SAE's feature index (see Feature lookup).")
    set_query_param("latent", str(latent), "dream_qp")
    if alive is not None and latent not in alive:
        st.warning(f"Latent {latent} never fired on the indexed corpus (dead there); dreaming "
                   "may still find text that drives it up, but there is no corpus reference.")

KEEP = {"persist_state": "session"}  # the settings survive visits to other pages
with st.expander("Parameters", expanded=False):
    st.caption(f"Defaults for {lm.device.type.upper()}: smaller batches and prompts on a CPU. "
               "Score = −activation + XE weight · XE; the best `buffer` prompts are kept and the "
               "best one is mutated each iteration.")
    if kind != "vector":
        top_act = corpus_max(found_index, latent)
        if top_act:
            st.caption(f"Latent {latent} reaches {top_act:,.2f} on the indexed corpus; XE is in "
                       "nats (about 2–10), so an XE weight near "
                       f"{top_act / 20:,.2g} makes one nat cost 5% of that.")
    c = st.columns(4)
    c[0].number_input("Iterations", key="dream_iters", step=1, **KEEP)
    c[1].number_input("Seed", key="dream_seed", step=1, **KEEP)
    c[2].number_input("Candidates per iteration (explore)", key="dream_explore", step=1, **KEEP)
    c[3].number_input("Buffer size", key="dream_buffer_size", step=1, **KEEP)
    c = st.columns(4)
    c[0].number_input("Min tokens", key="dream_min_tokens", step=1, **KEEP)
    c[1].number_input("Max tokens", key="dream_max_tokens", step=1, **KEEP)
    c[2].number_input("GCG top-k", key="dream_gcg_topk", step=1, **KEEP)
    c[3].number_input("Sampling top-k (sample_k2)", key="dream_sample_k2", step=1, **KEEP)
    c = st.columns(6)
    c[0].number_input("XE weight", key="dream_xe_regularization", step=0.1, format="%.3f", **KEEP)
    c[1].number_input("XE cap (0: none)", key="dream_xe_max", step=0.5, format="%.2f", **KEEP)
    c[2].number_input("P(GCG swap)", key="dream_p_gcg", step=0.05, format="%.2f", **KEEP)
    c[3].number_input("P(sampled insert)", key="dream_p_insert", step=0.05, format="%.2f", **KEEP)
    c[4].number_input("P(sampled swap)", key="dream_p_swap", step=0.05, format="%.2f", **KEEP)
    c[5].number_input("P(delete)", key="dream_p_delete", step=0.05, format="%.2f", **KEEP)
    st.text_input("Initial prompt (empty: random tokens)", key="dream_init", **KEEP)
changed = {k: st.session_state[f"dream_{k}"] for k in BASE
           if st.session_state[f"dream_{k}"] != BASE[k]}
set_query_param("dream", json.dumps(changed, separators=(",", ":")) if changed else None,
                "dream_qp_settings")

b = st.columns([1, 1, 5])
start = b[0].button("Start", key="dream_start", type="primary", width="stretch")
b[1].button("Stop", key="dream_stop", width="stretch",
            help="Ends the run after the current iteration; what it found so far stays.")


def make_job() -> tuple[Objective, DreamConfig]:
    ss = st.session_state
    if kind == "vector":
        v = vectors[vname]
        objective = Objective.concept(v.name, v.hook_name, v.vector)
    else:
        objective = Objective.sae_latent(sae, int(ss.dream_latent), kind)
    cfg = DreamConfig(**{n: ss[f"dream_{n}"] for n in SETTINGS},
                      xe_max=ss.dream_xe_max or None, init_prompt=ss.dream_init or None)
    return objective, cfg


if start:
    try:
        job = make_job()
    except ValueError as exc:
        st.error(str(exc))
    else:
        st.session_state.dream_job = (*job, lm)
        st.session_state.dream_history = []
        st.session_state.dream_error = None
        st.session_state.dream_pending = True


# --- live view --------------------------------------------------------------------------------


def draw(history, objective, ref, key: int, note: str) -> None:
    """The live panel; ``note`` (the run's progress) is drawn with the metrics, from the same
    step, so the two never disagree."""
    last = history[-1]
    st.caption(note)
    m = st.columns(5)
    m[0].metric("Iteration", f"{last.iteration}")
    m[1].metric("Best activation", f"{last.best.activation:.2f}",
                delta=None if ref is None or ref.max_act is None
                else f"{last.best.activation - ref.max_act:+.2f} vs corpus max")
    m[2].metric("XE of the best", f"{last.best.xe:.2f}")
    m[3].metric("Last iteration", f"{last.seconds:.2f} s", help=f"operation: {last.op}")
    m[4].metric("Candidates evaluated", f"{sum(len(s.activations) for s in history):,}")
    st.plotly_chart(progress_figure(history, ref), width="stretch", key=f"dream_progress_{key}")
    left, right = st.columns(2)
    left.plotly_chart(pareto_figure(history, ref), width="stretch", key=f"dream_pareto_{key}")
    if objective.sae is not None:
        fig, _ = enc_dec_figure(history)
        right.plotly_chart(fig, width="stretch", key=f"dream_encdec_{key}")
    else:
        right.info("The encoder/decoder comparison needs an SAE latent objective.")
    st.subheader("Best prompts so far")
    scale = max(last.best.activation, (ref.max_act or 0) if ref else 0, 1e-6)
    st.markdown(best_html(lm, objective, last, scale), unsafe_allow_html=True)
    st.dataframe(buffer_table(last), hide_index=True, width="stretch", key=f"dream_buf_{key}",
                 column_config={"activation": st.column_config.NumberColumn(format="%.2f"),
                                "XE": st.column_config.NumberColumn(format="%.2f"),
                                "score": st.column_config.NumberColumn(format="%.2f")})


@st.fragment
def live() -> None:
    run = st.session_state.pop("dream_pending", False)  # a fragment rerun never restarts it
    job = st.session_state.get("dream_job")
    if job is None:
        st.info("Pick a latent and press Start. Each iteration mutates the best prompt, scores "
                "a batch of candidates and keeps the best; the plots update as it goes.")
        return
    objective, cfg, job_lm = job
    if job_lm is not lm or (objective.sae is not None and objective.sae is not sae):
        st.info("The model or SAE changed since the last run; press Start to dream again.")
        return
    st.caption(f"Objective: **{objective.label}** at `{objective.hook_name}` · {cfg.iters} "
               f"iterations × {cfg.explore} candidates, {cfg.min_tokens}–{cfg.max_tokens} tokens, "
               f"XE weight {cfg.xe_regularization}, seed {cfg.seed}")
    ref = reference(lm, found_index, objective)
    history = st.session_state.dream_history
    panel = st.empty()
    def note(step, state: str) -> str:
        return f"{state}: iteration {step.iteration} of {cfg.iters} ({step.elapsed:.1f} s)"

    if run:
        gen = dream(lm, objective, cfg)
        drawn = 0.0
        try:
            for step in gen:
                history.append(step)
                if time.monotonic() - drawn > 0.3:
                    with panel.container():
                        draw(history, objective, ref, step.iteration, note(step, "Running"))
                    drawn = time.monotonic()
        except ValueError as exc:
            st.session_state.dream_error = str(exc)
        finally:
            gen.close()  # also when a click (Stop) interrupts the run
        if history:
            with panel.container():
                draw(history, objective, ref, -2, note(history[-1], "Finished"))
    elif history:
        with panel.container():
            draw(history, objective, ref, -1, note(history[-1], "Last run"))
    if st.session_state.get("dream_error"):
        st.error(st.session_state.dream_error)
    if not history:
        return
    last = history[-1]
    if not run and last.iteration < cfg.iters:
        st.caption(f"Stopped after {last.iteration} of {cfg.iters} iterations.")
    meta = {"objective": objective.label, "kind": objective.kind, "hook": objective.hook_name,
            "latent": objective.latent, "model": lm.name,
            "config": {k: v for k, v in vars(cfg).items() if k != "stop"}}
    e = st.columns([1, 1, 1.4, 1.4])
    e[0].download_button("History as CSV", history_csv(history), file_name="dream-history.csv",
                         mime="text/csv", key="dream_csv", width="stretch",
                         on_click="ignore")
    e[1].download_button("History as JSON", history_json(history, meta),
                         file_name="dream-history.json", mime="application/json",
                         key="dream_json", width="stretch", on_click="ignore")
    text = last.best.text
    e[2].page_link("pages/steering.py", label="Best text → Steering", icon=":material/tune:",
                   query_params=link_params(prompt=text))
    if objective.latent is not None:
        e[3].page_link("pages/lookup.py", label="Best text → Lookup", icon=":material/search:",
                       query_params=link_params(latent=objective.latent, text=text))


live()
