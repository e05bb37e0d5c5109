"""Pick the checkpoint to ship: score every saved iter_*.pth on the evaluation questions (does
the answer carry the new identity?) and on held-out general questions (does it still answer
them, rather than repeating the identity line?). The tutorials did this by reading logs by eye
(iteration 130 good, 260 overfit).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data.validate import render_xtuner
from .run import checkpoints, convert
from .settings import TrainSettings


@dataclass
class Score:
    iteration: int
    identity: int
    general: int
    answers: dict[str, str]

    def total(self, n_identity: int, n_general: int) -> float:
        return self.identity / max(1, n_identity) + self.general / max(1, n_general)


def _generate(model, tok, template: dict, system: str, question: str, max_new_tokens: int = 64) -> str:
    import torch

    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    ids = tok.encode(render_xtuner(template, msgs), add_special_tokens=True, return_tensors="pt")
    stop = [tok.eos_token_id] + [tok.convert_tokens_to_ids(w) for w in template.get("STOP_WORDS", [])
                                 if len(tok.encode(w, add_special_tokens=False)) == 1]
    with torch.no_grad():
        out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def score_checkpoints(s: TrainSettings, config: Path) -> list[Score]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from xtuner.utils import PROMPT_TEMPLATE

    work = Path(s.work_dir)
    found = checkpoints(work)
    if not found:
        raise FileNotFoundError(f"no iter_*.pth checkpoints in {work}")
    device = "cuda" if s.profile == "gpu" and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(s.model_path, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(s.model_path, torch_dtype=dtype, trust_remote_code=True).to(device)
    template = dict(PROMPT_TEMPLATE[s.prompt_template])
    model, scores = None, []
    for iteration, pth in found:
        adapter = work / "adapters" / f"iter_{iteration}"
        if not (adapter / "adapter_config.json").exists():  # complete folders only (atomic)
            convert(config, pth, adapter, work / "convert.log")
        name = f"iter_{iteration}"
        if model is None:
            model = PeftModel.from_pretrained(base, str(adapter), adapter_name=name)
        else:
            model.load_adapter(str(adapter), adapter_name=name)
        model.set_adapter(name)
        model.eval()
        answers = {q: _generate(model, tok, template, s.system, q)
                   for q in [*s.evaluation_inputs, *s.general_questions]}
        key = s.expected_answer
        identity = sum(bool(key) and key in answers[q] for q in s.evaluation_inputs)
        general = sum(bool(answers[q]) and not (key and key in answers[q]) for q in s.general_questions)
        scores.append(Score(iteration, identity, general, answers))
    return scores


def pick(scores: list[Score], s: TrainSettings) -> Score:
    """Highest total; on a tie the earliest checkpoint (less chance of overfitting)."""
    n_i, n_g = len(s.evaluation_inputs), len(s.general_questions)
    return max(scores, key=lambda x: (x.total(n_i, n_g), -x.iteration))


def table(scores: list[Score], best: Score, s: TrainSettings) -> str:
    n_i, n_g = len(s.evaluation_inputs), len(s.general_questions)
    q = s.evaluation_inputs[0] if s.evaluation_inputs else ""
    rows = [f"{'checkpoint':<12} {'identity':>9} {'general':>8} {'score':>6}   answer to {q!r}"]
    for x in scores:
        mark = " <- best" if x is best else ""
        ans = x.answers.get(q, "").replace("\n", " ")[:60]
        rows.append(f"iter_{x.iteration:<7} {x.identity:>5}/{n_i:<3} {x.general:>4}/{n_g:<3} "
                    f"{x.total(n_i, n_g):>6.2f}   {ans}{mark}")
    return "\n".join(rows)
