"""The Gradio chat app: settings, the UI, and launching it over any inference engine."""
