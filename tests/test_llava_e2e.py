"""The offline LLaVA demo, as scripts/demo_llava.sh runs it, into a temp dir: XTuner's LLaVA
pretrain and LoRA finetune on generated squares, conversion to the Hugging Face llava layout,
then the serving side's transformers backend answers colour questions on squares it never saw,
and our server answers an image turn from the openai client."""
from __future__ import annotations

import base64
import re
import subprocess
import sys

import openai
import pytest

from conftest import ROOT, TRAIN_PY, load_script, train_env
from engines import local_settings
from infer_engine import create_engine
from infer_engine.server import BackgroundServer, create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    if not TRAIN_PY.exists():
        pytest.skip("training environment missing (scripts/setup_train_env.sh)")
    tmp = tmp_path_factory.mktemp("llava")
    build = load_script("build_tiny_model")
    clip = build.build_clip(tmp / "clip")
    train_env("-m", "training.data.shapes", tmp / "shapes")
    before = build.build_llava(tmp / "before", tiny_model, vision=clip)
    out = train_env("-m", "training.llava", "--config", ROOT / "training/examples/llava_tiny_cpu.yaml",
                    "--set", f"llm_path={tiny_model}", "--set", f"visual_encoder_path={clip}",
                    "--set", f"data_path={tmp / 'shapes/train.json'}", "--set", f"image_folder={tmp / 'shapes/images'}",
                    "--set", f"evaluation_image={tmp / 'shapes/images/test_red_12.png'}",
                    "--set", f"work_dir={tmp / 'work'}", "--out", tmp / "after")
    assert "[done] LLaVA model" in out
    return tmp, before, tmp / "after"


def test_the_finetuned_llava_names_the_colours_of_unseen_squares(trained):
    tmp, before, after = trained
    r = subprocess.run([sys.executable, str(ROOT / "scripts/compare_answers.py"), str(before), str(after),
                        "--images", str(tmp / "shapes/test.json"), "--image-folder", str(tmp / "shapes/images"), "--max-new-tokens", "24", "--expect-reference"],
                       capture_output=True, text=True)
    m = re.search(r"before (\d+)/8, after (\d+)/8", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr[-2000:]
    assert int(m.group(1)) == 0 and int(m.group(2)) >= 7, r.stdout  # 8/8 where it was measured


def test_the_served_llava_answers_an_image_turn(trained):
    tmp, _, after = trained
    image = (tmp / "shapes/images/test_blue_12.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    with create_engine(local_settings(after)) as engine, BackgroundServer(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        r = client.chat.completions.create(model="after", max_tokens=24, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What colour is the square?"}]}])
    assert "blue" in r.choices[0].message.content
