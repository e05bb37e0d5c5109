"""The server's own settings (SERVER_* env vars / flags), beside the engine's."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

from ..errors import InvalidRequest

SERVER_ENV_PREFIX = "SERVER_"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ServerSettings:
    host: str = field(default="127.0.0.1", metadata=_help("interface to listen on (0.0.0.0: all)"))
    port: int = field(default=23333, metadata=_help("port"))
    api_key: str = field(default="", metadata=_help("require 'Authorization: Bearer KEY' (empty: none)"))
    served_model_name: str = field(default="", metadata=_help("model id in /v1/models (default: folder name)"))
    max_body_mb: float = field(default=2.0, metadata=_help("largest request body accepted, in MB (413 above)"))
    stream_interval_ms: float = field(default=0.0, metadata=_help(
        "a streamed choice's chunks at most every this many ms (the first at once; what came meanwhile "
        "goes in one chunk): fewer chunks for the server and its clients to handle at high concurrency; "
        "0: each piece as it comes"))
    max_request_tokens: int = field(default=65536, metadata=_help(
        "n x max_tokens one request may ask for, at most (400 above)"))
    client_share: int = field(default=0, metadata=_help(
        "generations one client (its address) may run at once (more wait their turn); 0: all but an eighth of what "
        "the engine runs at once, so another client always has room"))
    proxy_url: str = field(default="", metadata=_help(
        "register with this LMDeploy proxy (lmdeploy serve proxy) as one of its replicas"))
    public_url: str = field(default="", metadata=_help(
        "where the proxy reaches this server (default http://HOST:PORT; HOST 0.0.0.0: this machine's name)"))

    def node_url(self) -> str:
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return (self.public_url or f"http://{host}:{self.port}").rstrip("/")

    def validate(self) -> "ServerSettings":
        for name in ("proxy_url", "public_url"):
            if getattr(self, name) and not getattr(self, name).startswith(("http://", "https://")):
                raise InvalidRequest(f"{name} must be an http(s) URL, got {getattr(self, name)!r}", param=name)
        if not 0 < self.port < 65536:
            raise InvalidRequest(f"port must be in 1..65535, got {self.port}", param="port")
        if not self.max_body_mb > 0:
            raise InvalidRequest(f"max_body_mb must be > 0, got {self.max_body_mb}", param="max_body_mb")
        if not 0 <= self.stream_interval_ms <= 1000:
            raise InvalidRequest(f"stream_interval_ms must be in [0, 1000], got {self.stream_interval_ms}",
                                 param="stream_interval_ms")
        return self
