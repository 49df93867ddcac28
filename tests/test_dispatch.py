"""Two-pass inference: routing by category, the base weights for 'others', one-hot few-shot mixing,
shots kept out of the score, and a single expert through two passes equal to evaluating it directly."""

import pytest
import torch

import cem
import classify
import dispatch
import generate as gen
import model as m
import svf as svf_lib
import tasks


class Words:
    """A task over the tiny model's word vocabulary; its reference answer is fixed per example."""
    name = "arc_challenge"
    category = "reasoning"
    max_new_tokens = 4
    splits = ("validation", "test")

    def __init__(self, answers=None):
        self.answers = answers or {}

    def load(self, split):
        g = torch.Generator().manual_seed(0 if split == "test" else 1)
        return [{"id": f"{split}/{i}", "question": " ".join(f"w{int(t)}" for t in torch.randint(3, 96, (5,), generator=g))}
                for i in range(12)]

    def question(self, e):
        return e["question"]

    def messages(self, e):
        return [{"role": "user", "content": e["question"]}]

    def reference(self, e):
        return self.answers.get(e["id"]) or "w7 w8"

    def score_many(self, examples, replies):
        # Right when the reply opens with the same word as the answer: a graded enough target for CEM.
        return [r.split()[:1] == (self.answers.get(e["id"]) or "").split()[:1] for e, r in zip(examples, replies)]


@pytest.fixture
def two_pass(sharp_tiny_llama, tmp_path):
    """Three random experts (saved as files, loaded through load_experts) on the sharp tiny model."""
    model, tokenizer = m.load(sharp_tiny_llama, device="cpu")
    svf = svf_lib.SVF(model, targets="mlp", parametrization="scale", cache=False, progress=False)
    g = torch.Generator().manual_seed(0)
    for task_name in ("gsm8k", "mbpp", "arc_easy"):
        with torch.no_grad():
            for z in svf.parameters():
                z.copy_(1 + 0.8 * torch.randn(z.shape, generator=g))
        svf.save_expert(tmp_path / "experts" / f"{task_name}.safetensors", task=task_name)
    svf.remove()
    return dispatch.TwoPass(model, tokenizer, dispatch.load_experts(tmp_path / "experts"), batch_size=4)


def replies_with(two, task, examples, expert):
    prompts = [two.tokenizer.encode_chat(task.messages(e)) for e in examples]
    with two.use(expert):
        return two.generate(prompts, task.max_new_tokens, progress=False).texts


def test_experts_are_named_by_their_task(two_pass):
    assert sorted(two_pass.experts) == two_pass.skills == ["code", "math", "reasoning"]


@pytest.fixture
def four_experts(two_pass, sharp_tiny_llama, tmp_path):
    """The three experts plus a fourth skill no code names (category "medicine", from a task outside
    tasks.py) and a classifier trained on all four: adding a skill is adding a file."""
    g = torch.Generator().manual_seed(1)
    svf = two_pass.svf
    for name, meta in (("medqa", dict(task="medqa", category="medicine")),
                       ("cls", dict(task="cls", category="classifier", label_rule="strict",
                                    categories='["code", "math", "medicine", "reasoning"]'))):
        svf.load_state({k: 1 + 0.8 * torch.randn(v.shape, generator=g) for k, v in two_pass.experts["math"].items()})
        svf.save_expert(tmp_path / "experts" / f"{name}.safetensors", **meta)
    model, tokenizer = m.load(sharp_tiny_llama, device="cpu")  # two_pass's model already has its SVF layers
    return dispatch.TwoPass(model, tokenizer, dispatch.load_experts(tmp_path / "experts"), batch_size=4)


def test_a_fourth_expert_is_routed_to_and_mixed(four_experts, monkeypatch):
    two = four_experts
    assert two.skills == ["code", "math", "medicine", "reasoning"] and "classifier" in two.experts
    offered, real_messages = [], classify.classification_messages
    monkeypatch.setattr(classify, "classification_messages", lambda q, c: offered.append(c) or real_messages(q, c))
    monkeypatch.setattr(two, "generate", lambda p, n, **kw: gen.Generation(
        ["\\boxed{medicine}", "\\boxed{others}", "\\boxed{poetry}"], [], []))
    for with_classifier in (False, True):
        choices, _ = two.classify(["q"] * 3, with_classifier=with_classifier)
        assert choices == ["medicine", None, None]
    assert set(offered) == {("code", "math", "medicine", "reasoning")}
    monkeypatch.undo()

    captured = {}

    def fake_maximize(score, shape, settings, log=None):
        captured["shape"], captured["init_mean"] = shape, settings.init_mean
        alpha = torch.tensor([0.0, 0.0, 1.0, 0.0])
        return cem.Result(best=alpha, best_score=score(alpha), mean=alpha, iterations=1, evaluations=1)

    monkeypatch.setattr(cem, "maximize", fake_maximize)
    task = Words({e["id"]: "w7" for e in Words().load("validation")})
    shots = task.load("validation")[:3]
    chosen = two.fewshot_alpha(task, shots, cem.LIGHT)
    assert captured == {"shape": (4,), "init_mean": 0.25} and chosen.names == two.skills
    examples = task.load("test")[:4]
    one_hot = two.mixed(two.skills, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert two.answer(task, examples, [one_hot] * 4, progress=False) == replies_with(two, task, examples, "medicine")


def test_prompt_strategy_routes_each_prompt_and_others_use_the_base_weights(two_pass, monkeypatch):
    pass1 = ["Classification: `\\boxed{math}`", "\\boxed{ Code }", "\\boxed{others}", "I think it is reasoning",
             "\\boxed{\\text{Reasoning}}", "\\boxed{poetry}"]
    monkeypatch.setattr(two_pass, "generate", lambda prompts, n, **kw: gen.Generation(pass1, [], []))
    choices, _ = two_pass.classify(["q"] * len(pass1), with_classifier=False)
    assert choices == ["math", "code", None, None, "reasoning", None]  # no box -> base, unknown -> base
    lenient, _ = two_pass.classify(["q"] * len(pass1), with_classifier=False, strict=False)
    assert lenient == ["math", "code", None, "reasoning", "reasoning", None]  # the first category word counts
    monkeypatch.undo()

    task = Words()
    examples = task.load("test")[: len(choices)]
    got = two_pass.answer(task, examples, choices, progress=False)
    direct = {name: replies_with(two_pass, task, examples, name) for name in (None, "code", "math", "reasoning")}
    for i, choice in enumerate(choices):
        assert got[i] == direct[choice][i]
    # The base replies differ from every expert's: a test that would fail if 'others' used any expert.
    for i in (2, 3, 5):
        assert all(got[i] != direct[name][i] for name in ("code", "math", "reasoning")), i


def test_cls_mode_needs_a_classifier(two_pass):
    with pytest.raises(ValueError, match="classification expert"):
        two_pass.classify(["q"], with_classifier=True)


def test_one_hot_mixture_reproduces_the_expert(two_pass):
    task = Words()
    examples = task.load("test")[:6]
    for k, name in enumerate(["code", "math", "reasoning"]):
        alpha = torch.nn.functional.one_hot(torch.tensor(k), 3).float()
        mixed = two_pass.mixed(["code", "math", "reasoning"], alpha)
        assert two_pass.answer(task, examples, [mixed] * 6, progress=False) == replies_with(two_pass, task, examples, name)


def reference_loglik(two, task, shots, expert):
    """Mean log-probability per token of the shots' reference replies (then EOS), one full forward per shot."""
    total, count = 0.0, 0
    with two.use(expert), torch.no_grad():
        for e in shots:
            prompt = two.tokenizer.encode_chat(task.messages(e))
            target = two.tokenizer.encode(task.reference(e)) + two.tokenizer.eos_ids[:1]
            logits = two.model(torch.tensor([prompt + target]))[0]
            logp = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)
            total += logp.gather(-1, torch.tensor(target)[:, None]).sum().item()
            count += len(target)
    return total / count


def test_fewshot_score_is_accuracy_then_reference_loglikelihood(two_pass, monkeypatch):
    """The CEM objective on shots whose right answers are the math expert's own replies: one-hot math
    scores 1.0, another expert lower; the second number is the log-likelihood of the reference replies
    under the mixture, equal to a full forward's; α is over the three experts and starts at 1/K."""
    task = Words()
    shots = task.load("validation")[:6]
    task.answers = dict(zip([e["id"] for e in shots], replies_with(two_pass, task, shots, "math")))
    captured = {}

    def fake_maximize(score, shape, settings, log=None):
        captured.update(score=score, shape=shape, init_mean=settings.init_mean)
        return cem.Result(best=torch.zeros(shape), best_score=(0.0, -99.0), mean=torch.zeros(shape), iterations=0,
                          evaluations=0)

    monkeypatch.setattr(cem, "maximize", fake_maximize)
    chosen = two_pass.fewshot_alpha(task, shots, cem.LIGHT)
    assert chosen.names == ["code", "math", "reasoning"] and captured["shape"] == (3,) and captured["init_mean"] == 1 / 3
    accuracy, loglik = captured["score"](torch.tensor([0.0, 1.0, 0.0]))
    assert accuracy == 1.0 and loglik == pytest.approx(reference_loglik(two_pass, task, shots, "math"), abs=1e-4)
    assert captured["score"](torch.tensor([1.0, 0.0, 0.0]))[0] < 1.0
    assert chosen.base_score[1] == pytest.approx(reference_loglik(two_pass, task, shots, None), abs=1e-4)
    two_pass.fewshot_alpha(task, shots, cem.LIGHT, per_layer=True)
    assert captured["shape"] == (3, two_pass.model.args.n_layers)


@pytest.mark.parametrize("answers_from", ["base", "math", "nobody"])
def test_fewshot_never_picks_a_mixture_below_the_base_model_on_the_shots(two_pass, answers_from):
    """A real CEM search (light). Shots answered as the base model answers: no mixture beats it and the base
    weights are kept. As the math expert answers: a mixture wins on accuracy. As nobody answers (no
    candidate solves a shot, the case that cost HumanEval 0.07): the reference log-likelihood decides, and
    whatever is chosen scores at least the base model's (accuracy, log-likelihood) on the shots."""
    task = Words()
    shots = task.load("validation")[:6]
    if answers_from == "nobody":
        task.answers = {e["id"]: "zzz" for e in shots}
    else:
        task.answers = dict(zip([e["id"] for e in shots],
                                replies_with(two_pass, task, shots, None if answers_from == "base" else "math")))
    chosen = two_pass.fewshot_alpha(task, shots, cem.LIGHT)
    assert chosen.base_score[0] == {"base": 1.0, "math": chosen.base_score[0], "nobody": 0.0}[answers_from]
    if answers_from == "base":
        assert chosen.alpha is None and chosen.decided_by.startswith("base model kept")
        assert tuple(chosen.result.best_score) <= chosen.base_score
    elif answers_from == "math":
        assert chosen.alpha is not None and chosen.decided_by.startswith("accuracy on the shots")
        assert chosen.result.best_score[0] > chosen.base_score[0]
    else:
        assert chosen.result.best_score[0] == 0.0
        assert chosen.alpha is None or chosen.decided_by.startswith("log-likelihood")
        if chosen.alpha is not None:
            assert chosen.result.best_score[1] > chosen.base_score[1]


def test_shots_never_appear_in_the_scored_prompts():
    humaneval = tasks.get("humaneval")
    shots, scored, source = dispatch.shots_and_scored(humaneval, "test", 10)
    assert source == "test" and len(shots) == 10 and len(scored) == 164 - 10
    assert not {e["id"] for e in shots} & {e["id"] for e in scored}
    math = tasks.get("math")
    shots, scored, source = dispatch.shots_and_scored(math, "test500", 10)
    assert source == "shots" and len(scored) == 500
    assert not {e["id"] for e in shots} & {e["id"] for e in scored}


def test_two_pass_with_one_expert_equals_evaluating_it_directly(two_pass, sharp_tiny_llama, tmp_path):
    task = Words()
    examples = task.load("test")
    two_pass_replies = two_pass.answer(task, examples, ["math"] * len(examples), progress=False)
    model, tokenizer = m.load(sharp_tiny_llama, device="cpu")
    svf_lib.apply_expert(model, tmp_path / "experts" / "gsm8k.safetensors")
    prompts = [tokenizer.encode_chat(task.messages(e)) for e in examples]
    direct = gen.generate(model, tokenizer, prompts, task.max_new_tokens, batch_size=5).texts
    assert two_pass_replies == direct


def test_adapt_fewshot_end_to_end(two_pass, sharp_tiny_llama, tmp_path, monkeypatch, capsys):
    """adapt.py --mode fewshot: CEM over the experts on shots left out of the score, then pass 2 with what it
    reports using (the mixture, or the base weights), and it prints which signal decided. No shot is solvable
    here, so the reference replies' log-likelihood decides."""
    import json

    import adapt

    task = Words({f"{split}/{i}": "unreachable" for split in ("validation", "test") for i in range(12)})  # all tie at 0
    monkeypatch.setattr(tasks, "get", lambda name, **kw: task)
    out = tmp_path / "report.json"
    adapt.main(["--mode", "fewshot", "--task", "arc_challenge", "--shots", "3", "--limit", "4", "--model",
                str(sharp_tiny_llama), "--experts", str(tmp_path / "experts"), "--threads", "1", "--out", str(out),
                "--export", str(tmp_path / "exported")])
    report = json.loads(out.read_text())
    assert report["scored"] == 4 and report["shots"] == 3 and report["cem_evaluations"] == 48
    assert report["shot_score"][0] == 0 and report["base_shot_score"][0] == 0
    printed = capsys.readouterr().out
    assert f"[cem] decided by {report['decided_by']}" in printed
    if report["used"] == "base":
        assert report["decided_by"].startswith("base model kept") and report["alpha"] is None
        weights = None
    else:
        assert report["decided_by"].startswith("log-likelihood of the shots' reference replies")
        assert report["shot_score"][1] > report["base_shot_score"][1]
        weights = svf_lib.mix([two_pass.experts[n] for n in two_pass.skills], torch.tensor(report["alpha_full"]),
                              two_pass.svf.parametrization)
    scored = [e for e in task.load("test") if e["id"] in {r["id"] for r in report["records"]}]
    assert [r["reply"] for r in report["records"]] == replies_with(two_pass, task, scored, weights)
    # --export wrote the weights pass 2 used: the exported folder, loaded as a plain model, answers the same
    exported, tokenizer = m.load(tmp_path / "exported", device="cpu")
    prompts = tasks.prompt_tokens(tokenizer, task, scored)
    assert gen.generate(exported, tokenizer, prompts, task.max_new_tokens).texts == [r["reply"] for r in report["records"]]
