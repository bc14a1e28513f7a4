"""Autointerp: detection-score arithmetic, reply parsing, and the client against a loopback
OpenAI-compatible server that checks what it is sent."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.autointerp import (
    AutoInterpConfig,
    Endpoint,
    EndpointError,
    detection_score,
    estimate,
    explain_latent,
    explain_many,
    gather,
    parse_predictions,
    tidy_explanation,
)
from core.feature_index import FeatureIndex
from core.index import IndexConfig, build_index
from core.labels import Explanation, LabelStore
from core.saes import SaeSpec, load_sae
from tests.conftest import INDEX_TEXTS

KEY = "sk-test-0123456789abcdef"


# --- arithmetic and parsing ---------------------------------------------------------------------


def test_detection_score_is_accuracy_over_all_examples():
    correct = {2, 5, 7, 9}
    assert detection_score({2, 5, 7, 9}, correct, 12) == 1.0
    assert detection_score(set(), correct, 12) == 8 / 12  # every random one right
    assert detection_score({2, 5}, correct, 12) == 10 / 12
    assert detection_score({1, 3}, correct, 12) == 6 / 12  # 2 false alarms, 4 misses
    assert detection_score(set(range(1, 13)), correct, 12) == 4 / 12
    with pytest.raises(ValueError):
        detection_score(set(), set(), 0)


@pytest.mark.parametrize("reply, chosen, out, dups", [
    ("None", set(), (), ()),
    ("none.", set(), (), ()),
    ("2, 5, 7, 8", {2, 5, 7, 8}, (), ()),
    ("2,5 ,5, 7", {2, 5, 7}, (), (5,)),
    ("3, 13, 0, 4", {3, 4}, (0, 13), ()),
    ("Looking at the 12 examples, the neuron fires on 1, 4 and 6.", {1, 4, 6}, (), ()),
    ("Answer:\n\n[2, 3]\n", {2, 3}, (), ()),
    ("7", {7}, (), ()),
])
def test_parse_predictions(reply, chosen, out, dups):
    got = parse_predictions(reply, 12)
    assert set(got.chosen) == chosen
    assert got.out_of_range == out
    assert got.duplicates == dups


def test_parse_predictions_refuses_a_reply_without_an_answer():
    with pytest.raises(ValueError, match="names no example and does not say None"):
        parse_predictions("I cannot tell from these examples.", 12)


def test_tidy_explanation_drops_the_lead_in():
    assert tidy_explanation('This neuron fires on "the word fox".') == "the word fox"
    assert tidy_explanation("  the   letter e\n") == "the letter e"
    assert len(tidy_explanation("x " * 1000)) <= 400


def test_config_and_endpoint_checks():
    with pytest.raises(ValueError, match="n_top_ex_for_generation=0"):
        AutoInterpConfig(n_top_ex_for_generation=0)
    with pytest.raises(ValueError, match="act_threshold_frac"):
        AutoInterpConfig(act_threshold_frac=0)
    with pytest.raises(ValueError, match="not an http"):
        Endpoint("ftp://x", "m")
    with pytest.raises(ValueError, match="Name the endpoint's model"):
        Endpoint("http://127.0.0.1:1/v1", " ")
    ep = Endpoint("http://user:pw@127.0.0.1:9/v1?token=abc", "m", KEY)
    assert ep.where == "http://127.0.0.1:9/v1"
    assert KEY not in repr(ep) and ep.masked_key == "…cdef"


def test_endpoint_from_env(monkeypatch):
    for name in ("SAE_WORKBENCH_LLM_BASE_URL", "OPENAI_BASE_URL", "SAE_WORKBENCH_LLM_API_KEY",
                 "OPENAI_API_KEY", "SAE_WORKBENCH_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    assert Endpoint.from_env() is None
    monkeypatch.setenv("SAE_WORKBENCH_LLM_BASE_URL", "http://127.0.0.1:8080/v1")
    monkeypatch.setenv("SAE_WORKBENCH_LLM_MODEL", "local-model")
    ep = Endpoint.from_env()
    assert (ep.base_url, ep.model, ep.api_key) == ("http://127.0.0.1:8080/v1", "local-model", "")


# --- the loopback server ------------------------------------------------------------------------


class FakeLLM:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that records each request and answers
    deterministically: the explanation for a generation prompt, ``score_reply(examples)`` for a
    scoring prompt. ``mode`` makes it misbehave."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.mode = "ok"
        self.explanation = "This neuron fires on the letter e."
        self.score_reply = lambda examples: "1, 2, 2, 99"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                if fake.mode == "slow":
                    time.sleep(2)
                if fake.mode in ("401", "404", "500"):
                    return self.send(int(fake.mode), {"error": {"message": "nope"}})
                if fake.mode == "html":
                    return self.send(200, b"<html>not an API</html>", "text/html")
                if fake.mode == "nochoices":
                    return self.send(200, {"id": "x", "object": "chat.completion"})
                if not self.path.endswith("/chat/completions"):
                    return self.send(404, {"error": {"message": "no route"}})
                user = body["messages"][-1]["content"]
                if "activating documents" in user:
                    text = fake.explanation
                else:
                    examples = re.findall(r"^\d+\. (.*)$", user.split("Here are the examples:")[1],
                                          re.MULTILINE)
                    text = fake.score_reply(examples)
                self.send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10,
                              "total_tokens": 110}})

            def send(self, status, payload, ctype="application/json"):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def llm():
    fake = FakeLLM()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def index(gpt2, tiny_dir, tmp_path_factory):
    sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)
    path = tmp_path_factory.mktemp("ai") / "index.duckdb"
    build_index(gpt2, {"s": sae}, INDEX_TEXTS, path,
                IndexConfig(context_size=16, max_tokens=600, top_k=16, n_sample=16))
    return FeatureIndex(path)


def busy_latent(index) -> int:
    table = index.summary("s")
    return int(table.sort_values("firing_count", ascending=False)["latent"].iloc[0])


def test_explain_and_score_against_the_loopback_server(llm, index, gpt2):
    latent = busy_latent(index)
    cfg = AutoInterpConfig()
    ep = Endpoint(llm.url, "explainer-1", KEY, timeout_s=10, max_retries=0)
    res = explain_latent(ep, index, "s", latent, gpt2.tokenizer, cfg)
    gen, score = llm.requests
    assert gen["model"] == score["model"] == "explainer-1"
    assert llm.headers[0]["authorization"] == f"Bearer {KEY}"
    assert gen["max_tokens"] == cfg.max_tokens_in_explanation
    gen_user = gen["messages"][-1]["content"]
    gen_examples = re.findall(r"^\d+\. (.*)$", gen_user, re.MULTILINE)
    assert len(gen_examples) == cfg.n_top_ex_for_generation
    assert all("<<" in ex and ">>" in ex for ex in gen_examples)  # activating tokens marked
    assert "<< ... >>" in gen["messages"][0]["content"]
    score_user = score["messages"][-1]["content"]
    assert "this neuron fires on the letter e." in score_user  # the tidied explanation
    examples = re.findall(r"^\d+\. (.*)$", score_user.split("Here are the examples:")[1],
                          re.MULTILINE)
    n = cfg.n_top_ex_for_scoring + cfg.n_random_ex_for_scoring
    assert len(examples) == n and "12 example sequences" in score["messages"][0]["content"]
    assert not any("<<" in ex or ">>" in ex for ex in examples)  # shown unmarked
    assert res.explanation == "the letter e"
    assert len(res.correct) == cfg.n_top_ex_for_scoring
    # the server named 1, 2, 2 and 99: 99 is out of range, 2 counts once
    assert set(res.predictions.chosen) == {1, 2} and res.predictions.out_of_range == (99,)
    hits = len({1, 2} & res.correct)
    false_alarms = 2 - hits
    assert res.score == pytest.approx((hits + (n - len(res.correct) - false_alarms)) / n)
    # the held-out top examples are what scoring marks correct: a server naming exactly them
    ex = gather(index, "s", latent, gpt2.tokenizer, cfg)
    llm.score_reply = lambda shown: ", ".join(str(i) for i in sorted(ex.correct))
    assert explain_latent(ep, index, "s", latent, gpt2.tokenizer, cfg).score == 1.0
    llm.score_reply = lambda shown: "None"
    assert explain_latent(ep, index, "s", latent, gpt2.tokenizer, cfg).score == pytest.approx(
        (n - len(ex.correct)) / n)


def test_batch_stores_each_result_and_never_recomputes_by_accident(llm, index, gpt2, tmp_path):
    store = LabelStore(tmp_path / "labels.duckdb")
    scope = LabelStore.scope("m", "s")
    alive = index.alive_latents("s")[:5]
    ep = Endpoint(llm.url, "explainer-1", KEY, timeout_s=10, max_retries=0)
    seen = []
    report = explain_many(ep, index, "s", alive, gpt2.tokenizer, AutoInterpConfig(), store,
                          scope, concurrency=3, progress=lambda i, n, m: seen.append((i, n)))
    assert len(report.done) == 5 and not report.failed and seen[-1] == (5, 5)
    assert report.usage.requests == 10 and report.usage.prompt_tokens == 1000
    stored = store.explanations(scope, sources=("autointerp",))
    assert sorted(e.latent for e in stored) == sorted(alive)
    assert all(e.score is not None and 0 <= e.score <= 1 for e in stored)
    assert stored[0].params["explainer"] == "explainer-1"
    assert KEY not in (tmp_path / "labels.duckdb").read_bytes().decode("latin-1")
    n_requests = len(llm.requests)
    again = explain_many(ep, index, "s", alive, gpt2.tokenizer, AutoInterpConfig(), store, scope)
    assert sorted(again.skipped) == sorted(alive) and len(llm.requests) == n_requests
    redo = explain_many(ep, index, "s", alive[:1], gpt2.tokenizer, AutoInterpConfig(), store,
                        scope, redo=True)
    assert len(redo.done) == 1 and len(llm.requests) == n_requests + 2
    other = Endpoint(llm.url, "explainer-2", KEY, timeout_s=10, max_retries=0)
    explain_many(other, index, "s", alive[:1], gpt2.tokenizer, AutoInterpConfig(), store, scope)
    assert len(store.explanations(scope, [alive[0]], ("autointerp",))) == 2  # one per explainer
    est = estimate(index, "s", alive, gpt2.tokenizer, AutoInterpConfig())
    assert est.requests == 10 and est.prompt_tokens > 0 and est.completion_tokens > 0
    with pytest.raises(ValueError, match="1 to 1000 latents"):
        explain_many(ep, index, "s", list(range(1001)), gpt2.tokenizer, AutoInterpConfig(),
                     store, scope)
    with pytest.raises(ValueError, match="concurrency=99"):
        explain_many(ep, index, "s", alive, gpt2.tokenizer, AutoInterpConfig(), store, scope,
                     concurrency=99)


@pytest.mark.parametrize("mode, message, fatal", [
    ("down", "Cannot reach the endpoint .* Check the base URL", True),
    ("slow", "did not answer within 0.5 s", False),
    ("401", "refused the key \\(HTTP 401\\)", True),
    ("404", "no model 'explainer-1' or no /chat/completions route", True),
    ("500", "answered HTTP 500", False),
    ("html", "malformed reply", False),
    ("nochoices", "malformed reply", False),
])
def test_endpoint_failures_are_clear_and_lose_nothing(llm, index, gpt2, tmp_path, mode,
                                                      message, fatal):
    store = LabelStore(tmp_path / "labels.duckdb")
    scope = LabelStore.scope("m", "s")
    latents = index.alive_latents("s")[:3]
    keep = [Explanation(latents[0], "autointerp", "kept", 0.75, {"explainer": "old"}),
            Explanation(latents[0], "user", "my label")]
    store.put(scope, keep)
    url = llm.url
    if mode == "down":
        llm.close()
    llm.mode = mode
    ep = Endpoint(url, "explainer-1", KEY, timeout_s=0.5, max_retries=0)
    with pytest.raises(EndpointError, match=message) as err:
        explain_latent(ep, index, "s", latents[0], gpt2.tokenizer, AutoInterpConfig())
    assert err.value.fatal == fatal and KEY not in str(err.value)
    report = explain_many(ep, index, "s", latents, gpt2.tokenizer, AutoInterpConfig(), store,
                          scope, redo=True, concurrency=1)
    assert not report.done and set(report.failed) == set(latents)
    assert bool(report.stopped) == fatal
    after = {(e.source, e.text, e.score) for e in store.explanations(scope)}
    assert after == {("autointerp", "kept", 0.75), ("user", "my label", None)}
    if mode == "down":
        llm.server = type("Closed", (), {"shutdown": lambda s: None,
                                         "server_close": lambda s: None})()
