"""Load test of `blip3o serve`'s HTTP API: concurrent clients on the loopback interface, bounded in count and time.

    python benchmarks/load_test.py                                # starts `blip3o serve` (bundled tiny model) on a free port
    python benchmarks/load_test.py --model PATH --steps 30        # another model; requests ask for 30 steps
    python benchmarks/load_test.py --random-model                 # untrained weights of the tiny preset (same speed)
    python benchmarks/load_test.py --url http://127.0.0.1:7860    # a server that is already running (loopback only)

Phases:
1. sustained: --clients clients (8) each send POST /api/generate back to back for --duration s (60);
   expected: zero errors; reports p50/p95/max latency and throughput;
2. burst: --burst-clients clients (64) for --burst-duration s (15), more than the queue holds;
   expected: overload answered with 429/503 (clients wait 0.2 s after one, then retry), no other errors;
3. after: the queue drains, GET /health is ok and one more request succeeds.
The server's resident memory (from /health) is sampled every 2 s and printed before, during and after; it must end
within 64 MiB of what it was after the warm-up request.
Exits 1 if an expectation fails. Only loopback addresses are ever contacted; every loop stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from blip3o_next.serving.server import is_loopback

PROMPTS = [
    "a photo of a red circle left of a blue star",
    "a photo of three green triangles",
    'a photo of the word "CAT"',
    "a photo of a yellow square and a purple cross",
]
OVERLOAD = (429, 503)
RSS_TOLERANCE_MB = 64  # growth allowed from after warm-up to the end: allocator slack, not a leak


@dataclass
class Target:
    host: str
    port: int

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        """One request on a fresh connection (simple and robust; loopback connects are cheap)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def health(self) -> dict | None:
        try:
            status, body = self.request("GET", "/health", timeout=10)
            return json.loads(body) if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            return None


@dataclass
class PhaseResult:
    name: str
    clients: int
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # of 200s, seconds
    errors: Counter = field(default_factory=Counter)  # connection errors and unexpected statuses, by kind
    rss_mb: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
        return {
            "phase": self.name, "clients": self.clients, "seconds": round(self.seconds, 1),
            "requests": sum(self.statuses.values()) + sum(self.errors.values()), "ok": self.statuses.get(200, 0),
            "status_counts": dict(sorted(self.statuses.items())), "errors": dict(self.errors),
            "ok_per_s": round(self.statuses.get(200, 0) / self.seconds, 2) if self.seconds else None,
            "latency_p50_s": pct(0.50), "latency_p95_s": pct(0.95), "latency_max_s": round(lat[-1], 3) if lat else None,
            "latency_mean_s": round(statistics.fmean(lat), 3) if lat else None,
            "rss_mb_min": min(self.rss_mb, default=None), "rss_mb_max": max(self.rss_mb, default=None),
        }


def run_phase(target: Target, name: str, clients: int, duration: float, max_requests: int, steps: int | None,
              request_timeout: float, overload_ok: bool) -> PhaseResult:
    """`clients` threads send generate requests back to back until `duration` s or `max_requests` have passed."""
    result = PhaseResult(name, clients)
    lock, stop = threading.Lock(), threading.Event()
    sent = [0]
    deadline = time.monotonic() + duration

    def client(k: int) -> None:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            body = {"prompt": PROMPTS[(k + i) % len(PROMPTS)], "seed": k * 100_000 + i}
            if steps:
                body["steps"] = steps
            i += 1
            start = time.perf_counter()
            try:
                status, _ = target.request("POST", "/api/generate", body, timeout=request_timeout)
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    result.errors[type(e).__name__] += 1
                time.sleep(0.2)
                continue
            took = time.perf_counter() - start
            with lock:
                result.statuses[status] += 1
                if status == 200:
                    result.latencies.append(took)
                elif not (overload_ok and status in OVERLOAD):
                    result.errors[f"HTTP {status}"] += 1
            if status in OVERLOAD:
                time.sleep(0.2)  # a polite client backs off (bounded: the phase still ends on time)

    def monitor() -> None:
        while not stop.wait(2.0):
            health = target.health()
            if health and health.get("rss_mb") is not None:
                result.rss_mb.append(health["rss_mb"])

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    watcher = threading.Thread(target=monitor, daemon=True)
    start = time.monotonic()
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + request_timeout + 5)
    stop.set()
    watcher.join(15)
    result.seconds = time.monotonic() - start
    return result


def wait_idle(target: Target, timeout: float) -> dict | None:
    """Wait (bounded) until nothing runs or waits; the last health answer."""
    deadline = time.monotonic() + timeout
    health = target.health()
    while time.monotonic() < deadline:
        health = target.health()
        if health and health["queue"]["running"] == 0 and health["queue"]["waiting"] == 0:
            return health
        time.sleep(0.5)
    return health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_model(path: str) -> None:
    """Untrained weights of the tiny preset: the bundled model's shapes, so the same speed, for when none is trained yet."""
    import torch

    from blip3o_next.models.presets import build_model, tiny_parts_configs
    from blip3o_next.models.text_tokenizer import build_text_tokenizer

    configs = tiny_parts_configs(vocab_size=0)
    tokenizer, _ = build_text_tokenizer(configs["image_tokenizer"]["codebook_size"], corpus_size=3000)
    torch.manual_seed(0)
    build_model(tokenizer, configs).save_pretrained(path)


def start_server(args: argparse.Namespace, model: str, log_path: str) -> tuple[subprocess.Popen, Target]:
    """`blip3o serve` in a child process on a free loopback port; waits (bounded) until it answers /health."""
    port = free_port()
    cmd = [sys.executable, "-m", "blip3o_next.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--model", model,
           "--queue-size", str(args.queue_size), "--timeout", str(args.server_timeout)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    target = Target("127.0.0.1", port)
    deadline = time.monotonic() + args.startup_timeout
    while target.health() is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            sys.exit(f"the server did not start; see {log_path}")
        time.sleep(0.5)
    return proc, target


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def print_phase(s: dict) -> None:
    print(f"\n[{s['phase']}] {s['clients']} clients, {s['seconds']} s, {s['requests']} requests")
    print(f"  status counts: {s['status_counts']}   errors: {s['errors'] or 0}")
    print(f"  200s: {s['ok']} ({s['ok_per_s']}/s)   latency p50 {s['latency_p50_s']} s, p95 {s['latency_p95_s']} s, "
          f"max {s['latency_max_s']} s")
    print(f"  server RSS during: {s['rss_mb_min']} .. {s['rss_mb_max']} MiB")


@contextmanager
def server_under_test(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Iterator[Target]:
    """The server to load: the running one at --url (loopback only), or `blip3o serve` started here and stopped after."""
    if args.url:
        parts = urlsplit(args.url)
        if not parts.hostname or not is_loopback(parts.hostname):
            parser.error(f"{args.url}: only loopback servers (127.0.0.0/8, ::1, localhost) may be load-tested")
        target = Target(parts.hostname, parts.port or 80)
        if target.health() is None:
            sys.exit(f"{args.url}/health does not answer")
        yield target
        return
    log_path = os.path.join(tempfile.gettempdir(), f"blip3o-load-test-server-{os.getpid()}.log")
    with tempfile.TemporaryDirectory(prefix="blip3o-load-test-") as scratch:
        model = args.model
        if args.random_model:
            model = os.path.join(scratch, "random-tiny")
            print(f"saving an untrained tiny-preset model to {model} ...", flush=True)
            save_random_model(model)
        print(f"starting blip3o serve --model {model} (log: {log_path}) ...", flush=True)
        proc, target = start_server(args, model, log_path)
        try:
            yield target
        finally:
            stop_server(proc)


def measure(target: Target, args: argparse.Namespace) -> dict:
    """Warm up, run the phases, let the queue drain, send one last request; the summaries and health snapshots."""
    steps = {"steps": args.steps} if args.steps else {}
    before = target.health()
    print(f"server: model {before['model']}, queue capacity {before['queue']['capacity']}, defaults {before['defaults']}, "
          f"RSS {before['rss_mb']} MiB", flush=True)
    target.request("POST", "/api/generate", {"prompt": PROMPTS[0], **steps}, timeout=args.request_timeout)  # not counted
    warm = target.health()
    phases = [run_phase(target, "sustained", args.clients, args.duration, args.max_requests, args.steps, args.request_timeout,
                        overload_ok=False)]
    print_phase(phases[0].summary())
    mid = wait_idle(target, args.request_timeout)
    if args.burst_clients:
        phases.append(run_phase(target, "burst", args.burst_clients, args.burst_duration, args.max_requests, args.steps,
                                args.request_timeout, overload_ok=True))
        print_phase(phases[1].summary())
    after = wait_idle(target, args.request_timeout)
    try:
        final_status, _ = target.request("POST", "/api/generate", {"prompt": PROMPTS[1], **steps}, timeout=args.request_timeout)
    except (OSError, http.client.HTTPException):
        final_status = None
    after = target.health() or after
    rss = {"start": before["rss_mb"], "after_warmup": warm and warm["rss_mb"], "after_sustained": mid and mid["rss_mb"],
           "end": after and after["rss_mb"]}
    return {"phases": [p.summary() for p in phases], "rss_mb": rss, "final_status": final_status, "health": after}


def expectations(report: dict) -> dict[str, bool]:
    """What the run must show: no errors under sustained load, overload answered, healthy after, memory steady."""
    sustained, after, rss = report["phases"][0], report["health"], report["rss_mb"]
    healthy = bool(after and after["status"] == "ok") and report["final_status"] == 200
    steady = None not in (rss["after_warmup"], rss["end"]) and rss["end"] - rss["after_warmup"] <= RSS_TOLERANCE_MB
    checks = {
        "sustained: zero errors": not sustained["errors"] and sustained["ok"] > 0,
        "healthy afterwards (GET /health ok, one more request 200)": healthy,
        f"memory steady: end RSS within {RSS_TOLERANCE_MB} MiB of the RSS after warm-up": steady,
    }
    if len(report["phases"]) > 1:
        burst = report["phases"][1]
        checks["burst: overload answered with 429/503, no other errors"] = (
            not burst["errors"] and sum(burst["status_counts"].get(s, 0) for s in OVERLOAD) > 0)
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (loopback only); default: start one")
    parser.add_argument("--model", default="tiny", help="model for the started server: bundled name or checkpoint folder")
    parser.add_argument("--random-model", action="store_true", help="serve untrained weights of the tiny preset instead")
    parser.add_argument("--threads", type=int, help="torch threads of the started server")
    parser.add_argument("--queue-size", type=int, default=16, help="queue size of the started server")
    parser.add_argument("--server-timeout", type=float, default=300, help="per-request timeout of the started server, s")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for the started server")
    parser.add_argument("--steps", type=int, help="diffusion steps per request (default: the server's)")
    parser.add_argument("--clients", type=int, default=8, help="clients in the sustained phase")
    parser.add_argument("--duration", type=float, default=60, help="seconds of the sustained phase (at most 600)")
    parser.add_argument("--burst-clients", type=int, default=64, help="clients in the burst phase (0 skips it)")
    parser.add_argument("--burst-duration", type=float, default=15, help="seconds of the burst phase (at most 600)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="at most this many requests per phase")
    parser.add_argument("--request-timeout", type=float, default=330, help="client-side timeout of one request, s")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not (0 < args.duration <= 600 and 0 <= args.burst_duration <= 600 and 0 < args.clients <= 256
            and 0 <= args.burst_clients <= 256):
        parser.error("durations must be in (0, 600] s and clients in [1, 256]")

    with server_under_test(args, parser) as target:
        report = measure(target, args)
    checks = expectations(report)
    print(f"\nserver RSS (MiB): {report['rss_mb']}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "checks": checks}, f, indent=2)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
