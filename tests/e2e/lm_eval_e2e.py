"""The real lm-eval (`local-completions`) against a real exitserve on the tiny fixtures of
both architectures, offline.

Usage: python tests/e2e/lm_eval_e2e.py BINARY
       python tests/e2e/lm_eval_e2e.py BINARY --prefix-cache MODEL_DIR [SERVER FLAGS...]
         (only the prefix-cache comparison below, on another checkpoint: prints the wall times)
Runs the two local tasks in tests/lm_eval (multiple choice; generate_until with five stops)
in the original mode and in a contrast mode chosen by model id: on GPT-Neo with
`tokenizer_backend=huggingface` (the fixture folder) and `remote` (the server's /tokenize),
on GPT-2 with `huggingface`. Then checks:
- every logged loglikelihood equals the reference implementation's, per mode
  (tests/fixtures/<fixture>.scoring.json), and `is_greedy` with it;
- every generation equals the reference greedy text cut at the first stop sequence.
Then one DoLa run by model id (`:dola-1-2` on GPT-Neo): each generation begins with the DoLa
reference's greedy text (tests/fixtures/<fixture>.dola.json, 8 tokens) cut at the first stop,
and every loglikelihood is a number (a token DoLa rules out scores -9999, never null).
Last, the 4-choice task (tests/lm_eval/exitserve_mc4.yaml) against a server with the prefix
cache and one with `--no-prefix-cache`: the same loglikelihoods (1e-5) and accuracy, the cache
server reporting hits.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from server import FIXTURE, GPT2_FIXTURE, GPT2_MODEL, MODEL, ROOT, running_server

TASKS = os.path.join(ROOT, "tests", "lm_eval")
STOPS = [" pet", "anten", " accredited", "\n\n", "Christianity"]
# (fixture folder, served id, {mode of the scoring/reference files: model-id suffix}, backends)
RUNS = [
    (FIXTURE, MODEL, {"original": "", "contrast:4,1": ":contrast-4-1"}, ("huggingface", "remote")),
    (GPT2_FIXTURE, GPT2_MODEL, {"original": "", "contrast:6,2": ":contrast-6-2"}, ("huggingface",)),
]
TOLERANCE = 2e-3


def fixture_file(fixture, kind):
    return f"{fixture}.{kind}.json"


def run_lm_eval(port, model_id, backend, out, fixture, tasks="exitserve_mc,exitserve_gen"):
    args = {
        "model": model_id,
        "base_url": f"http://127.0.0.1:{port}/v1/completions",
        "tokenizer_backend": backend,
        "num_concurrent": 2,
        "max_retries": 1,
        "tokenized_requests": True,
    }
    if backend == "huggingface":
        args["tokenizer"] = fixture
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
           "--tasks", tasks, "--include_path", TASKS,
           "--log_samples", "--output_path", out, "--batch_size", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OPENAI_API_KEY="unused", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"lm_eval failed ({model_id}, {backend}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def samples(out, task):
    files = glob.glob(os.path.join(out, "**", f"samples_{task}_*.jsonl"), recursive=True)
    if len(files) != 1:
        raise SystemExit(f"expected one samples file for {task} in {out}, found {files}")
    with open(files[0]) as f:
        return [json.loads(line) for line in f]


def check_loglikelihoods(rows, mode, fixture):
    with open(fixture_file(fixture, "scoring")) as f:
        want = {(x["context"], x["continuation"]): x for x in json.load(f)["loglikelihood"] if x["mode"] == mode}
    checked = 0
    for row in rows:
        # `arguments`: {"gen_args_i": {"arg_0": context, "arg_1": continuation}}; `resps`:
        # one [[loglikelihood, is_greedy]] per argument (logged as strings)
        for i, resp in enumerate(row["resps"]):
            args = row["arguments"][f"gen_args_{i}"]
            ctx, cont = args["arg_0"], args["arg_1"]
            got_ll, got_greedy = float(resp[0][0]), resp[0][1] in (True, "True")
            ref = want[(ctx, cont)]
            if abs(got_ll - ref["loglikelihood"]) > TOLERANCE:
                raise SystemExit(f"{mode} {ctx!r}+{cont!r}: loglikelihood {got_ll} != reference {ref['loglikelihood']}")
            if bool(got_greedy) != ref["is_greedy"]:
                raise SystemExit(f"{mode} {ctx!r}+{cont!r}: is_greedy {got_greedy} != {ref['is_greedy']}")
            checked += 1
    if checked != len(want):
        raise SystemExit(f"{mode}: checked {checked} loglikelihoods, the reference has {len(want)}")
    return checked


def check_generations(rows, mode, fixture):
    with open(fixture_file(fixture, "reference")) as f:
        greedy = {c["prompt"]: c["greedy_text"] for c in json.load(f)["cases"] if c["mode"] == mode}
    for row in rows:
        prompt = row["doc"]["prompt"]
        text = greedy[prompt]
        cut = min([text.find(s) for s in STOPS if s in text], default=len(text))
        got = row["resps"][0][0]
        if got != text[:cut]:
            raise SystemExit(f"{mode} {prompt!r}: generated {got!r}, the reference gives {text[:cut]!r}")
    if len(rows) != len(greedy):
        raise SystemExit(f"{mode}: {len(rows)} generations for {len(greedy)} prompts")
    return len(rows)


def check_dola(out, fixture):
    with open(fixture_file(fixture, "dola")) as f:
        greedy = {c["prompt"]: c["greedy_text"] for c in json.load(f)["cases"]
                  if c["premature"] == "exits" and c["layers"] == [1, 2] and c["repetition_penalty"] == 1.0}
    checked = 0
    for row in samples(out, "exitserve_gen"):
        text = greedy.get(row["doc"]["prompt"])
        if text is None:
            continue
        cut = min([text.find(s) for s in STOPS if s in text], default=None)
        got = row["resps"][0][0]
        ok = got == text[:cut] if cut is not None else got.startswith(text)
        if not ok:
            raise SystemExit(f"dola {row['doc']['prompt']!r}: generated {got!r}, the reference begins {text!r}")
        checked += 1
    if checked != len(greedy):
        raise SystemExit(f"dola: checked {checked} generations, the reference has {len(greedy)}")
    lls = [float(r[0][0]) for row in samples(out, "exitserve_mc") for r in row["resps"]]
    if not lls or not all(-9999.0 * 64 <= x <= 0.0 for x in lls):
        raise SystemExit(f"dola loglikelihoods: {lls}")
    return checked, len(lls)


def metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise SystemExit(f"no metric {name}")


def check_prefix_cache(binary, model_dir, flags=()):
    """The 4-choice task with the prefix cache and without: the same scores; the wall times."""
    results, seconds = [], []
    for cache_flags in ((), ("--no-prefix-cache",)):
        with running_server(binary, *flags, *cache_flags, fixture=model_dir) as server, \
                tempfile.TemporaryDirectory() as out:
            model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/models"))["data"][0]["id"]
            start = time.monotonic()
            run_lm_eval(server.port, model, "remote", out, model_dir, tasks="exitserve_mc4")
            seconds.append(time.monotonic() - start)
            hits = metric(server.port, "exitserve_prefix_cache_hit_tokens_total")
            if (hits > 0) != (not cache_flags):
                raise SystemExit(f"prefix cache hits {hits} with flags {cache_flags}")
            rows = sorted(samples(out, "exitserve_mc4"), key=lambda r: r["doc_id"])
            results.append([([float(x[0][0]) for x in r["resps"]], r["acc"]) for r in rows])
    (on, off) = results
    if len(on) != len(off) or not on:
        raise SystemExit(f"mc4: {len(on)} vs {len(off)} documents")
    for (ll_on, acc_on), (ll_off, acc_off) in zip(on, off):
        if acc_on != acc_off or any(abs(a - b) > 1e-5 for a, b in zip(ll_on, ll_off, strict=True)):
            raise SystemExit(f"mc4 with the cache {ll_on} (acc {acc_on}) != without {ll_off} (acc {acc_off})")
    print(f"lm-eval 4-choice task, {len(on)} questions: the same loglikelihoods and accuracy with the "
          f"prefix cache ({seconds[0]:.1f} s) and without ({seconds[1]:.1f} s): {seconds[1] / seconds[0]:.2f}x")


def main():
    binary = sys.argv[1]
    if len(sys.argv) > 3 and sys.argv[2] == "--prefix-cache":
        return check_prefix_cache(binary, os.path.abspath(sys.argv[3]), sys.argv[4:])
    with running_server(binary, fixture=FIXTURE) as server, tempfile.TemporaryDirectory() as out:
        run_lm_eval(server.port, MODEL + ":dola-1-2", "remote", out, FIXTURE)
        n_gen, n_ll = check_dola(out, FIXTURE)
        print(f"lm-eval dola ({MODEL}:dola-1-2): {n_gen} generations begin with the reference's, "
              f"{n_ll} loglikelihoods are numbers")
    for fixture, model, modes, backends in RUNS:
        with running_server(binary, fixture=fixture) as server:
            for mode, suffix in modes.items():
                for backend in backends:
                    with tempfile.TemporaryDirectory() as out:
                        run_lm_eval(server.port, model + suffix, backend, out, fixture)
                        n_ll = check_loglikelihoods(samples(out, "exitserve_mc"), mode, fixture)
                        n_gen = check_generations(samples(out, "exitserve_gen"), mode, fixture)
                        print(f"lm-eval {mode} ({model + suffix}), tokenizer {backend}: "
                              f"{n_ll} loglikelihoods equal the reference, {n_gen} generations equal it")
    check_prefix_cache(binary, FIXTURE)
    print("lm-eval e2e: all checks passed")


if __name__ == "__main__":
    main()
