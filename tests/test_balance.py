"""balanced_order: verl's equal-size Karmarkar-Karp split of a batch across data-parallel ranks."""
import random

import pytest

from grpo import balanced_order


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
