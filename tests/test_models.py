"""drop_layers leaves a correct model: logits, KV-cache generation, save/reload; the adapter."""

import copy

import pytest
import torch
from torch import nn

from lp import models

ARCHS = ["llama", "qwen2", "gemma3_text"]


class Skip(nn.Module):
    """Stands in for a removed layer: passes the residual stream through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def reference_without(model, drop):
    """The dense model with layers `drop` replaced by identity: what a correct drop must equal."""
    ref = copy.deepcopy(model)
    for i in drop:
        ref.model.layers[i] = Skip()
    return ref


@pytest.fixture(params=ARCHS)
def tiny(request):
    return models.tiny_model(request.param, num_layers=6, hidden_size=64, seed=1)


def test_drop_layers_matches_skipping_reference(tiny):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    drop = [1, 2, 4]
    ref = reference_without(tiny, drop)
    dense = tiny(input_ids=ids).logits
    models.drop_layers(tiny, drop)
    got = tiny(input_ids=ids).logits
    torch.testing.assert_close(got, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)  # the layers did matter
    assert tiny.config.num_hidden_layers == 3 and len(tiny.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in tiny.model.layers] == [0, 1, 2]


def test_drop_layers_subsets_per_layer_config():
    m = models.tiny_model("gemma3_text", num_layers=6, hidden_size=64)
    types = list(m.config.layer_types)
    models.drop_layers(m, [0, 2])
    assert m.config.layer_types == [types[i] for i in (1, 3, 4, 5)]


def test_generation_with_cache_equals_without(tiny):
    models.drop_layers(tiny, [2, 3])
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=258)
    with_cache = tiny.generate(ids, use_cache=True, **kw)
    without = tiny.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_save_reload_gives_identical_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    models.drop_layers(tiny, [0, 5])
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    tiny.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == 4
    torch.testing.assert_close(back(input_ids=ids).logits, tiny(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("bad, msg", [
    ([6], r"out of range: the model has layers 0\.\.5"),
    ([-1], "out of range"),
    ([1, 1], "duplicate layer indices \\[1\\]"),
    ([0, 1, 2, 3, 4, 5], "cannot remove all 6 layers"),
])
def test_drop_layers_rejects_bad_indices(bad, msg):
    m = models.tiny_model("llama", num_layers=6)
    with pytest.raises(ValueError, match=msg):
        models.drop_layers(m, bad)
    assert len(m.model.layers) == 6  # untouched


def test_decoder_adapter_and_unsupported_architecture():
    m = models.tiny_model("qwen2", num_layers=3, hidden_size=32)
    dec = models.Decoder(m)
    assert (dec.num_layers, dec.hidden_size) == (3, 32) and dec.norm is m.model.norm
    with pytest.raises(ValueError, match="model_type=None is not a model family lp knows"):
        models.Decoder(nn.Linear(2, 2))
    m.model.layers = nn.Sequential(*m.model.layers)  # a known family whose layout is not the family's
    with pytest.raises(TypeError, match=r"Qwen2ForCausalLM \(family qwen2\) has no decoder layer list at `model.layers`"):
        models.Decoder(m)


def test_load_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="model.dtype='float8'"):
        models.resolve_dtype("float8")
    with pytest.raises(FileNotFoundError, match="not a readable folder"):
        models.model_source(_Cfg(pretrained="/no/such/folder"))
    with pytest.raises(FileNotFoundError, match="not installed"):
        models.gguf_path("no_such_package_lp", "x.gguf")


class _Cfg(dict):
    def __init__(self, **kw):
        super().__init__(name="x", **kw)

    def __getattr__(self, k):
        return self[k]


def test_byte_tokenizer_round_trips():
    tok = models.byte_tokenizer()
    text = "héllo\n\n world"
    assert tok.decode(tok(text).input_ids) == text and len(tok) == 259
