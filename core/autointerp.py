"""Autointerp: an LLM explains a latent from its top examples, and a detection score checks it.

As in ARENA's SAE exercises (after SAEBench and OpenAI's automated interpretability):

* **Generation**: the LLM reads the latent's top activating examples from the feature index,
  activating tokens marked ``<<like this>>``, and writes a short explanation.
* **Scoring**: the LLM reads the explanation and a shuffle of other top examples and random
  windows of the index's corpus, *unmarked*, and lists the ones it thinks the latent fires on.
  The detection score is its accuracy over all of them; with the defaults (4 top examples among
  12) answering "None" already scores 8/12, so only scores well above 0.67 say much.

Any OpenAI-compatible chat endpoint serves (OpenAI, a local llama.cpp / vLLM / Ollama server):
base URL, model and key come from the environment (``SAE_WORKBENCH_LLM_BASE_URL``,
``SAE_WORKBENCH_LLM_MODEL``, ``SAE_WORKBENCH_LLM_API_KEY``, or OpenAI's own ``OPENAI_BASE_URL``
and ``OPENAI_API_KEY``) or from the sidebar. The key is never stored and never shown in full.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from core.feature_index import FeatureIndex
from core.labels import Explanation, LabelStore, clean_text

log = logging.getLogger(__name__)

MAX_LATENTS = 1000
"""Latents in one batch."""
MAX_CONCURRENCY = 8
MAX_RETRIES = 5
MAX_TIMEOUT_S = 600.0
DEFAULT_MODEL = "gpt-4o-mini"


@dataclass(frozen=True)
class AutoInterpConfig:
    """ARENA's ``AutoInterpConfig`` defaults."""

    n_top_ex_for_generation: int = 10
    """Top examples the explainer reads (activating tokens marked)."""
    n_top_ex_for_scoring: int = 4
    """Other top examples in the scoring shuffle (unmarked)."""
    n_random_ex_for_scoring: int = 8
    """Random corpus windows in the scoring shuffle."""
    act_threshold_frac: float = 0.1
    """A token is marked when its activation reaches this fraction of the examples' maximum."""
    max_tokens_in_explanation: int = 30
    """Cap on the explanation's length (the request's ``max_tokens``)."""
    scoring: bool = True
    """Score each explanation (one more request per latent)."""
    seed: int = 0
    """Draws the split of top examples and the random windows (per latent)."""

    def __post_init__(self) -> None:
        for name, lo, hi in (("n_top_ex_for_generation", 1, 50), ("n_top_ex_for_scoring", 0, 50),
                             ("n_random_ex_for_scoring", 0, 50),
                             ("max_tokens_in_explanation", 5, 300)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r}; use a whole number from {lo} to {hi}.")
        if not (isinstance(self.act_threshold_frac, (int, float))
                and 0 < self.act_threshold_frac <= 1):
            raise ValueError(f"act_threshold_frac={self.act_threshold_frac!r}; use a number in "
                             "(0, 1].")
        if self.scoring and self.n_top_ex_for_scoring + self.n_random_ex_for_scoring < 2:
            raise ValueError("Scoring needs at least 2 examples; raise n_top_ex_for_scoring or "
                             "n_random_ex_for_scoring, or turn scoring off.")


class EndpointError(ValueError):
    """The endpoint could not give an answer; ``fatal`` when no other request would fare
    better (unreachable, key refused, no such model), so a batch stops."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat endpoint."""

    base_url: str
    """e.g. https://api.openai.com/v1 or http://127.0.0.1:8080/v1"""
    model: str
    api_key: str = field(default="", repr=False)
    """Kept in memory only: never stored, logged or shown in full."""
    timeout_s: float = 60.0
    max_retries: int = 2
    """Retries of a request that timed out, was rate limited or hit a server error (the
    ``openai`` client's own backoff)."""

    def __post_init__(self) -> None:
        url = urlsplit(self.base_url.strip()) if isinstance(self.base_url, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"The endpoint's base URL {self.base_url!r} is not an http(s) URL; "
                             "use e.g. https://api.openai.com/v1 or http://127.0.0.1:8080/v1.")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("Name the endpoint's model (e.g. gpt-4o-mini, or the model your "
                             "local server loaded).")
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"timeout_s={self.timeout_s!r}; use 1 to {MAX_TIMEOUT_S:g} seconds.")
        if not (isinstance(self.max_retries, int) and 0 <= self.max_retries <= MAX_RETRIES):
            raise ValueError(f"max_retries={self.max_retries!r}; use 0 to {MAX_RETRIES}.")
        object.__setattr__(self, "base_url", self.base_url.strip().rstrip("/"))
        object.__setattr__(self, "model", self.model.strip())

    @classmethod
    def from_env(cls, **overrides) -> "Endpoint | None":
        """The endpoint the environment configures, or ``None`` when it names none."""
        env = os.environ
        base = env.get("SAE_WORKBENCH_LLM_BASE_URL") or env.get("OPENAI_BASE_URL") or ""
        key = env.get("SAE_WORKBENCH_LLM_API_KEY") or env.get("OPENAI_API_KEY") or ""
        if not base and key:
            base = "https://api.openai.com/v1"
        if not base:
            return None
        model = env.get("SAE_WORKBENCH_LLM_MODEL") or DEFAULT_MODEL
        return cls(base, model, key, **overrides)

    @property
    def where(self) -> str:
        """The base URL without credentials, query or fragment (safe to show and store)."""
        url = urlsplit(self.base_url)
        host = url.hostname or ""
        netloc = host + (f":{url.port}" if url.port else "")
        return urlunsplit((url.scheme, netloc, url.path, "", ""))

    @property
    def masked_key(self) -> str:
        """The key as the pages show it: its last four characters at most."""
        if not self.api_key:
            return "no key"
        return "…" + self.api_key[-4:] if len(self.api_key) > 12 else "set (hidden)"


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _client(ep: Endpoint):
    import openai

    key = (ep.base_url, ep.api_key, ep.timeout_s, ep.max_retries)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = openai.OpenAI(base_url=ep.base_url, api_key=ep.api_key or "none",
                                          timeout=ep.timeout_s, max_retries=ep.max_retries)
        return _clients[key]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.requests += other.requests


def chat(ep: Endpoint, messages: list[dict], max_tokens: int) -> tuple[str, Usage]:
    """The endpoint's reply (text) to ``messages``, greedy; every failure is one
    :class:`EndpointError` naming the cause and the fix."""
    import openai

    where = ep.where
    try:
        resp = _client(ep).chat.completions.create(model=ep.model, messages=messages,
                                                   max_tokens=int(max_tokens), temperature=0)
    except openai.APITimeoutError as exc:
        raise EndpointError(f"The endpoint {where} did not answer within {ep.timeout_s:g} s "
                            f"({ep.max_retries} retries). Raise the timeout, or check the "
                            "server.") from exc
    except openai.APIConnectionError as exc:
        raise EndpointError(f"Cannot reach the endpoint {where} ({exc.__cause__ or exc}). Check "
                            "the base URL (it usually ends in /v1) and that the server runs.",
                            fatal=True) from exc
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise EndpointError(f"The endpoint {where} refused the key (HTTP {exc.status_code}). "
                            "Set a valid key in the sidebar or SAE_WORKBENCH_LLM_API_KEY.",
                            fatal=True) from exc
    except openai.NotFoundError as exc:
        raise EndpointError(f"The endpoint {where} has no model {ep.model!r} or no "
                            "/chat/completions route (HTTP 404). Check the model name and the "
                            "base URL.", fatal=True) from exc
    except openai.RateLimitError as exc:
        raise EndpointError(f"The endpoint {where} is rate limiting (HTTP 429) after "
                            f"{ep.max_retries} retries; lower the concurrency or wait.") from exc
    except openai.APIStatusError as exc:
        raise EndpointError(f"The endpoint {where} answered HTTP {exc.status_code}: "
                            f"{str(exc.message)[:200]}") from exc
    except (openai.APIError, ValueError, TypeError) as exc:  # a reply that is not the API's JSON
        raise EndpointError(f"The endpoint {where} sent a malformed reply ({str(exc)[:200]}); "
                            "is it an OpenAI-compatible chat endpoint?") from exc
    choices = getattr(resp, "choices", None)
    message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices \
        else None
    text = getattr(message, "content", None)
    if not isinstance(text, str):
        raise EndpointError(f"The endpoint {where} sent a malformed reply (no message text in "
                            "it); is it an OpenAI-compatible chat endpoint?")
    usage = getattr(resp, "usage", None)
    return text, Usage(int(getattr(usage, "prompt_tokens", 0) or 0),
                       int(getattr(usage, "completion_tokens", 0) or 0), 1)


# --- examples ---------------------------------------------------------------------------------


def render(tokenizer, ids: list[int], acts: list[float] | None = None,
           threshold: float = math.inf) -> str:
    """Tokens as text, runs of tokens whose activation reaches ``threshold`` marked
    ``<<...>>``; special tokens dropped, line breaks shown as ↵ (one line per example)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    acts = acts if acts is not None else [0.0] * len(ids)
    out, open_ = [], False
    for tok, act in zip(ids, acts):
        if int(tok) in special:
            continue
        text = tokenizer.decode([int(tok)]).replace("\n", "↵").replace("\r", "")
        hot = act >= threshold
        if hot and not open_:
            out.append("<<")
        elif open_ and not hot:
            out.append(">>")
        open_ = hot
        out.append(text)
    if open_:
        out.append(">>")
    return "".join(out).replace("�", "")


@dataclass
class Examples:
    generation: list[str]
    """Top examples, activating tokens marked, strongest first."""
    scoring: list[str]
    """Top and random examples, unmarked, shuffled."""
    correct: set[int]
    """1-based numbers of the top examples among ``scoring``."""


def gather(index: FeatureIndex, sae_name: str, latent: int, tokenizer,
           cfg: AutoInterpConfig) -> Examples:
    """Examples from the index: the latent's top examples (split at random between generation
    and scoring, as in the reference) and random windows of the index's corpus."""
    data = index.latent(sae_name, latent)
    if not data.top:
        raise ValueError(f"Latent {latent} has no top examples in the index (it never fired "
                         "there); nothing to explain.")
    rng = random.Random(f"{cfg.seed}-{sae_name}-{latent}")
    tops = list(data.top)
    want = cfg.n_top_ex_for_generation + (cfg.n_top_ex_for_scoring if cfg.scoring else 0)
    tops = tops[:want]
    order = list(range(len(tops)))
    rng.shuffle(order)
    n_gen = min(cfg.n_top_ex_for_generation, max(1, len(tops) - (
        cfg.n_top_ex_for_scoring if cfg.scoring else 0)))
    gen = sorted(order[:n_gen])  # strongest first
    held = [tops[i] for i in order[n_gen:]] if cfg.scoring else []

    def span(ex) -> tuple[list[int], list[float] | None]:
        if ex.acts is not None:
            return ex.token_ids[ex.acts_start:ex.acts_start + len(ex.acts)], ex.acts
        lo, hi = max(0, ex.pos - index.show_left), ex.pos + index.show_right + 1
        acts = [0.0] * len(ex.token_ids)
        acts[ex.pos] = ex.value  # an index without stored spans: the indexed token only
        return ex.token_ids[lo:hi], acts[lo:hi]

    spans = [span(tops[i]) for i in gen]
    top_act = max([max(a) for _, a in spans if a] + [data.max_act or 0.0])
    threshold = cfg.act_threshold_frac * top_act if top_act > 0 else math.inf
    generation = [render(tokenizer, ids, acts, threshold) for ids, acts in spans]
    if not cfg.scoring:
        return Examples(generation, [], set())
    length = index.show_left + index.show_right + 1
    n_seq, ctx = index.sequence_count(), index.context_size
    seqs = [rng.randrange(n_seq) for _ in range(cfg.n_random_ex_for_scoring)]
    windows = index.sequences(sorted(set(seqs)))
    randoms = []
    for seq in seqs:
        ids = windows[seq]
        start = rng.randrange(1, max(2, min(ctx, len(ids)) - length + 1))
        randoms.append(ids[start:start + length])
    items = [(render(tokenizer, span(ex)[0]), True) for ex in held] + [
        (render(tokenizer, ids), False) for ids in randoms]
    rng.shuffle(items)
    return Examples(generation, [t for t, _ in items],
                    {i + 1 for i, (_, top) in enumerate(items) if top})


# --- prompts ----------------------------------------------------------------------------------

GENERATION_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron activates on some particular "
    "word/words/substring/concept in a short document. The activating words in each document "
    "are indicated with << ... >>. We will give you a list of documents on which the neuron "
    "activates, in order from most strongly activating to least strongly activating. Look at "
    "the parts of the document the neuron activates for and summarize in a single sentence "
    "what the neuron is activating on. Try not to be overly specific in your explanation. Note "
    "that some neurons will activate only on specific words or substrings, but others will "
    "activate on most/all words in a sentence provided that sentence contains some particular "
    "concept. Your explanation should cover most or all activating words (for example, don't "
    "give an explanation which is specific to a single word if all words in a sentence cause "
    "the neuron to activate). Pay attention to things like the capitalization and punctuation "
    "of the activating words or concepts, if that seems relevant. Keep the explanation as "
    "short and simple as possible, limited to 20 words or less. Omit punctuation and "
    "formatting. You should avoid giving long lists of words.")
SCORING_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron activates on some particular "
    "word/words/substring/concept in a short document. You will be given a short explanation "
    "of what this neuron activates for, and then be shown {n} example sequences in random "
    "order. You will have to return a comma-separated list of the examples where you think the "
    "neuron should activate at least once, on ANY of the words or substrings in the document. "
    "For example, your response might look like \"2, 5, 7, 8\". Try not to be overly specific "
    "in your interpretation of the explanation. If you think there are no examples where the "
    "neuron will activate, you should just respond with \"None\". You should include nothing "
    "else in your response other than comma-separated numbers or the word \"None\" - this is "
    "important.")


def numbered(examples: list[str]) -> str:
    return "\n".join(f"{i}. {text}" for i, text in enumerate(examples, 1))


def generation_messages(examples: list[str]) -> list[dict]:
    return [{"role": "system", "content": GENERATION_SYSTEM},
            {"role": "user", "content": "The activating documents are given below:\n\n"
             f"{numbered(examples)}\n\nAnswer with the explanation only, completing: "
             "\"This neuron fires on ...\""}]


def scoring_messages(explanation: str, examples: list[str]) -> list[dict]:
    return [{"role": "system", "content": SCORING_SYSTEM.format(n=len(examples))},
            {"role": "user", "content": f"Here is the explanation: this neuron fires on "
             f"{explanation}.\n\nHere are the examples:\n\n{numbered(examples)}"}]


_LEAD = re.compile(r"^\s*(?:explanation\s*:\s*)?(?:this|the)\s+(?:neuron|latent|feature)\s+"
                   r"(?:fires|activates)\s+(?:on|for)\s*:?\s*", re.IGNORECASE)


def tidy_explanation(reply: str) -> str:
    """The explanation without the lead-in the prompt asked to complete, quotes or a final
    full stop."""
    text = " ".join(reply.split())
    text = _LEAD.sub("", text).strip().rstrip(".").strip().strip('"\'“”').strip()
    return clean_text(text)


# --- scoring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    chosen: frozenset[int]
    """The example numbers the LLM named (in range, each once)."""
    out_of_range: tuple[int, ...] = ()
    """Numbers it named that are not an example's (left out of ``chosen``)."""
    duplicates: tuple[int, ...] = ()


_RUN = re.compile(r"\d+(?:\s*(?:,|;|\band\b|&)?\s*\d+)*")


def parse_predictions(reply: str, n: int) -> Predictions:
    """The examples the LLM's reply names: "None" (nothing), or a list of numbers; prose
    around the list is ignored (the longest run of numbers wins, the last on a tie), numbers
    named twice count once, numbers outside 1..n are left out and reported. A reply with
    neither numbers nor "None" raises ValueError."""
    runs = [[int(x) for x in re.findall(r"\d+", m.group())] for m in _RUN.finditer(reply)]
    if not runs:
        if re.search(r"\bnone\b", reply, re.IGNORECASE):
            return Predictions(frozenset())
        raise ValueError(f"The scoring reply names no example and does not say None: "
                         f"{reply[:120]!r}")
    best = max(range(len(runs)), key=lambda i: (len(runs[i]), i))
    numbers = runs[best]
    seen, dups = set(), []
    for x in numbers:
        if x in seen:
            dups.append(x)
        seen.add(x)
    inside = frozenset(x for x in seen if 1 <= x <= n)
    return Predictions(inside, tuple(sorted(seen - inside)), tuple(dups))


def detection_score(chosen: set[int] | frozenset[int], correct: set[int], n: int) -> float:
    """Accuracy: the share of the ``n`` examples classified right (named and a top example, or
    not named and a random one)."""
    if n < 1:
        raise ValueError("A detection score needs at least one example.")
    return sum((i in chosen) == (i in correct) for i in range(1, n + 1)) / n


# --- one latent, many latents -----------------------------------------------------------------


@dataclass
class Result:
    latent: int
    explanation: str
    score: float | None
    predictions: Predictions | None
    correct: set[int]
    n_scored: int
    usage: Usage


def params(ep: Endpoint, cfg: AutoInterpConfig) -> dict:
    """What is stored with an explanation (the cache key): explainer, where, settings."""
    return {"explainer": ep.model, "endpoint": ep.where, **asdict(cfg)}


def explain_latent(ep: Endpoint, index: FeatureIndex, sae_name: str, latent: int, tokenizer,
                   cfg: AutoInterpConfig) -> Result:
    ex = gather(index, sae_name, latent, tokenizer, cfg)
    reply, usage = chat(ep, generation_messages(ex.generation), cfg.max_tokens_in_explanation)
    explanation = tidy_explanation(reply)
    if not explanation:
        raise EndpointError(f"The endpoint {ep.where} gave an empty explanation for latent "
                            f"{latent}.")
    if not cfg.scoring:
        return Result(int(latent), explanation, None, None, set(), 0, usage)
    reply, more = chat(ep, scoring_messages(explanation, ex.scoring), 8 + 4 * len(ex.scoring))
    usage.add(more)
    try:
        pred = parse_predictions(reply, len(ex.scoring))
    except ValueError as exc:
        raise EndpointError(f"Latent {latent}: {exc}") from exc
    score = detection_score(pred.chosen, ex.correct, len(ex.scoring))
    return Result(int(latent), explanation, score, pred, ex.correct, len(ex.scoring), usage)


@dataclass(frozen=True)
class Estimate:
    latents: int
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def dollars(self, per_m_in: float, per_m_out: float) -> float:
        return (self.prompt_tokens * per_m_in + self.completion_tokens * per_m_out) / 1e6


def estimate(index: FeatureIndex, sae_name: str, latents: list[int], tokenizer,
             cfg: AutoInterpConfig, sample: int = 5) -> Estimate:
    """Tokens a batch will send and receive, from the prompts of up to ``sample`` of the
    latents (about four characters a token)."""
    latents = [int(i) for i in latents]
    if not latents:
        return Estimate(0, 0, 0, 0)
    chars = []
    for latent in latents[:sample]:
        try:
            ex = gather(index, sae_name, latent, tokenizer, cfg)
        except ValueError:
            continue
        n = sum(len(m["content"]) for m in generation_messages(ex.generation))
        if cfg.scoring:
            n += sum(len(m["content"]) for m in scoring_messages("x" * 100, ex.scoring))
        chars.append(n)
    per = (sum(chars) / len(chars) / 4) if chars else 0
    out = cfg.max_tokens_in_explanation + (8 + 4 * (cfg.n_top_ex_for_scoring
                                                    + cfg.n_random_ex_for_scoring)
                                           if cfg.scoring else 0)
    k = len(latents)
    return Estimate(k, k * (2 if cfg.scoring else 1), round(per * k), out * k)


@dataclass
class BatchReport:
    done: list[Result] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    """Latents that already had an explanation made the same way (not recomputed)."""
    failed: dict[int, str] = field(default_factory=dict)
    stopped: str = ""
    """Why the batch stopped early (the endpoint unreachable, the key refused)."""
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


def explain_many(ep: Endpoint, index: FeatureIndex, sae_name: str, latents: list[int], tokenizer,
                 cfg: AutoInterpConfig, store: LabelStore, scope: str, redo: bool = False,
                 concurrency: int = 4,
                 progress: Callable[[int, int, str], None] | None = None) -> BatchReport:
    """Explain and score many latents, ``concurrency`` requests at a time; each result is
    stored as soon as it arrives, so an interrupted batch keeps what it finished. Latents
    already explained with the same explainer and settings are skipped unless ``redo``."""
    latents = list(dict.fromkeys(int(i) for i in latents))
    if not 1 <= len(latents) <= MAX_LATENTS:
        raise ValueError(f"Explain 1 to {MAX_LATENTS} latents at once; got {len(latents)}.")
    if not 1 <= int(concurrency) <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency={concurrency}; use 1 to {MAX_CONCURRENCY}.")
    for latent in latents:
        index.check_latent(sae_name, latent)
    report = BatchReport()
    made = params(ep, cfg)
    if not redo:
        have = store.explained(scope, "autointerp", made)
        report.skipped = [i for i in latents if i in have]
        latents = [i for i in latents if i not in have]
    start = time.perf_counter()
    stop = threading.Event()

    def one(latent: int) -> Result:
        if stop.is_set():
            raise EndpointError("skipped: the batch stopped", fatal=True)
        return explain_latent(ep, index, sae_name, latent, tokenizer, cfg)

    with ThreadPoolExecutor(max_workers=int(concurrency)) as pool:
        futures = {pool.submit(one, latent): latent for latent in latents}
        for n, fut in enumerate(as_completed(futures), 1):
            latent = futures[fut]
            try:
                res = fut.result()
            except CancelledError:
                report.failed[latent] = "not run: the batch stopped"
            except EndpointError as exc:
                report.failed[latent] = str(exc)
                if exc.fatal and not stop.is_set():
                    report.stopped = str(exc)
                    stop.set()
                    for other in futures:
                        other.cancel()
            except ValueError as exc:  # e.g. a latent that never fired
                report.failed[latent] = str(exc)
            else:
                report.done.append(res)
                report.usage.add(res.usage)
                store.put(scope, [Explanation(latent, "autointerp", res.explanation, res.score,
                                              made, time.time())])
            if progress is not None:
                progress(n, len(latents), f"latent {latent}")
    report.seconds = time.perf_counter() - start
    return report
