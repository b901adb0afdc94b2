# Copyright 2026 The BalancedDPO authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Which of the K images of a prompt are paired (pair_generation.py), on hand-made score tables."""

import pytest
import torch

import pair_generation
import rewards


TEMPS = {"a": 1.0, "b": 1.0, "c": 1.0}


def majority(scores_0, scores_1):
    return rewards.consensus(scores_0, scores_1, mode="majority", temperatures=TEMPS)


def test_extremes_pairs_the_copeland_winner_with_the_copeland_loser():
    # Prompt 0, four images. Metric a ranks 2 > 0 > 3 > 1, b ranks 2 > 3 > 0 > 1, c ranks 0 > 2 > 1 > 3: image 2 wins
    # every majority comparison and image 1 loses every one, although c alone would call image 0 the best and
    # image 3 the worst; summing the raw scores would pick image 0 (c's scale is large).
    scores = {
        "a": torch.tensor([[3.0, 0.0, 4.0, 1.0]]),
        "b": torch.tensor([[1.0, 0.0, 3.0, 2.0]]),
        "c": torch.tensor([[90.0, 10.0, 50.0, 0.0]]),
    }
    candidates, result = pair_generation.label_candidates(scores, majority)
    assert len(candidates) == 6
    selected = pair_generation.select_pairs(candidates, result, 1, 4, "extremes")
    assert (selected.prompt, selected.image_0, selected.image_1) == ([0], [1], [2])
    assert selected.label.tolist() == [0.0] and selected.keep.tolist() == [True]  # image 1 of the pair (2) wins
    wins, _ = pair_generation.copeland_scores(candidates, result, 1, 4)
    assert wins[0].tolist() == [2.0, 0.0, 3.0, 1.0]


def test_extremes_breaks_ties_by_preference_then_generation_order():
    # Three identical images: every comparison is dropped and ties everywhere; the first and second are paired.
    same = {"a": torch.zeros(1, 3), "b": torch.zeros(1, 3), "c": torch.zeros(1, 3)}
    candidates, result = pair_generation.label_candidates(same, majority)
    selected = pair_generation.select_pairs(candidates, result, 1, 3, "extremes")
    assert (selected.image_0, selected.image_1) == ([0], [1]) and selected.keep.tolist() == [False]
    # Equal wins, different preference: a 1-1-1 cycle where image 1 has the largest summed probability.
    cycle = {
        "a": torch.tensor([[1.0, 3.0, 2.0]]),
        "b": torch.tensor([[2.0, 1.0, 3.0]]),
        "c": torch.tensor([[3.0, 2.5, 1.0]]),
    }
    candidates, result = pair_generation.label_candidates(cycle, majority)
    wins, preference = pair_generation.copeland_scores(candidates, result, 1, 3)
    assert wins[0].tolist() == [1.0, 1.0, 1.0]
    best = int(preference[0].argmax())
    worst = int(preference[0].argmin())
    selected = pair_generation.select_pairs(candidates, result, 1, 3, "extremes")
    assert {selected.image_0[0], selected.image_1[0]} == {best, worst}


def test_swapping_the_images_of_a_prompt_swaps_the_selected_pair():
    scores = {
        "a": torch.tensor([[0.1, 2.0, -1.0]]),
        "b": torch.tensor([[0.5, 1.0, 0.0]]),
        "c": torch.tensor([[1.0, 3.0, 2.0]]),
    }
    reversed_scores = {m: s.flip(1) for m, s in scores.items()}
    for table, (winner, loser) in ((scores, (1, 2)), (reversed_scores, (1, 0))):
        candidates, result = pair_generation.label_candidates(table, majority)
        selected = pair_generation.select_pairs(candidates, result, 1, 3, "extremes")
        pair = (selected.image_0[0], selected.image_1[0])
        chosen_winner = pair[0] if selected.label[0] > 0.5 else pair[1]
        assert set(pair) == {winner, loser} and chosen_winner == winner


def test_all_and_random_selections():
    scores = {m: torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i, m in enumerate("abc")}
    candidates, result = pair_generation.label_candidates(scores, majority)
    every = pair_generation.select_pairs(candidates, result, 5, 4, "all")
    assert len(every) == 5 * 6 and every.candidates == 30
    torch.testing.assert_close(every.label, result.label)
    one = pair_generation.select_pairs(candidates, result, 5, 4, "random", torch.Generator().manual_seed(3))
    again = pair_generation.select_pairs(candidates, result, 5, 4, "random", torch.Generator().manual_seed(3))
    assert one.prompt == list(range(5)) and (one.image_0, one.image_1) == (again.image_0, again.image_1)
    assert all(i < j for i, j in zip(one.image_0, one.image_1))
    with pytest.raises(ValueError, match="Unknown pair selection 'best'"):
        pair_generation.select_pairs(candidates, result, 5, 4, "best")


def test_image_seeds_are_distinct_across_prompts_and_draws():
    seeds = {pair_generation.image_seed(7, d, k, 4) for d in range(10) for k in range(4)}
    assert len(seeds) == 40 and min(seeds) == 7
