"""Dreaming: search for fluent text that drives a latent as high as it goes, and watch it."""

import json
import random
import time
from dataclasses import fields, replace

import streamlit as st

from core.dreaming import (
    FLUENT_XE,
    MAX_WEIGHT,
    SEED_EXAMPLES,
    DreamConfig,
    Objective,
    best_fluent,
    corpus_seeds,
    default_config,
    dream,
    limits,
    seed_prompts,
)
from ui.dreaming_view import (
    alive_latents,
    best_html,
    buffer_table,
    corpus_max,
    corpus_top1,
    enc_dec_figure,
    front_table,
    history_csv,
    history_json,
    pareto_figure,
    progress_figure,
    reference,
    silent_note,
)
from ui.resources import index_for, names_of
from ui.safe_text import as_text
from ui.state import changed_query_param, current, link_params, set_query_param
from ui.tokens import TOKEN_CSS

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
        st.warning(as_text(f"Ignored latent={param!r}: {exc}"))
found_index = index_for(lm, sae) if sae is not None else None
if found_index is not None and found_index.problem:
    st.warning(as_text(f"Feature index unavailable ({found_index.problem}); no corpus "
                       "reference or alive latents until it is rebuilt."))
alive = alive_latents(found_index)
if sae is not None and not 0 <= st.session_state.get("dream_latent", -1) < sae.d_sae:
    # first visit, or a narrower SAE was loaded: start on a latent that fires
    st.session_state.dream_latent = alive[0] if alive else 0

# DreamConfig's fields that have a number input of their own (xe_max and init_prompt can be off,
# the other XE weights are a list, the activation scale and the seeds come from the index)
OWN_INPUTS = ("xe_max", "init_prompt", "stop", "xe_weights", "act_scale", "seeds")
SETTINGS = [f.name for f in fields(DreamConfig) if f.name not in OWN_INPUTS]
defaults = default_config(lm.device)
for name in SETTINGS:
    st.session_state.setdefault(f"dream_{name}", getattr(defaults, name))
st.session_state.setdefault("dream_xe_max", 0.0)
st.session_state.setdefault("dream_init", "")
st.session_state.setdefault("dream_xe_weights", ", ".join(f"{w:g}" for w in defaults.xe_weights))
st.session_state.setdefault("dream_scale", True)
st.session_state.setdefault("dream_corpus", True)
bounds = limits(lm.device)
# Settings that differ from the defaults travel in the URL as ?dream={"iters": 120, ...}.
BASE = {**{n: getattr(defaults, n) for n in SETTINGS}, "xe_max": 0.0, "init": "",
        "xe_weights": ", ".join(f"{w:g}" for w in defaults.xe_weights), "scale": True,
        "corpus": True}
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
        st.warning(as_text(f"Ignored the dreaming settings in the link: {exc}."))
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
    if found_index is not None and not found_index.problem and found_index.index is not None:
        names = names_of(found_index.index, found_index.name, lm, sae, [latent])[latent]
        st.caption(as_text(f"Latent {latent}: {names}"))
    if alive is not None and latent not in alive:
        st.warning(as_text(silent_note(found_index, latent)))

top_act = corpus_max(found_index, latent) if kind != "vector" else None
KEEP = {"persist_state": "session"}  # the settings survive visits to other pages
with st.expander("Parameters", expanded=False):
    st.caption(f"Defaults for {lm.device.type.upper()}: smaller batches and prompts on a CPU. "
               "Score = −activation / corpus top-1 + XE weight · (XE − free XE, if positive). "
               "Each XE weight keeps its "
               "own buffer of the best prompts; they take turns being mutated and share every "
               "scored candidate, so one run traces the whole activation-vs-fluency front.")
    if top_act:
        st.caption(f"Latent {latent} reaches {top_act:,.2f} on the indexed corpus: an XE weight "
                   f"of 0.05 makes one nat of XE cost 5% of that.")
    c = st.columns(4)
    c[0].number_input("Iterations", 1, bounds["iters"], key="dream_iters", step=1, **KEEP)
    c[1].number_input("Seed", 0, 2**31 - 1, key="dream_seed", step=1, **KEEP)
    c[2].number_input("Candidates per iteration (explore)", 1, bounds["explore"],
                      key="dream_explore", step=1, **KEEP)
    c[3].number_input("Buffer size", 1, bounds["buffer_size"], key="dream_buffer_size", step=1,
                      **KEEP)
    c = st.columns(4)
    c[0].number_input("Min tokens", 1, bounds["max_tokens"], key="dream_min_tokens", step=1,
                      **KEEP)
    c[1].number_input("Max tokens", 1, bounds["max_tokens"], key="dream_max_tokens", step=1,
                      **KEEP)
    c[2].number_input("GCG top-k", 1, bounds["gcg_topk"], key="dream_gcg_topk", step=1, **KEEP)
    c[3].number_input("Sampling top-k (sample_k2)", 1, bounds["sample_k2"],
                      key="dream_sample_k2", step=1, **KEEP)
    c = st.columns([1, 1.2, 0.9, 0.9, 0.9, 1.6])
    c[0].number_input("XE weight (main)", 0.0, MAX_WEIGHT, key="dream_xe_regularization",
                      step=0.01, format="%.3f", **KEEP)
    c[1].text_input("Other XE weights, explored at once", key="dream_xe_weights",
                    help="Comma-separated, e.g. 0, 0.5; empty for one weight only.", **KEEP)
    c[2].number_input("Free XE (nats)", 0.0, MAX_WEIGHT, key="dream_xe_free", step=0.5,
                      format="%.2f", help="XE up to this costs nothing; the weights apply to "
                      "the XE above it.", **KEEP)
    c[3].number_input("Fluent cap (0: off)", 0.0, MAX_WEIGHT, key="dream_fluent_cap",
                      step=0.25, format="%.2f", help="One more member of the population keeps "
                      "the strongest prompts whose XE is at most this, so the run searches "
                      f"right under the fluent line ({FLUENT_XE:g} nats).", **KEEP)
    c[4].number_input("XE cap (0: none)", 0.0, MAX_WEIGHT, key="dream_xe_max", step=0.5,
                      format="%.2f", help="Candidates above this XE are dropped by every "
                      "member.", **KEEP)
    c[5].checkbox("Scale by the corpus top-1", key="dream_scale",
                  disabled=not top_act,
                  help="Divides the activation by the latent's corpus top-1, so the XE weights "
                  "mean the same for every latent; needs the feature index.", **KEEP)
    c = st.columns(4)
    c[0].number_input("P(GCG swap)", 0.0, 1.0, key="dream_p_gcg", step=0.05, format="%.2f",
                      **KEEP)
    c[1].number_input("P(sampled insert)", 0.0, 1.0, key="dream_p_insert", step=0.05,
                      format="%.2f", **KEEP)
    c[2].number_input("P(sampled swap)", 0.0, 1.0, key="dream_p_swap", step=0.05,
                      format="%.2f", **KEEP)
    c[3].number_input("P(delete)", 0.0, 1.0, key="dream_p_delete", step=0.05, format="%.2f",
                      **KEEP)
    c = st.columns([2.5, 1.5], vertical_alignment="bottom")
    c[0].text_input("Initial prompt (empty: the model writes one)", key="dream_init", **KEEP)
    c[1].checkbox("Also start from the top corpus examples", key="dream_corpus",
                  disabled=not top_act,
                  help=f"Adds cuts of the latent's top {SEED_EXAMPLES} corpus examples (the last "
                  "max tokens and half as many, ending on the activating token) to the start: "
                  "fluent text that already drives the latent, so the search begins near the "
                  "corpus. The Pareto front marks them as corpus cuts; needs the feature index.",
                  **KEEP)
changed = {k: st.session_state[f"dream_{k}"] for k in BASE
           if st.session_state[f"dream_{k}"] != BASE[k]}
set_query_param("dream", json.dumps(changed, separators=(",", ":")) if changed else None,
                "dream_qp_settings")

b = st.columns([1, 1, 5])
start = b[0].button("Start", key="dream_start", type="primary", width="stretch")
b[1].button("Stop", key="dream_stop", width="stretch",
            help="Ends the run within the current iteration; what it found so far stays.")


def make_job() -> tuple[Objective, DreamConfig]:
    ss = st.session_state
    if kind == "vector":
        v = vectors[vname]
        objective = Objective.concept(v.name, v.hook_name, v.vector)
    else:
        objective = Objective.sae_latent(sae, int(ss.dream_latent), kind)
    try:
        weights = tuple(float(w) for w in ss.dream_xe_weights.replace(";", ",").split(",")
                        if w.strip())
    except ValueError:
        raise ValueError(f"Other XE weights {ss.dream_xe_weights!r}: type numbers separated by "
                         "commas, e.g. 0, 0.08 (or leave it empty).") from None
    scale = top_act if kind != "vector" and ss.dream_scale and top_act and top_act > 0 else None
    cfg = DreamConfig(**{n: ss[f"dream_{n}"] for n in SETTINGS}, xe_weights=weights,
                      act_scale=scale, xe_max=ss.dream_xe_max or None,
                      init_prompt=ss.dream_init or None)
    if kind != "vector" and ss.dream_corpus and top_act:
        top = found_index.index.latent(found_index.name, objective.latent).top
        cfg = replace(cfg, seeds=corpus_seeds(lm, [(ex.token_ids, ex.pos) for ex in top], cfg))
    cfg.check_device(lm.device)
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


# Seconds between two redraws of the live numbers (metrics, best prompts, tables), and of the
# plots. Every redraw of a plot mounts it afresh in the browser (its element id hashes the
# figure), so the plots redraw less often: a browser on a busy machine needs about a second to
# render the three, and redrawing them faster would replace them before they show. (A comment,
# not a docstring: Streamlit would print a bare string on the page.)
REDRAW_S = 1.0
PLOT_REDRAW_S = 3.0


def draw_numbers(history, ref, note: str) -> None:
    """The run's progress (``note``) and metrics, drawn from the same step so they never
    disagree."""
    last = history[-1]
    top1 = corpus_top1(ref)
    fluent = best_fluent(last.front)
    st.caption(note)
    m = st.columns(6)
    m[0].metric("Iteration", f"{last.iteration}")
    vs_top1 = None if top1 is None else (f"The delta is against the latent's corpus top-1, "
                                         f"{top1:,.2f}.")
    strongest = last.front[-1] if last.front else last.best  # the front is ordered by XE

    def found(p, what: str) -> str:
        return " ".join(filter(None, [f"{what}: {p.text!r}, XE {p.xe:.2f}.", vs_top1]))

    m[1].metric("Strongest activation", f"{strongest.activation:.2f}",
                delta=None if top1 is None else f"{strongest.activation - top1:+.2f} vs top-1",
                help=found(strongest, "The strongest prompt scored so far, at any XE"))
    m[2].metric(f"Best fluent (XE ≤ {FLUENT_XE:g})",
                "none yet" if fluent is None else f"{fluent.activation:.2f}",
                delta=None if fluent is None or top1 is None
                else f"{fluent.activation - top1:+.2f} vs top-1",
                help=None if fluent is None else found(fluent, "The strongest fluent prompt"))
    m[3].metric("Buffer's best", f"{last.best.activation:.2f}",
                help=f"The head of the buffer of XE weight {history[0].weight:g}: its best "
                     f"score, activation traded against XE. {last.best.text!r}, XE "
                     f"{last.best.xe:.2f}.")
    m[4].metric("Last iteration", f"{last.seconds:.2f} s",
                help=f"operation: {last.op}, {last.member}")
    m[5].metric("Candidates evaluated", f"{sum(len(s.activations) for s in history):,}")


def draw_plots(history, objective, ref, key: int, cfg: DreamConfig) -> None:
    st.plotly_chart(progress_figure(history, ref), width="stretch", key=f"dream_progress_{key}")
    left, right = st.columns(2)
    left.plotly_chart(pareto_figure(history, ref, cfg.fluent_cap), width="stretch",
                      key=f"dream_pareto_{key}")
    if objective.sae is not None:
        fig, _ = enc_dec_figure(history)
        right.plotly_chart(fig, width="stretch", key=f"dream_encdec_{key}")
    else:
        right.info("The encoder/decoder comparison needs an SAE latent objective.")


def draw_prompts(history, objective, ref, key: int, cfg: DreamConfig) -> None:
    """The best prompts, token-coloured, and the front and buffer tables."""
    last = history[-1]
    top1 = corpus_top1(ref)
    st.subheader("The buffer's best prompts")
    st.caption(f"The search's buffer for XE weight {history[0].weight:g}, best score first "
               "(activation traded against XE): what it mutates next. The Pareto front below "
               "holds the strongest prompt found at every XE.")
    scale = max(last.best.activation, top1 or 0, 1e-6)
    st.markdown(best_html(lm, objective, last, scale), unsafe_allow_html=True)
    numbers = {"activation": st.column_config.NumberColumn(format="%.2f"),
               "XE": st.column_config.NumberColumn(format="%.2f"),
               "score": st.column_config.NumberColumn(format="%.2f")}
    front, buffer = st.tabs([f"Pareto front ({len(last.front)})",
                             f"Buffer of XE weight {history[0].weight:g}"])
    front.dataframe(front_table(last, top1, set(seed_prompts(lm, cfg))), hide_index=True,
                    width="stretch", key=f"dream_front_{key}", column_config=numbers)
    buffer.dataframe(buffer_table(last), hide_index=True, width="stretch",
                     key=f"dream_buf_{key}", column_config=numbers)


class Panel:
    """The live panel in three slots, so the plots can redraw on their own, slower cadence."""

    def __init__(self) -> None:
        self.numbers, self.plots, self.prompts = st.empty(), st.empty(), st.empty()

    def draw(self, history, objective, ref, key: int, note: str, cfg: DreamConfig,
             plots: bool = True) -> None:
        with self.numbers.container():
            draw_numbers(history, ref, note)
        if plots:
            with self.plots.container():
                draw_plots(history, objective, ref, key, cfg)
        with self.prompts.container():
            draw_prompts(history, objective, ref, key, cfg)


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
    origin = "your prompt" if cfg.init_prompt else "the model's text"
    st.caption(f"Objective: **{objective.label}** at `{objective.hook_name}` · {cfg.iters} "
               f"iterations × {cfg.explore} candidates, {cfg.min_tokens}–{cfg.max_tokens} "
               f"tokens, XE weights {', '.join(f'{w:g}' for w in cfg.weights)}"
               + ("" if cfg.act_scale is None else f" × corpus top-1 ({cfg.act_scale:,.1f})")
               + (f", fluent cap {cfg.fluent_cap:g}" if cfg.fluent_cap > 0 else "")
               + f", seed {cfg.seed}"
               + (f" · starts from {origin} and {len(cfg.seeds)} cuts of the top corpus "
                  "examples" if cfg.seeds else ""))
    ref = reference(lm, found_index, objective)
    history = st.session_state.dream_history
    panel = Panel()

    def note(step, state: str) -> str:
        return f"{state}: iteration {step.iteration} of {cfg.iters} ({step.elapsed:.1f} s)"

    if run:
        status = st.empty()

        def checkpoint() -> bool:
            """A Streamlit interrupt point, called between scoring chunks: a Stop click ends
            the run here, within the iteration."""
            status.caption(f"Scoring iteration {len(history) + 1} of {cfg.iters}…")
            return False

        gen = dream(lm, objective, replace(cfg, stop=checkpoint))
        drawn = plotted = 0.0
        try:
            for step in gen:
                history.append(step)
                now = time.monotonic()
                if now - drawn > REDRAW_S:
                    plots = now - plotted > PLOT_REDRAW_S
                    panel.draw(history, objective, ref, step.iteration, note(step, "Running"),
                               cfg, plots=plots)
                    drawn = time.monotonic()
                    plotted = drawn if plots else plotted
        except ValueError as exc:
            st.session_state.dream_error = str(exc)
        finally:
            gen.close()  # also when a click (Stop) interrupts the run
        status.empty()
        if history:
            panel.draw(history, objective, ref, -2, note(history[-1], "Finished"), cfg)
    elif history:
        panel.draw(history, objective, ref, -1, note(history[-1], "Last run"), cfg)
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
    e[2].page_link("views/steering.py", label="Best text → Steering", icon=":material/tune:",
                   query_params=link_params(prompt=text))
    if objective.latent is not None:
        e[3].page_link("views/lookup.py", label="Best text → Lookup", icon=":material/search:",
                       query_params=link_params(latent=objective.latent, text=text))


live()
