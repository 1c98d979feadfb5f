"""A static file server with injected faults, run as its own process by the remote-shard tests.

    python tests/fault_http_server.py ROOT REQUEST_LOG

Binds a free port on 127.0.0.1 and prints it as the first line of stdout. `GET /MODES/PATH` serves
ROOT/PATH; MODES is `ok` or `+`-joined faults. One-time faults apply in the order given, one per
request to the same URL (`fail500+reset`: the first request gets a 500, the second a reset, later
ones are served normally; `?anything` makes a distinct URL); `slow` and `norange` apply to every
request:

- `reset`:   send the headers (full Content-Length) and half the body, then reset the connection
- `fail500`: answer 500 Internal Server Error
- `slow`:    wait 0.5 s before answering
- `norange`: ignore Range headers and answer 200 with the whole file, as `python -m http.server`
A missing file is a 404. Range requests (`bytes=N-`) are answered 206 otherwise. Every request is
appended to REQUEST_LOG as a JSON line: path, range header, status (-1 for a reset).
"""
import json
import os
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT, LOG = sys.argv[1], sys.argv[2]
_requests = {}  # URL -> requests so far
_lock = threading.Lock()
_ONE_TIME = ("reset", "fail500")


def _one_time_fault(url: str, modes: list):
    """The one-time fault for this request to `url`, if any."""
    with _lock:
        count = _requests.get(url, 0)
        _requests[url] = count + 1
    faults = [m for m in modes if m in _ONE_TIME]
    return faults[count] if count < len(faults) else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # the JSON log replaces stderr chatter
        pass

    def _log(self, status: int) -> None:
        with _lock, open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "range": self.headers.get("Range"), "status": status}) + "\n")

    def do_GET(self):
        _, modes, rel = self.path.split("/", 2)
        modes = modes.split("+")
        path = os.path.join(ROOT, rel.split("?")[0])  # a query only makes a distinct URL (its own faults)
        fault = _one_time_fault(self.path, modes)
        if "slow" in modes:
            time.sleep(0.5)
        if not os.path.isfile(path):
            return self._plain(404, b"not found")
        if fault == "fail500":
            return self._plain(500, b"injected failure")
        with open(path, "rb") as f:
            data = f.read()
        start = 0
        byte_range = self.headers.get("Range")
        if byte_range and "norange" not in modes and byte_range.startswith("bytes=") and byte_range.endswith("-"):
            start = int(byte_range[len("bytes="):-1])
        status = 206 if start else 200
        body = data[start:]
        self._log(-1 if fault == "reset" else status)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/x-tar")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Connection", "close")
        self.end_headers()
        if fault == "reset":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            time.sleep(0.05)
            # SO_LINGER 0: close() sends a TCP reset instead of an orderly end.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(body)
        self.close_connection = True

    def _plain(self, status: int, text: bytes) -> None:
        self._log(status)
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(text)
        self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # resets and clients that hang up are expected
        pass


if __name__ == "__main__":
    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
