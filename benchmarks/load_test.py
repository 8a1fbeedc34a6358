"""Bounded load test of the inspection service, on this machine's loopback only.

    python benchmarks/load_test.py --model builtin --requests 200 --concurrency 4

Starts ``metaldefect serve`` as a subprocess on 127.0.0.1 at a free port, waits until
``/v1/health`` answers, sends a few warm-up requests, then exactly ``--requests`` uploads
(``POST /v1/detect``, multipart, the packaged NEU-DET samples in turn) from
``--concurrency`` client threads, and stops the server. Reports requests/s, latency
percentiles (client side, whole request) and the error count; exit status 1 when any
request failed. It never talks to any address but 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

HOST = "127.0.0.1"  # loopback only, by design: this script must not load anything else
SAMPLES = Path(__file__).resolve().parents[1] / "src" / "metaldefect" / "samples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "metaldefect", "serve", "--model", args.model, "--host", HOST,
               "--port", str(port), "--concurrency", str(args.server_concurrency), "--queue", str(args.queue)]
    print("server:", " ".join(command[1:]), flush=True)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(server: subprocess.Popen, url: str, timeout: float, log_path: Path) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: the server stopped (exit {server.returncode}); its log:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/v1/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.5)
    sys.exit(f"error: the server did not answer within {timeout:.0f} s; its log:\n{log_path.read_text()[-3000:]}")


def run_load(url: str, images: list[tuple[str, bytes]], requests: int, concurrency: int) -> dict:
    """``requests`` uploads from ``concurrency`` threads; latencies (s), errors, server-side ms, wall time."""
    latencies = np.zeros(requests)
    server_ms = np.zeros(requests)
    errors: list[str] = []
    lock = threading.Lock()
    bar = tqdm(total=requests, unit="req", desc="load", file=sys.stderr, disable=None)

    with httpx.Client(timeout=120) as client:  # thread-safe; pooled keep-alive connections
        def one(index: int) -> None:
            name, data = images[index % len(images)]
            start = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/detect", files={"file": (name, data, "image/jpeg")})
                ok = response.status_code == 200
                message = "" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as error:
                ok, message, response = False, f"{error.__class__.__name__}: {error}", None
            latencies[index] = time.perf_counter() - start
            with lock:
                if ok:
                    server_ms[index] = response.json()["elapsed_ms"]
                else:
                    errors.append(message)
                bar.update(1)

        wall_start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - wall_start
    bar.close()
    return {"latencies": latencies, "server_ms": server_ms[server_ms > 0], "errors": errors, "wall": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="what `metaldefect serve --model` gets (default: builtin)")
    parser.add_argument("--requests", type=int, default=200, help="measured requests (default: 200)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads sending at once (default: 4)")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests first (default: 4)")
    parser.add_argument("--server-concurrency", type=int, default=1, help="serve --concurrency (default: 1)")
    parser.add_argument("--queue", type=int, default=16, help="serve --queue (default: 16)")
    parser.add_argument("--images", nargs="+", type=Path,
                        help="images to upload in turn (default: the packaged samples)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the model to load")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")

    files = args.images or sorted(SAMPLES.glob("*.jpg"))
    images = [(path.name, path.read_bytes()) for path in files]
    port = free_port()
    url = f"http://{HOST}:{port}"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="metaldefect-load-") as folder:
        log_path = Path(folder) / "server.log"
        with open(log_path, "wb") as log:
            server = start_server(args, port, log)
            try:
                started = time.perf_counter()
                health = wait_ready(server, url, args.startup_timeout, log_path)
                print(f"server ready in {time.perf_counter() - started:.1f} s: model {health['model']}", flush=True)
                if args.warmup:
                    run_load(url, images, args.warmup, min(args.concurrency, args.warmup))
                result = run_load(url, images, args.requests, args.concurrency)
            finally:
                server.terminate()
                server.wait(timeout=30)
    latencies_ms = result["latencies"] * 1000.0
    summary = {
        "model": health["model"], "requests": args.requests, "concurrency": args.concurrency,
        "server_concurrency": args.server_concurrency, "images": [name for name, _ in images],
        "requests_per_s": round(args.requests / result["wall"], 2), "wall_s": round(result["wall"], 1),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 1),
        "p90_ms": round(float(np.percentile(latencies_ms, 90)), 1),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 1),
        "max_ms": round(float(latencies_ms.max()), 1),
        "server_elapsed_ms_median": (round(float(np.median(result["server_ms"])), 1)
                                     if result["server_ms"].size else None),
        "errors": len(result["errors"]),
        "cpus": os.cpu_count(), "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(summary, indent=2))
    print(f"| {summary['model']} | {args.requests} | {args.concurrency} | {summary['requests_per_s']} | "
          f"{summary['p50_ms']} | {summary['p99_ms']} | {summary['server_elapsed_ms_median']} | {summary['errors']} |")
    for message in result["errors"][:10]:
        print("error:", message, file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
