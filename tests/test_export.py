"""Saving pruned models: `lp.export.save_pruned` / `lp.load_pruned`."""

import json

import pytest
import torch
from test_patch import IDS, D, random_patches

from lp import load_pruned
from lp.export import save_pruned
from lp.models import byte_tokenizer, drop_layers, tiny_model
from lp.patch import find_patches, insert_patches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_pruned_gives_identical_logits(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    # load the dense model in `dtype` as load_model does for real checkpoints (`.to(bf16)` would also
    # cast the rotary inv_freq buffer, which from_pretrained keeps in fp32)
    tiny_model("llama", num_layers=8, hidden_size=D).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=dtype)
    drop_layers(model, [0, 3, 4, 7])
    insert_patches(model, random_patches([0, 3, 4, 7], 8))
    path = save_pruned(model, byte_tokenizer(), tmp_path / "m", {"note": "test"})
    assert find_patches(model), "saving must leave the in-memory model patched"
    back, tok = load_pruned(path)
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, model(input_ids=IDS).logits)
    assert next(back.parameters()).dtype == dtype and tok is not None
    meta = json.loads((path / "lp_patch.json").read_text())
    assert meta["removed_layers"] == [0, 3, 4, 7] and meta["num_layers_dense"] == 8
    assert [(c["start"], c["end"]) for c in meta["cuts"]] == [(0, 1), (3, 5), (7, 8)]
    plain = AutoModelForCausalLM.from_pretrained(path)  # the plain pruned model, no wrappers needed
    assert plain.config.num_hidden_layers == 4 and not find_patches(plain)


def test_save_pruned_replaces_only_a_complete_save(tmp_path, monkeypatch):
    import lp.export as export_mod

    model = drop_layers(tiny_model("llama", num_layers=8, hidden_size=D), [3, 4])
    insert_patches(model, random_patches([3, 4], 8))
    first = save_pruned(model, None, tmp_path / "m", {"run": 1})
    save_pruned(model, None, first, {"run": 2})  # an earlier save is replaced
    assert json.loads((first / "lp_patch.json").read_text())["meta"] == {"run": 2}

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, first, {"run": 3})
    assert json.loads((first / "lp_patch.json").read_text())["meta"] == {"run": 2}  # the old save is intact
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written, no temp folder left
    monkeypatch.undo()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a save_pruned folder"):
        save_pruned(model, None, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
