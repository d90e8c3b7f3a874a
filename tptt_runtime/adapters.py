"""Adapters: LoRA (peft) on the shared projections, saved as safetensors + tptt_config.json, and the import of
checkpoints written by the upstream `tptt` package (TpttModel.save_pretrained).

An adapter directory holds:
    tptt_config.json            TpttConfig (window, sinks, memory operator, MaG, LoRA shape, base model)
    adapter_model.safetensors   LoRA weights, keys as peft names them without the adapter name, and the
                                memory's own parameters when the config learns them: gates (`*.mag_gate.*`,
                                mag_gate "learned"), feature maps (`*.memory_map.*`, feature_map "learned")
                                read scales (`*.read_scale`, read_scale "learned"), the gates' inputs
                                (`*.gate_input_k.*`, `*.gate_input_v.*`, gate_input "learned") and decays
                                (`*.memory_decay`, alpha_gate "learned")
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TpttConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def add_lora(hf_model: nn.Module, config: TpttConfig) -> None:
    """Wrap the projections named in config.lora_targets with LoRA layers (in place, initially a no-op)."""
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets))
    inject_adapter_in_model(lora, hf_model)


def merge_lora(hf_model: nn.Module) -> None:
    """Fold LoRA deltas into the base weights and drop the wrappers: inference runs plain Linear layers."""
    for parent in list(hf_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())


def _is_memory_param(name: str) -> bool:
    return (".mag_gate." in name or ".memory_map." in name or name.endswith((".read_scale", ".memory_decay"))
            or ".gate_input_" in name or ".retaining_head." in name)


def trainable_names(hf_model: nn.Module) -> list[str]:
    """Parameters distillation trains (an adapter stores them all): LoRA weights and the memory's own parameters
    but the retaining heads, which no gradient reaches (they rank tokens for a hard top-C; train/retain.py fits
    them)."""
    return [name for name, _ in hf_model.named_parameters()
            if "lora_" in name or (_is_memory_param(name) and ".retaining_head." not in name)]


def adapter_state_dict(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor an adapter stores (see the module docstring), detached and contiguous."""
    has_lora = any("lora_" in name for name, _ in hf_model.named_parameters())
    weights = dict(get_peft_model_state_dict(hf_model)) if has_lora else {}
    weights.update({name: p for name, p in hf_model.named_parameters() if _is_memory_param(name)})
    return {k: v.detach().contiguous() for k, v in weights.items()}


def load_adapter_state_dict(hf_model: nn.Module, weights: dict[str, torch.Tensor], origin: str,
                            missing_ok: bool = False) -> None:
    """Inverse of adapter_state_dict. Memory parameters the model lacks are skipped (a constant mu was asked
    for: loading(mag_weight=...)); ones it has must all be there, unless `missing_ok` (a conversion starting
    from an adapter with a config change: those keep their fresh values)."""
    memory = {k: v for k, v in weights.items() if _is_memory_param(k)}
    lora = {k: v for k, v in weights.items() if not _is_memory_param(k)}
    if lora:
        unexpected = getattr(set_peft_model_state_dict(hf_model, lora), "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter {origin} has weights this model does not: {unexpected[:3]} ...")
    params = dict(hf_model.named_parameters())
    wanted = [name for name in params if _is_memory_param(name)]
    missing = [name for name in wanted if name not in memory]
    if missing and not missing_ok:
        raise ValueError(f"adapter {origin} lacks memory parameters its config asks for: {missing[:3]} ...")
    with torch.no_grad():
        for name in wanted:
            if name in memory:
                params[name].copy_(memory[name])


def save_adapter(hf_model: nn.Module, config: TpttConfig, directory: str | Path) -> Path:
    directory = Path(directory)
    config.save(directory)
    save_file(adapter_state_dict(hf_model), directory / ADAPTER_WEIGHTS)
    return directory


def load_adapter_weights(hf_model: nn.Module, directory: str | Path, missing_ok: bool = False) -> None:
    path = Path(directory) / ADAPTER_WEIGHTS
    if path.exists():
        load_adapter_state_dict(hf_model, load_file(path), str(path), missing_ok)


# ------------------------------------------------------------------------------------ upstream tptt import
UPSTREAM_TRICKS = {"dt": "derivative", "derivative": "derivative", "rot": "rotary", "rotative": "rotary",
                   "rdt": "combined", "combined": "combined"}
UPSTREAM_MODES = {  # upstream operator_mode -> (order, alpha_gate, beta_gate, linear, trick)
    "delta_rule": (1, "c", "k", True, "dt"), "gated_delta_rule": (1, "k", "k", True, "dt"),
    "delta_rule_v": (1, "c", "v", True, "dt"), "delta_rule_kv": (1, "c", "kv", True, "dt"),
    "delta_rule_gelu": (1, "c", "k", False, "dt"), "delta_product": (2, "c", "k", True, "dt"),
    "gated_delta_product": (2, "k", "k", True, "dt"), "delta_product_r": (2, "c", "k", True, "rot"),
    "delta_product_c": (2, "c", "k", True, "rdt"),
}


def is_upstream_checkpoint(directory: str | Path) -> bool:
    config = Path(directory) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "tptt"


def upstream_config(directory: str | Path, default_window: int) -> tuple[TpttConfig, str]:
    """Map an upstream TpttConfig (config.json) to ours; returns (config, upstream base_model_name)."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    for unsupported in ("base_scale_attn", "bidirectional"):
        if raw.get(unsupported):
            raise ValueError(f"upstream option {unsupported}=True has no equivalent in this runtime")
    if raw.get("operator_mode") in UPSTREAM_MODES:
        order, alpha, beta, linear, trick = UPSTREAM_MODES[raw["operator_mode"]]
    else:
        rec = raw.get("recurrent_config") or {}
        order, alpha, beta = rec.get("order", 1), rec.get("alpha_gate", "c"), rec.get("beta_gate", "k")
        linear, trick = rec.get("linear", True), rec.get("trick", "dt")
    lora = raw.get("lora_config") or {}
    targets = lora.get("target_modules") or []
    config = TpttConfig(
        window=raw.get("max_self_attn_length") or default_window,
        mag_weight=float(raw.get("mag_weight", 0.5)), cross_gate=bool(raw.get("cross_gate", False)),
        order=int(order), trick=UPSTREAM_TRICKS[trick], alpha_gate="c" if alpha in ("1", "c") else alpha,
        beta_gate=beta, nonlinear_chunk=0 if linear else int(raw.get("max_chunk_size", 64)),
        lora_rank=int(lora.get("r", 8)), lora_alpha=float(lora.get("lora_alpha", 16)),
        lora_dropout=float(lora.get("lora_dropout", 0.0)),
        lora_targets=sorted(targets) if isinstance(targets, list) else [targets],
        base_model=str(raw.get("base_model_name", "")))
    return config, config.base_model


def _canonical(key: str) -> str:
    """Key without wrapper prefixes, LiZA's base_attn level and peft's adapter name."""
    key = key.replace(".base_attn.", ".").replace(".default.", ".")
    return re.sub(r"^((base_model|tptt_model|model)\.)+", "", key)


def load_upstream_weights(hf_model: nn.Module, directory: str | Path) -> int:
    """Load the upstream adapter_model.safetensors (LoRA or full projection weights); returns tensors loaded."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.exists():
        raise ValueError(f"{directory} has no {ADAPTER_WEIGHTS}")
    params = dict(hf_model.named_parameters())
    by_canonical = {_canonical(name): name for name in params}
    loaded = 0
    with torch.no_grad():
        for key, tensor in load_file(path).items():
            target = by_canonical.get(_canonical(key))
            if target is None:
                raise ValueError(f"upstream weight {key!r} matches no parameter of this model")
            if params[target].shape != tensor.shape:
                raise ValueError(f"upstream weight {key!r} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(params[target].shape)}")
            params[target].copy_(tensor)
            loaded += 1
    return loaded
