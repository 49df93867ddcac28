"""Two-pass inference with expert vectors (paper §3.2): pass 1 decides z', pass 2 answers with W'.

Strategies for pass 1:
    prompt    the base model classifies each prompt with the paper's Figure 3 prompt; the boxed
              category picks that expert; 'others' or an unreadable reply means the base weights
              (never "whichever expert was loaded last", the reference code's bug).
    cls       the same prompt, answered with the classification expert z^c merged in.
    fewshot   z' = Σ_k α_k z_k with α found by cem.py on a few held-out shots of the target task,
              once per task; every remaining prompt is then answered with that z', or with the base
              weights when no mixture scored above them on the shots.
    none      the base model; expert NAME: one fixed expert (comparison rows).
Prompts that chose the same expert are answered together, so each expert is merged once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import cem
import classify
import common
import generate as gen
import reinforce
import svf as svf_lib
import tasks

CLASSIFIER = tasks.Classification.category  # the expert pass 1 uses in mode cls; every other expert is a skill
CLASSIFY_TOKENS = 32


@dataclasses.dataclass
class FewShotChoice:
    """What few-shot adaptation decided: the mixture α (None: the base weights), the CEM run, the base
    model's score on the same shots, and which part of the score made the decision."""
    names: list[str]
    alpha: torch.Tensor | None
    result: cem.Result
    base_score: tuple
    decided_by: str


def load_experts(folder) -> dict[str, tuple[dict, dict]]:
    """{name: (z, metadata)} for the expert files in a folder, any number of them, named by expert_name:
    the category train.py writes (its task's: math, code, reasoning, classifier, or a new task's own)."""
    folder = common.resolve_experts(folder)  # a folder, or a hub repository of experts
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no expert files (*.safetensors) in {folder}; train them with "
                                f"python train.py --task gsm8k|mbpp|arc_easy|cls, or pass --experts DIR")
    experts = {}
    for path in files:
        z, meta = svf_lib.read_expert(path)
        name = expert_name(meta, path)
        if name in experts:
            raise ValueError(f"two experts for {name!r} in {folder}: keep one")
        experts[name] = (z, {**meta, "file": path.name})
    kinds = {(meta["param"], meta["targets"], meta.get("layers", "null")) for _, meta in experts.values()}
    if len(kinds) > 1:
        raise ValueError(f"the experts in {folder} were trained with different settings {sorted(kinds)}; mix only like with like")
    return experts


def expert_name(meta: dict, path) -> str:
    """What adapt.py calls an expert: the category in its metadata, else the category of the task it
    names (files written before experts carried one), else its file name."""
    task = meta.get("task")
    return meta.get("category") or (tasks.TASKS[task].category if task in tasks.TASKS else Path(path).stem)


def where(name: str, meta: dict) -> str:
    """How an error names an expert: its file (load_experts records it) and its name."""
    return f"expert {name!r} ({meta['file']})" if "file" in meta else f"expert {name!r}"


class TwoPass:
    """One model with SVF set up for a set of experts; runs pass 1 and pass 2."""

    def __init__(self, model, tokenizer, experts: dict[str, tuple[dict, dict]], batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.experts = {name: z for name, (z, _) in experts.items()}
        self.metadata = {name: meta for name, (_, meta) in experts.items()}
        self.skills = sorted(name for name in experts if name != CLASSIFIER)  # pass 1's categories; the order of α
        # Metadata is parsed through svf.expert_settings, which names the file and key of a damaged value.
        classifier = experts.get(CLASSIFIER, (None, None))[1]
        categories = svf_lib.expert_settings(classifier, where(CLASSIFIER, classifier))["categories"] if classifier else None
        self.classifier_categories = categories or classify.CATEGORIES
        name, (_, meta) = next(iter(experts.items()))
        settings = svf_lib.expert_settings(meta, where(name, meta))
        self.svf = svf_lib.SVF(model, targets=settings["targets"], parametrization=settings["param"], layers=settings["layers"])
        for name, (z, meta) in experts.items():
            svf_lib.check_fits(self.svf, z, meta, where(name, meta))

    def use(self, name_or_z):
        """A context with the given expert (name or z dict) merged in, or the base weights for None."""
        if name_or_z is None:
            return self.svf.disabled()
        self.svf.load_state(self.z_of(name_or_z))
        return self.svf.merged()

    def z_of(self, name_or_z) -> dict:
        """An expert's z by name, or a z dict (a mixture) as it is."""
        return self.experts[name_or_z] if isinstance(name_or_z, str) else name_or_z

    def generate(self, prompts, max_new_tokens, **kw) -> gen.Generation:
        return gen.generate(self.model, self.tokenizer, prompts, max_new_tokens, batch_size=self.batch_size, **kw)

    # -- pass 1

    def categories(self, with_classifier: bool) -> tuple:
        """The categories the pass-1 prompt offers: those the classifier was trained on, or (prompt mode)
        the skills of the experts at hand."""
        return self.classifier_categories if with_classifier else tuple(self.skills)

    def label_rule(self, with_classifier: bool) -> str:
        """How pass 1's reply names a category unless told otherwise: with the classification expert the
        rule its reward was trained with (lenient for files that do not say), else the paper's (strict)."""
        classifier = self.metadata.get(CLASSIFIER, {})
        return classifier.get("label_rule", "lenient") if with_classifier else "strict"

    def classify(self, questions: list[str], with_classifier: bool, strict: bool = True, progress: bool = True):
        """The expert each question should use (a skill's name), or None for the base weights ('others',
        an unreadable reply, or a category without an expert). strict=True is the paper's rule (the
        category must be boxed); strict=False also takes the first category word of an unboxed reply,
        the rule the classification expert's reward used in training (tasks.Classification). Returns
        (choices, pass-1 replies)."""
        if with_classifier and CLASSIFIER not in self.experts:
            raise ValueError("mode cls needs a classification expert (train.py --task cls) in the experts folder")
        categories = self.categories(with_classifier)
        prompts = [self.tokenizer.encode_chat(classify.classification_messages(q, categories)) for q in questions]
        with self.use(CLASSIFIER if with_classifier else None):
            replies = self.generate(prompts, CLASSIFY_TOKENS, progress=progress, desc="pass 1: classify").texts
        return self.route(replies, strict, with_classifier), replies

    def route(self, replies: list[str], strict: bool = True, with_classifier: bool = False) -> list:
        """The expert named by each pass-1 reply, or None (base weights) for others / unreadable / no such expert."""
        categories = self.categories(with_classifier)
        return [c if c in self.skills else None for c in (classify.parse_category(r, strict, categories) for r in replies)]

    # -- pass 2

    def answer(self, task, examples, choices: list, progress: bool = True) -> list[str]:
        """Replies for every example, each with its chosen expert (a name, a z dict shared by all, or None).
        Examples that chose the same expert are generated together: one merge per expert."""
        prompts = tasks.prompt_tokens(self.tokenizer, task, examples)
        replies = [None] * len(examples)
        groups: dict = {}
        for i, choice in enumerate(choices):
            key = choice if choice is None or isinstance(choice, str) else id(choice)
            groups.setdefault(key, (choice, []))[1].append(i)
        for key, (choice, indices) in groups.items():
            label = "base" if choice is None else choice if isinstance(choice, str) else "mixed"
            with self.use(choice):
                out = self.generate([prompts[i] for i in indices], task.max_new_tokens, progress=progress,
                                    desc=f"pass 2: {label}")
            for i, text in zip(indices, out.texts):
                replies[i] = text
        return replies

    # -- few-shot adaptation

    def fewshot_alpha(self, task, shots, settings: cem.Settings, per_layer: bool = False, log=None) -> FewShotChoice:
        """α over the skill experts (self.skills, e.g. code, math, reasoning), by CEM on the shots, or the base weights.

        A candidate's score is (accuracy on the shots, mean log-likelihood per token of the shots' reference
        replies under the mixture), compared in that order. The paper breaks accuracy ties by the
        log-likelihood of the model's own correct replies; when no candidate solves a shot (HumanEval and
        GSM8K on a small model) that is undefined, every candidate ties and the search keeps its first
        candidate, which cost 0.07 on HumanEval. The reference replies' log-likelihood is defined for every
        candidate, so the search always has a signal. The base model is scored the same way, and a mixture
        that does not score above it is not used: on the shots, few-shot adaptation is never below base."""
        names = self.skills
        zs = [self.experts[n] for n in names]
        prompts = tasks.prompt_tokens(self.tokenizer, task, shots)
        references = tasks.reference_tokens(self.tokenizer, task, shots)
        shape = (len(names), self.model.args.n_layers) if per_layer else (len(names),)

        def score_current_weights():
            out = self.generate(prompts, task.max_new_tokens)
            accuracy = sum(task.score_many(shots, out.texts)) / len(shots)
            with torch.no_grad():
                logp, _, mask = reinforce.completion_logprobs(self.model, prompts, references, with_base=False)
            return (accuracy, (logp.sum() / mask.sum()).item())

        def score(alpha):
            with self.use(svf_lib.mix(zs, alpha, self.svf.parametrization)):
                return score_current_weights()

        with self.use(None):
            base_score = score_current_weights()
        settings = dataclasses.replace(settings, init_mean=1.0 / len(names))
        result = cem.maximize(score, shape, settings, log=log)
        best = tuple(result.best_score)
        (accuracy, loglik), (base_accuracy, base_loglik) = best, base_score
        if best <= base_score:
            decided_by = (f"base model kept: no mixture scored above it on the shots (best mixture: accuracy "
                          f"{accuracy:.3f}, reference log-likelihood {loglik:.4f}; base: {base_accuracy:.3f}, "
                          f"{base_loglik:.4f})")
            return FewShotChoice(names, None, result, base_score, decided_by)
        if accuracy > base_accuracy:
            decided_by = f"accuracy on the shots ({accuracy:.3f} against the base model's {base_accuracy:.3f})"
        else:
            decided_by = (f"log-likelihood of the shots' reference replies ({loglik:.4f} against the base model's "
                          f"{base_loglik:.4f}; accuracy tied at {accuracy:.3f})")
        return FewShotChoice(names, result.best, result, base_score, decided_by)

    def mixed(self, names, alpha) -> dict:
        return svf_lib.mix([self.experts[n] for n in names], alpha, self.svf.parametrization)


def shots_and_scored(task, split: str, n_shots: int, seed: int = 0, limit: int | None = None):
    """Few-shot examples from the task's own validation data where it exists (or MATH's pool outside
    MATH-500), else from the evaluated split; prompts used as shots are never scored. Every mode scores
    the same prompts, so the rows of a comparison are comparable."""
    import random

    evaluated = task.load(split)
    pool_split = next((s for s in ("validation", "valid", "shots") if s in task.splits and s != split), None)
    pool = task.load(pool_split) if pool_split else evaluated
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    shots = [pool[i] for i in order[:n_shots]] if n_shots else []
    shot_ids = {e["id"] for e in shots}
    scored = [e for e in evaluated if e["id"] not in shot_ids][:limit]
    return shots, scored, pool_split or split
