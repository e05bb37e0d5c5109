"""Images in the chat page: an upload becomes a small data URL kept in the chat itself, and a
kept image becomes a file the chat window can show.

An uploaded file is read only if Gradio put it in its upload folder (a path a client names is
never opened), checked by the engine's own image check (infer_engine.images: size, pixels,
complete file), and scaled to at most MAX_SIDE pixels a side as a JPEG: a vision tower sees
336-448 pixels a side, and a kept chat (one store row, the export, every replica of the app)
stays small. For the chat window each image is written once, named by its hash, into Gradio's
upload folder (swept of files not used for an hour by the app's delete_cache; a kept chat's
images are written again when it is shown).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any

from infer_engine.errors import InvalidRequest
from infer_engine.images import MAX_IMAGE_BYTES, data_url, load_image

MAX_SIDE = 1024
MAX_IMAGES_PER_MESSAGE = 4


def upload_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def uploaded_paths(files: Any) -> list[Path]:
    """The files of a MultimodalTextbox value (paths, or FileData dicts from an API client),
    each one inside Gradio's upload folder, or InvalidRequest."""
    if files is None:
        return []
    if not isinstance(files, list):
        raise InvalidRequest("files: expected a list of uploaded files", param="files")
    folder, paths = upload_folder().resolve(), []
    for i, f in enumerate(files):
        path = f.get("path") if isinstance(f, dict) else f
        if not isinstance(path, str) or not path:
            raise InvalidRequest(f"files[{i}]: expected an uploaded file", param=f"files[{i}]")
        p = Path(path).resolve()
        if not p.is_relative_to(folder) or not p.is_file():
            raise InvalidRequest(f"files[{i}]: not a file uploaded to this app", param=f"files[{i}]")
        paths.append(p)
    return paths


def from_upload(path: Path, name: str, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """An uploaded image as the data URL the chat keeps (a JPEG of at most MAX_SIDE a side), or
    InvalidRequest naming the file."""
    image = load_image(data_url(path, max_bytes, name), name)
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


# A streamed reply shows its chat's images on every update: their hashes are kept for the
# images in use. The cache holds its keys, the data URLs (up to ~1 MB each): 64 of them.
@functools.lru_cache(maxsize=64)
def _digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def shown_file(url: str) -> str:
    """A kept image (a data URL) as a file for the chat window: written once, by hash (again
    if the cache sweep took it)."""
    folder = upload_folder() / "chat-images"
    path = folder / f"{_digest(url)}.jpg"
    if path.exists():
        os.utime(path)  # in use: not swept
        return str(path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    os.replace(tmp, path)
    return str(path)

