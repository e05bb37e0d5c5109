"""Chat app entry point: `python app.py` locally, in Docker, and as an OpenXLab app.

Settings: `python app.py --help` (flags), APP_* / ENGINE_* environment variables, or an
app.env file of KEY=VALUE lines.
"""
from __future__ import annotations

import sys

from chat_ui.settings import compare_engine_settings, parse_settings
from infer_engine import EngineError, create_engine


def main(argv: list[str] | None = None) -> int:
    from chat_ui.workers import serve, worker_count, worker_index
    try:
        app, engine_settings = parse_settings(argv)
        workers = 1 if worker_index() is not None else worker_count(app, engine_settings)
        if workers > 1:  # several app processes on one port, the model in a process of its own
            return serve(app, engine_settings, workers)
        compare_settings = compare_engine_settings(app, engine_settings)
        engine = create_engine(engine_settings)  # fetches openxlab:// modelscope:// hf:// models
        compare = create_engine(compare_settings) if compare_settings else None
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from chat_ui.store import StoreError
    from chat_ui.ui import ChatUI, launch  # Gradio is imported only once settings are good
    try:
        ui = ChatUI(engine, app, compare=compare)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launch(ui.build(), app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
