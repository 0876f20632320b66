"""Parity of a server binary with the reference on one tiny fixture, through HTTP: every
reference case (prompt x mode) greedily, one at a time and then all at once, greedy ids
compared with the reference's and first-step top-5 logprobs within 1e-3 — with logprobs
(chosen in the step, the logprobs read there), with a logit bias of 0 (chosen on the host from
copied rows) and without logprobs (chosen in the step) — and seeded sampling drawn in the step
(without and with logprobs) against drawn on the host (a logit bias of 0); then echo's scoring of every entry of the fixture's `.scoring.json` (all at once, the
prompt logprobs read where the logits are) within 1e-3 of the reference's; then the same
greedy and sampled passes over the fixture's `.dola.json` cases (DoLa's token chosen in the
step from the candidate chosen there) and `.sled.json` cases (SLED's scores computed in the
step), all at once.
Standard library only (it runs on the GPU machine, which has no network). Prints one JSON
line per pass.

    python3 bench/gpu/parity.py SERVER_BINARY tests/fixtures/tiny-gpt2-multiexit --dtype bf16
"""
import argparse, concurrent.futures, json, os, socket, subprocess, sys, tempfile, time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("server")
ap.add_argument("fixture")
ap.add_argument("--dtype", default="f32")
ap.add_argument("--flags", default="", help="more server flags, space-separated")
a = ap.parse_args()

name = os.path.basename(a.fixture.rstrip("/"))
reference = json.load(open(a.fixture.rstrip("/") + ".reference.json"))
scoring = json.load(open(a.fixture.rstrip("/") + ".scoring.json"))
dola = json.load(open(a.fixture.rstrip("/") + ".dola.json"))
for c in dola["cases"]:
    c["multi_exit"] = {"mode": "dola", "layers": c["layers"], "premature": c["premature"]}
    c["top5"] = [c["top5"]]  # the first step's, as the reference's cases hold them per step
sled = json.load(open(a.fixture.rstrip("/") + ".sled.json"))
for c in sled["cases"]:
    c["multi_exit"] = {"mode": "sled", "premature": c["premature"], **c["params"]}
    c["top5"] = [c["top5"]]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
# The server's log goes to a file (a pipe nobody reads would fill and stall it).
log = tempfile.TemporaryFile("w+")
proc = subprocess.Popen([a.server, "--model", a.fixture, "--dtype", a.dtype, "--port", str(port),
                         "--max-batch-size", "128", *a.flags.split()],
                        stdout=subprocess.DEVNULL, stderr=log, text=True)
base = f"http://127.0.0.1:{port}"


def post(body, route="/v1/completions"):
    req = urllib.request.Request(base + route, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


texts = {}  # token id -> its text, the key of `top_logprobs`


def text(tid):
    if tid not in texts:
        texts[tid] = post({"tokens": [tid]}, "/detokenize")["prompt"]
    return texts[tid]


def multi_exit(mode):
    if mode == "original":
        return {"mode": "original"}
    if mode.startswith("exit:"):
        return {"mode": "exit", "layer": int(mode[5:])}
    upper, lower = mode[len("contrast:"):].split(",")
    return {"mode": "contrast", "upper": upper if upper == "original" else int(upper),
            "lower": int(lower)}


def run(case):
    body = {"model": name, "prompt": case["prompt_ids"], "max_tokens": len(case["greedy_ids"]),
            "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "repetition_penalty": case.get("repetition_penalty", 1.0),
            "multi_exit": case.get("multi_exit") or multi_exit(case["mode"])}
    choice = post({**body, "logprobs": 5})["choices"][0]
    same_ids = choice["token_ids"] == case["greedy_ids"]
    # a bias that changes nothing but makes the host choose from copied rows
    on_host = {"logit_bias": {"0": 0}}
    host_ids = post({**body, **on_host})["choices"][0]["token_ids"] == case["greedy_ids"]
    # first step: the reference's top-5 (token id, score) against the response's top logprobs
    # (keyed by token text; a token missing from them counts as a difference of 1)
    top = choice["logprobs"]["top_logprobs"][0] or {}
    worst = max(abs(top[text(t)] - want) if text(t) in top else 1.0 for t, want in case["top5"][0])
    # without logprobs: chosen in the step
    in_step = post(body)["choices"][0]["token_ids"] == case["greedy_ids"]
    # seeded sampling: drawn in the step, and on the host from copied rows
    sampled = {**body, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": len(case["prompt_ids"])}
    drawn = [post(b)["choices"][0]["token_ids"]
             for b in (sampled, {**sampled, "logprobs": 1}, {**sampled, **on_host})]
    return same_ids, worst, in_step, drawn[0] == drawn[1] == drawn[2], host_ids


def score(entry):
    """The largest difference of the echoed prompt's logprobs from the reference's."""
    body = {"model": name, "prompt": [entry["prompt_ids"]], "echo": True, "logprobs": 1,
            "max_tokens": 0, "multi_exit": multi_exit(entry["mode"])}
    got = post(body)["choices"][0]["logprobs"]["token_logprobs"]
    want = entry["token_logprobs"]
    if len(got) != len(want):
        return float("inf")
    return max(abs(g - w) for g, w in zip(got[1:], want[1:]))


try:
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                sys.exit(f"server did not start: {log.read()[-2000:]}")
            time.sleep(0.5)
    # which of our own kernels the server took (its start-up checks' lines)
    log.seek(0)
    kernels = [line.strip()[-300:] for line in log
               if "paged-attention" in line or "fused epilogues" in line
               or "greedy choice" in line or "sampled tokens" in line or "draw kernel" in line
               or "prompt logprobs" in line or "logprob kernel" in line
               or "SLED" in line]
    print(json.dumps({"fixture": name, "dtype": a.dtype, "kernels": kernels}), flush=True)
    for label, cases in [("alone", reference["cases"]), ("all_at_once", reference["cases"]),
                         ("dola_all_at_once", dola["cases"]),
                         ("sled_all_at_once", sled["cases"])]:
        t = time.time()
        if label == "alone":
            results = [run(c) for c in cases]
        else:
            with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
                results = list(pool.map(run, cases))
        print(json.dumps({"fixture": name, "dtype": a.dtype, "flags": a.flags, "pass": label,
                          "cases": len(cases), "greedy_equal": sum(r[0] for r in results),
                          "worst_top5_logprob_diff": round(max(r[1] for r in results), 6),
                          "greedy_equal_chosen_in_step": sum(r[2] for r in results),
                          "greedy_equal_on_host": sum(r[4] for r in results),
                          "sampled_drawn_in_step_equal_host": sum(r[3] for r in results),
                          "seconds": round(time.time() - t, 2)}), flush=True)
    t = time.time()
    echo = scoring["echo"]
    with concurrent.futures.ThreadPoolExecutor(len(echo)) as pool:
        diffs = list(pool.map(score, echo))
    print(json.dumps({"fixture": name, "dtype": a.dtype, "flags": a.flags, "pass": "echo_scoring",
                      "entries": len(echo), "within_1e-3": sum(d <= 1e-3 for d in diffs),
                      "worst_logprob_diff": round(max(diffs), 6),
                      "seconds": round(time.time() - t, 2)}), flush=True)
finally:
    proc.terminate()
    proc.wait(timeout=30)
