"""Session state, query parameters and the loaders shared by every page.

The model and SAEs are loaded once per process into one bounded pool (``core.pool``) shared by
every browser session; hooks on them only ever go through ``core.hooks``. A link preselects a
model or SAE; what the pool does not hold yet loads only when the user presses Load.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from urllib.parse import urlencode

import psutil
import streamlit as st

from core.models import (
    LoadedModel,
    ModelSpec,
    embedded_model_dir,
    embedded_ready,
    model_param,
    parse_model_param,
)
from core.pool import (
    ModelPool,
    check_link_path,
    link_may_load_model,
    link_may_load_sae,
    model_key,
)
from core.saes import LoadedSAE, SaeSpec, embedded_saes, parse_sae_param, sae_param

MODEL_SOURCES = {"embedded": "Embedded default", "hub": "Hub id", "local": "Local directory"}
SAE_SOURCES = {
    "embedded": "Embedded family",
    "release": "sae_lens release",
    "neuronpedia": "Neuronpedia id",
    "local": "Local directory",
    "none": "No SAE",
}
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Choice:
    """What the sidebar asked for; mirrored into the URL."""

    model: ModelSpec
    sae: SaeSpec | None


def default_choice() -> Choice:
    """The embedded model and the widest embedded SAE, or what ``SAE_WORKBENCH_MODEL`` says."""
    env_model = os.environ.get("SAE_WORKBENCH_MODEL", "")
    model = parse_model_param(env_model) if env_model else ModelSpec()
    env_sae = os.environ.get("SAE_WORKBENCH_SAE", "")
    if env_sae:
        sae = parse_sae_param(env_sae)
    else:
        shipped = embedded_saes() if model.source == "embedded" else []
        sae = SaeSpec("embedded", shipped[-1]) if shipped else None
    return Choice(model, sae)


# --- query parameters -------------------------------------------------------------------------


def choice_from_query(params: dict[str, str]) -> tuple[Choice, list[str]]:
    """The choice a link asks for; each invalid parameter is ignored with a notice, and so is a
    ``local:`` path outside the directories the operator allows."""
    base = default_choice()
    notices: list[str] = []
    device, dtype = base.model.device, base.model.dtype
    if "device" in params:
        if params["device"] in DEVICES:
            device = params["device"]
        else:
            notices.append(f"Ignored device={params['device']!r}: use one of {', '.join(DEVICES)}.")
    if "dtype" in params:
        if params["dtype"] in DTYPES:
            dtype = params["dtype"]
        else:
            notices.append(f"Ignored dtype={params['dtype']!r}: use one of {', '.join(DTYPES)}.")
    model = ModelSpec(base.model.source, base.model.name, device=device, dtype=dtype)
    if "model" in params:
        try:
            model = parse_model_param(params["model"], device, dtype)
            if model.source == "local" and model_param(model) != model_param(base.model):
                check_link_path(model.name, "model")
        except ValueError as exc:
            notices.append(f"Ignored {exc}")
            model = ModelSpec(base.model.source, base.model.name, device=device, dtype=dtype)
    sae = base.sae if model.source == base.model.source and model.name == base.model.name else None
    if "sae" in params:
        try:
            sae = parse_sae_param(params["sae"])
            if sae is not None and sae.source == "local" and sae != base.sae:
                check_link_path(sae.name, "sae")
        except ValueError as exc:
            notices.append(f"Ignored {exc}")
            sae = base.sae if model.source == base.model.source and model.name == \
                base.model.name else None
    return Choice(model, sae), notices


def mirror_to_query(choice: Choice) -> None:
    params = {"model": model_param(choice.model), "sae": sae_param(choice.sae)}
    if choice.model.device != "auto":
        params["device"] = choice.model.device
    if choice.model.dtype != "auto":
        params["dtype"] = choice.model.dtype
    for key, value in params.items():
        if st.query_params.get(key) != value:
            st.query_params[key] = value
    for key in ("device", "dtype"):
        if key not in params and key in st.query_params:
            del st.query_params[key]


def link_params(sae: str | None = None, **params: str) -> dict[str, str]:
    """Query parameters of an in-app link to a latent: the session's model when it is not the
    default, the SAE (``sae``, a :func:`sae_param` string, else the session's), then ``params``.
    Every link to a latent carries its SAE, so it opens the same latent in a new tab too."""
    choice: Choice = st.session_state.choice
    out = {}
    if model_param(choice.model) != model_param(default_choice().model):
        out["model"] = model_param(choice.model)
    out["sae"] = sae if sae is not None else sae_param(choice.sae)
    return {**out, **{k: str(v) for k, v in params.items()}}


def link_url(page: str, **params: str) -> str:
    """A relative URL to ``page`` ("lookup") with :func:`link_params`, for link columns."""
    return f"{page}?{urlencode(link_params(**params))}"


def changed_query_param(key: str, seen: str) -> str | None:
    """Query parameter ``key`` when it changed since this session last saw it (a link was
    followed or the URL edited), else ``None``. Session state ``seen`` remembers the value."""
    value = st.query_params.get(key)
    if value is None or value == st.session_state.get(seen):
        return None
    st.session_state[seen] = value
    return value


def set_query_param(key: str, value: str | None, seen: str) -> None:
    """Mirror a page's own choice into the URL (``None`` removes it); it is not a change a link
    asked for."""
    if value is None:
        if key in st.query_params:
            del st.query_params[key]
    elif st.query_params.get(key) != value:
        st.query_params[key] = value
    st.session_state[seen] = value


# --- the shared pool --------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def model_pool() -> ModelPool:
    """Every model and SAE this server holds (at most ``SAE_WORKBENCH_MAX_MODELS`` models)."""
    return ModelPool()


def get_model(spec: ModelSpec) -> LoadedModel:
    """The shared model; the embedded default is converted first, once, with a progress bar."""
    if spec.source == "embedded" and not embedded_ready():
        with st.status("Preparing the embedded model", expanded=False) as status:
            bar = st.progress(0.0)

            def report(fraction: float, message: str) -> None:
                bar.progress(min(max(fraction, 0.0), 1.0), text=message)
                status.update(label=message)

            embedded_model_dir(report)
            status.update(label="Embedded model ready", state="complete")
    pool = model_pool()
    if pool.holds(spec):
        return pool.model(spec)
    with st.spinner(f"Loading {spec.label} (shared by every session once loaded)"):
        return pool.model(spec)


def get_sae(spec: SaeSpec, lm: LoadedModel) -> LoadedSAE:
    pool = model_pool()
    found = pool.get_sae(lm, spec)
    if found is not None:
        return found
    with st.spinner(f"Loading SAE {spec.label}"):
        return pool.sae(lm, spec)


# --- the current state ------------------------------------------------------------------------


def init_state() -> None:
    """Session defaults, read once per session from the URL."""
    if "choice" not in st.session_state:
        choice, notices = choice_from_query(dict(st.query_params))
        st.session_state.choice = choice
        st.session_state.notices = notices
        st.session_state.url_read = dict(st.query_params)  # follow_link need not read it again
    st.session_state.setdefault("model", None)
    st.session_state.setdefault("sae", None)
    st.session_state.setdefault("load_errors", [])


def follow_link() -> None:
    """A link inside the app (``st.page_link`` with ``sae=`` or ``model=``) or an edited URL asks
    for another model or SAE: make it the session's choice. The URL always mirrors the choice at
    the end of a run, so any difference at the start of one was asked for."""
    choice: Choice = st.session_state.choice
    params = dict(st.query_params)
    if params == st.session_state.pop("url_read", None):
        return  # init_state just read this URL (and noted what it ignored)
    wanted_model, wanted_sae = params.get("model"), params.get("sae")
    if (wanted_model in (None, model_param(choice.model))
            and wanted_sae in (None, sae_param(choice.sae))):
        return
    params.setdefault("model", model_param(choice.model))
    if choice.model.device != "auto":
        params.setdefault("device", choice.model.device)
    if choice.model.dtype != "auto":
        params.setdefault("dtype", choice.model.dtype)
    if wanted_sae is None and wanted_model == model_param(choice.model):
        params["sae"] = sae_param(choice.sae)
    new, notices = choice_from_query(params)
    st.session_state.notices = [*st.session_state.get("notices", []), *notices]
    if new != choice:
        st.session_state.choice = new
        st.session_state.picker_seeded = False  # point the sidebar at the new choice


def current() -> tuple[LoadedModel | None, LoadedSAE | None]:
    """The model and SAE this session has loaded (``None`` when loading failed)."""
    return st.session_state.get("model"), st.session_state.get("sae")


def approve(choice: Choice) -> None:
    """The user pressed Load for ``choice``: it may load whatever it names."""
    st.session_state.choice = choice
    st.session_state.approved = choice
    st.session_state.pop("loaded_for", None)  # Load again retries a failed load


def load_current() -> None:
    """Load what the session's choice names, where a link may load it or the user pressed Load;
    errors go to ``load_errors``, what waits for a click to ``waiting``, and the app goes on.
    Every run takes the model and SAE from the pool afresh, so a session never keeps one the
    pool has dropped."""
    choice: Choice = st.session_state.choice
    pool = model_pool()
    if st.session_state.get("loaded_for") == choice:
        lm, sae = st.session_state.get("model"), st.session_state.get("sae")
        if lm is not None:
            lm = pool.get(choice.model)
            if lm is None:
                st.session_state.load_errors = [
                    f"Model {choice.model.label} was unloaded to make room for another (the "
                    f"server holds at most {pool.capacity}); press Load in the sidebar to load "
                    "it again."]
                st.session_state.pop("loaded_for", None)
                st.session_state.approved = None
            elif sae is not None:
                sae = pool.get_sae(lm, choice.sae) or get_sae(choice.sae, lm)
        st.session_state.model, st.session_state.sae = lm, sae
        return
    base = default_choice()
    clicked = st.session_state.get("approved") == choice
    errors: list[str] = []
    waiting: list[str] = []
    lm = sae = None
    if clicked or link_may_load_model(pool, choice.model, base.model):
        try:
            lm = get_model(choice.model)
        except (ValueError, FileNotFoundError, OSError) as exc:
            errors.append(f"Model {choice.model.label}: {exc}")
    else:
        waiting.append(f"model {choice.model.label}")
    if lm is not None and choice.sae is not None:
        if clicked or link_may_load_sae(pool, choice.model, choice.sae, base.sae):
            try:
                sae = get_sae(choice.sae, lm)
            except (ValueError, FileNotFoundError, OSError) as exc:
                errors.append(f"SAE {choice.sae.label}: {exc}")
        else:
            waiting.append(f"SAE {choice.sae.label}")
    elif lm is None and choice.sae is not None and waiting:
        waiting.append(f"SAE {choice.sae.label}")
    st.session_state.model, st.session_state.sae = lm, sae
    st.session_state.load_errors = errors
    st.session_state.waiting = waiting
    st.session_state.loaded_for = choice


def held_models() -> list[dict[str, str]]:
    """What the server holds now, for Home: one row per model."""
    rows = []
    for lm in model_pool().held():
        source, name, device, dtype = model_key(lm.spec)
        rows.append({"model": lm.name, "source": source, "device": device, "dtype": dtype,
                     "weights": _size(lm.param_bytes)})
    return rows


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n_bytes < 1024:
            return f"{n_bytes:,.0f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:,.2f} GiB"


def memory_summary(lm: LoadedModel | None, sae: LoadedSAE | None) -> dict[str, str]:
    out = {"Process RSS": _size(psutil.Process().memory_info().rss)}
    if lm is not None:
        out["Model weights"] = _size(lm.param_bytes)
        if lm.device.type == "cuda":
            import torch

            out["CUDA allocated"] = _size(torch.cuda.memory_allocated(lm.device))
    if sae is not None:
        out["SAE weights"] = _size(sae.param_bytes)
    return out


def password_gate() -> None:
    """When ``SAE_WORKBENCH_PASSWORD`` is set, ask for it once per session."""
    secret = os.environ.get("SAE_WORKBENCH_PASSWORD", "")
    if not secret or st.session_state.get("authenticated"):
        return
    st.title("SAE Workbench")
    attempt = st.text_input("Password", type="password", key="auth_password")
    if attempt and hmac.compare_digest(attempt.encode(), secret.encode()):
        st.session_state.authenticated = True
        st.rerun()
    if attempt:
        st.error("Wrong password. Ask whoever shared this link.")
    st.stop()


# --- pages ------------------------------------------------------------------------------------

PAGES = (
    ("views/home.py", "Home", ":material/home:"),
    ("views/lookup.py", "Feature lookup", ":material/search:"),
    ("views/steering.py", "Steering", ":material/tune:"),
    ("views/dreaming.py", "Dreaming", ":material/auto_awesome:"),
    ("views/maps.py", "Feature maps", ":material/scatter_plot:"),
)
"""(script, title, icon) of every page; the first is the default."""


def app_pages() -> list:
    return [st.Page(path, title=title, icon=icon, default=i == 0)
            for i, (path, title, icon) in enumerate(PAGES)]
