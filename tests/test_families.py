"""Model families (lp/families): one module per family, a registry with "did you mean", and every family
with a tiny config runs through the adapter, the engine and drop_layers."""

import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf

from lp import families
from lp.calib import collect
from lp.models import Decoder, drop_layers, tiny_model
from lp.replay import Head, Replay

TINY = families.tiny_arches()


def test_one_module_per_family_and_every_model_type_maps_to_one_family():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3", "baichuan"} <= set(families.FAMILIES)
    for fam in families.FAMILIES.values():
        for t in fam.model_types:
            assert families.get(t) is fam
    assert {"llama", "qwen2", "gemma3_text", "mistral", "qwen3"} <= set(TINY)


def test_unknown_family_is_one_line_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"model_type='lamma' is not a model family lp knows \(did you mean 'llama'\?\); known: \["):
        families.get("lamma")


def test_every_configured_model_names_a_known_family():
    # conf/model/*.yaml -> the model type its checkpoint declares (read from the hub configs these ids name)
    declared = {"llama2_7b": "llama", "llama2_13b": "llama", "llama3_8b": "llama", "smollm2_135m": "llama",
                "deepseek_r1_distill_llama_8b": "llama", "deepseek_r1_distill_qwen_7b": "qwen2",
                "baichuan2_7b": "baichuan", "tiny_llama": "llama"}
    assert set(declared) == {p.stem for p in (CONF / "model").glob("*.yaml")}
    for name, model_type in declared.items():
        fam = families.get(model_type)
        cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
        assert bool(cfg.get("trust_remote_code")) == fam.trust_remote_code, name  # remote code only where the family needs it


@pytest.mark.parametrize("arch", TINY)
def test_each_tiny_family_runs_through_adapter_engine_and_drop(arch):
    model = tiny_model(arch, num_layers=5, hidden_size=32, seed=1)
    dec = Decoder(model)
    assert dec.family is families.get(arch) and dec.num_layers == 5
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    rp = Replay(model, ids, batch_size=2)
    got = Head(model)(rp.stream(5))  # engine: embedding, every layer by hand, final norm, head
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = collect(model, ids, batch_size=1)
    assert torch.isfinite(stats.cos_token).all()
    drop_layers(model, [1, 2])
    assert Decoder(model).num_layers == 3 and model.config.num_hidden_layers == 3
    for key in dec.family.per_layer_keys:
        value = getattr(model.config, key, None)
        assert value is None or len(value) == 3, key
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
