"""This server as one replica of several behind LMDeploy's request router (`lmdeploy serve proxy`)."""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

from loguru import logger


class ProxyRegistration:
    """This server as a replica behind LMDeploy's proxy: POST /nodes/add once the server
    listens (with its model, so the proxy need not call back with an API key), retried while
    the proxy is not up yet; POST /nodes/remove on a clean exit."""

    def __init__(self, proxy_url: str, node_url: str, model: str, timeout_s: float = 120.0):
        self.proxy_url, self.node_url, self.model, self.timeout_s = proxy_url.rstrip("/"), node_url, model, timeout_s
        self.registered = threading.Event()
        self._stop = threading.Event()

    def _post(self, path: str, body: dict) -> None:
        import urllib.request

        req = urllib.request.Request(self.proxy_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode(errors="replace")
        if "error_code" in text:  # the proxy answers 200 with its own error object
            raise OSError(text.strip())

    def start(self, ready: Callable[[], bool] = lambda: True) -> None:
        threading.Thread(target=self._register, args=(ready,), daemon=True, name="proxy-registration").start()

    def _register(self, ready: Callable[[], bool]) -> None:
        while not ready() and not self._stop.wait(0.05):
            pass
        deadline, wait, last = time.monotonic() + self.timeout_s, 0.5, None
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._post("/nodes/add", {"url": self.node_url, "status": {"models": [self.model]}})
                self.registered.set()
                logger.info("registered {} ({}) with the proxy at {}", self.node_url, self.model, self.proxy_url)
                return
            except OSError as exc:  # not up yet, or refused: try again
                last = exc
            self._stop.wait(wait)
            wait = min(wait * 2, 5.0)
        if not self._stop.is_set():
            logger.error("could not register {} with the proxy at {}: {}", self.node_url, self.proxy_url, last)

    def stop(self) -> None:
        self._stop.set()
        if self.registered.is_set():
            try:
                self._post("/nodes/remove", {"url": self.node_url})
                logger.info("left the proxy at {}", self.proxy_url)
            except OSError as exc:
                logger.warning("could not leave the proxy at {}: {}", self.proxy_url, exc)

