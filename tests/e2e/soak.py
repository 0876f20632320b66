"""A bounded soak: 16 clients for 60 s against a real exitserve on the tiny fixture, mixed
modes, streamed and not, with random disconnects and low limits so that the budget, the queue
bound and the pauses all act; a share of the traffic goes to /tokenize, /detokenize and
/v1/inspect, some of it over their bounds.

Usage: python tests/e2e/soak.py BINARY [SECONDS]
Fails on any 5xx or error event, if queue depth or batch size do not return to 0, or if the
server's resident memory floor grew by 10 % or more from the warmed-up part of the run to its
end.
"""
import json
import os
import random
import sys
import threading
import time

import httpx

from server import MODEL, running_server

CLIENTS = 16
MODES = [
    {"mode": "original"},
    {"mode": "exit", "layer": 1},
    {"mode": "exit", "layer": 2},
    {"mode": "contrast", "upper": 4, "lower": 1},
    {"mode": "contrast", "upper": "original", "lower": 2, "alpha": 0.2},
]
WORDS = "the a tale of exits and layers early late contrast model token stream".split()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric(base, name):
    text = httpx.get(f"{base}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"no metric {name}")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.failures = []

    def add(self, key, failure=None):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if failure:
                self.failures.append(failure)


def side_request(client, base, rng, tally):
    """The routes beside completions: /tokenize, /detokenize, /v1/inspect; some over their
    bounds on purpose (those must be a 400)."""
    kind = rng.choice(["tokenize", "detokenize", "inspect"])
    over = rng.random() < 0.25
    if kind == "tokenize":
        words = 300 if over else rng.randint(1, 60)
        path, body = "/tokenize", {"prompt": " ".join(rng.choice(WORDS) for _ in range(words)),
                                   "return_token_strs": rng.random() < 0.5}
    elif kind == "detokenize":
        n = 257 if over else rng.randint(1, 200)
        path, body = "/detokenize", {"tokens": [rng.randint(0, 50000) for _ in range(n)]}
    else:
        n = 257 if over else rng.randint(1, 40)
        path, body = "/v1/inspect", {"model": MODEL, "prompt": [rng.randint(1, 50000) for _ in range(n)],
                                     "positions": rng.choice(["last", "all"]),
                                     "top_logprobs": rng.randint(0, 20)}
        if body["positions"] == "last" and over:
            body["prompt"] = body["prompt"][:256]
            over = False
    try:
        r = client.post(f"{base}{path}", json=body, timeout=120)
    except httpx.TransportError as e:
        tally.add("transport", f"transport error: {e!r}")
        return
    if over and r.status_code == 400:
        tally.add(f"{kind}-400")
    else:
        check_status(r.status_code, r.text, tally)


# Completions of other priorities than the default, so that requests preempt each other under
# the load (latency.py turns this off: its probes measure against the default-priority mix).
MIXED_PRIORITIES = True


def one_request(client, base, rng, tally):
    if rng.random() < 0.15:
        return side_request(client, base, rng, tally)
    stream = rng.random() < 0.5
    body = {
        "model": MODEL,
        "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))),
        "max_tokens": rng.randint(1, 80),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "multi_exit": rng.choice(MODES),
        "stream": stream,
    }
    if rng.random() < 0.3:
        body["n"] = rng.randint(1, 3)
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS), "\n\n"]
    if MIXED_PRIORITIES and rng.random() < 0.3:
        body["priority"] = rng.choice([-1, 1])
    if rng.random() < 0.1 and not stream:
        body.update(echo=True, logprobs=1, max_tokens=rng.randint(0, 4))
    disconnect = rng.random() < 0.2
    url = f"{base}/v1/completions"
    try:
        if stream:
            with client.stream("POST", url, json=body, timeout=120) as r:
                if r.status_code != 200:
                    r.read()
                    return check_status(r.status_code, r.text, tally)
                seen = 0
                text = ""
                for line in r.iter_lines():
                    text += line + "\n"
                    seen += 1
                    if disconnect and seen >= rng.randint(1, 6):
                        tally.add("disconnected")
                        return  # closing the response drops the connection mid-stream
                # An error event has "error" at its top level; generated text and top
                # logprobs may well contain the word.
                events = [
                    json.loads(line[len("data: "):])
                    for line in text.splitlines()
                    if line.startswith("data: {")
                ]
                errors = [e for e in events if "error" in e]
                if errors:
                    tally.add("error-event", f"stream error: {json.dumps(errors[0])[:500]}")
                elif "data: [DONE]" not in text:
                    tally.add("truncated", f"stream ended without [DONE]: {text[-300:]}")
                else:
                    tally.add("200")
        else:
            timeout = rng.uniform(0.01, 0.2) if disconnect else 120
            try:
                r = client.post(url, json=body, timeout=timeout)
            except httpx.TimeoutException:
                tally.add("disconnected")
                return
            check_status(r.status_code, r.text, tally)
    except httpx.TransportError as e:
        tally.add("transport", f"transport error: {e!r}")


def check_status(status, text, tally):
    if status == 200 or status == 429:
        tally.add(str(status))
        if status == 429:
            time.sleep(0.05)  # as a client honouring Retry-After would, briefly
    elif status >= 500:
        tally.add(str(status), f"{status}: {text[:300]}")
    else:
        tally.add(str(status), f"unexpected {status}: {text[:300]}")


def client_loop(base, seed, until, tally):
    rng = random.Random(seed)
    with httpx.Client() as client:
        while time.time() < until:
            one_request(client, base, rng, tally)


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    limits = ["--max-batch-size", "8", "--max-queued-requests", "6", "--max-batch-total-tokens", "1200",
              "--stream-buffer-events", "4"]
    # As deployed (the Dockerfile sets it): glibc's per-thread arenas otherwise let the
    # resident floor creep by ~10 % in a minute of bursts, which is not a leak (flat with 1-2).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    with running_server(binary, *limits) as server:
        tally = Tally()
        start = time.time()
        until = start + seconds
        threads = [threading.Thread(target=client_loop, args=(server.base, i, until, tally)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        # RSS once a second. Single requests make transient spikes (echo scores every prompt
        # position), so the resident floor is compared: its lowest value in 10-40 % of the
        # run (warmed up) against its lowest in the last 20 %. A leak raises the floor.
        samples = []
        while any(t.is_alive() for t in threads):
            samples.append((time.time() - start, rss_kib(server.pid)))
            time.sleep(1.0)
        for t in threads:
            t.join()
        warm = min(r for at, r in samples if 0.1 * seconds <= at <= 0.4 * seconds)
        late = min(r for at, r in samples if at >= 0.8 * seconds)
        # the engine notices the last disconnects at its next step
        settle = time.time() + 15
        while time.time() < settle:
            if (metric(server.base, "exitserve_queue_depth") == 0 and metric(server.base, "exitserve_batch_size") == 0
                    and metric(server.base, "exitserve_requests_preempted") == 0):
                break
            time.sleep(0.2)
        end = late
        queue, batch = metric(server.base, "exitserve_queue_depth"), metric(server.base, "exitserve_batch_size")
        kv = metric(server.base, "exitserve_kv_tokens_reserved")
        parked = metric(server.base, "exitserve_requests_preempted")
        preemptions = metric(server.base, "exitserve_preemptions_total")
        peak_batch = metric(server.base, "exitserve_batch_size_peak")
        peak_kv = metric(server.base, "exitserve_kv_tokens_reserved_peak")
        summary = {
            "seconds": round(time.time() - start, 1),
            "results": tally.counts,
            "rss_kib_floor_10_40pct": warm,
            "rss_kib_floor_last_20pct": end,
            "rss_kib_series": [r for _, r in samples],
            "rss_growth_pct": round(100.0 * (end - warm) / warm, 2),
            "queue_depth_end": queue,
            "batch_size_end": batch,
            "kv_tokens_reserved_end": kv,
            "batch_size_peak": peak_batch,
            "kv_tokens_reserved_peak": peak_kv,
            "preemptions": preemptions,
            "preempted_end": parked,
        }
        print("soak:", json.dumps(summary))
        problems = list(tally.failures[:10])
        if queue != 0 or batch != 0 or kv != 0 or parked != 0:
            problems.append(f"did not drain: queue {queue}, batch {batch}, kv {kv}, preempted {parked}")
        if peak_batch > 8 or peak_kv > 1200:
            problems.append(f"limits overshot: batch {peak_batch} > 8 or kv {peak_kv} > 1200")
        if end >= warm * 1.10:
            problems.append(f"RSS grew {summary['rss_growth_pct']} % (>= 10 %)")
        if tally.counts.get("200", 0) < 100:
            problems.append("too few successful requests for a soak")
        if problems:
            raise SystemExit("soak failed:\n" + "\n".join(problems))
    print("soak: passed")


if __name__ == "__main__":
    main()
