"""Fuzz the live server with schemathesis against openapi.yaml: no 5xx, every response conforms.

Usage: python tests/e2e/fuzz.py BINARY [MAX_EXAMPLES]
The server runs with --api-key, so the auth checks exercise real 401s, and with the shipped
chat template, so that chat requests reach the engine. The spec's free-form
`model` string is pinned to the served id (in a temporary copy) so that generated requests
reach the engine instead of stopping at 404. `positive_data_acceptance` is left out: the
spec cannot state model-dependent limits (exit layers, vocabulary, context length).
"""
import os
import subprocess
import sys
import tempfile

import yaml

from server import MODEL, ROOT, running

KEY = "fuzz-key"


def main():
    binary = sys.argv[1]
    examples = sys.argv[2] if len(sys.argv) > 2 else "40"
    spec = yaml.safe_load(open(os.path.join(ROOT, "openapi.yaml")))
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        spec["components"]["schemas"][request]["properties"]["model"]["enum"] = [MODEL]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(spec, f)
        pinned = f.name
    template = os.path.join(ROOT, "config", "chat-template-base.jinja")
    with running(binary, "--api-key", KEY, "--chat-template", template) as port:
        # The CLI through this interpreter: a fresh `pip install` may not have put `st` on PATH
        # (pyenv shims are only rehashed by the pip shim).
        cmd = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; sys.exit(schemathesis())",
               "run", pinned, "--url", f"http://127.0.0.1:{port}", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--max-examples", examples, "--seed", "1",
               "--no-color", "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "60"]
        code = subprocess.call(cmd)
    os.unlink(pinned)
    if code != 0:
        raise SystemExit(f"schemathesis failed (exit {code})")
    print("schemathesis: no failures")


if __name__ == "__main__":
    main()
