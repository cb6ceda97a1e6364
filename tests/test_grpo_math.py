"""grpo.py's pure functions against hand-computed values, and the loss aggregation modes."""
import math

import pytest
import torch

from grpo import aggregate, clipped_policy_loss, group_advantages, kl_k3, step_prompts


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=2)
    s = 1 / math.sqrt(0.5)  # unbiased std of {0, 1} = sqrt(0.5); (1 - 0.5) / sqrt(0.5) = 0.7071
    torch.testing.assert_close(adv, torch.tensor([0.5 * s, -0.5 * s, -0.5 * s, 0.5 * s, 0.0, 0.0]), atol=1e-5, rtol=0)
    three = group_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3)  # mean 1/3, std sqrt(1/3)
    torch.testing.assert_close(three, torch.tensor([2 / 3, -1 / 3, -1 / 3]) / math.sqrt(1 / 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0]), group_size=1), torch.tensor([1.0, 0.0]))


def test_kl_k3_values_clamp_and_finite_gradient():
    logp = torch.tensor([[0.0, -1.0, -50.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.5), -1.0, 0.0, -50.0]])
    kl = kl_k3(logp, ref)
    # log-ratio -0.6931: 0.5 + 0.6931 - 1 = 0.1931; equal: 0; +50 -> clamped to 10; -50: e^-20 + 20 - 1 = 19 -> 10
    torch.testing.assert_close(kl, torch.tensor([[0.5 + math.log(2) - 1, 0.0, 10.0, 10.0]]), atol=1e-5, rtol=0)
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2] == 0 and logp.grad[0, 3] == 0  # clamped: no gradient


def test_clipped_policy_loss_cases():
    ratios = torch.tensor([1.5, 0.5, 1.5, 5.0, 0.5, 1.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 2.0])
    old = torch.zeros(6, 1)
    loss, clipped = clipped_policy_loss(ratios.log()[:, None], old, adv[:, None])
    expected = [-1.2,   # A>0, ratio above 1.2: clipped to -1.2
                -0.5,   # A>0, ratio below: unclipped (pessimistic max of -0.5, -0.8)
                1.5,    # A<0, ratio 1.5: max(1.5, 1.2) = 1.5, under the dual clip 3
                3.0,    # A<0, ratio 5: max(5, 1.2) = 5, dual clip caps at -A*c = 3
                0.8,    # A<0, ratio 0.5: clipped at 0.8
                -2.0]   # ratio 1: -A
    torch.testing.assert_close(loss[:, 0], torch.tensor(expected), atol=1e-5, rtol=0)
    # the clip fraction counts the PPO clip (verl's pg_clipfrac); the dual clip is not counted
    assert clipped[:, 0].tolist() == [True, False, False, False, True, False]
    wide, _ = clipped_policy_loss(ratios.log()[:, None], old, adv[:, None], clip_low=0.5, clip_high=0.5, dual_clip=10.0)
    torch.testing.assert_close(wide[:, 0], torch.tensor([-1.5, -0.5, 1.5, 5.0, 0.5, -2.0]), atol=1e-5, rtol=0)


def test_aggregate_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(loss, mask, "token-microbatch").item() == pytest.approx(7 / 3)
    assert aggregate(loss, mask, "token-microbatch", num_micro_batches=2).item() == pytest.approx(7 / 6)
    assert aggregate(loss, mask, "token-global", global_tokens=7).item() == pytest.approx(1.0)
    assert aggregate(loss, mask, "token-global", global_tokens=7, world_size=2).item() == pytest.approx(2.0)


def _sequences(seed=0, B=8, T=7, H=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    lengths = torch.tensor([1, 7, 2, 6, 3, 5, 4, 7])
    mask = torch.arange(T)[None] < lengths[:, None]                     # (B, T) ragged completions
    return x, mask


def _grad(splits: list[list[int]], mode: str, ranks: int = 1) -> torch.Tensor:
    """Gradient of a toy per-token loss, with the sequences cut into micro-batches and spread over
    simulated ranks; FSDP's gradient averaging over ranks is reproduced by dividing by `ranks`."""
    x, mask = _sequences()
    w = torch.ones(x.shape[-1], requires_grad=True)
    total_tokens = int(mask.sum())
    per_rank = [splits[r::ranks] for r in range(ranks)]
    grads = []
    for rank_splits in per_rank:
        for idx in rank_splits:
            loss_tok = (x[idx] @ w) ** 2                                  # (b, T)
            aggregate(loss_tok, mask[idx], mode, num_micro_batches=len(rank_splits),
                      global_tokens=total_tokens, world_size=ranks).backward()
        grads.append(w.grad.clone())
        w.grad = None
    return sum(grads) / ranks


def test_token_global_is_invariant_to_how_the_batch_is_split():
    one = _grad([list(range(8))], "token-global")
    four = _grad([[0, 1], [2, 3], [4, 5], [6, 7]], "token-global")
    two_ranks = _grad([[0, 1], [2, 3], [4, 5], [6, 7]], "token-global", ranks=2)
    torch.testing.assert_close(four, one)
    torch.testing.assert_close(two_ranks, one)
    # and it is the plain mean over all tokens
    x, mask = _sequences()
    w = torch.ones(x.shape[-1], requires_grad=True)
    (((x @ w) ** 2)[mask].mean()).backward()
    torch.testing.assert_close(one, w.grad)


def test_token_microbatch_is_the_mean_of_micro_batch_means():
    four = _grad([[0, 1], [2, 3], [4, 5], [6, 7]], "token-microbatch")
    x, mask = _sequences()
    w = torch.ones(x.shape[-1], requires_grad=True)
    sum(((x[i] @ w) ** 2)[mask[i]].mean() for i in ([0, 1], [2, 3], [4, 5], [6, 7])).div(4).backward()
    torch.testing.assert_close(four, w.grad)
    assert not torch.allclose(four, _grad([list(range(8))], "token-microbatch"))  # depends on the split


def test_step_prompts_cover_each_epoch_once():
    indices = list(range(10))
    epoch0 = [i for s in range(3) for i in step_prompts(42, indices, s, 3)]
    assert len(set(epoch0)) == 9 and step_prompts(42, indices, 1, 3) == step_prompts(42, indices, 1, 3)
    assert step_prompts(42, indices, 3, 3) != step_prompts(42, indices, 0, 3)  # epoch 1: new order
