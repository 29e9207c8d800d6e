"""Loading Hugging Face models (any id or local path) and saying exactly which weights they are.

`LoadedModel` is what a model actor holds: the model on its device, its tokenizer, and its site map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from interpflow.tasks.sites import SiteMap


@functools.cache
def dtypes() -> dict[str, Any]:
    """Dtype name -> torch dtype (torch loads when a model does, not when a graph is built)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def __getattr__(name: str):
    if name == "DTYPES":
        return dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")


class ModelConfig(BaseModel):
    """How a model actor loads its model. Nothing here but `dtype` changes the numbers."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="weights and compute dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the actor has a GPU")
    revision: str | None = Field(None, description="hub revision when the model is a hub id")
    trust_remote_code: bool = False


def is_local(path_or_id: str) -> bool:
    return Path(path_or_id).expanduser().exists()


def model_identity(path_or_id: str, revision: str | None = None) -> dict[str, str]:
    """A model's identity for node keys: a digest of its weight and config files when local,
    else the hub id and revision (a hub model should be pinned to a commit for reproducibility)."""
    from interpflow.tasks.digests import directory_digest

    if is_local(path_or_id):
        path = Path(path_or_id).expanduser().resolve()
        return {"path": str(path), "digest": directory_digest(path, WEIGHT_SUFFIXES)}
    return {"id": path_or_id, "revision": revision or "main"}


# Weight files `from_pretrained` reads (one file, or the shards an index names).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weights(folder: str | Path, field: str = "model.path") -> None:
    """A local model folder holds weights that will load: a weight file or every shard its index names, and
    every `*.safetensors` file a valid one (its header parsed and its tensors inside the file: reads the
    header only). Raises FileNotFoundError / ValueError naming `field`, the file and the fix."""
    import json

    from safetensors import SafetensorError, safe_open

    folder = Path(folder).expanduser()
    shards: set[str] = set()
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                shards |= {str(v) for v in weight_map.values()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{field}: {folder / index} is not a valid weight index (no readable weight_map): "
                                 "re-save or re-download the model") from None
    missing = sorted(name for name in shards if not (folder / name).is_file())
    if missing:
        raise FileNotFoundError(f"{field}: '{folder}' lacks weight shard(s) {missing[:3]}"
                                f"{' and more' if len(missing) > 3 else ''} named by its index: re-save or "
                                "re-download the model")
    if not shards and not any((folder / name).is_file() for name in WEIGHT_FILES) \
            and not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{field}: '{folder}' has a config.json but no weights (model.safetensors or "
                                "pytorch_model.bin): save the model with save_pretrained, or re-download it")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="numpy") as weights:
                weights.keys()
        except (SafetensorError, OSError) as exc:
            reason = " ".join(str(exc).split()).removeprefix("Error while deserializing header: ")
            raise ValueError(f"{field}: {file} is not a valid safetensors file ({reason}): re-save or "
                             "re-download the model") from None


def check_model_source(path_or_id: str) -> None:
    """Fail early, and clearly, for a model that cannot be loaded here: a local folder needs a config.json and
    intact weights (`check_weights`); a hub id must be in the cache when offline."""
    if is_local(path_or_id):
        if not (Path(path_or_id).expanduser() / "config.json").exists():
            raise FileNotFoundError(f"model path '{path_or_id}' has no config.json: not a Hugging Face model folder")
        check_weights(path_or_id)
        return
    looks_like_path = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"model path '{path_or_id}' does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(path_or_id, "config.json") is None:
            raise FileNotFoundError(f"model '{path_or_id}' is not a local path and not in the offline hub cache")


def check_dtype(dtype: str, device: str) -> None:
    """A tiny matmul in `dtype` on `device`; raise ValueError if the device cannot do it."""
    import torch

    try:
        a = torch.ones(4, 4, dtype=dtypes()[dtype], device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"dtype {dtype} is not supported on {device}: {exc}") from None


def resolve_device(cfg: ModelConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but no GPU is visible to this process; ask Ray for num_gpus>0 "
                         "or set model.device=cpu")
    return cfg.device


def _load_hf(path_or_id: str, cfg: ModelConfig, meta: bool = False):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path_or_id, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    architectures = getattr(hf_config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    auto = AutoModelForCausalLM if causal else AutoModel
    if meta:
        with torch.device("meta"):
            return auto.from_config(hf_config), hf_config
    model = auto.from_pretrained(path_or_id, revision=cfg.revision, dtype=dtypes()[cfg.dtype],
                                 trust_remote_code=cfg.trust_remote_code)
    return model, hf_config


def model_sites(path_or_id: str, cfg: ModelConfig | None = None) -> SiteMap:
    """The site map of a model built on the meta device: no weights are read (for early checks)."""
    model, _ = _load_hf(path_or_id, cfg or ModelConfig(), meta=True)
    return SiteMap(model)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    sites: SiteMap
    source: str
    identity: dict = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        config = self.model.config
        limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
        limits.append(getattr(self.tokenizer, "model_max_length", None) if self.tokenizer else None)
        limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
        return min(limits) if limits else 512


class ModelRef(BaseModel):
    """A model given by the user: a hub id or a local folder."""

    model_config = ConfigDict(extra="forbid")
    path: str
    revision: str | None = None


def hf_config(ref: ModelRef, cfg: ModelConfig):
    """A user model's HF config (no weights read), for checks before any compute; a clear error when the
    folder or hub id holds no model."""
    from transformers import AutoConfig

    check_model_source(ref.path)
    return AutoConfig.from_pretrained(ref.path, revision=ref.revision, trust_remote_code=cfg.trust_remote_code)


def use_model(cfg: ModelRef) -> str:
    """A graph node standing for an external model: its output is the id or path to load.

    The node's key carries the model's identity (weight digest), so new weights mean a new key.
    """
    check_model_source(cfg.path)
    return str(Path(cfg.path).expanduser().resolve()) if is_local(cfg.path) else cfg.path


def load_model(path_or_id: str, cfg: ModelConfig) -> LoadedModel:
    """Load a model and its tokenizer (if any) once, for an actor to serve many batches."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per actor start would interleave on the driver's console
    check_model_source(path_or_id)
    device = resolve_device(cfg)
    check_dtype(cfg.dtype, device)
    model, _ = _load_hf(path_or_id, cfg)
    model.to(device).eval()
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path_or_id, revision=cfg.revision)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
    except (OSError, ValueError, TypeError):
        tokenizer = None  # vision and video models take pixels
    return LoadedModel(model, tokenizer, device, SiteMap(model), str(path_or_id),
                       model_identity(str(path_or_id), cfg.revision))
