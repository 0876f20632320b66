"""Latency of a short request under the soak's mixed load: the soak's 16 clients (mixed modes,
streams, disconnects, tokenizer routes, low limits) against a real exitserve on the tiny
fixture, and beside them two probes that each send a 16-token greedy request every 0.1 s, one
with the default priority and one with `priority: -1`. Prints p50/p95 of each (over the
answered ones; the soak's queue bound turns many away with 429) against the same request on
the idle server.

Usage: python tests/e2e/latency.py BINARY [SECONDS] [CHECKPOINT]

CHECKPOINT: another model folder to serve in place of the tiny fixture (e.g. the bench's
125M-shaped one), served under the fixture's name so that the soak's requests reach it.
"""
import collections
import multiprocessing
import os
import statistics
import sys
import threading
import time

import httpx

import soak
from server import MODEL, running_server


def probe(base, priority, until, out, refused=None):
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
            elif refused is not None:
                refused.append(r.status_code)
            time.sleep(0.1)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def load(base, until):
    """The soak's clients, in a process of their own: in the probes' process their threads
    would hold the interpreter lock while a probe's answer waits to be read, and the probe
    would time that."""
    soak.MIXED_PRIORITIES = False  # the load the probes were measured against
    tally = soak.Tally()
    clients = [threading.Thread(target=soak.client_loop, args=(base, i, until, tally))
               for i in range(soak.CLIENTS)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    checkpoint = sys.argv[3] if len(sys.argv) > 3 else None
    limits = ["--max-batch-size", "8", "--max-queued-requests", "6", "--max-batch-total-tokens", "1200",
              "--stream-buffer-events", "4"]
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # as deployed (see soak.py)
    served = {} if checkpoint is None else {"fixture": checkpoint}
    if checkpoint is not None:
        limits += ["--served-model-name", MODEL]
    with running_server(binary, *limits, **served) as server:
        idle = []
        probe(server.base, None, time.time() + 5, idle)
        until = time.time() + seconds
        loader = multiprocessing.Process(target=load, args=(server.base, until))
        loader.start()
        results = {None: [], -1: []}
        refused = {None: [], -1: []}
        probes = [threading.Thread(target=probe, args=(server.base, p, until, results[p], refused[p]))
                  for p in results]
        for t in probes:
            t.start()
        for t in probes:
            t.join()
        loader.join()
        metrics = httpx.get(f"{server.base}/metrics", timeout=30).text
    preempted = next((line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("exitserve_preemptions_total ")), "?")
    base = statistics.median(idle)
    print(f"idle: p50 {base * 1e3:.0f} ms over {len(idle)}")
    for p, xs in results.items():
        name = "default priority" if p is None else f"priority {p}"
        print(f"{name}: p50 {pct(xs, 0.5) * 1e3:.0f} ms, p95 {pct(xs, 0.95) * 1e3:.0f} ms "
              f"({pct(xs, 0.95) / base:.1f}x idle) over {len(xs)} answered, {len(refused[p])} refused "
              f"{dict(collections.Counter(refused[p]))}")
    print(f"requests preempted for one of higher priority: {preempted}")


if __name__ == "__main__":
    main()
