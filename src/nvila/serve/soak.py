"""``nvila soak``: a long mixed load against a real ``nvila serve`` process, for failures, latency and leaks.

The server runs as its own process (``python -m nvila serve``), so its resident memory is its own: it is read
from ``/proc/<pid>/status`` after the first ``warm`` requests and after the last. ``concurrency`` clients send
``requests`` chat completions cycling through four kinds: text, an image (data URL), a video (data URL) and a
JSON-schema constrained answer (``response_format``), each checked (status 200, a ``finish_reason``; the
constrained answer parses and has the schema's keys unless cut by ``max_tokens``). Then a burst larger than the
server's queue bound must be answered with HTTP 429 for the excess while the server stays healthy.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvila.base.errors import NvilaError
from nvila.serve.loadtest import free_port

KINDS = ("text", "image", "video", "json_schema")
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
          "required": ["answer", "confidence"], "additionalProperties": False}


@dataclass
class SoakConfig:
    model: str
    image: Path
    video: Path
    requests: int = 1000
    concurrency: int = 16
    warm: int = 100                    # RSS is compared against its value after this many requests
    max_tokens: int = 16
    max_queue: int = 32
    max_batch: int = 8
    server_args: list[str] = field(default_factory=list)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise NvilaError(f"no VmRSS for process {pid}")


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def request_body(kind: str, i: int, cfg: SoakConfig, media: dict[str, str]) -> dict[str, Any]:
    text = f"Request {i}: answer in a few words."
    content: Any = text
    extra: dict[str, Any] = {}
    if kind == "image":
        content = [{"type": "image_url", "image_url": {"url": media["image"]}}, {"type": "text", "text": text}]
    elif kind == "video":
        content = [{"type": "video_url", "video_url": {"url": media["video"]}}, {"type": "text", "text": text}]
    elif kind == "json_schema":
        extra["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    return {"model": "soak", "max_tokens": cfg.max_tokens if kind != "json_schema" else 4 * cfg.max_tokens,
            "temperature": 0.7, "seed": i, "messages": [{"role": "user", "content": content}], **extra}


def check_reply(kind: str, reply: dict[str, Any]) -> str | None:
    """What is wrong with a 200 reply (None: nothing)."""
    choice = reply["choices"][0]
    if choice.get("finish_reason") not in ("stop", "length"):
        return f"finish_reason {choice.get('finish_reason')!r}"
    if kind == "json_schema" and choice["finish_reason"] == "stop":
        try:
            data = json.loads(choice["message"]["content"])
        except ValueError:
            return "constrained answer is not JSON"
        if set(data) != set(SCHEMA["required"]):
            return f"constrained answer has keys {sorted(data)}"
    return None


class Server:
    """``python -m nvila serve`` in a subprocess, on a free loopback port."""

    def __init__(self, cfg: SoakConfig) -> None:
        import httpx

        self.port = free_port()
        cmd = [sys.executable, "-m", "nvila", "serve", "--model", cfg.model, "--port", str(self.port),
               "--served-model-name", "soak", "--max-queue", str(cfg.max_queue), "--max-batch", str(cfg.max_batch),
               "--allow-remote-media", *cfg.server_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise NvilaError(f"nvila serve exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise NvilaError("nvila serve did not answer /health within 180 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def soak(cfg: SoakConfig, progress: bool = False) -> dict[str, Any]:
    """Run the soak and the overload burst; returns the report (failures listed, not raised)."""
    import httpx

    if cfg.max_queue <= cfg.concurrency:
        raise NvilaError(f"the queue bound ({cfg.max_queue}) must exceed the concurrency ({cfg.concurrency}): the soak "
                         "itself must never be refused; the overload burst tests the bound")
    media = {"image": _data_url(cfg.image, "image/png"), "video": _data_url(cfg.video, "video/x-msvideo")}
    server = Server(cfg)
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {k: [] for k in KINDS}
    stopped = dict.fromkeys(KINDS, 0)               # answers that ended on their own (JSON ones validated)
    failures: list[str] = []
    done = [0]
    rss: dict[str, int] = {"start": rss_bytes(server.proc.pid)}
    try:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            def one(i: int) -> None:
                kind = KINDS[i % len(KINDS)]
                t = time.perf_counter()
                finish = None
                try:
                    r = client.post("/v1/chat/completions", json=request_body(kind, i, cfg, media))
                    problem = check_reply(kind, r.json()) if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                    finish = r.json()["choices"][0]["finish_reason"] if not problem else None
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    problem = f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t
                with lock:
                    if problem:
                        failures.append(f"request {i} ({kind}): {problem}")
                    else:
                        latencies[kind].append(dt)
                        stopped[kind] += finish == "stop"
                    done[0] += 1
                    if done[0] == cfg.warm:
                        rss["warm"] = rss_bytes(server.proc.pid)
                    if progress and done[0] % 100 == 0:
                        print(f"soak: {done[0]}/{cfg.requests}, {len(failures)} failures", file=sys.stderr)

            start = time.perf_counter()
            with ThreadPoolExecutor(cfg.concurrency) as pool:
                list(pool.map(one, range(cfg.requests)))
            wall = time.perf_counter() - start
            rss["end"] = rss_bytes(server.proc.pid)
            overload = _burst(server.url, cfg, media)
            healthy = client.get("/health").status_code == 200
    finally:
        server.stop()
    every = sorted(x for v in latencies.values() for x in v) or [float("nan")]
    growth = rss["end"] / rss["warm"] - 1 if "warm" in rss else float("nan")
    return {
        "requests": cfg.requests, "concurrency": cfg.concurrency, "failures": len(failures),
        "failure_examples": failures[:10], "wall_s": wall, "requests_per_s": sum(map(len, latencies.values())) / wall,
        "p50_s": statistics.median(every), "p95_s": every[min(len(every) - 1, int(0.95 * len(every)))],
        "by_kind": {k: {"n": len(v), "stopped": stopped[k], "p50_s": statistics.median(v) if v else None}
                    for k, v in latencies.items()},
        "rss_bytes": rss, "rss_growth_after_warm": growth, "overload": overload, "healthy_after": healthy,
    }


def _burst(url: str, cfg: SoakConfig, media: dict[str, str]) -> dict[str, int]:
    """Twice the queue bound at once: the excess must get 429, the rest 200."""
    import httpx

    n = 2 * cfg.max_queue + cfg.max_batch
    codes: list[int] = []
    body = request_body("text", 0, cfg, media) | {"max_tokens": 8 * cfg.max_tokens}
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body).status_code, range(n)))
    return {"sent": n, "ok": codes.count(200), "rejected_429": codes.count(429),
            "other": len(codes) - codes.count(200) - codes.count(429)}


def verdict(report: dict[str, Any], max_growth: float = 0.10) -> list[str]:
    """The soak's pass conditions that failed (empty: passed)."""
    problems = []
    if report["failures"]:
        problems.append(f"{report['failures']} failed requests, e.g. {report['failure_examples'][:3]}")
    if not report["rss_growth_after_warm"] <= max_growth:
        problems.append(f"server RSS grew {100 * report['rss_growth_after_warm']:.1f} % after the first "
                        f"warm-up requests (bound {100 * max_growth:.0f} %)")
    if report["overload"]["rejected_429"] == 0 or report["overload"]["other"]:
        problems.append(f"overload burst: {report['overload']} (expected 429s and 200s only)")
    if not report["healthy_after"]:
        problems.append("the server was not healthy after the run")
    return problems


def default_media() -> tuple[Path, Path]:
    """A packaged test photo and clip when run from a checkout (tests/fixtures/official/media)."""
    root = Path(os.environ.get("NVILA_FIXTURES", Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "official"))
    return root / "media" / "hopper_64x64.png", root / "media" / "clip_24f_12fps_176x144.avi"
