"""GRPO's update batches: verl's balance across ranks (balanced_order), the mini/micro cut and token
pieces (cut_updates, split_by_tokens), packed forwards (model.pack) against padded ones."""
import random

import pytest
import torch

import model
from conftest import make_rows
from batching import balanced_order, cut_updates, split_by_tokens
from grpo import aggregate, clipped_policy_loss, kl_k3, per_token


def parts(order: list[int], world: int) -> list[list[int]]:
    n = len(order)
    return [order[r * n // world:(r + 1) * n // world] for r in range(world)]


@pytest.mark.parametrize("lengths, world, sums", [
    # total 36, so 18 per rank: {2,3,5,8} and {1,4,6,7} (a plain split would give 10 and 26)
    ([1, 2, 3, 4, 5, 6, 7, 8], 2, [18, 18]),
    # largest with smallest: 8+1 = 7+2 = 6+3 = 5+4 = 9
    ([1, 2, 3, 4, 5, 6, 7, 8], 4, [9, 9, 9, 9]),
    # total 30, so 15 per rank: one 10 and five 1s each (a plain split would give 24 and 6)
    ([10, 10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2, [15, 15]),
    # total 18 over 4 ranks of 3 items: 2+2+1 twice and 2+1+1 twice, the best possible (plain: 6,6,3,3)
    ([2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1], 4, [5, 5, 4, 4]),
])
def test_equal_sizes_and_balanced_sums(lengths, world, sums):
    ps = parts(balanced_order(lengths, world), world)
    assert [len(p) for p in ps] == [len(lengths) // world] * world
    assert [sum(lengths[i] for i in p) for p in ps] == sums


# Golden outputs from verl@54b2677 get_seqlen_balanced_partitions(lengths, world, equal_size=True),
# its partitions concatenated in order.
@pytest.mark.parametrize("lengths, world, expected", [
    ([1, 2, 3, 4, 5, 6, 7, 8], 2, [1, 2, 4, 7, 0, 3, 5, 6]),
    ([5] * 8, 4, [0, 7, 1, 6, 2, 5, 3, 4]),  # all tied
    ([3, 1, 3, 1, 2, 2, 3, 1], 2, [1, 2, 4, 5, 0, 3, 6, 7]),  # ties within and across parts
    ([2, 2, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1], 4, [1, 2, 4, 0, 3, 5, 6, 8, 11, 7, 9, 10]),
    ([900, 40, 35, 300, 12, 60, 2048, 75, 33, 41, 512, 18, 90, 27, 130, 64], 4,
     [2, 4, 6, 15, 0, 1, 7, 11, 9, 10, 12, 13, 3, 5, 8, 14]),  # long tail
    ([7, 3, 9], 1, [0, 1, 2]),
])
def test_matches_verl(lengths, world, expected):
    assert balanced_order(lengths, world) == expected


@pytest.mark.parametrize("seed", range(5))
def test_permutation_with_sorted_parts(seed):
    rng = random.Random(seed)
    world = rng.choice([1, 2, 4, 8])
    lengths = [rng.choice([16, 64, 64, 512, 4096]) for _ in range(world * rng.randint(1, 32))]
    order = balanced_order(lengths, world)
    assert sorted(order) == list(range(len(lengths)))
    assert all(p == sorted(p) for p in parts(order, world))


def test_single_rank_keeps_order():
    assert balanced_order([9, 1, 5, 5, 2], 1) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("lengths, world", [([1, 2, 3], 2), ([1, 2], 0), ([1, 2], -1), ([5], 2), ([], 1)])
def test_rejects_bad_sizes(lengths, world):
    with pytest.raises(ValueError):
        balanced_order(lengths, world)


# ---- the mini/micro cut and the token-budget pieces, by hand ----

def test_split_by_tokens():
    assert split_by_tokens([5, 3, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]      # 9 > 8 runs alone
    assert split_by_tokens([5, 3, 4, 9, 1], 0) == [[0, 1, 2, 3, 4]]            # 0: never split
    assert split_by_tokens([2, 2, 5], 9, padded=True) == [[0, 1], [2]]         # padded: 3 x 5 = 15 > 9


def test_cut_updates_by_hand():
    # 8 sequences, 2 ranks, 2 updates, micro-batches of 2, budget 10 tokens, sequence 5 left out
    order = [0, 3, 5, 6, 1, 2, 4, 7]
    lengths = [4, 6, 3, 9, 2, 5, 5, 1]
    completion = [1, 2, 3, 4, 5, 6, 7, 8]
    keep = [i != 5 for i in range(8)]
    cut, tokens = cut_updates(order, lengths, completion, keep, world=2, updates=2, micro=2, budget=10)
    as_lists = [[[None if f is None else (f.idx, f.micro_tokens, f.micro_batches) for f in u] for u in r] for r in cut]
    assert as_lists == [
        # rank 0 trains [0, 3, 5, 6]: update 0 = [0, 3] (4 + 9 > 10: two pieces), update 1 = [6] (5 left out)
        [[([0], 5, 1), ([3], 5, 1)], [([6], 7, 1)]],
        # rank 1 trains [1, 2, 4, 7]: update 0 = [1, 2] (5 tokens, one forward; padded with None)
        [[([1, 2], 5, 1), None], [([4, 7], 13, 1)]]]
    assert tokens == [5 + 5, 7 + 13]  # completion tokens of each update on all ranks


# ---- packed forwards = padded forwards, and pieces = the whole micro-batch ----

@pytest.fixture(scope="module")
def mixed(processor):
    """Text-only, one-image and two-image rows (images of different sizes), completions of 1-200 tokens."""
    rows = make_rows()
    rows = [rows[0], rows[2], rows[1], rows[2], rows[0]]
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, 151643, (n,), generator=g).tolist() for n in (1, 200, 37, 5, 120)]
    prompts = [model.encode_prompt(processor, r) for r in rows]
    return prompts, completions, processor.tokenizer.pad_token_id


def test_packed_logprobs_and_gradients_equal_padded(tiny_model, mixed):
    prompts, completions, pad = mixed
    padded = model.collate(prompts, completions, pad)
    packed = model.pack(tiny_model, padded)
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum())) < padded["input_ids"].shape
    assert packed["position_ids"].shape == (4, 1, packed["input_ids"].shape[1])
    params = list(tiny_model.parameters())
    a = model.token_logprobs(tiny_model, padded)                                # (B, T)
    b = model.token_logprobs(tiny_model, packed)                                # (1, N)
    torch.testing.assert_close(b[packed["completion_mask"]], a[padded["completion_mask"]], atol=1e-5, rtol=0)
    for ga, gb in zip(torch.autograd.grad(a.sum(), params), torch.autograd.grad(b.sum(), params)):
        assert (ga - gb).norm() <= 1e-5 * ga.norm()
    # model.PACKED_SDPA's per-sequence attention is what keeps them apart: without seq_lens they leak
    causal = {k: v for k, v in packed.items() if k != "seq_lens"}
    with torch.no_grad():
        leaky = model.token_logprobs(tiny_model, causal)
    assert (leaky[packed["completion_mask"]] - b[packed["completion_mask"]].detach()).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["token-microbatch", "token-global"])
def test_pieces_give_the_unsplit_gradient(tiny_model, mixed, mode):
    prompts, completions, pad = mixed
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5])
    lengths = [len(p["input_ids"]) + len(c) for p, c in zip(prompts, completions)]
    params = list(tiny_model.parameters())

    def grads(budget: int) -> list[torch.Tensor]:
        pieces = split_by_tokens(lengths, budget)
        total = None
        for piece in pieces:
            batch = model.pack(tiny_model, model.collate([prompts[j] for j in piece], [completions[j] for j in piece], pad))
            logp = model.token_logprobs(tiny_model, batch)
            old = logp.detach() + 0.3 * torch.sin(batch["input_ids"].double()).float()  # per token, any split
            loss, _ = clipped_policy_loss(logp, old, per_token(adv[piece], batch))
            loss = loss + 0.01 * kl_k3(logp, old - 0.05)
            scalar = aggregate(loss, batch["completion_mask"], mode, num_micro_batches=3, global_tokens=900,
                               world_size=2, micro_tokens=sum(len(c) for c in completions))
            g = torch.autograd.grad(scalar, params)
            total = g if total is None else [a + b for a, b in zip(total, g)]
        return total, len(pieces)

    whole, one = grads(0)
    split, n = grads(400)
    assert one == 1 and n >= 3
    for a, b in zip(whole, split):
        assert (a - b).norm() <= 1e-6 * a.norm() + 1e-12
