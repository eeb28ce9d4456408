"""experiments/disagreement.py: the box/chain consistency of a response, on hand-written cases."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import disagreement  # noqa: E402


def test_box_follows_chain_on_hand_written_responses():
    f = disagreement.box_follows_chain
    assert f("4 + 3 = 7.\nAnswer: \\boxed{7}") == ("7", "7", True)
    assert f("9 - 7 = 2.\nAnswer: \\boxed{1.33}") == ("1.33", "2", False)  # the box cut loose from the work
    assert f("She has 2.0 now. \\boxed{2}")[2]  # values, not strings
    assert f("half of it: 1/2. \\boxed{0.5}")[2]
    assert f("no box: 4 + 3 = 7") is None and f("\\boxed{7}") is None  # nothing to compare


def test_consistency_counts_a_right_chain_with_a_wrong_box():
    samples = [{"response": "9 - 7 = 2.\nAnswer: \\boxed{1.33}", "gold": "2"},
               {"response": "4 + 3 = 7.\nAnswer: \\boxed{7}", "gold": "7"},
               {"response": "4 + 3 = 8.\nAnswer: \\boxed{8}", "gold": "7"},
               {"response": "I give up", "gold": "1"}]
    assert disagreement.consistency(samples) == {"with_box_and_chain": 3, "box_equals_chain": 2,
                                                 "chain_right_box_not": 1}
