"""Neuronpedia's explanations imported from a loopback server that plays the export endpoint and
the dataset bucket it moved to."""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from core.labels import Explanation, LabelStore
from core.neuronpedia import as_explanations, import_explanations, split_id

RECORDS = [
    {"modelId": "gpt2-small", "layer": "8-res-jb", "index": "3", "description": " foxes",
     "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
    {"modelId": "gpt2-small", "layer": "8-res-jb", "index": "3", "description": "animals",
     "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
    {"modelId": "gpt2-small", "layer": "8-res-jb", "index": "5", "description": "Paris",
     "explanationModelName": "claude", "typeName": "np_max-act", "score": 0.4},
    {"index": "999", "description": "out of range"},
    {"index": "6", "description": ""},
    {"description": "no index"},
]


class FakeNeuronpedia:
    def __init__(self, export: str = "moved"):
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.paths.append(self.path)
                url = urlsplit(self.path)
                if url.path == "/api/explanation/export":
                    q = parse_qs(url.query)
                    assert q == {"modelId": ["gpt2-small"], "saeId": ["8-res-jb"]}
                    if export == "moved":
                        return self.send(400, json.dumps({"message": "Moved to S3"}).encode())
                    return self.send(200, json.dumps(RECORDS).encode())
                if url.path == "/v1/gpt2-small/8-res-jb/explanations/batch-0.jsonl.gz":
                    lines = "\n".join(json.dumps(r) for r in RECORDS[:2])
                    return self.send(200, gzip.compress(lines.encode()))
                if url.path == "/v1/gpt2-small/8-res-jb/explanations/batch-1.jsonl.gz":
                    lines = "\n".join(json.dumps(r) for r in RECORDS[2:])
                    return self.send(200, gzip.compress(lines.encode()))
                return self.send(404, b"no such key")

            def send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("export", ["moved", "list"])
def test_import_from_the_export_or_the_bucket(tmp_path, export):
    fake = FakeNeuronpedia(export)
    store = LabelStore(tmp_path / "labels.duckdb")
    scope = LabelStore.scope("gpt2", "release:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    store.set(scope, 3, "my label")
    try:
        kw = {"export_url": f"{fake.url}/api/explanation/export",
              "datasets_url": f"{fake.url}/v1"}
        stored, skipped = import_explanations(store, scope, "gpt2-small/8-res-jb", 64, **kw)
        assert (stored, skipped) == (3, 3)
        if export == "moved":
            assert any("batch-1" in p for p in fake.paths) and any("batch-2" in p
                                                                  for p in fake.paths)
        else:
            assert len(fake.paths) == 1
        again = import_explanations(store, scope, "gpt2-small/8-res-jb", 64, **kw)
        assert again == (3, 3)  # a second import replaces the first
    finally:
        fake.close()
    found = store.explanations(scope, sources=("neuronpedia",))
    assert sorted((e.latent, e.text, e.score) for e in found) == [
        (3, "animals", None), (3, "foxes", None), (5, "Paris", 0.4)]
    assert {e.params["explainer"] for e in found} == {"gpt-4o-mini", "claude"}
    assert store.all(scope) == {3: "my label"}


def test_offline_import_says_so_and_keeps_what_is_stored(tmp_path):
    store = LabelStore(tmp_path / "labels.duckdb")
    store.put("s", [Explanation(1, "neuronpedia", "kept", None, {"explainer": "x"})])
    with pytest.raises(ValueError, match="Cannot reach Neuronpedia.*needs the internet"):
        import_explanations(store, "s", "gpt2-small/8-res-jb", 64,
                            export_url="http://127.0.0.1:9/api/explanation/export",
                            datasets_url="http://127.0.0.1:9/v1", timeout_s=2)
    assert [e.text for e in store.explanations("s")] == ["kept"]
    with pytest.raises(ValueError, match="not a Neuronpedia SAE id"):
        split_id("gpt2-small")
    assert as_explanations([{"index": "1", "description": "x", "score": True}], "a/b", 4)[0][0] \
        .score is None
