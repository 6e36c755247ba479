"""Weights both ways: HF PhiForCausalLM names (megaphi's own), the old phi-1 namings, and safetensors files.

megaphi's PhiForCausalLM already uses transformers' names, so exporting is a dtype cast. Importing also reads
the two older phi-1 releases, whose blocks hold one fused `mixer.Wqkv` (rows: all of Q, then K, then V):
  phi-1 first release: layers.0.wte, layers.{1..L}.{ln, mixer.Wqkv, mixer.out_proj, mlp.fc1, mlp.fc2},
                       layers.{L+1}.ln (final LayerNorm), layers.{L+1}.linear (LM head)
  MixFormer release:   transformer.embd.wte, transformer.h.{0..L-1}.{same block names}, lm_head.ln, lm_head.linear
"""

import json
import os
import re
from pathlib import Path

import torch

from megaphi.model.config import ModelConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_BLOCK = {"ln": "input_layernorm", "mixer.out_proj": "self_attn.dense", "mlp.fc1": "mlp.fc1",
          "mlp.fc2": "mlp.fc2"}
# Buffers some releases saved beside the weights: recomputed from the config, never needed.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\.(cos|sin)_cached|\.masked_bias|attn\.bias)$")


def expected_names(config: ModelConfig) -> list[str]:
    """The state-dict keys of megaphi's (and transformers') PhiForCausalLM."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_layers):
        for module in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.dense", "mlp.fc1", "mlp.fc2"):
            names += [f"model.layers.{i}.{module}.weight", f"model.layers.{i}.{module}.bias"]
    return names + ["model.final_layernorm.weight", "model.final_layernorm.bias", "lm_head.weight", "lm_head.bias"]


def to_hf_state_dict(state_dict: dict, config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The transformers PhiForCausalLM state dict: same names, contiguous tensors of one dtype, shapes checked."""
    names = expected_names(config)
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[0]!r}")
    extra = sorted(set(state_dict) - set(names))
    if extra:
        raise ValueError(f"the checkpoint has {len(extra)} unexpected weights, e.g. {extra[0]!r}")
    out, seen = {}, set()
    for name in names:
        t = state_dict[name].detach().to("cpu", dtype)
        # safetensors refuses tensors that share memory (slices of a fused Wqkv, tied embeddings): copy those.
        whole = t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not whole or t.untyped_storage().data_ptr() in seen:
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    _check_shapes(out, config)
    return out


def naming(state_dict: dict) -> str:
    """Which release's names a state dict uses: "hf", "phi-1" (layers.N) or "mixformer" (transformer.h.N)."""
    if "model.embed_tokens.weight" in state_dict:
        return "hf"
    if "layers.0.wte.weight" in state_dict:
        return "phi-1"
    if "transformer.embd.wte.weight" in state_dict:
        return "mixformer"
    sample = sorted(state_dict)[:3]
    raise ValueError(f"unrecognised weight names (e.g. {sample}): expected transformers' PhiForCausalLM "
                     f"(model.embed_tokens...), phi-1's layers.0.wte... or transformer.embd.wte...")


def from_hf_state_dict(state_dict: dict, config: ModelConfig) -> dict:
    """megaphi's state dict (fp32) from any of the three namings; an unknown or missing weight is an error."""
    kind = naming(state_dict)
    src = {k: v for k, v in state_dict.items() if not _IGNORED.search(k)}
    if kind == "hf":
        out = dict(src)
        if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:  # tie_word_embeddings
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out = _rename_old(src, config, kind)
    return to_hf_state_dict(out, config, torch.float32)


def _rename_old(src: dict, config: ModelConfig, kind: str) -> dict:
    """phi-1 / MixFormer names -> HF names, splitting each fused Wqkv into q, k, v."""
    L = config.num_layers
    if kind == "phi-1":
        embed, block, head_ln, head = "layers.0.wte", "layers.{}.", f"layers.{L + 1}.ln", f"layers.{L + 1}.linear"
        index = 1  # block i is layers.{i + 1}
    else:
        embed, block, head_ln, head = "transformer.embd.wte", "transformer.h.{}.", "lm_head.ln", "lm_head.linear"
        index = 0
    out, used = {}, set()

    def take(name):
        if name not in src:
            raise ValueError(f"the {kind} checkpoint lacks {name!r} (config.json says {L} layers)")
        used.add(name)
        return src[name]

    out["model.embed_tokens.weight"] = take(embed + ".weight")
    h = config.hidden_size
    for i in range(L):
        prefix, dst = block.format(i + index), f"model.layers.{i}."
        for old, new in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}{new}.{p}"] = take(f"{prefix}{old}.{p}")
        for p in ("weight", "bias"):
            qkv = take(f"{prefix}mixer.Wqkv.{p}")
            if qkv.shape[0] != 3 * h:
                raise ValueError(f"{prefix}mixer.Wqkv.{p} has {qkv.shape[0]} rows, expected 3 x hidden = {3 * h}")
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{dst}self_attn.{name}.{p}"] = qkv[j * h:(j + 1) * h]
    for p in ("weight", "bias"):
        out[f"model.final_layernorm.{p}"] = take(f"{head_ln}.{p}")
        out[f"lm_head.{p}"] = take(f"{head}.{p}")
    extra = sorted(set(src) - used)
    if extra:
        raise ValueError(f"the {kind} checkpoint has {len(extra)} weights this conversion does not use, "
                         f"e.g. {extra[0]!r} (more layers than config.json says?)")
    return out


def to_old_state_dict(state_dict: dict, config: ModelConfig, kind: str) -> dict:
    """HF names -> the phi-1 or MixFormer naming (fused Wqkv): for tests and for tools that want the old layout."""
    L = config.num_layers
    if kind == "phi-1":
        embed, block, head_ln, head, index = "layers.0.wte", "layers.{}.", f"layers.{L + 1}.ln", \
            f"layers.{L + 1}.linear", 1
    elif kind == "mixformer":
        embed, block, head_ln, head, index = "transformer.embd.wte", "transformer.h.{}.", "lm_head.ln", \
            "lm_head.linear", 0
    else:
        raise ValueError(f"kind must be 'phi-1' or 'mixformer', got {kind!r}")
    out = {embed + ".weight": state_dict["model.embed_tokens.weight"]}
    for i in range(L):
        src, dst = f"model.layers.{i}.", block.format(i + index)
        for old, new in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}{old}.{p}"] = state_dict[f"{src}{new}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}mixer.Wqkv.{p}"] = torch.cat([state_dict[f"{src}self_attn.{n}.{p}"]
                                                      for n in ("q_proj", "k_proj", "v_proj")])
    for p in ("weight", "bias"):
        out[f"{head_ln}.{p}"] = state_dict[f"model.final_layernorm.{p}"]
        out[f"{head}.{p}"] = state_dict[f"lm_head.{p}"]
    return out


def _check_shapes(state_dict: dict, config: ModelConfig) -> None:
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "lm_head.bias": (v,),
              "model.final_layernorm.weight": (h,), "model.final_layernorm.bias": (h,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "mlp.fc1.weight": (f, h), p + "mlp.fc1.bias": (f,), p + "mlp.fc2.weight": (h, f),
                       p + "mlp.fc2.bias": (h,), p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,)})
        for name in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes.update({f"{p}self_attn.{name}.weight": (h, h), f"{p}self_attn.{name}.bias": (h,)})
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(state_dict[name].shape)}, but the config "
                             f"(hidden {h}, ffn {f}, vocab rows {v}) needs {shape}")


def parse_size(text: str | int) -> int:
    """Bytes from "5GB", "500MB", "10KB", "123" (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2000000")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(number * scale)


def save_safetensors(state_dict: dict, folder: str | Path, max_shard_size: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + the index past max_shard_size bytes."""
    from safetensors.torch import save_file as _save_file

    def save_file(tensors, path, metadata):
        _save_file(tensors, path, metadata=metadata)
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates files readable by their owner only

    folder = Path(folder)
    shards, current, size = [], {}, 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [SAFETENSORS_INDEX]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_weights(folder: str | Path) -> dict:
    """All tensors of an HF folder: model.safetensors, sharded safetensors, or pytorch_model.bin (sharded too)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    for index, load in ((SAFETENSORS_INDEX, load_file), (BIN_INDEX, _load_bin)):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            out = {}
            for file in sorted(set(weight_map.values())):
                out.update(load(folder / file))
            return out
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(folder / "pytorch_model.bin")
    raise ValueError(f"--hf {folder}: no model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin or "
                     f"{BIN_INDEX} found")


def _load_bin(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
