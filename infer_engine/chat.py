"""Chat with any backend in the terminal.

    python -m infer_engine.chat models/tiny-chat [--system "..."] [--temperature 0.7]
    python -m infer_engine.chat ./merged --prompt-template internlm2_chat   # as with `xtuner chat`
    python -m infer_engine.chat models/tiny-llava-shapes --image square.png  # an image model

Type a message and Enter. Commands: /image PATH (an image for the next message: a local file,
read here and sent inline), /reset or RESET (forget the history), /exit or EXIT (`xtuner chat`'s
words for them are commands here too, never messages to the model). Ctrl-C while a reply streams
stops it (the engine cancels the generation); Ctrl-C at the prompt quits. Installed with `pip
install -e .`, `chat-cli` is this command.
"""
from __future__ import annotations

import argparse
import sys
import uuid

from .errors import EngineError
from .factory import create_engine
from .images import data_url, load_image
from .settings import SamplingParams, add_engine_arguments, settings_from_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Chat with a model in the terminal")
    p.add_argument("model", nargs="?", default=None,
                   help="model folder or openxlab:// modelscope:// hf:// id (same as --model-path)")
    p.add_argument("--prompt-template", dest="chat_template", default=None,
                   help="same as --chat-template (the name `xtuner chat` uses)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the first message (an image model; as `xtuner chat --image`)")
    p.add_argument("--max-new-tokens", type=int, default=SamplingParams.max_new_tokens)
    p.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    p.add_argument("--top-p", type=float, default=SamplingParams.top_p)
    p.add_argument("--top-k", type=int, default=SamplingParams.top_k)
    p.add_argument("--repetition-penalty", type=float, default=SamplingParams.repetition_penalty)
    add_engine_arguments(p)
    args = p.parse_args(argv)
    if args.model and not args.model_path:
        args.model_path = args.model
    try:
        settings = settings_from_args(args)
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k,
                                  repetition_penalty=args.repetition_penalty).validate()
        engine = create_engine(settings)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    session = uuid.uuid4().hex
    images: list[str] = []  # data URLs for the next message
    for path in args.image:
        try:
            images.append(_image(path))
        except (EngineError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    with engine:
        try:
            name = engine.model_name
        except EngineError as exc:  # a remote API that is down: say so, and try again per message
            print(f"error: {exc}", file=sys.stderr)
            name = "the model"
        print(f"chatting with {name} ({settings.backend}); /reset (RESET), /exit (EXIT)", flush=True)
        while True:
            try:
                line = input("\n>>> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line in ("/exit", "/quit", "EXIT"):
                return 0
            if line in ("/reset", "RESET"):
                history = history[:1] if args.system else []
                print("(history cleared)")
                continue
            if line.startswith("/image"):
                try:
                    images.append(_image(line[len("/image"):].strip()))
                    print(f"({len(images)} image(s) for the next message)")
                except (EngineError, OSError) as exc:
                    print(f"error: {exc}")
                continue
            if not line:
                continue
            parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
            history.append({"role": "user", "content": parts + [{"type": "text", "text": line}] if parts else line})
            reply, usage = [], None
            try:
                stream = engine.stream_chat(history, sampling, session)
                try:
                    for delta in stream:
                        print(delta.text, end="", flush=True)
                        reply.append(delta.text)
                        usage = delta.usage or usage
                except KeyboardInterrupt:
                    engine.cancel(session)
                    stream.close()
                    print("\n(stopped)")
            except EngineError as exc:  # too long for the context, backend down, ...: go on
                print(f"\nerror: {exc}")
                history.pop()
                continue
            images = []  # sent: they stay in the history
            history.append({"role": "assistant", "content": "".join(reply)})
            if usage:
                tps = f", {usage.decode_tokens_per_s:.1f} tok/s" if usage.decode_tokens_per_s else ""
                ttft = f", first token {usage.ttft_s * 1000:.0f} ms" if usage.ttft_s is not None else ""
                print(f"\n[{usage.completion_tokens} tokens{ttft}{tps}]")


def _image(path: str) -> str:
    """A local image file as a checked data URL (an unreadable or cut file: one error line)."""
    if not path:
        raise OSError("/image needs a file path")
    url = data_url(path)
    load_image(url, path)
    return url


if __name__ == "__main__":
    sys.exit(main())
