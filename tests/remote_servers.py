"""Real server processes for the remote-shard tests: the fault-injecting HTTP server and moto's S3 server."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

HTTP_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_http_server.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def fault_http_server(root: str, log_path: str):
    """Serve `root` with injected faults (see fault_http_server.py); yields the base URL."""
    proc = subprocess.Popen([sys.executable, HTTP_SERVER, root, log_path], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def requests_made(log_path: str) -> list:
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def moto_s3_server():
    """moto's standalone S3 server on a free port; yields the environment that points AWS clients at it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start (exit {proc.poll()})")
                time.sleep(0.2)
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        _stop(proc)
