"""REINFORCE with a KL penalty for SVF experts, the paper's training objective (arXiv 2501.06252, §3.1):

    J(z) = E[ log π_{W'}(ŷ | x) · A ] − λ · KL(π_{W'} ‖ π_W)

One step: (1) rollouts — the current z merged into the weights, batched generation with the KV cache,
no gradients; K replies per prompt (K = 1 and greedy is the paper's setting; K > 1 samples at a
temperature); (2) rewards r ∈ {−1, +1} from the task's exact scorer; (3) advantages, one of
    --baseline none    A = r                          the paper's exact setting
    --baseline mean    A = r − mean(r) over the batch
    --baseline group   A_i = r_i − mean of the other K−1 replies to the same prompt (leave-one-out, RLOO)
optionally divided by the std of the prompt's K rewards (--scale-by-std, as GRPO); (4) the loss on
the generated tokens, through the factored SVF forward so gradients reach z only, accumulated over
micro-batches; (5) gradient clipping and an AdamW update.

Why a baseline by default: with A = r and a model that is right less than half the time, most
rewards are −1 and every update pushes down whatever the model said, well-formed answers included.
On the default model this collapsed ARC-Easy validation accuracy from 0.21 to 0.06 in 25 steps
(docs/findings.md). The paper's base models were right 40–90% of the time, so it did not show there.

Why a group baseline: with one reply per prompt, the batch mean compares replies to different
questions, so it rewards whatever is right on average; on ARC with a weak model that is one answer
letter (every batch-mean ARC expert learnt to answer "A"). The K replies to one prompt share its
difficulty, so r_i minus their mean leaves only what this reply did better or worse than the others on
the same question. Leave-one-out rather than the group mean including r_i: the baseline then does not
depend on the reply it judges (unbiased, as RLOO); the including mean gives the same direction scaled
by (K−1)/K (half at K = 2), so between the two only the effective learning rate differs. A prompt whose
K replies all score the same gives no gradient; the share of such groups is logged (`equal_groups`).

Data parallel (torchrun, parallel.py): each process rolls out its share of the global batch; the
baseline's mean reward, the batch size that weighs each micro-batch and the gradients are summed over
the processes, so every process takes the same step as one process with the whole batch would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import generate as gen
import tasks
from parallel import all_reduce_sum, sum_gradients


@dataclass
class Rollouts:
    """One batch of generated replies and their rewards."""

    prompts: list[list[int]]
    completions: list[list[int]]  # generated ids, EOS included when the model stopped by itself
    texts: list[str]
    correct: list[bool]
    rewards: torch.Tensor  # (B,) ±1
    group_size: int = 1  # replies per prompt; the K replies to one prompt are consecutive

    def groups(self) -> torch.Tensor:
        """Rewards as (prompts, K)."""
        return self.rewards.view(-1, self.group_size)

    def equal_groups(self) -> int:
        """Prompts whose K replies all got the same reward: under the group baseline they give no gradient."""
        r = self.groups()
        return int((r == r[:, :1]).all(1).sum())

    def advantages(self, baseline: str, scale_by_std: bool = False) -> torch.Tensor:
        if baseline == "mean":
            total, count = all_reduce_sum([self.rewards.sum().item(), len(self.rewards)]).tolist()
            advantages = self.rewards - total / count  # the mean over the global batch
        elif baseline == "none":
            advantages = self.rewards
        elif baseline == "group":
            K = self.group_size
            if K < 2:
                raise ValueError("the group baseline needs at least 2 replies per prompt (--samples 2 or more)")
            r = self.groups()
            others = (r.sum(1, keepdim=True) - r) / (K - 1)  # mean of the other K−1 replies to the prompt
            advantages = (r - others).reshape(-1)
        else:
            raise ValueError(f"unknown baseline {baseline!r}: group, mean or none")
        if scale_by_std:
            if baseline != "group":
                raise ValueError("--scale-by-std divides each prompt's advantages by the std of its replies' rewards: "
                                 "it goes with --baseline group")
            std = self.groups().std(1, keepdim=True).expand(-1, self.group_size).reshape(-1)
            advantages = advantages / std.clamp(min=1e-6)  # an all-equal group has A = 0 and stays 0
        return advantages


@torch.no_grad()
def rollout(model, tokenizer, svf, task, examples, max_new_tokens: int, batch_size: int = 16,
            temperature: float = 0.0, seed: int | None = None, samples: int = 1) -> Rollouts:
    """Generate `samples` replies to each example with z merged into the weights (zero per-token
    overhead), then score each reply. The copies of a prompt are prefilled once (generate.Engine)."""
    if samples > 1 and temperature == 0:
        raise ValueError(f"{samples} greedy replies to one prompt are all the same: sample (temperature > 0)")
    examples = [e for e in examples for _ in range(samples)]
    prompts = tasks.prompt_tokens(tokenizer, task, examples)
    with svf.merged():
        out = gen.generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                           temperature=temperature, seed=seed)
    completions, texts = out.tokens, out.texts
    correct = task.score_many(examples, texts)
    rewards = torch.tensor([task.reward(c) for c in correct], dtype=torch.float32)
    return Rollouts(prompts, completions, texts, correct, rewards, group_size=samples)


def pack_replies(prompts, completions, window: int | None = None):
    """One forward pass for a batch of replies, in which replies to the same prompt share it.

    Consecutive replies with equal prompts (the K replies of a group rollout) become one packed row
    [prompt, reply 1, ..., reply K, padding]. Each reply attends to the prompt and to its own earlier
    tokens only, and its positions continue from the prompt's end, so every reply sees exactly what it
    would see alone after the prompt; the prompt is computed once instead of K times (with a 110-token
    ARC prompt and 8-token replies, a group of 8 is 174 tokens instead of 944). Gradients through the
    shared prompt sum over its replies, as they would over K separate copies. The saving shrinks as
    replies grow: a packed row's attention costs the square of its whole length (with 8 replies of 256
    tokens after a 150-token prompt, about what the 8 unpacked rows cost by a count of operations;
    not timed).

    Returns tokens (G, S), positions (G, S), mask (G, 1, S, S) (True where a query may attend to a key),
    and source_row (B,), source_slot (B, L): the row and slot whose hidden state predicts token t of
    reply i (the prompt's last slot for t = 0, the reply's own token t − 1 after it); L is the longest
    reply, and slots past a reply's end point at slot 0 (masked out by the caller)."""
    groups = []  # (prompt, [reply indices])
    for i, prompt in enumerate(prompts):
        if groups and groups[-1][0] == prompt:
            groups[-1][1].append(i)
        else:
            groups.append((prompt, [i]))
    B, G = len(prompts), len(groups)
    L = max(max(map(len, completions)), 1)
    S = max(len(p) + sum(len(completions[i]) for i in members) for p, members in groups)
    tokens = torch.zeros(G, S, dtype=torch.long)
    positions = torch.zeros(G, S, dtype=torch.long)
    segment = torch.full((G, S), -1, dtype=torch.long)  # 0: prompt, j: reply j of the row, -1: padding
    source_row = torch.zeros(B, dtype=torch.long)
    source_slot = torch.zeros(B, L, dtype=torch.long)
    for g, (prompt, members) in enumerate(groups):
        P = len(prompt)
        tokens[g, :P] = torch.tensor(prompt, dtype=torch.long)
        positions[g, :P] = torch.arange(P)
        segment[g, :P] = 0
        start = P
        for j, i in enumerate(members, start=1):
            n = len(completions[i])
            tokens[g, start:start + n] = torch.tensor(completions[i], dtype=torch.long)
            positions[g, start:start + n] = torch.arange(P, P + n)
            segment[g, start:start + n] = j
            source_row[i] = g
            if n:
                source_slot[i, 0] = P - 1
                source_slot[i, 1:n] = torch.arange(start, start + n - 1)
            start += n
    slots = torch.arange(S)
    causal = slots[None, :] <= slots[:, None]  # (S, S): query slot, key slot
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]  # (G, S, 1), (G, 1, S)
    allowed = causal[None] & (seg_k != -1) & ((seg_k == 0) | (seg_k == seg_q))
    if window is not None:
        allowed = allowed & (positions[:, :, None] - positions[:, None, :] < window)
    allowed = allowed | torch.eye(S, dtype=torch.bool)[None]  # a padding query sees itself: softmax stays finite
    return tokens, positions, allowed[:, None], source_row, source_slot


def completion_logprobs(model, prompts, completions, with_base: bool = True, svf=None):
    """Log-probabilities of each generated token under the current policy (with grad), and the KL
    divergence KL(π_{W'} ‖ π_W) at each generated position (the base policy is the same model with
    SVF switched off: no second copy of the weights). Returns (logp (B, L), kl (B, L), mask (B, L)),
    L the longest completion; mask marks real tokens. Replies to the same prompt share one
    computation of it (pack_replies)."""
    device = model.embed.weight.device
    B = len(prompts)
    tokens, positions, attend, source_row, source_slot = (
        t.to(device) for t in pack_replies(prompts, completions, model.args.sliding_window))
    L = source_slot.shape[1]
    lengths = torch.tensor([len(c) for c in completions], device=device)
    mask = torch.arange(L, device=device)[None, :] < lengths[:, None]  # (B, L)
    targets = torch.zeros(B, L, dtype=torch.long)
    for i, c in enumerate(completions):
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    targets = targets.to(device)

    def logits_at_completions():
        hidden = model.hidden_states(tokens, positions=positions, mask=attend)  # (G, S, dim)
        h = hidden[source_row[:, None], source_slot]  # (B, L, dim): the state predicting each reply token
        return model.lm_head(h).float()  # (B, L, vocab)

    logp_all = F.log_softmax(logits_at_completions(), dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)  # (B, L)
    kl = torch.zeros_like(logp)
    if with_base:
        with torch.no_grad(), svf.disabled():
            base_logp_all = F.log_softmax(logits_at_completions(), dim=-1)
        # KL(π' ‖ π) = Σ_v π'(v) (log π'(v) − log π(v)), exact over the vocabulary at every position.
        kl = (logp_all.exp() * (logp_all - base_logp_all)).sum(-1)
    return logp * mask, kl * mask, mask


def policy_loss(logp, kl, mask, advantages, kl_coef: float):
    """−mean_i(A_i · Σ_t log π(ŷ_it)) + λ · mean over generated tokens of KL. The sum over a reply's
    tokens follows the reference code (its whole answer is one action); the batch mean keeps the scale
    independent of the batch size."""
    advantages = advantages.to(logp.device)
    pg = -(advantages * logp.sum(-1)).mean()
    kl_mean = kl.sum() / mask.sum().clamp(min=1)
    return pg + kl_coef * kl_mean, pg.detach(), kl_mean.detach()


class Diverged(ArithmeticError):
    """A step whose loss, gradient or updated parameters are not finite (inf or NaN): too large a learning
    rate or KL weight. AdamW and clipping cannot recover from it (a NaN spreads through the moments to every
    later update), so training stops rather than save a non-finite z."""


def check_finite(values: dict):
    """Stop before the update when the loss or the gradient norm is not finite. The numbers are sums
    over the processes (NaN and inf survive a sum), so every process stops at the same step."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        shown = ", ".join(f"{name} {value}" for name, value in bad.items())
        raise Diverged(f"the loss or its gradient is not finite ({shown})")


@torch.no_grad()
def check_finite_parameters(parameters):
    """Stop when an update made a trained parameter infinite or NaN: with a huge learning rate AdamW's
    first step alone moves each parameter by about the learning rate. Every process took the same update."""
    bad = sum(int((~torch.isfinite(p)).sum()) for p in parameters)
    if bad:
        raise Diverged(f"the update made {bad} trained values non-finite (inf or NaN)")


def make_optimizer(parameters, lr: float, total_steps: int):
    """AdamW with cosine decay to 0 (the paper). No weight decay: it would pull z towards 0, and for the
    scale parametrization z = 0 is a zero matrix, not a neutral one."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))))
    return optimizer, scheduler


def train_step(model, svf, rollouts: Rollouts, optimizer, scheduler, baseline: str = "mean", kl_coef: float = 0.0,
               micro_batch: int = 8, clip: float = 1e-3, autocast_dtype=None, scale_by_std: bool = False) -> dict:
    """One update from a batch of rollouts, accumulated over micro-batches of `micro_batch` replies.
    Returns logged numbers."""
    advantages = rollouts.advantages(baseline, scale_by_std)
    B = int(all_reduce_sum(len(rollouts.prompts)).item())  # the global batch
    optimizer.zero_grad(set_to_none=True)
    pg_total, kl_values = 0.0, []
    device = model.embed.weight.device
    for start in range(0, len(rollouts.prompts), micro_batch):
        sl = slice(start, start + micro_batch)
        # The base model's forward is needed for the loss only when λ > 0; otherwise KL is measured on
        # the first micro-batch alone, for the log, which saves a forward pass per micro-batch.
        with_base = kl_coef > 0 or start == 0
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logp, kl, mask = completion_logprobs(model, rollouts.prompts[sl], rollouts.completions[sl],
                                                 with_base=with_base, svf=svf)
            loss, pg, kl_mean = policy_loss(logp, kl, mask, advantages[sl], kl_coef)
        share = len(rollouts.prompts[sl]) / B  # micro-batch losses are means: weight them into the batch mean
        (loss * share).backward()
        pg_total += pg.item() * share
        if with_base:
            kl_values.append(kl_mean.item())
    sum_gradients(svf.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(svf.parameters(), clip).item()
    reward, correct, pg, kl, processes, equal, groups = all_reduce_sum(
        [rollouts.rewards.sum().item(), sum(rollouts.correct), pg_total, sum(kl_values) / len(kl_values), 1,
         rollouts.equal_groups(), len(rollouts.prompts) // rollouts.group_size]).tolist()
    check_finite(dict(policy_loss=pg, kl=kl, grad_norm=grad_norm))
    optimizer.step()
    scheduler.step()
    check_finite_parameters(svf.parameters())
    stats = dict(reward=reward / B, accuracy=correct / B, pg_loss=pg, kl=kl / processes, grad_norm=grad_norm,
                 lr=scheduler.get_last_lr()[0])
    if rollouts.group_size > 1:
        stats["equal_groups"] = equal / groups  # share of prompts whose replies all scored the same
    return stats


def nexttoken_step(model, adapter, tokenizer, task, examples, optimizer, scheduler, micro_batch, clip, autocast_dtype):
    """Supervised baseline: mean negative log-likelihood of the reference reply (then EOS) given the prompt."""
    prompts = tasks.prompt_tokens(tokenizer, task, examples)
    targets = tasks.reference_tokens(tokenizer, task, examples)
    n_tokens = all_reduce_sum(sum(map(len, targets))).item()  # over the global batch
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    device = model.embed.weight.device
    for start in range(0, len(examples), micro_batch):
        sl = slice(start, start + micro_batch)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logp, _, _ = completion_logprobs(model, prompts[sl], targets[sl], with_base=False)
            loss = -logp.sum() / n_tokens  # every token of the batch weighs the same
        loss.backward()
        total += loss.item()
    sum_gradients(adapter.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(adapter.parameters(), clip).item()
    nll = all_reduce_sum(total).item()
    check_finite(dict(nll=nll, grad_norm=grad_norm))
    optimizer.step()
    scheduler.step()
    check_finite_parameters(adapter.parameters())
    return dict(nll=nll, grad_norm=grad_norm, lr=scheduler.get_last_lr()[0])
