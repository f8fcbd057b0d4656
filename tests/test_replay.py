"""The layer-replay engine (`lp.replay`) against ordinary forwards of tiny random models."""

import copy

import pytest
import torch

from lp.evaluate.ppl import window_nll
from lp.models import drop_layers, tiny_model
from lp.patch import LinearPatch, insert_patches
from lp.replay import Head, Replay

ARCHS = ["llama", "qwen2", "gemma3_text", "mistral"]


def windows(n=6, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def forward_streams(model, w, batch_size):
    """h_0..h_L of an ordinary forward in the same batches: inputs of every layer and of the final norm."""
    seen = {}

    def hook(i):
        def pre(_mod, args, kwargs):
            seen.setdefault(i, []).append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return pre

    modules = [*model.model.layers, model.model.norm]
    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    with torch.no_grad():
        for i in range(0, len(w), batch_size):
            model(input_ids=w[i:i + batch_size], use_cache=False)
    for h in handles:
        h.remove()
    return [torch.cat(seen[i]) for i in range(len(modules))]


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_is_bitwise_the_forward_stream(arch):
    model, w = tiny_model(arch, num_layers=5), windows()
    rp = Replay(model, w, batch_size=4)  # 6 windows: batches of 4 and 2 (two captured shapes)
    want = forward_streams(model, w, 4)
    for layer in (0, 2, 5):  # h_5 = last layer output before the final norm
        assert torch.equal(rp.stream(layer), want[layer]), (arch, layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_nll_of_all_layers_is_the_model_nll(arch):
    model, w = tiny_model(arch, num_layers=4), windows()
    rp = Replay(model, w, batch_size=4)
    got = rp.nll(rp.stream(0), list(range(4)))
    assert got.dtype == torch.float64 and got.shape == (6,)
    torch.testing.assert_close(got, window_nll(model, w, batch_size=4, progress=False), rtol=1e-6, atol=1e-6)
    assert rp.head_calls == 1 and rp.layer_calls == 4


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("cut", [(1, 3), (3, 5)])  # a block inside, and one at the end (patch before the norm)
def test_nll_after_a_cut_with_a_patch_is_the_patched_pruned_model(arch, cut):
    """The held-out verification use: NLL from h_a with layers [a, b) removed and a patch at the cut."""
    a, b = cut
    model, w = tiny_model(arch, num_layers=5), windows()
    g = torch.Generator().manual_seed(1)
    weight = torch.eye(64) + 0.05 * torch.randn(64, 64, generator=g)
    patch = LinearPatch(weight, a, b, 5, kind="rotate")
    rp = Replay(model, w, batch_size=4)
    h = rp.stream(a)
    after = list(range(b, 5))
    pruned = drop_layers(copy.deepcopy(model), list(range(a, b)))
    plain = window_nll(pruned, w, batch_size=4, progress=False)
    torch.testing.assert_close(rp.nll(h, after), plain, rtol=1e-6, atol=1e-6)
    insert_patches(pruned, {a: copy.deepcopy(patch)})
    patched = window_nll(pruned, w, batch_size=4, progress=False)
    torch.testing.assert_close(rp.nll(h, after, patch), patched, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(patched, plain)  # the patch changed something


def test_head_soft_caps_logits_as_the_model_does():
    model = tiny_model("gemma3_text", num_layers=2, final_logit_softcapping=0.5)
    w = windows(n=2)
    rp = Replay(model, w, batch_size=2)
    h = rp.stream(2)
    logits = model(input_ids=w, use_cache=False).logits
    assert logits.abs().max() <= 0.5  # capping is active
    head = Head(model)
    torch.testing.assert_close(head(h), logits, rtol=1e-5, atol=1e-6)
    idx = torch.randint(0, 259, (2, 24, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(head.logits_at(model.model.norm(h), idx), logits.gather(-1, idx), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rp.nll(h, []), window_nll(model, w, batch_size=2, progress=False), rtol=1e-6, atol=1e-6)


def test_bad_input_is_a_clear_error():
    model = tiny_model("llama", num_layers=3)
    with pytest.raises(ValueError, match=r"windows must be \[N, T\] with T >= 2, got shape \(4, 1\)"):
        Replay(model, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        Replay(model, windows(), batch_size=0)
    with pytest.raises(ValueError, match=r"stream\(4\): the model has layers 0\.\.2 \(h_0\.\.h_3\)"):
        Replay(model, windows()).stream(4)
