"""LoRA on the UNet's attention projections through peft, saved in diffusers' format.

The adapter is added with ``unet.add_adapter`` as diffusers' own training scripts do, its
weights are kept in float32 whatever the frozen model's dtype, and
:func:`save_lora` writes ``pytorch_lora_weights.safetensors`` that stock diffusers loads with
``pipe.load_lora_weights(folder)``. :func:`load_lora` loads such a file into a pipeline after
checking that every adapter fits one of its layers: diffusers itself skips adapters for layers the
model lacks without an error, and fails on wrong shapes with a raw ``state_dict`` traceback.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
_ADAPTER_WEIGHT = re.compile(r"^(?P<layer>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")  # peft's key format


def add_lora(unet, rank: int, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, add a LoRA adapter (A gaussian, B zero: the model is unchanged at first).

    Returns the trainable parameters, cast to float32.
    """
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"the UNet has none of the attention projections {TARGET_MODULES}; LoRA cannot attach")
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format (float32, CPU)."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_lora(unet, folder, rank: int, alpha: float | None = None) -> None:
    """Write the adapter so that ``pipe.load_lora_weights(folder)`` restores it exactly (alpha included)."""
    metadata = {"r": rank, "lora_alpha": alpha if alpha is not None else rank, "target_modules": TARGET_MODULES}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=lora_state_dict(unet),
                                              safe_serialization=True, unet_lora_adapter_metadata=metadata)


def read_lora(path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The LoRA file of ``path`` (a folder holding ``pytorch_lora_weights.safetensors``, or the file) and its
    tensors. Raises ``FileNotFoundError`` or, for a file that is not a readable LoRA, ``ValueError``."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"LoRA {str(path)!r} has no {WEIGHTS_NAME}; pass the folder train.py wrote "
                                "(e.g. runs/pxpo/lora) or a LoRA .safetensors file")
    try:
        state = load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"LoRA file {str(file)!r} is corrupt or not a safetensors file ({error}); "
                         "save it again or pass another") from None
    if not state:
        raise ValueError(f"LoRA file {str(file)!r} holds no weights; save it again or pass another")
    if not_lora := sorted(k for k in state if "lora" not in k):
        raise ValueError(f"{str(file)!r} is not a LoRA file: {not_lora[0]!r} is not a LoRA weight "
                         f"({len(not_lora)} of {len(state)} are not)")
    return file, state


def _peft_keys(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's weights with peft's key names, converted as ``load_lora_weights`` converts them."""
    if component == "unet":
        return state if any("lora_A" in k for k in state) else convert_unet_state_dict_to_peft(state)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))


def _layer_size(layer: torch.nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a layer LoRA can adapt; ``None`` for any other module."""
    layer = getattr(layer, "base_layer", layer)  # a layer that already carries a peft adapter
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, torch.nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return None


def check_lora_fits(pipe, state: dict[str, torch.Tensor], where) -> None:
    """Raise a ``ValueError`` naming an adapter weight of ``state`` (diffusers, peft or kohya keys) that is for
    no part of ``pipe``, targets a layer it does not have, or has another width; ``where`` names the file."""
    state, _ = type(pipe).lora_state_dict(dict(state))  # diffusers' own conversion of kohya-style keys
    components = {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
                  if getattr(pipe, name, None) is not None}
    foreign = sorted(k for k in state if k.split(".", 1)[0] not in components)
    unknown, wrong = [], []
    for name, module in components.items():
        own = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
        if not own:
            continue
        own = _peft_keys(name, own)
        if name.startswith("text_encoder") and not hasattr(module, "text_model"):  # transformers' flattened CLIP
            own = {k.removeprefix("text_model."): v for k, v in own.items()}
        for key, weight in sorted(own.items()):
            if not (m := _ADAPTER_WEIGHT.match(key)):
                continue  # biases, DoRA magnitudes: their layer's lora_A/lora_B are checked
            try:
                size = _layer_size(module.get_submodule(m["layer"]))
            except AttributeError:
                size = None
            if size is None:
                unknown.append(f"{name}.{m['layer']}")
                continue
            inputs, outputs = size  # lora_A is (rank, inputs, ...), lora_B is (outputs, rank, ...)
            expected = (weight.shape[0], inputs) if m["part"] == "A" else (outputs, weight.shape[1])
            if tuple(weight.shape[:2]) != expected:
                wrong.append(f"{name}.{key} with shape {tuple(weight.shape)} but this model's layer needs "
                             f"{expected + tuple(weight.shape[2:])}")
    if foreign:
        problem = f"{len(foreign)} of its {len(state)} weights are for no part of this pipeline, e.g. {foreign[0]!r}"
    elif unknown:
        problem = (f"it targets {unknown[0]}, which this model does not have "
                   f"({len(unknown)} of its {len(state)} weights target missing layers)")
    elif wrong:
        problem = f"it targets {wrong[0]} ({len(wrong)} of its {len(state)} weights do not fit)"
    else:
        return
    raise ValueError(f"LoRA {str(where)!r} does not fit this model: {problem}; it was trained for another model: "
                     "load it into the model it was trained on")


def load_lora(pipe, path) -> Path:
    """Load the LoRA of ``path`` (see :func:`read_lora`) into ``pipe`` after :func:`check_lora_fits`;
    returns the file."""
    file, state = read_lora(path)
    check_lora_fits(pipe, state, file)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    return file
