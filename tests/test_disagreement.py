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
    assert disagreement.consistency(samples) == {"with_box_and_chain": 3, "box_equals_chain": 2, "chain_right": 2,
                                                 "chain_right_box_not": 1}


def test_opsd_logit_gradient_is_the_probability_gap():
    # d/dz KL(p_T || softmax(z)) = softmax(z) - p_T per token; logit_grad_norms undoes the token mean
    import torch

    torch.manual_seed(0)
    lps = torch.log_softmax(torch.randn(5, 3, dtype=torch.float64), -1)
    lpt = torch.log_softmax(torch.randn(5, 3, dtype=torch.float64), -1)
    g = disagreement.logit_grad_norms(lps, lpt, "opsd")
    assert torch.allclose(g, (lps.exp() - lpt.exp()).norm(dim=-1), atol=1e-12)
    assert disagreement.logit_grad_norms(lps, lps, "opsd").abs().max() < 1e-12  # nothing to learn from a copy
    assert disagreement.logit_grad_norms(lps, lpt, "dasd").shape == (5,)


def test_token_kinds_on_the_embedded_tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    import teacher

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    text = "She buys 12 apples. 12 + 30 = 42 apples.\nAnswer: \\boxed{42}"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    kinds = disagreement.token_kinds(tok, ids, teacher.answer_span_start(tok, ids))
    pieces = [tok.decode([i]) for i in ids]
    by_kind = {k: "".join(p for p, kk in zip(pieces, kinds) if kk == k) for k in disagreement.KINDS}
    assert by_kind["answer span"].startswith("\\boxed") or by_kind["answer span"].lstrip().startswith("\\")
    assert "42" in by_kind["answer span"] and "Answer" not in by_kind["answer span"]
    assert by_kind["result digits"].replace(" ", "") == "42"  # the number after '=' in the chain
    assert by_kind["other digits"].replace(" ", "") == "121230"  # operands
    assert "apples" in by_kind["words"] and kinds[-1] == "eos"
