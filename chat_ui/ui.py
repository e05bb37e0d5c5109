"""The Gradio chat page, assembled: the side panel, the Chat tab, the Compare tab (with a second
model) and the public API over one conversation service, and its launch.

    chat_ui/
      conversation.py  Gradio-free: chats, their replies, checks, limits      (replies.py: a reply)
      stream.py        the plain route the page reads replies through, and its script
      form.py, sidebar.py, chat_tab.py, compare_tab.py, api.py   the page's parts
      ui.py            this: assembly and launch

Imports go one way: the parts import conversation.py, never each other's internals; nothing
here is shared between visitors but the service's per-chat state.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import gradio as gr
from loguru import logger
from starlette.middleware import Middleware

from infer_engine import Engine, EngineError
from infer_engine import connections
from infer_engine.asgi import RequestLimits

from .api import ChatApi
from .chat_tab import ChatTab
from .compare_tab import CompareTab
from .conversation import BUSY, Conversations, Limits
from .page import CSS, HEAD
from .router import StickyCookie
from .settings import AppSettings
from .sidebar import Sidebar
from .store import MemoryStore, SQLiteStore, Store
from .images import upload_folder
from .stream import download_route, stream_route
from .visitors import BrowserCookie, UploadGuard, browser_of, image_check, sweep_cache
from .workers import worker_index

__all__ = ["BUSY", "ChatUI", "launch", "make_store"]


def make_store(settings: AppSettings) -> Store:
    limits = dict(max_bytes_per_browser=int(settings.history_max_mb * 2**20), retention_days=settings.history_days,
                  max_total_bytes=int(settings.history_max_total_mb * 2**20))
    if settings.no_history:
        return MemoryStore(**limits)
    return SQLiteStore(settings.history_path, **limits)


class ChatUI:
    def __init__(self, engine: Engine, settings: AppSettings, compare: Engine | None = None,
                 label: str | None = None, compare_label: str | None = None, store: Store | None = None):
        self.engine, self.compare_engine, self.settings = engine, compare, settings
        self.store = store or make_store(settings)
        self.label = label or settings.model_label or _name_of(engine)
        self.compare_label = compare_label or settings.compare_label or (_name_of(compare) if compare else "")
        self.limits = Limits.of(settings, [engine] + ([compare] if compare is not None else []))
        self.service = Conversations(engine, self.store, settings, self.limits, self.label)

    def on_load(self, request: gr.Request, sidebar: Sidebar) -> tuple:
        """A page opened: the browser's latest chat (a new browser: a new chat), and a banner if
        the model cannot answer now. The browser is its HttpOnly cookie (chat_ui/visitors.py)."""
        ptr, chat = self.service.first_chat(browser_of(request.headers) or "")
        problem = self.engine.health()
        if problem:
            logger.warning("model backend unavailable at page load: {}", problem)
        banner = gr.update(visible=bool(problem), value=(
            "⚠️ **The model server is not reachable right now.** Replies will fail until it is back; "
            "please try again in a minute." if problem else ""))
        return (ptr, *sidebar.view(ptr, chat), "", banner)

    def build(self) -> gr.Blocks:
        s = self.settings
        # Gradio recomputes its monitoring summary with pandas over up to 10,000 recorded events
        # after every event (GRADIO_ANALYTICS_CACHE_FREQUENCY=1): ~2 ms per event, growing with
        # traffic (yappi). The app has no monitoring page: keep a short record, summed rarely.
        os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
        os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
        # No analytics calls from a public deployment. Gradio's cache (uploads, images shown in the
        # chat window) is swept by the app itself (launch: sweep_cache): Gradio's own delete_cache
        # sweep dies when an upload lands while it runs, and then never cleans again.
        with gr.Blocks(title=s.title, analytics_enabled=False) as demo:
            ptr = gr.State({})
            sidebar = Sidebar(self.service)
            gr.Markdown(f"## {s.title}")
            banner = gr.Markdown("", visible=False, elem_id="banner")
            hint = gr.Markdown("", elem_id="system_hint")
            with gr.Tabs():
                with gr.Tab("Chat"):
                    chat = ChatTab(self.service, sidebar, self.label, s.example_list())
                    chat.wire(ptr)
                    ChatApi(self.service).wire(chat.box, ptr, sidebar.form.inputs, chat.chatbot, chat.stats)
                    sidebar.wire(ptr, chat.chatbot, hint, chat.stats, chat.reader)
                if self.compare_engine is not None:
                    compare = CompareTab(self.service, self.compare_engine, self.label, self.compare_label)
                    compare.wire(sidebar.form.inputs, self.limits.concurrency)
            def page_load(request: gr.Request) -> tuple:
                return self.on_load(request, sidebar)
            demo.load(page_load, None, [ptr, *sidebar.view_outputs(chat.chatbot, hint), chat.stats, banner],
                      api_name="page_load", api_visibility="private")
            if self.compare_engine is not None:
                demo.unload(compare.stop)  # a visitor closed the page: the Compare tab stops
        demo.chat_limits = self.limits            # read by launch()
        demo.chat_routes = [stream_route(self.service), download_route(self.service)]
        demo.chat_uploads = self.service.uploads if self.limits.upload_mb else None  # read by launch()
        return demo


def _name_of(engine: Engine) -> str:
    try:
        return engine.model_name
    except EngineError:  # a remote API that is down at start: the app still comes up
        return "model"


def _no_matplotlib_lookups() -> None:
    """Gradio wraps every event step in `import matplotlib` (twice: MatplotlibBackendMananger);
    without matplotlib installed each attempt walks sys.path again, ~1 ms per streamed update
    (measured with yappi: a quarter of the app's CPU at 64 streams). Marking the module absent
    makes the import fail at once, exactly as it would after the walk."""
    if importlib.util.find_spec("matplotlib") is None:
        sys.modules.setdefault("matplotlib", None)


def launch(demo: gr.Blocks, settings: AppSettings, prevent_thread_lock: bool = False,
           host: str | None = None, port: int | None = None) -> Any:
    """Queue and launch with settings fit for a public deployment: the limits the page was built
    with, and the page's own reply stream route served beside Gradio's."""
    _no_matplotlib_lookups()
    connections.install()  # a head timeout and a per-client connection cap (slowloris, file limits)
    limits: Limits = demo.chat_limits
    # replies wait for a generation slot in the conversation service; Gradio's queue holds the
    # page's short events and the API's streams (its max_size: what may wait at once)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=None)
    if limits.upload_mb:  # an image model: uploads up to MAX_IMAGES_PER_MESSAGE images of upload_mb each
        limit = Middleware(RequestLimits, max_bytes=limits.max_body_bytes)
    else:  # no component takes files: uploads are refused, and no request body may exceed 1 MB
        limit = Middleware(RequestLimits, max_bytes=limits.max_body_bytes, refused=("/upload",),
                           refused_reason="this app takes no uploads")
    # the browser's id in an HttpOnly cookie, set before anything reads it; an image app's
    # uploads checked on arrival, counted and bound to their visitor; Gradio's cache swept
    middleware = [limit, Middleware(BrowserCookie, max_age_s=int(max(settings.history_days, 1) * 86400))]
    if demo.chat_uploads is not None:
        max_file = int(settings.max_image_mb * 2**20)
        middleware.append(Middleware(UploadGuard, uploads=demo.chat_uploads, check=image_check(max_file),
                                     max_file_bytes=max_file))
    sweep_cache(upload_folder())
    worker = worker_index()
    if worker is not None:  # one of several app processes behind the router: keep visitors here
        middleware.append(Middleware(StickyCookie, index=worker))
    return demo.launch(
        server_name=host or settings.host, server_port=port or settings.port, quiet=worker is not None,
        # Gradio runs at most max_threads events at once, whatever their concurrency limits
        auth=settings.auth_pairs(), max_threads=max(40, limits.concurrency + 16),
        max_file_size=f"{limits.upload_mb:g}mb" if limits.upload_mb else "1mb",
        app_kwargs={"middleware": middleware, "routes": demo.chat_routes},
        allowed_paths=[], show_error=False, ssr_mode=False, run_history=False,
        prevent_thread_lock=prevent_thread_lock, css=CSS, head=HEAD)
