"""Entry point (OpenXLab runs `python app.py`).

Until the Gradio chat UI lands, this serves the configured engine through the project's
OpenAI-compatible API server; every engine setting is a flag or an ENGINE_* variable
(`python app.py --help`).
"""
from infer_engine.server import main

if __name__ == "__main__":
    main()
