"""``nvila bench-serve``: server throughput, sequential vs concurrent clients, in one process run.

Starts the real app with uvicorn on a free loopback port (in a thread), then sends the same bounded set
of chat requests once one at a time and once from ``concurrency`` clients, and reports requests/s,
generated tokens/s and latency percentiles for both, plus their ratio.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Any, port: int) -> Any:
    """Run ``app`` with uvicorn in a daemon thread; returns the uvicorn server once it accepts requests."""
    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start within 60 s")


def run_load(port: int, model: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    """Send ``requests`` text prompts from ``concurrency`` threads; returns throughput and latencies."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    latencies: list[float] = []
    tokens = [0]
    failures = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"Request {i}: describe a sunny day in a few words."}]}
        t = time.perf_counter()
        r = httpx.post(url, json=body, timeout=600)
        dt = time.perf_counter() - t
        with lock:
            if r.status_code == 200:
                latencies.append(dt)
                tokens[0] += r.json()["usage"]["completion_tokens"]
            else:
                failures[0] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    lat = sorted(latencies) or [float("nan")]
    return {"requests_per_s": len(latencies) / wall, "tokens_per_s": tokens[0] / wall, "failures": failures[0],
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "wall_s": wall}
