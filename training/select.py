"""Pick the checkpoint to ship: score every saved iter_*.pth on the evaluation questions (does
the answer carry the new identity?) and on held-out general questions (does it still answer
them as the base model did, in whole characters, rather than repeating the identity line or
breaking down?), asked alone and again after the identity exchange (a chat goes on after "who
are you": a checkpoint whose identity bleeds into the next answer is not the one to ship).
The tutorials did this by reading logs by eye (iteration 130 good, 260 overfit).
"""
from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

from .config import template_of
from .data.validate import render_xtuner
from .run import checkpoints, convert, converted, export_full
from .settings import TrainSettings


@dataclass
class Score:
    iteration: int
    identity: int        # identity answers that carry expected_answer
    general: float       # sum over general questions of general_quality()
    answers: dict[str, str]
    broken: int = 0      # answers with broken text (replacement characters)

    def total(self, n_identity: int, n_general: int) -> float:
        return self.identity / max(1, n_identity) + self.general / max(1, n_general)


def general_quality(answer: str, base_answer: str, key: str) -> float:
    """0 for an empty answer, one that says the new identity, or broken text (U+FFFD: a model
    falling apart); else how close it stays to what the base model answered (0..1)."""
    if not answer.strip() or (key and key in answer) or "\ufffd" in answer:
        return 0.0
    if not base_answer.strip():
        return 1.0
    return SequenceMatcher(None, answer, base_answer).ratio()


def _generate(model, tok, template: dict, system: str, question: str, max_new_tokens: int = 64,
              before: list[dict] = ()) -> str:
    """The greedy answer to `question`, after the turns `before` (user/assistant messages)."""
    import torch

    msgs = ([{"role": "system", "content": system}] if system else []) + list(before) + \
        [{"role": "user", "content": question}]
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
    template = dict(PROMPT_TEMPLATE[template_of(s)])
    questions = [*s.evaluation_inputs, *s.general_questions]
    base.eval()
    reference = {q: _generate(base, tok, template, s.system, q) for q in s.general_questions}
    model, scores, key = None, [], s.expected_answer
    for iteration, pth in found:
        name = f"iter_{iteration}"
        if s.method == "full":  # each checkpoint is a whole model
            folder = work / "models" / name
            if not converted(folder, pth):
                export_full(config, pth, folder, Path(s.model_path), work / "convert.log")
            model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=dtype,
                                                         trust_remote_code=True).to(device).eval()
        else:
            adapter = work / "adapters" / name
            if not converted(adapter, pth):  # converted from this very checkpoint, or anew
                convert(config, pth, adapter, work / "convert.log")
            if model is None:
                model = PeftModel.from_pretrained(base, str(adapter), adapter_name=name)
            else:
                model.load_adapter(str(adapter), adapter_name=name)
            model.set_adapter(name)
            model.eval()
        answers = {q: _generate(model, tok, template, s.system, q) for q in questions}
        identity = sum(bool(key) and key in answers[q] for q in s.evaluation_inputs)
        # each general question alone, and after the first identity question and this answer to it
        opening = [{"role": "user", "content": s.evaluation_inputs[0]},
                   {"role": "assistant", "content": answers[s.evaluation_inputs[0]]}] if s.evaluation_inputs else []
        later = {q: _generate(model, tok, template, s.system, q, before=opening) for q in s.general_questions} \
            if opening else answers
        general = sum((general_quality(answers[q], reference[q], key) + general_quality(later[q], reference[q], key)) / 2
                      for q in s.general_questions)
        broken = sum("\ufffd" in a for a in [*answers.values(), *(later.values() if later is not answers else ())])
        scores.append(Score(iteration, identity, general, answers, broken))
        if s.method == "full":
            del model
            model = None
    return scores


def pick(scores: list[Score], s: TrainSettings) -> Score:
    """Highest total; on a tie the earliest checkpoint (less chance of overfitting)."""
    n_i, n_g = len(s.evaluation_inputs), len(s.general_questions)
    return max(scores, key=lambda x: (x.total(n_i, n_g), -x.iteration))


def table(scores: list[Score], best: Score, s: TrainSettings) -> str:
    """Every checkpoint's scores, and why the best one won."""
    n_i, n_g = len(s.evaluation_inputs), len(s.general_questions)
    q = s.evaluation_inputs[0] if s.evaluation_inputs else ""
    rows = [f"{'checkpoint':<12} {'identity':>9} {'general':>9} {'broken':>7} {'score':>6}   answer to {q!r}"]
    for x in scores:
        mark = " <- best" if x is best else ""
        ans = x.answers.get(q, "").replace("\n", " ")[:60]
        rows.append(f"iter_{x.iteration:<7} {x.identity:>5}/{n_i:<3} {x.general:>5.2f}/{n_g:<3} {x.broken:>7} "
                    f"{x.total(n_i, n_g):>6.2f}   {ans}{mark}")
    ties = [x for x in scores if x is not best and x.total(n_i, n_g) == best.total(n_i, n_g)]
    why = (f"iter_{best.iteration} won: {best.identity}/{n_i} identity answers hold {s.expected_answer!r}, "
           f"general answers {best.general / max(1, n_g):.0%} like the base model's (alone and after the identity "
           f"exchange), {best.broken} broken")
    if ties:
        why += f"; tied with {', '.join(f'iter_{x.iteration}' for x in ties)}, the earliest is taken"
    return "\n".join(rows + [why])
