"""Perplexity on cases computable by hand."""

import math

import torch
from torch import nn

from lp.evaluate.ppl import perplexity, token_nll, window_nll


class FixedLM(nn.Module):
    """Predicts the same distribution `probs` [V] at every position."""

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(torch.log(torch.tensor(probs)), requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        out = self.logits.expand(*input_ids.shape, -1)
        return type("Out", (), {"logits": out})


def test_uniform_model_has_ppl_equal_to_vocab_size():
    model = FixedLM([0.25] * 4)
    windows = torch.randint(0, 4, (3, 9))
    assert math.isclose(perplexity(model, windows, batch_size=2, progress=False), 4.0, rel_tol=1e-6)


def test_ppl_is_exp_of_mean_window_nll():
    # p = [0.5, 0.25, 0.25]: window A predicts tokens (1, 1) -> nll log 4 each; window B (0, 0) -> log 2
    model = FixedLM([0.5, 0.25, 0.25])
    windows = torch.tensor([[0, 1, 1], [2, 0, 0]])
    nll = window_nll(model, windows, batch_size=1, progress=False)
    assert torch.allclose(nll, torch.tensor([math.log(4), math.log(2)], dtype=torch.float64))
    assert math.isclose(perplexity(model, windows, progress=False), math.exp((math.log(4) + math.log(2)) / 2), rel_tol=1e-6)


def test_chunked_token_nll_equals_plain_cross_entropy():
    logits = torch.randn(100, 50).bfloat16()
    targets = torch.randint(0, 50, (100,))
    ref = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    torch.testing.assert_close(token_nll(logits, targets), ref, rtol=0, atol=0)
