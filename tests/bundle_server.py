"""A real HTTP server on loopback that serves an adapter store's bundles, as a peer would."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from longtail.serving.adapter_store import AdapterNotFound, AdapterStore


class BundleServer:
    """A real HTTP server on loopback serving one store's bundles at /v1/adapters/<id>/bundle."""

    def __init__(self, store: AdapterStore):
        outer = self
        self.requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                outer.requests.append(self.path)
                parts = self.path.strip("/").split("/")
                try:
                    body = store.open_bundle(parts[2])
                except (AdapterNotFound, IndexError):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/adapters"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
