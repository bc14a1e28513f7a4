"""Neuronpedia's explanations of an SAE's latents, imported into the labels database.

For sae_lens releases with a Neuronpedia id (``gemma-2-2b/12-gemmascope-res-16k``), Neuronpedia
publishes its autointerp explanations. Its export endpoint
(``/api/explanation/export?modelId=<model>&saeId=<sae>``) is asked first; Neuronpedia has since
moved the exports to a public dataset bucket (gzipped JSON lines, ``batch-<i>.jsonl.gz``), which
is read when the endpoint answers that it moved (or fails). Online only.
"""

from __future__ import annotations

import gzip
import json
import logging
import time

from core.labels import Explanation, LabelStore

log = logging.getLogger(__name__)

EXPORT_URL = "https://www.neuronpedia.org/api/explanation/export"
DATASETS_URL = "https://neuronpedia-datasets.s3.us-east-1.amazonaws.com/v1"
MAX_BYTES = 256 * 1024 * 1024
"""What one import may download in all."""
MAX_BATCHES = 512


def split_id(neuronpedia_id: str) -> tuple[str, str]:
    """'gemma-2-2b/12-gemmascope-res-16k' -> ('gemma-2-2b', '12-gemmascope-res-16k')."""
    parts = str(neuronpedia_id).strip().strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{neuronpedia_id!r} is not a Neuronpedia SAE id; it looks like "
                         "<model>/<sae>, e.g. gpt2-small/8-res-jb.")
    return parts[0], parts[1]


def _get(client, url: str, params: dict | None, budget: list[int]) -> tuple[int, bytes]:
    """(status, body) of a GET, refusing bodies past what is left of ``budget``."""
    import httpx

    try:
        with client.stream("GET", url, params=params) as resp:
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > budget[0]:
                    raise ValueError(f"Neuronpedia's export is larger than {MAX_BYTES:,} bytes; "
                                     "not imported.")
            budget[0] -= len(body)
            return resp.status_code, bytes(body)
    except httpx.TimeoutException as exc:
        raise ValueError(f"Neuronpedia did not answer in time ({url}); try again later.") from exc
    except httpx.HTTPError as exc:
        raise ValueError(f"Cannot reach Neuronpedia ({exc}); this needs the internet. Your "
                         "stored explanations are unchanged.") from exc


def fetch_records(neuronpedia_id: str, export_url: str = EXPORT_URL,
                  datasets_url: str = DATASETS_URL, timeout_s: float = 60.0) -> list[dict]:
    """Every explanation record Neuronpedia exports for the SAE (``index``, ``description``,
    ``explanationModelName``, ``typeName``, ...)."""
    import httpx

    model_id, sae_id = split_id(neuronpedia_id)
    budget = [MAX_BYTES]
    with httpx.Client(timeout=timeout_s, follow_redirects=True) as client:
        status, body = _get(client, export_url, {"modelId": model_id, "saeId": sae_id}, budget)
        if status == 200:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict):
                data = data.get("explanations")
            if isinstance(data, list):
                return data
        log.info("the export endpoint answered %s; reading the dataset bucket", status)
        records: list[dict] = []
        for i in range(MAX_BATCHES):
            url = f"{datasets_url}/{model_id}/{sae_id}/explanations/batch-{i}.jsonl.gz"
            status, body = _get(client, url, None, budget)
            if status in (403, 404):
                break
            if status != 200:
                raise ValueError(f"Neuronpedia's dataset answered HTTP {status} for {url}.")
            try:
                lines = gzip.decompress(body).decode("utf-8").splitlines()
                records += [json.loads(line) for line in lines if line.strip()]
            except (OSError, ValueError) as exc:
                raise ValueError(f"Neuronpedia's dataset file {url} is damaged ({exc}).") from exc
    if not records:
        raise ValueError(f"Neuronpedia has no explanations for {neuronpedia_id} (the export "
                         f"endpoint answered HTTP {status} and the dataset holds none).")
    return records


def as_explanations(records: list, neuronpedia_id: str, d_sae: int) -> tuple[list[Explanation],
                                                                           int]:
    """(explanations, records skipped): records without a latent index in 0..d_sae-1 or
    without a description are skipped."""
    out, skipped, seen = [], 0, {}
    now = time.time()
    for rec in records:
        try:
            latent = int(rec["index"])
            text = str(rec.get("description") or "").strip()
        except (KeyError, TypeError, ValueError):
            skipped += 1
            continue
        if not (0 <= latent < d_sae and text):
            skipped += 1
            continue
        score = rec.get("score")
        score = float(score) if isinstance(score, (int, float)) and not isinstance(
            score, bool) and abs(score) < 1e9 else None
        explainer = str(rec.get("explanationModelName") or "")
        kind = str(rec.get("typeName") or "")
        n = seen.get((latent, explainer, kind), 0)
        seen[(latent, explainer, kind)] = n + 1
        out.append(Explanation(latent, "neuronpedia", text, score,
                               {"neuronpedia_id": neuronpedia_id, "explainer": explainer,
                                "type": kind, "variant": n}, now))
    return out, skipped


def import_explanations(store: LabelStore, scope: str, neuronpedia_id: str, d_sae: int,
                        **fetch_kw) -> tuple[int, int]:
    """Fetch and store Neuronpedia's explanations of the SAE (replacing an earlier import's);
    (stored, skipped). Nothing is stored when the fetch fails."""
    found, skipped = as_explanations(fetch_records(neuronpedia_id, **fetch_kw), neuronpedia_id,
                                     d_sae)
    store.put(scope, found)
    return len(found), skipped
