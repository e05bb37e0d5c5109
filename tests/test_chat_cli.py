"""The terminal chat, driven through its stdin as a person types: errors are one line and the
chat goes on; it takes the tutorials' habits (`xtuner chat MODEL --prompt-template NAME`)."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from infer_engine.server import free_port


def chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infer_engine.chat", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_a_too_long_message_is_an_error_line_and_the_chat_goes_on(tiny_model):
    r = chat(str(tiny_model), "--prompt-template", "internlm2_chat", "--session-len", "128",
             "--max-new-tokens", "4", "--temperature", "0",
             stdin="word " * 300 + "\nhello\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert f"chatting with {tiny_model.name} (transformers)" in r.stdout
    assert "error: the last message is 1200 tokens" in r.stdout
    assert "[4 tokens" in r.stdout  # the next message was answered
    assert "Traceback" not in r.stderr


def test_a_backend_that_is_down_is_an_error_line_not_a_traceback():
    r = chat("--backend", "api", "--api-base-url", f"http://127.0.0.1:{free_port()}/v1",
             "--api-max-retries", "0", stdin="hello\nagain\n/exit\n")
    assert r.returncode == 0
    assert r.stdout.count("error: api: http://127.0.0.1") == 2  # both messages, one line each
    assert "Traceback" not in r.stdout + r.stderr


def test_an_unknown_prompt_template_is_refused_in_one_line(tiny_model):
    r = chat(str(tiny_model), "--prompt-template", "nonsense", stdin="")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: chat_template must be 'auto' or one of")


def test_an_image_model_chats_about_a_local_image(tiny_llava, tiny_model, tmp_path):
    from PIL import Image

    square = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(square)
    (tmp_path / "cut.png").write_bytes(square.read_bytes()[:60])
    r = chat(str(tiny_llava), "--max-new-tokens", "3", "--temperature", "0", "--image", str(square),
             stdin=f"What colour?\n/image {tmp_path / 'cut.png'}\n/image {tmp_path / 'missing.png'}\n"
                   f"/image {square}\nAnd now?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[3 tokens") == 2  # both questions, each with its image, answered
    assert f"error: {tmp_path / 'cut.png'}: not a readable image" in r.stdout
    assert "missing.png" in r.stdout and "(1 image(s) for the next message)" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    r = chat(str(tiny_model), "--image", str(square), stdin="What colour?\n/exit\n")
    assert "error: messages[0].content: this model (tiny-chat) takes no images" in r.stdout


def test_xtuner_chats_reset_and_exit_are_commands_and_it_runs_from_any_folder(tmp_path):
    """`xtuner chat` users type RESET and EXIT: they were sent to the model as messages. And
    `python -m infer_engine.chat` failed outside the repository (No module named 'infer_engine'):
    the project is installed (pip install -e ., scripts/setup_env.sh) with console scripts."""
    r = subprocess.run([sys.executable, "-m", "infer_engine.chat", "--backend", "synthetic",
                        "--synthetic-tokens-per-s", "0"], cwd=tmp_path, input="hello\nRESET\nEXIT\nnot sent\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "You said: hello" in r.stdout and "(history cleared)" in r.stdout
    assert "You said: RESET" not in r.stdout and "not sent" not in r.stdout
    bin_dir = ROOT / ".venv" / "bin"
    for tool in ("chat-app", "chat-server", "chat-cli"):
        out = subprocess.run([str(bin_dir / tool), "--help"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0 and "usage:" in out.stdout, (tool, out.stderr[-500:])
