"""The feature race after Wen and Li: what our synthetic model (fastpred.dynamics.race) does, seed by seed."""

import functools

import numpy as np
import pytest
import torch

from fastpred.dynamics.race import RaceConfig, run_race, sample_views

REPRODUCES, FAILS = 3, 0  # of seeds 0-4, only seed 3 reproduces the off-diagonal claim (README, Dynamics)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


@functools.cache
def race(head, seed):
    return run_race(RaceConfig(seed=seed, log_every=20), head)


def test_views_carry_one_feature_per_sample_in_both_views():
    g = torch.Generator().manual_seed(0)
    x1, x2 = sample_views(RaceConfig(noise=0.0, batch=256), g)
    assert x1.shape == x2.shape == (256, 8, 16)
    both = torch.stack([x1, x2])
    # without noise: only the first 2 patches of each view carry signal, exactly one of +-v1, +-0.5 v2
    assert torch.all(both[..., 2:] == 0) and torch.all(both[:, :, 2:] == 0)
    v1, v2 = both[:, :, :2, 0].abs(), both[:, :, :2, 1].abs()  # (view, sample, feature patch)
    assert torch.all((v1 > 0) != (v2 > 0))
    torch.testing.assert_close(v2.unique(), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(x1[:, :2, :2], x2[:, :2, :2])  # the views agree on the feature and its sign
    assert 0.35 < (v1[0, :, 0] > 0).float().mean() < 0.65  # p1 = 1/2
    # with noise, the views share nothing else: the noise off the feature patches is independent
    y1, y2 = sample_views(RaceConfig(batch=1024), g)
    corr = torch.corrcoef(torch.stack([y1[:, 4:, 2:].flatten(), y2[:, 4:, 2:].flatten()]))[0, 1]
    assert abs(corr) < 0.03 and 0.65 < y1[:, 4:, 2:].std() < 0.75 and 0.17 < y1[:, 4:, :2].std() < 0.25


def test_seeded():
    cfg = RaceConfig(steps=20, log_every=10)
    a, b = run_race(cfg, "offdiag"), run_race(cfg, "offdiag")
    np.testing.assert_array_equal(a.alignment, b.alignment)
    np.testing.assert_array_equal(a.head_matrix, b.head_matrix)


@pytest.mark.parametrize("seed", [FAILS, REPRODUCES])
def test_without_a_head_every_neuron_learns_the_strong_feature(seed):
    r = race("none", seed)
    assert r.alignment[-1, :, 0].min() > 0.95 and r.alignment[-1, :, 1].max() < 0.2


def test_offdiagonal_head_substitutes_then_a_second_neuron_learns_the_weak_feature():
    r, baseline = race("offdiag", REPRODUCES), race("none", REPRODUCES)
    end = r.alignment[-1]
    weak = int(np.argmax(end[:, 1]))
    assert end[weak, 1] > 0.95 and end[1 - weak, 0] > 0.95  # one neuron per feature...
    assert baseline.alignment[-1, weak, 0] > 0.95  # ...where, without the head, that neuron learned v1
    off = np.abs(r.head_matrix - np.eye(2)).max(axis=(1, 2))
    learned = int(np.argmax(r.alignment[:, weak, 1] > 0.9))  # first logged step with the weak feature learned
    first_v1 = int(np.argmax(r.alignment[:, 1 - weak, 0] > 0.9))
    assert first_v1 < learned  # the other neuron learned v1 first
    assert off[: learned + 1].max() > 1.0  # substitution: an off-diagonal entry grew before v2 was learned
    assert off[-1] < 0.05  # and the head drifted back to the identity


@pytest.mark.xfail(strict=True, reason="fragile: with the off-diagonal head, 4 of seeds 0-4 end with both neurons "
                   "on v1 and W ~ [[1, 1], [1, 1]] (README, Dynamics); strict, so a more robust model shows up")
def test_offdiagonal_head_learns_the_weak_feature_for_another_seed():
    assert race("offdiag", FAILS).alignment[-1, :, 1].max() > 0.9
