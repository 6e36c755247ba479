"""megaphi checkpoint -> HF folder (config, safetensors, tokenizer) and HF/phi-1 folder -> megaphi checkpoint.

Checkpoints are read with megaphi.train.checkpoint.load_full_state_dict (any tensor/data-parallel layout) and
written with save_model_checkpoint (any tensor-parallel layout).
"""

import json
import os
import shutil
from pathlib import Path

import torch

from megaphi.hf.config import generation_config, hf_config, model_config_from_hf
from megaphi.hf.tokenizer import HF_TOKENIZER_FILES, export_tokenizer, load_hf_tokenizer, special_ids, tokenizer_spec
from megaphi.hf.weights import from_hf_state_dict, load_weights, naming, parse_size, save_safetensors, to_hf_state_dict
from megaphi.model import PRESETS, ModelConfig, PhiForCausalLM, get_preset
from megaphi.train import checkpoint as ckpt

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TMP_PREFIX = ".tmp_"


def find_checkpoint_path(load: str | Path, iteration: int | None = None) -> Path:
    """The iter_ folder to read: `load` itself when it is one, else the given iteration or the latest in it."""
    load = Path(load)
    match = ckpt.CHECKPOINT_RE.match(load.name)
    if match and (load / "meta.json").is_file():
        if iteration is not None and iteration != int(match.group(1)):
            raise ValueError(f"--iteration {iteration} disagrees with --load {load}: give its --save folder")
        return load
    if not load.is_dir():
        raise ValueError(f"--load {load}: no such folder")
    try:
        path = ckpt.find_checkpoint(load, iteration)
    except ValueError:  # names the trainer's flag
        raise ValueError(f"--iteration {iteration}: {load} holds no complete checkpoint of that iteration "
                         f"(it has {[i for i, _ in ckpt.list_checkpoints(load)]})") from None
    if path is None:
        raise ValueError(f"--load {load}: no checkpoint found")
    return path


def read_weights_checkpoint(path: Path) -> tuple[ModelConfig, dict]:
    """(model config, full fp32 state dict) of a checkpoint saved at any layout."""
    return ckpt.load_full_state_dict(path)


def save_weights_checkpoint(folder: str | Path, state_dict: dict, config: ModelConfig, tensor_parallel_size: int = 1,
                            meta: dict | None = None) -> Path:
    """A weights-only checkpoint (iteration 0) that --load / --finetune read; returns its iter_ folder."""
    return ckpt.save_model_checkpoint(folder, state_dict, config, tensor_parallel_size=tensor_parallel_size,
                                      iteration=0, meta=meta)


def checkpoint_tokenizer(meta: dict) -> tuple[str, str] | None:
    """(tokenizer type, model) a checkpoint names: its training config's, else the one convert_from_hf copied."""
    data = (meta.get("config") or {}).get("data") or {}
    if data.get("tokenizer_type") and data.get("tokenizer_model"):
        return data["tokenizer_type"], data["tokenizer_model"]
    tok = meta.get("tokenizer") or {}
    if tok.get("tokenizer_type") and tok.get("tokenizer_model"):
        return tok["tokenizer_type"], tok["tokenizer_model"]
    return None


def resolve_tokenizer(meta: dict, tokenizer_type: str | None, tokenizer_model: str | None, where: str):
    """The tokenizer (type, model) to use: the flags, else the checkpoint's; a ValueError naming the flags."""
    if (tokenizer_type is None) != (tokenizer_model is None):
        raise ValueError("--tokenizer-type and --tokenizer-model go together: give both or neither")
    spec = (tokenizer_type, tokenizer_model) if tokenizer_type else checkpoint_tokenizer(meta)
    if spec is None:
        raise ValueError(f"{where} names no tokenizer: pass --tokenizer-type and --tokenizer-model")
    if not Path(spec[1]).exists():
        raise ValueError(f"{where}: tokenizer {spec[1]} does not exist here; pass --tokenizer-type and "
                         f"--tokenizer-model")
    return spec


def _prepare_output(output: Path, force: bool) -> Path:
    """Checks that output may be written; returns the temp folder beside it to write into."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise ValueError(f"--output {output} exists and is not empty; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f"{TMP_PREFIX}{output.name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, output: Path) -> None:
    """Renames the finished temp folder to output, replacing what was there."""
    if output.exists():
        old = output.parent / f"{TMP_PREFIX}old_{output.name}.{os.getpid()}"
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, output)


def convert_to_hf(load: str | Path, output: str | Path, iteration: int | None = None, dtype: str = "fp32",
                  tokenizer_type: str | None = None, tokenizer_model: str | None = None,
                  max_shard_size: str | int = "5GB", force: bool = False) -> dict:
    """Writes a transformers PhiForCausalLM folder for a checkpoint; returns its paths, config, tokenizer, files."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    shard_bytes = parse_size(max_shard_size)
    output = Path(output)
    path = find_checkpoint_path(load, iteration)
    meta = ckpt.read_meta(path)
    tok_type, tok_model = resolve_tokenizer(meta, tokenizer_type, tokenizer_model, f"checkpoint {path}")
    tmp = _prepare_output(output, force)
    try:
        config, state_dict = read_weights_checkpoint(path)
        tokenizer = export_tokenizer(tok_type, tok_model, tmp, config.max_position_embeddings)
        if tokenizer.vocab_size > config.padded_vocab_size:
            raise ValueError(f"tokenizer {tok_model} has {tokenizer.vocab_size} tokens, more than the model's "
                             f"{config.padded_vocab_size} embedding rows: is it the one the model was trained with?")
        bos, eos = special_ids(tokenizer)
        weights = to_hf_state_dict(state_dict, config, TORCH_DTYPES[dtype])
        files = save_safetensors(weights, tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config(config, bos, eos, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(bos, eos), indent=2) + "\n")
        _commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"checkpoint": path, "output": output, "config": config, "tokenizer": tokenizer, "files": files}


def read_hf_folder(folder: str | Path) -> tuple[ModelConfig, dict, str]:
    """(model config, megaphi fp32 state dict, naming) of an HF phi folder (PhiForCausalLM or phi-1 naming)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--hf {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--hf {folder}: no config.json (not a HuggingFace model folder)")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise ValueError(f"--hf {folder}: config.json is not valid JSON: {e}") from None
    tokenizer = load_hf_tokenizer(folder)
    config = model_config_from_hf(cfg, tokenizer.vocab_size if tokenizer is not None else None)
    weights = load_weights(folder)
    kind = naming(weights)
    return config, from_hf_state_dict(weights, config), kind


def load_hf_model(folder: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> PhiForCausalLM:
    """megaphi's eval-mode PhiForCausalLM with an HF folder's weights (no transformers needed)."""
    config, state_dict, _ = read_hf_folder(folder)
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    model.load_state_dict(state_dict, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def convert_from_hf(hf: str | Path, save: str | Path, tensor_parallel_size: int = 1, force: bool = False) -> dict:
    """Writes a megaphi checkpoint (iteration 0) of an HF folder's weights, and copies its tokenizer beside it."""
    hf, save = Path(hf), Path(save)
    if tensor_parallel_size < 1:
        raise ValueError(f"--tensor-model-parallel-size must be >= 1, got {tensor_parallel_size}")
    if ckpt.list_checkpoints(save) and not force:
        raise ValueError(f"--save {save} already holds checkpoints; pass --force to add iteration 0 beside them")
    config, state_dict, kind = read_hf_folder(hf)
    meta = {"converted_from": str(hf.resolve()), "naming": kind}
    spec = tokenizer_spec(hf)
    # What to remove if saving fails: the folder if this made it, else the tokenizer copy if this made it.
    made = save if not save.exists() else save / "tokenizer" if not (save / "tokenizer").exists() else None
    try:
        if spec is not None:
            meta["tokenizer"] = _copy_tokenizer(spec, hf, save / "tokenizer")
        path = save_weights_checkpoint(save, state_dict, config, tensor_parallel_size, meta)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    return {"checkpoint": path, "config": config, "naming": kind, "tokenizer": meta.get("tokenizer")}


def _copy_tokenizer(spec: tuple[str, str], hf: Path, dest: Path) -> dict:
    """Copies an HF folder's tokenizer files into dest; returns the tokenizer_type/tokenizer_model to use."""
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind, _ = spec
    names = ("tokenizer.model",) if kind == "sentencepiece" else HF_TOKENIZER_FILES
    for name in names:
        if (hf / name).is_file():
            shutil.copyfile(hf / name, tmp / name)
    _commit(tmp, dest)
    model = dest / "tokenizer.model" if kind == "sentencepiece" else dest
    return {"tokenizer_type": kind, "tokenizer_model": str(model.resolve())}


def trainer_flags(config: ModelConfig) -> list[str] | None:
    """The trainer's flags that rebuild this model: a preset for what has no flag (rotary_dim, rope_theta, the
    vocabulary's padding multiple), then the shape; None when no preset matches."""
    shape = dict(num_layers=config.num_layers, hidden_size=config.hidden_size,
                 num_attention_heads=config.num_attention_heads, ffn_hidden_size=config.ffn_hidden_size,
                 max_position_embeddings=config.max_position_embeddings, vocab_size=config.vocab_size)
    for name in PRESETS:
        try:
            candidate = get_preset(name, **shape)
        except ValueError:  # e.g. the preset's rotary_dim does not fit this head size
            continue
        if (candidate.rotary_dim, candidate.rope_theta, candidate.padded_vocab_size, candidate.layernorm_epsilon) == \
                (config.rotary_dim, config.rope_theta, config.padded_vocab_size, config.layernorm_epsilon):
            flags = ["--preset", name]
            for key, value in shape.items():
                flags += ["--" + key.replace("_", "-"), str(value)]
            return flags
    return None

