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


# --------------------------------------------------------------------------- loss arithmetic (eval.ppl.loss_dtype)
def test_logits_dtype_loss_is_the_official_cross_entropy_bit_for_bit():
    from lp.evaluate.ppl import window_loss

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 500, generator=g)).bfloat16()
    ids = torch.randint(0, 500, (64,), generator=g)
    official = nn.CrossEntropyLoss()(logits[:-1].view(-1, 500), ids[1:].view(-1))  # test_ppl, one window
    assert official.dtype == torch.bfloat16
    assert window_loss(logits, ids, "logits").item() == official.float().item()
    assert window_loss(logits, ids, "bfloat16").item() == official.float().item()
    accurate = window_loss(logits, ids, "float32").item()
    assert accurate == nn.functional.cross_entropy(logits[:-1].float(), ids[1:]).item()
    assert accurate != official.float().item() and abs(accurate - official.float().item()) < 0.02 * accurate
    # the official loss is rounded to bf16: 8 significant bits
    assert torch.tensor(official.float().item()).bfloat16().float().item() == official.float().item()


def test_official_ppl_formula():
    """test_ppl: nll_w = float32(loss_w) * seqlen; ppl = exp(sum nll / (W * seqlen)) in float32."""
    model = FixedLM([0.5, 0.2, 0.2, 0.1]).bfloat16()
    windows = torch.randint(0, 4, (5, 17), generator=torch.Generator().manual_seed(1))
    nlls = []
    for w in windows:
        logits = model(w[None]).logits
        nlls.append(nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, 4), w[None, 1:].reshape(-1)).float() * 17)
    official = torch.exp(torch.stack(nlls).sum() / (5 * 17)).item()
    assert perplexity(model, windows, batch_size=2, progress=False, loss_dtype="logits") == official
    accurate = perplexity(model, windows, batch_size=2, progress=False)
    assert accurate != official and math.isclose(accurate, official, rel_tol=0.02)


def test_bad_loss_dtype():
    import pytest

    with pytest.raises(ValueError, match=r"eval.ppl.loss_dtype='fp8'; choose one of \['float32', 'logits'"):
        window_nll(FixedLM([0.5, 0.5]), torch.zeros(1, 3, dtype=torch.long), loss_dtype="fp8")
