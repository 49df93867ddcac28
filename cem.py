"""The Cross-Entropy Method: a small, generic black-box maximiser (paper §3.2 C and Appendix A.4).

Few-shot adaptation uses it to find the mixing weights α of the expert vectors, z' = Σ_k α_k z_k,
that score best on a handful of the target task's prompts. Each iteration samples a population of
candidates from a Gaussian, scores them, and refits the Gaussian's mean and std to the best (elite)
fraction. Scores are tuples compared in order, so a primary score (accuracy on the shots) can be
tie-broken by a secondary one (the mean log-likelihood of the tokens of the correct answers).

    result = cem.maximize(score_fn, dim=3, settings=cem.Settings(init_mean=1/3))
    result.best, result.best_score, result.history
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Settings:
    """Defaults are the reference code's: population 32, elite 0.2, initial std 0.5, α in [0, 1]."""

    population: int = 32
    elite_fraction: float = 0.2
    iterations: int = 100
    init_mean: float | torch.Tensor = 0.5  # few-shot adaptation sets 1/K
    init_std: float = 0.5
    low: float | None = 0.0  # candidates are clamped into [low, high]
    high: float | None = 1.0
    normalize: bool = False  # rescale each candidate to sum to 1 (over its first dimension)
    min_std: float = 1e-3  # stop when every std is below this ...
    tolerance: float = 1e-3  # ... or when the mean moved less than this (max abs) in an iteration
    seed: int = 0


# The paper's CEM-light (Table 10): a few generations, for a CPU or a quick look.
LIGHT = Settings(population=16, iterations=3)


@dataclass
class Result:
    best: torch.Tensor
    best_score: tuple
    mean: torch.Tensor
    iterations: int
    evaluations: int
    history: list[dict] = field(default_factory=list)  # per iteration: best α, its score, mean, std


def _normalize(candidates: torch.Tensor) -> torch.Tensor:
    """Each candidate (first dim = experts, optionally × layers) sums to 1 over the experts."""
    total = candidates.sum(dim=1, keepdim=True)
    uniform = torch.full_like(candidates, 1.0 / candidates.shape[1])
    return torch.where(total > 1e-8, candidates / total.clamp(min=1e-8), uniform)


def maximize(score: Callable[[torch.Tensor], float | tuple], shape, settings: Settings = Settings(),
             log: Callable[[dict], None] | None = None) -> Result:
    """Maximise score(α) over α of the given shape (e.g. (K,) or (K, n_layers)).

    score returns a number or a tuple (primary, tie-breaker, ...), compared lexicographically.
    The best candidate ever seen is returned (not the final mean), with its score.
    """
    shape = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
    generator = torch.Generator().manual_seed(settings.seed)
    mean = torch.as_tensor(settings.init_mean, dtype=torch.float32).expand(shape).clone()
    std = torch.full(shape, float(settings.init_std))
    n_elite = max(1, round(settings.population * settings.elite_fraction))
    best, best_score, history, evaluations = None, None, [], 0

    def key(s):
        return s if isinstance(s, tuple) else (s,)

    for iteration in range(1, settings.iterations + 1):
        candidates = mean + std * torch.randn((settings.population, *shape), generator=generator)
        if settings.low is not None or settings.high is not None:
            candidates = candidates.clamp(settings.low, settings.high)
        if settings.normalize:
            candidates = _normalize(candidates[:, None] if len(shape) == 0 else candidates)
        scores = [key(score(c)) for c in candidates]
        evaluations += len(candidates)
        order = sorted(range(len(candidates)), key=lambda i: scores[i], reverse=True)
        if best_score is None or scores[order[0]] > best_score:
            best, best_score = candidates[order[0]].clone(), scores[order[0]]
        elite = candidates[order[:n_elite]]
        new_mean, std = elite.mean(dim=0), elite.std(dim=0, unbiased=False) if n_elite > 1 else std
        moved = (new_mean - mean).abs().max().item()
        mean = new_mean
        entry = dict(iteration=iteration, best=best.tolist(), best_score=list(best_score), mean=mean.tolist(),
                     std_max=std.max().item(), moved=moved)
        history.append(entry)
        if log:
            log(entry)
        if std.max().item() < settings.min_std or moved < settings.tolerance:
            break
    return Result(best=best, best_score=best_score, mean=mean, iterations=iteration, evaluations=evaluations, history=history)
