"""Latency of a short request under the soak's mixed load: the soak's 16 clients (mixed modes,
streams, disconnects, tokenizer routes, low limits) against a real exitserve on the tiny
fixture, and beside them a probe that sends a 16-token greedy request every 0.25 s, with the
default priority and with `priority: -1`. Prints p50/p95 of each against the same request on
the idle server.

Usage: python tests/e2e/latency.py BINARY [SECONDS]
"""
import statistics
import sys
import threading
import time

import httpx

import soak
from server import MODEL, running_server


def probe(base, priority, until, out):
    body = {"model": MODEL, "prompt": "the tale of early exits", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    if priority is not None:
        body["priority"] = priority
    with httpx.Client() as client:
        while time.time() < until:
            t = time.time()
            r = client.post(f"{base}/v1/completions", json=body, timeout=120)
            if r.status_code == 200:
                out.append(time.time() - t)
            time.sleep(0.25)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    limits = ["--max-batch-size", "8", "--max-queued-requests", "6", "--max-batch-total-tokens", "1200",
              "--stream-buffer-events", "4"]
    with running_server(binary, *limits) as server:
        idle = []
        probe(server.base, None, time.time() + 5, idle)
        tally = soak.Tally()
        until = time.time() + seconds
        clients = [threading.Thread(target=soak.client_loop, args=(server.base, i, until, tally))
                   for i in range(soak.CLIENTS)]
        results = {None: [], -1: []}
        probes = [threading.Thread(target=probe, args=(server.base, p, until, results[p])) for p in results]
        for t in clients + probes:
            t.start()
        for t in clients + probes:
            t.join()
    base = statistics.median(idle)
    print(f"idle: p50 {base * 1e3:.0f} ms over {len(idle)}")
    for p, xs in results.items():
        name = "default priority" if p is None else f"priority {p}"
        print(f"{name}: p50 {pct(xs, 0.5) * 1e3:.0f} ms, p95 {pct(xs, 0.95) * 1e3:.0f} ms "
              f"({pct(xs, 0.95) / base:.1f}x idle) over {len(xs)} requests")


if __name__ == "__main__":
    main()
