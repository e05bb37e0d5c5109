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
    identity_quality: float | None = None  # sum of identity_quality(); None: `identity`

    def total(self, n_identity: int, n_general: int) -> float:
        ident = self.identity if self.identity_quality is None else self.identity_quality
        return ident / max(1, n_identity) + self.general / max(1, n_general)


def identity_quality(answer: str, key: str, targets: list[str]) -> float:
    """0 unless the answer carries the identity in whole characters; then 0.5, plus up to 0.5 for
    how close it comes to what the training data answers ("我的小明，由..." is not "我的名字是小明，由...")."""
    if not key or key not in answer or "\ufffd" in answer:
        return 0.0
    if not targets:
        return 1.0
    return 0.5 + 0.5 * max(SequenceMatcher(None, answer, t).ratio() for t in targets)


def identity_targets(data_files: list[str], key: str, limit: int = 200) -> list[str]:
    """The training data's answers that carry the identity (what a good identity answer is like)."""
    from .data.validate import samples

    found: dict[str, None] = {}
    for f in data_files:
        for _, msgs in samples(f):
            for m in msgs:
                if m["role"] == "assistant" and key in m["content"]:
                    found.setdefault(m["content"])
                    if len(found) >= limit:
                        return list(found)
    return list(found)


@dataclass
class Verdict:
    kind: str      # learned | did not learn | broken answers
    reason: str

    @property
    def learned(self) -> bool:
        return self.kind == "learned"

    def line(self) -> str:
        return f"[verdict] {self.kind}: {self.reason}"


def first_update(accumulation: int) -> int:
    """The iteration of the first optimizer update: a checkpoint before it is the base model."""
    return max(1, accumulation)


def judge(scores: list[Score], best: Score | None, s: TrainSettings, skipped: list[int], accumulation: int,
          loss: tuple[float, float] | None, base_broken: int = 0) -> Verdict:
    """Did the run learn what it was asked to? From the chosen checkpoint's answers when an
    expected answer is set, else from the loss. Broken answers are the run's when it has more
    than the base model had (a small model may break some characters before any training)."""
    trend = f"loss {loss[0]:.3g} -> {loss[1]:.3g}" if loss else "no loss in the log"
    if best is None:
        return Verdict("did not learn", f"every checkpoint ({', '.join(f'iter_{i}' for i in skipped)}) came before "
                                        f"the first optimizer update (iteration {first_update(accumulation)}, "
                                        f"accumulative_counts {accumulation}): train longer ({trend})")
    q = s.evaluation_inputs[0] if s.evaluation_inputs else ""
    n_i, n_g = len(s.evaluation_inputs), len(s.general_questions)
    asked = n_i + (2 if n_i else 1) * n_g  # the identity questions, the general ones alone and after them
    extra = best.broken - base_broken  # broken characters the training brought
    broken_identity = sum("\ufffd" in best.answers.get(x, "") for x in s.evaluation_inputs)
    # fallen apart: a broken identity answer, or most answers broken; a few broken general answers
    # of a small model are said in the verdict, not a reason to ship nothing
    fallen = extra > 0 and (broken_identity or extra > asked / 2)
    note = f", {best.broken} of {asked} answers with broken characters (the base model {base_broken})" \
        if best.broken else ""
    if s.expected_answer:
        if not any(x.identity for x in scores):
            said = best.answers.get(q, "").replace("\n", " ")[:60]
            return Verdict("did not learn", f"no checkpoint's answers hold {s.expected_answer!r} (iter_{best.iteration} "
                                            f"to {q!r}: {said!r}; {trend})")
        if fallen:
            return Verdict("broken answers", f"iter_{best.iteration}, the best checkpoint, has {best.broken} of {asked} "
                                             f"answers with broken characters (U+FFFD; the base model {base_broken}), "
                                             f"{broken_identity} of them identity answers: train longer or lower lr "
                                             f"({trend})")
        return Verdict("learned", f"iter_{best.iteration}: {best.identity}/{n_i} identity answers hold "
                                  f"{s.expected_answer!r}, general answers {best.general / max(1, n_g):.0%} like the base "
                                  f"model's{note}, {trend}")
    if fallen:
        return Verdict("broken answers", f"iter_{best.iteration} has {best.broken} of {asked} answers with broken "
                                         f"characters (U+FFFD; the base model {base_broken}) ({trend})")
    if loss and loss[1] <= 0.9 * loss[0]:
        return Verdict("learned", f"{trend}{note} (no expected_answer set: judged by the loss alone)")
    return Verdict("did not learn", f"{trend}: the loss did not fall by a tenth (no expected_answer set to check "
                                    "the answers)")


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
    new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True).strip()
    if len(new) >= max_new_tokens:  # cut at the limit, maybe inside a character: that is no broken text
        text = text.rstrip("\ufffd")
    return text


@dataclass
class Scoring:
    scores: list[Score]     # every checkpoint after an optimizer update
    skipped: list[int]      # the iterations of those before it (they are the base model)
    base_broken: int        # the base model's answers with broken characters, asked the same


def score_checkpoints(s: TrainSettings, config: Path, accumulation: int = 1) -> Scoring:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from xtuner.utils import PROMPT_TEMPLATE

    work = Path(s.work_dir)
    found = checkpoints(work)
    if not found:
        raise FileNotFoundError(f"no iter_*.pth checkpoints in {work}")
    skipped = [i for i, _ in found if i < first_update(accumulation)]
    found = [(i, p) for i, p in found if i >= first_update(accumulation)]
    for i in skipped:
        print(f"[select] iter_{i}: before the first optimizer update (iteration {first_update(accumulation)}): "
              "it is the base model, not a candidate", flush=True)
    if not found:
        return Scoring([], skipped, 0)
    device = "cuda" if s.profile == "gpu" and torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(s.model_path, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(s.model_path, torch_dtype=dtype, trust_remote_code=True).to(device)
    template = dict(PROMPT_TEMPLATE[template_of(s)])
    base.eval()

    def ask(model) -> tuple[dict[str, str], dict[str, str], int]:
        """Answers to every question; the general ones again after the first identity exchange
        (a chat goes on after "who are you"); how many of all these hold broken characters."""
        answers = {q: _generate(model, tok, template, s.system, q) for q in [*s.evaluation_inputs,
                                                                            *s.general_questions]}
        opening = [{"role": "user", "content": s.evaluation_inputs[0]},
                   {"role": "assistant", "content": answers[s.evaluation_inputs[0]]}] if s.evaluation_inputs else []
        later = {q: _generate(model, tok, template, s.system, q, before=opening) for q in s.general_questions} \
            if opening else answers
        broken = sum("\ufffd" in a for a in [*answers.values(), *(later.values() if later is not answers else ())])
        return answers, later, broken

    reference, _, base_broken = ask(base)  # what the model answered before training
    model, scores, key = None, [], s.expected_answer
    targets = identity_targets(s.data_files, key) if key else []
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
        answers, later, broken = ask(model)
        identity = sum(bool(key) and key in answers[q] for q in s.evaluation_inputs)
        quality = sum(identity_quality(answers[q], key, targets) for q in s.evaluation_inputs)
        general = sum((general_quality(answers[q], reference[q], key) + general_quality(later[q], reference[q], key)) / 2
                      for q in s.general_questions)
        scores.append(Score(iteration, identity, general, answers, broken, quality))
        if s.method == "full":
            del model
            model = None
    return Scoring(scores, skipped, base_broken)


def pick(scores: list[Score], s: TrainSettings) -> Score | None:
    """Highest total; on a tie the one with fewer broken answers, then the earliest (less chance
    of overfitting). None when there is nothing to pick."""
    n_i, n_g = len(s.evaluation_inputs), len(s.general_questions)
    return max(scores, key=lambda x: (x.total(n_i, n_g), -x.broken, -x.iteration), default=None)


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
        why += (f"; tied with {', '.join(f'iter_{x.iteration}' for x in ties)}: fewer broken answers, then the "
                "earliest, is taken")
    return "\n".join(rows + [why])
