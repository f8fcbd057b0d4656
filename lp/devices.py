"""Where a model's parts live and run: placement at load time and the execution device of a module.

Placement (`conf/model`: `device`, `device_map`, `max_memory`, `onload`, `offload`, `offload_folder`),
always through transformers' `from_pretrained(device_map=...)`, i.e. accelerate's dispatch and hooks:
  * default (`device_map: null`, `onload: null`): the whole model on `model.device`, loaded straight
    there (`device_map={"": device}`), never staged through host memory.
  * `device_map: auto` (+ `max_memory`, e.g. `{0: 20GiB, cpu: 60GiB}`): accelerate spreads the layers
    over the visible GPUs and spills the rest to host memory, then disk (`offload_folder`).
  * `onload: sequential`: embeddings, final norm and LM head on `model.device`; each decoder layer's
    weights stay in host memory (`offload: cpu`) or on disk (`offload: disk`, read from the
    checkpoint's safetensors where possible) and are brought to `model.device` by accelerate's
    `AlignDevicesHook` for the one module that runs, then dropped. `offload: auto` = cpu when the device
    is a GPU, disk when it is the CPU (host memory *is* the device there).

Offloaded parameters sit on the `meta` device; code must never read a device or a weight from a
parameter. `execution_device(module)` is where a module computes (accelerate's hook says so where
there is one); `input_device(model)` is where input ids go (the embedding's execution device).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

ONLOAD = (None, "sequential")
OFFLOAD = ("auto", "cpu", "disk")


def resolve_device(device: str | None = "auto") -> torch.device:
    """`model.device`: auto = the first GPU if one is visible, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _hook_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)  # AlignDevicesHook; SequentialHook: look inside
    if dev is None:
        for h in getattr(hook, "hooks", ()):
            dev = getattr(h, "execution_device", None) or dev
    return None if dev is None else torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's `execution_device` where it (or, for a
    container without one, its first hooked submodule) has one, else the device of its first
    parameter or buffer (a model built on `meta` without hooks stays there); the CPU for a module
    with neither."""
    for m in module.modules():
        dev = _hook_device(m)
        if dev is not None:
            return dev
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where input ids (and hence the first hidden state) go: the input embedding's execution device (the
    model's own for a module without `get_input_embeddings`)."""
    get = getattr(model, "get_input_embeddings", None)
    return execution_device(get() if get is not None else model)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's weights were loaded in (floating point; offloaded parameters keep it)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def is_offloaded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is held off-device by accelerate (on `meta` here)."""
    return any(p.device.type == "meta" for p in model.parameters())


def state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` with offloaded tensors brought to host memory (accelerate's
    `get_state_dict_offloaded_model`); the plain state dict when nothing is offloaded."""
    if not is_offloaded(model):
        return model.state_dict()
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    return get_state_dict_offloaded_model(model)


def check_placement(cfg) -> None:
    """Early, one-line errors for the placement settings of a `conf/model` config."""
    onload, offload, device_map = cfg.get("onload"), cfg.get("offload", "auto"), cfg.get("device_map")
    if onload not in ONLOAD:
        raise ValueError(f"model.onload={onload!r}; choose one of {list(ONLOAD)} (null = the whole model on model.device)")
    if offload not in OFFLOAD:
        raise ValueError(f"model.offload={offload!r}; choose one of {list(OFFLOAD)}")
    if onload and device_map is not None:
        raise ValueError(f"model.onload={onload!r} and model.device_map={device_map!r} both place the model; "
                         "set one of them (onload=sequential: one decoder layer at a time on model.device)")
    if cfg.get("max_memory") is not None and device_map is None:
        raise ValueError("model.max_memory is read only with model.device_map=auto (accelerate's dispatch)")


def placement(cfg, layer_names: list[str], other_names: list[str]) -> dict:
    """`from_pretrained` keyword arguments that place the model as `cfg` says (see module docstring).

    `layer_names` are the decoder layers' module names (e.g. `model.layers.7`), `other_names` every
    other top-level module with weights (embeddings, final norm, head, rotary embedding)."""
    check_placement(cfg)
    device = resolve_device(cfg.get("device"))
    if cfg.get("device_map") is not None:
        kw = {"device_map": cfg.device_map}
        if cfg.get("max_memory") is not None:
            kw["max_memory"] = {(int(k) if str(k).isdigit() else str(k)): str(v) for k, v in dict(cfg.max_memory).items()}
        kw["offload_folder"] = offload_folder(cfg)
        return kw
    if cfg.get("onload") == "sequential":
        where = cfg.get("offload", "auto")
        if where == "auto":
            where = "disk" if device.type == "cpu" else "cpu"
        dev = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
        dm = {name: dev for name in other_names}
        dm.update({name: where for name in layer_names})
        return {"device_map": dm, "offload_folder": offload_folder(cfg)}
    return {"device_map": {"": str(device)}}


_TMP: list[tempfile.TemporaryDirectory] = []  # this process's default offload folder, removed at exit


def offload_folder(cfg) -> str:
    """`model.offload_folder`, or one temporary folder per process, removed when it exits (accelerate
    writes there only what the checkpoint's safetensors cannot serve directly)."""
    folder = cfg.get("offload_folder")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return str(folder)
    if not _TMP:
        _TMP.append(tempfile.TemporaryDirectory(prefix="lp-offload-"))
    return _TMP[0].name
