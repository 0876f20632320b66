"""Start a real exitserve on a free port with the tiny fixture, for the Python e2e checks."""
import contextlib
import os
import socket
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny-gpt-neo-multiexit")
MODEL = "tiny-gpt-neo-multiexit"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(binary, *extra):
    """Yields the port of a healthy server; on exit sends SIGTERM and requires exit code 0."""
    port = free_port()
    server = subprocess.Popen([binary, "--model", FIXTURE, "--port", str(port), "--log-format", "json", *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
                raise SystemExit("server did not start: " + server.stderr.read().decode())
            time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise SystemExit("server did not shut down on SIGTERM")
        if code != 0:
            raise SystemExit(f"server exited with {code} on SIGTERM: " + server.stderr.read().decode()[-2000:])
