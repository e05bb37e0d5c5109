"""Images in chat messages, as OpenAI clients send them: content parts
`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`.

Only inline data is taken. A remote URL is refused, never fetched by the server (no request
to an address a client chose); local files are read by the terminal chat, which turns them
into data URLs itself. Every image is decoded here, once, with limits: bytes, pixels (a
decompression bomb is refused before it is decoded), and a complete file (a truncated one is
an error, not a grey tail).
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any

from .errors import InvalidRequest

MAX_IMAGE_BYTES = 10 * 2**20
MAX_IMAGE_PIXELS = 32_000_000
MAX_IMAGES_PER_REQUEST = 8
_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=-]+)*;base64,", re.I)


def load_image(url: Any, where: str) -> Any:
    """A data URL -> an RGB PIL image, or InvalidRequest naming `where`."""
    from PIL import Image

    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}: expected a data URL string", param=where)
    m = _DATA_URL.match(url)
    if not m:
        if url.lower().startswith(("http://", "https://")):
            raise InvalidRequest(f"{where}: remote image URLs are not fetched by this server; send the image "
                                 "inline as data:image/...;base64,...", param=where)
        raise InvalidRequest(f"{where}: expected a data:image/...;base64,... URL", param=where)
    payload = url[m.end():]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidRequest(f"{where}: the image is larger than {MAX_IMAGE_BYTES // 2**20} MB", param=where)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: the data URL is not valid base64", param=where) from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InvalidRequest(f"{where}: {im.width}x{im.height} pixels is more than "
                                     f"{MAX_IMAGE_PIXELS:,}", param=where)
            im.verify()  # structure and checksums (a cut PNG fails here)
        # Decoding does not say when the data ran out if anything in the process set PIL's
        # global ImageFile.LOAD_TRUNCATED_IMAGES (importing LMDeploy's vision code does), so a
        # JPEG must also have its end-of-image marker after its last scan (not only the EXIF
        # thumbnail's; data appended after the image, as in motion photos, is allowed).
        if raw[:2] == b"\xff\xd8" and raw.find(b"\xff\xd9", max(raw.rfind(b"\xff\xda"), 2)) < 0:
            raise OSError("the JPEG data is cut short")
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.convert("RGB")
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{where}: more than {MAX_IMAGE_PIXELS:,} pixels (refused as a decompression bomb)",
                             param=where) from None
    except Exception as exc:  # PIL raises many kinds for what is not an image or is cut short
        raise InvalidRequest(f"{where}: not a readable image ({type(exc).__name__}: {exc})", param=where) from None


def data_url(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES, name: str | None = None) -> str:
    """A local image file as a data URL (the terminal chat's and the app's way in); larger than
    max_bytes is an InvalidRequest naming the file as `name` (default: its path)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidRequest(f"{name or path}: {size / 2**20:.1f} MB is larger than the {max_bytes / 2**20:g} MB "
                             "limit", param="image")
    raw = path.read_bytes()
    kind = {".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".webp": "webp", ".bmp": "bmp"}.get(
        path.suffix.lower(), "png")
    return f"data:image/{kind};base64,{base64.b64encode(raw).decode()}"
