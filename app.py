"""Chat app entry point: `python app.py` locally, in Docker, and as an OpenXLab app.

Settings: `python app.py --help` (flags), APP_* / ENGINE_* environment variables, or an
app.env file of KEY=VALUE lines.
"""
from __future__ import annotations

import dataclasses
import sys

from chat_ui.settings import parse_settings
from infer_engine import EngineError, create_engine
from infer_engine.sources import resolve_model


def main(argv: list[str] | None = None) -> int:
    try:
        app, engine_settings = parse_settings(argv)
        if engine_settings.backend != "api":
            engine_settings.model_path = resolve_model(engine_settings.model_path, app.model_source,
                                                       app.cache_dir)
        compare_settings = None
        if app.compare_model_path:
            compare_settings = dataclasses.replace(
                engine_settings, model_path=resolve_model(app.compare_model_path, app.model_source,
                                                          app.cache_dir))
            if engine_settings.backend in ("pytorch", "turbomind"):  # two models share one GPU
                half = engine_settings.lmdeploy.cache_max_entry_count / 2
                for s in (engine_settings, compare_settings):
                    s.lmdeploy = dataclasses.replace(s.lmdeploy, cache_max_entry_count=half)
        engine = create_engine(engine_settings)
        compare = create_engine(compare_settings) if compare_settings else None
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from chat_ui.ui import ChatUI, launch  # Gradio is imported only once settings are good
    launch(ChatUI(engine, app, compare=compare).build(), app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
