import torch

import cem


def test_finds_the_optimum_of_a_quadratic():
    target = torch.tensor([0.2, 0.7, 0.45])
    result = cem.maximize(lambda a: -((a - target) ** 2).sum().item(), 3, cem.Settings(init_mean=1 / 3, iterations=60))
    assert (result.best - target).abs().max() < 0.03
    assert result.evaluations == 32 * result.iterations


def test_clamps_to_the_range():
    target = torch.tensor([1.5, -0.5])  # outside [0, 1]: the best feasible point is the corner (1, 0)
    result = cem.maximize(lambda a: -((a - target) ** 2).sum().item(), 2, cem.Settings(iterations=40))
    assert result.best.min() >= 0 and result.best.max() <= 1
    assert torch.allclose(result.best, torch.tensor([1.0, 0.0]), atol=1e-3)


def test_normalized_candidates_sum_to_one_per_layer():
    seen = []

    def score(a):
        seen.append(a)
        return -((a[:, 0] - torch.tensor([0.6, 0.3, 0.1])) ** 2).sum().item()

    result = cem.maximize(score, (3, 4), cem.Settings(normalize=True, iterations=30, init_mean=1 / 3))
    assert all(torch.allclose(a.sum(dim=0), torch.ones(4)) for a in seen)
    assert (result.best[:, 0] - torch.tensor([0.6, 0.3, 0.1])).abs().max() < 0.05


def test_reproducible_with_a_seed():
    def f(a):
        return -(a - 0.3).abs().sum().item()

    a = cem.maximize(f, 4, cem.Settings(seed=5, iterations=5))
    b = cem.maximize(f, 4, cem.Settings(seed=5, iterations=5))
    c = cem.maximize(f, 4, cem.Settings(seed=6, iterations=5))
    assert torch.equal(a.best, b.best) and a.history == b.history
    assert not torch.equal(a.best, c.best)


def test_ties_are_broken_by_the_secondary_score():
    """Accuracy is the same everywhere (a plateau); the tie-breaker alone must steer to its maximum."""
    result = cem.maximize(lambda a: (0.5, -abs(a[0].item() - 0.8)), 1, cem.Settings(iterations=40, init_mean=0.2))
    assert abs(result.best[0].item() - 0.8) < 0.02
    assert result.best_score[0] == 0.5


def test_primary_score_dominates_the_secondary():
    def score(a):
        x = a[0].item()
        return (1.0 if x > 0.9 else 0.0, -x)  # the tie-breaker pulls down; accuracy needs x > 0.9

    result = cem.maximize(score, 1, cem.Settings(iterations=40))
    assert result.best[0].item() > 0.9 and result.best_score[0] == 1.0


def test_light_preset_is_cheap():
    result = cem.maximize(lambda a: -a.sum().item(), 3, cem.LIGHT)
    assert result.iterations <= 3 and result.evaluations <= 3 * 16
