"""Start a real exitserve on a free port with the tiny fixture, for the Python e2e checks."""
import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt-neo-multiexit")
MODEL = "tiny-gpt-neo-multiexit"
GPT2_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt2-multiexit")
GPT2_MODEL = "tiny-gpt2-multiexit"


def multi_exit(mode, **extra):
    """The `multi_exit` object of a mode written `original`, `exit:L` or `contrast:U,L`."""
    if mode == "original":
        return {"mode": "original"}
    if mode.startswith("exit:"):
        return {"mode": "exit", "layer": int(mode[5:])}
    upper, lower = mode[len("contrast:"):].split(",")
    return {"mode": "contrast", "upper": upper if upper == "original" else int(upper),
            "lower": int(lower), **extra}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port, process):
        self.port = port
        self.pid = process.pid
        self.base = f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def running_server(binary, *extra, fixture=FIXTURE):
    """Yields a healthy `Server`; on exit sends SIGTERM and requires exit code 0. Its log goes
    to a file (a pipe nobody reads would fill and block the server's writes)."""
    port = free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([binary, "--model", fixture, "--port", str(port), "--log-format", "json", *extra],
                              stdout=subprocess.DEVNULL, stderr=log)

    def tail():
        log.seek(0)
        return log.read().decode(errors="replace")[-3000:]

    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("server did not start: " + tail())
            time.sleep(0.2)
        yield Server(port, server)
    finally:
        server.terminate()
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise SystemExit("server did not shut down on SIGTERM")
        if code != 0:
            raise SystemExit(f"server exited with {code} on SIGTERM: " + tail())


@contextlib.contextmanager
def running(binary, *extra):
    """As `running_server`, yielding the port."""
    with running_server(binary, *extra) as s:
        yield s.port
