"""A model server of the kind people run in containers: it builds a retrieval model at
start-up, warms its caches, then answers HTTP requests. It runs *inside* the benchmark
image (Debian's python3 with numpy and scikit-learn wheels), never in the benchmark's
own interpreter.

    python3 /srv/server.py --model-mib 1024 --port 8080 [--seed 7]

The model, sized by --model-mib (the embedding table is most of it):
1. an embedding table of `rows x 128` float32 drawn from a seeded generator and mixed by
   a fixed random basis (so rows correlate, as learned embeddings do), rows L2-normalised;
2. an IVF index: scikit-learn's MiniBatchKMeans trained on a sample, then every row
   assigned to its nearest centroid (inverted lists);
3. a ranking head: scikit-learn's Ridge fitted on a sample against a seeded target;
4. warm-up: a batch of queries through the whole path, their answers cached.
Only then does it bind its port, as servers that load a model before they listen do.

Endpoints: GET /healthz -> "ok"; GET /stats -> start-up phase timings and the CPU time
of the start-up (ms, measured in this process: a restored server reports those of the
start it was checkpointed from); POST /predict {"vector": [128 floats], "k": 10} -> {"ids", "scores", "rank"}:
the nearest rows by cosine within the 8 nearest lists, and the head's score
(`"cache": false` computes it afresh and leaves the cache alone). Same model and
query, same answer: the benchmark compares a restored server's answer with
the cold one byte for byte.
"""

from __future__ import annotations

import argparse
import json
import time

STARTED = time.monotonic()  # after the interpreter's own start

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIM = 128
CLUSTERS = 256
PROBES = 8
SAMPLE_ROWS = 32_000
CHUNK_ROWS = 1 << 16
WARMUP_QUERIES = 64


class Model:
    def __init__(self, model_mib: int, seed: int) -> None:
        self.phases_ms: dict[str, float] = {}
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.phases_ms[name] = round((now - mark) * 1000, 1)
            mark = now

        import numpy as np
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.linear_model import Ridge
        self.np = np
        phase("import")

        rows = max(CLUSTERS * 4, model_mib * (1 << 20) // (DIM * 4))
        rng = np.random.default_rng(seed)
        basis = rng.standard_normal((DIM, DIM), dtype=np.float32) / np.float32(np.sqrt(DIM))
        table = np.empty((rows, DIM), dtype=np.float32)
        for start in range(0, rows, CHUNK_ROWS):
            block = rng.standard_normal((min(CHUNK_ROWS, rows - start), DIM), dtype=np.float32) @ basis
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            table[start:start + len(block)] = block
        phase("embeddings")

        sample = table[np.sort(rng.choice(rows, size=min(rows, SAMPLE_ROWS), replace=False))]
        kmeans = MiniBatchKMeans(n_clusters=CLUSTERS, batch_size=4096, n_init=1, max_iter=10,
                                 random_state=seed).fit(sample)
        centroids = kmeans.cluster_centers_.astype(np.float32)
        half_norms = 0.5 * np.einsum("ij,ij->i", centroids, centroids)
        labels = np.empty(rows, dtype=np.int32)
        for start in range(0, rows, CHUNK_ROWS):
            # nearest centroid: argmax of x.c - |c|^2/2 (the |x|^2 term is the same for all)
            labels[start:start + CHUNK_ROWS] = np.argmax(
                table[start:start + CHUNK_ROWS] @ centroids.T - half_norms, axis=1)
        order = np.argsort(labels, kind="stable").astype(np.int64)
        offsets = np.searchsorted(labels[order], np.arange(CLUSTERS + 1))
        phase("index")

        truth = rng.standard_normal(DIM, dtype=np.float32)
        target = sample @ truth + 0.1 * rng.standard_normal(len(sample), dtype=np.float32)
        head = Ridge(alpha=1.0).fit(sample, target)
        phase("head")

        self.table, self.centroids, self.half_norms = table, centroids, half_norms
        self.order, self.offsets = order, offsets
        self.coef = head.coef_.astype(np.float32)
        self.intercept = float(head.intercept_)
        self.cache: dict[bytes, dict[str, object]] = {}
        for query in rng.standard_normal((WARMUP_QUERIES, DIM), dtype=np.float32):
            self.predict(query, 10)
        phase("warmup")

    def predict(self, vector: object, k: int, use_cache: bool = True) -> dict[str, object]:
        np = self.np
        query = np.asarray(vector, dtype=np.float32).reshape(DIM)
        key = query.tobytes() + k.to_bytes(4, "little")
        cached = self.cache.get(key) if use_cache else None
        if cached is not None:
            return cached
        unit = query / max(float(np.linalg.norm(query)), 1e-12)
        lists = np.argsort(-(self.centroids @ unit - self.half_norms), kind="stable")[:PROBES]
        candidates = np.concatenate([self.order[self.offsets[c]:self.offsets[c + 1]] for c in lists])
        scores = self.table[candidates] @ unit
        top = np.argsort(-scores, kind="stable")[:k]
        answer = {"ids": [int(i) for i in candidates[top]],
                  "scores": [float(s) for s in scores[top]],
                  "rank": float(unit @ self.coef + self.intercept)}
        if use_cache:
            self.cache[key] = answer
        return answer


class Handler(BaseHTTPRequestHandler):
    model: Model
    started_ms: dict[str, float]
    protocol_version = "HTTP/1.0"  # one request per connection: nothing open at a checkpoint

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the container's stdout goes nowhere

    def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif self.path == "/stats":
            self._send(200, json.dumps(self.started_ms).encode())
        else:
            self._send(404, b"{}")

    def do_POST(self) -> None:
        if self.path != "/predict":
            self._send(404, b"{}")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(min(length, 1 << 20)))
            answer = self.model.predict(request["vector"], int(request.get("k", 10)),
                                        bool(request.get("cache", True)))
        except (ValueError, KeyError, TypeError) as err:
            self._send(400, json.dumps({"error": str(err)}).encode())
            return
        self._send(200, json.dumps(answer, sort_keys=True).encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-mib", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    model = Model(args.model_mib, args.seed)
    Handler.model = model
    # CPU time next to the wall time: on a shared machine the wall time of a cold start
    # swings with the neighbours' load, its CPU time much less.
    Handler.started_ms = {**model.phases_ms, "total": round((time.monotonic() - STARTED) * 1000, 1),
                          "cpu": round(time.process_time() * 1000, 1)}
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
