"""Dataset tools: validate, generate self-cognition data, convert sheets/Alpaca/XTuner formats to
OpenAI `messages` JSONL, replace text safely. Each module is also a CLI (`python -m ...`)."""
