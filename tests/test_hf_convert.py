"""HF conversion both ways: transformers loads our folders with equal logits and generations, tokenizers give our
ids, phi-1's older namings import, round trips are bitwise, and a converted checkpoint fine-tunes."""

import json
import re

import pytest
import torch

from megaphi.data.tokenizer import build_tokenizer
from megaphi.generate import generate
from megaphi.hf import convert_from_hf, convert_to_hf, load_hf_model, save_weights_checkpoint, to_old_state_dict
from megaphi.hf.convert import trainer_flags
from megaphi.hf.config import model_config_from_hf, rotary_factor
from megaphi.hf.weights import parse_size
from megaphi.model import ModelConfig, PhiForCausalLM
from megaphi.train import checkpoint as ckpt
from tools.convert_from_hf import main as from_hf_main
from tools.convert_to_hf import main as to_hf_main

TOL = 1e-4  # fp32 logits: the same math in a different order
# vocab 8000 padded to 8064 rows: the padded rows and the multiple must survive the round trip.
CONFIG = ModelConfig(vocab_size=8000, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     max_position_embeddings=64, rotary_dim=8, init_std=0.2, make_vocab_size_divisible_by=128,
                     layernorm_epsilon=1e-6, rope_theta=5000.0)


def random_model(config=CONFIG, seed=0):
    """A model whose biases and LayerNorms are not at their init, so every mapped tensor matters."""
    torch.manual_seed(seed)
    model = PhiForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def corpus(megatron_fixtures):
    with open(megatron_fixtures / "code_sample.jsonl") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def sp_model(megatron_fixtures):
    return str(megatron_fixtures / "code8k.model")


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, sp_model):
    """A megaphi checkpoint whose training config names the sentencepiece tokenizer (as the trainer writes it)."""
    meta = {"config": {"data": {"tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": sp_model}}}
    return save_weights_checkpoint(tmp_path_factory.mktemp("ckpt") / "run", model.state_dict(), CONFIG, meta=meta)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("hf") / "phi-tiny"
    assert to_hf_main(["--load", str(checkpoint.parent), "--output", str(out), "--max-shard-size", "100KB"]) == 0
    return out


def real_ids(tokenizer, corpus, length=64, rows=2):
    return torch.tensor([tokenizer.encode(text)[:length] for text in corpus[:rows]])


def test_transformers_loads_the_folder_with_equal_logits(hf_dir, model, sp_model, corpus):
    from transformers import AutoModelForCausalLM, PhiForCausalLM as HFPhi

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert isinstance(hf, HFPhi) and hf.dtype == torch.float32
    tok = build_tokenizer("sentencepiece", sp_model)
    with torch.no_grad():
        for ids in (torch.randint(0, 8064, (3, 64)), real_ids(tok, corpus)):
            assert (hf(ids).logits - model(ids)).abs().max().item() < TOL
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "phi" and cfg["architectures"] == ["PhiForCausalLM"]
    assert cfg["vocab_size"] == 8064 and cfg["tie_word_embeddings"] is False
    assert cfg["partial_rotary_factor"] == 0.5 and cfg["rope_theta"] == 5000.0 and cfg["layer_norm_eps"] == 1e-6
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == tok.eod == 1  # not PhiConfig's 1/2 defaults by accident
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == tok.eod


def test_greedy_generations_are_identical(hf_dir, model, sp_model, corpus):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = build_tokenizer("sentencepiece", sp_model)
    prompts = real_ids(tok, corpus, length=12, rows=3)
    with torch.no_grad():
        theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[:, prompts.shape[1]:]
    ours = generate(model, prompts, max_new_tokens=24)
    assert theirs.tolist() == ours
    assert len({tuple(o) for o in ours}) == 3


def test_sharded_safetensors_and_index(hf_dir):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (hf_dir / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(random_model().state_dict())
    # Shards hold at most 100KB unless a single tensor is larger (the 8064 x 64 embedding).
    from safetensors import safe_open
    for file in files:
        with safe_open(hf_dir / file, "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert sum(sizes) <= 100_000 or len(sizes) == 1
    assert not list(hf_dir.parent.glob(".tmp_*"))


def test_autotokenizer_gives_our_ids_sentencepiece(hf_dir, sp_model, corpus):
    from transformers import AutoTokenizer

    theirs, ours = AutoTokenizer.from_pretrained(hf_dir), build_tokenizer("GPTSentencePieceTokenizer", sp_model)
    assert theirs.eos_token_id == ours.eod
    ids = ours.encode_batch(corpus)
    assert theirs(corpus, add_special_tokens=False)["input_ids"] == ids
    assert theirs.batch_decode(ids) == corpus


def test_huggingface_tokenizer_and_bf16(tmp_path, checkpoint, megatron_fixtures, corpus, capsys):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out, tok_dir = tmp_path / "hf", megatron_fixtures / "hf_bpe8k"
    argv = ["--load", str(checkpoint), "--output", str(out), "--dtype", "bf16", "--verify",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir)]
    assert to_hf_main(argv) == 0
    assert "verify: largest |logit difference|" in capsys.readouterr().out
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    theirs, ours = AutoTokenizer.from_pretrained(out), build_tokenizer("huggingface", tok_dir)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == theirs.eos_token_id == ours.eod == 0
    for text in corpus[:50]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text


def test_verify_passes_and_output_is_refused_unless_forced(tmp_path, checkpoint, capsys):
    out = tmp_path / "hf"
    assert to_hf_main(["--load", str(checkpoint.parent), "--output", str(out), "--verify"]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("verify:")][0]
    assert float(re.search(r"megaphi: (\S+) \(random ids", line).group(1)) < TOL and line.endswith("OK")
    assert to_hf_main(["--load", str(checkpoint.parent), "--output", str(out)]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    (out / "stale.txt").write_text("x")
    assert to_hf_main(["--load", str(checkpoint.parent), "--output", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob(".tmp_*"))


def test_failed_conversion_leaves_nothing(tmp_path, checkpoint, capsys):
    out = tmp_path / "hf"
    argv = ["--load", str(checkpoint), "--output", str(out), "--tokenizer-type", "sentencepiece",
            "--tokenizer-model", str(tmp_path / "missing.model")]
    assert to_hf_main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".tmp_*"))
    assert to_hf_main(["--load", str(tmp_path / "nothing"), "--output", str(out)]) == 2
    assert "--load" in capsys.readouterr().err
    assert to_hf_main(["--load", str(checkpoint.parent), "--output", str(out), "--iteration", "7"]) == 2
    assert "--iteration 7" in capsys.readouterr().err  # the flag the user gave, not the trainer's
    (tmp_path / "file").write_text("x")  # --output under a file: an OSError, reported in one line
    assert to_hf_main(["--load", str(checkpoint.parent), "--output", str(tmp_path / "file" / "sub")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_round_trip_is_bitwise(tmp_path, hf_dir, model, capsys):
    assert from_hf_main(["--hf", str(hf_dir), "--save", str(tmp_path / "back")]) == 0
    assert "--tokenizer-model" in capsys.readouterr().out
    back = ckpt.load_model(tmp_path / "back")
    assert back.config == CONFIG
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    tok = ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "back"))["tokenizer"]
    assert tok["tokenizer_type"] == "sentencepiece" and tok["tokenizer_model"].endswith("tokenizer/tokenizer.model")
    assert from_hf_main(["--hf", str(hf_dir), "--save", str(tmp_path / "back")]) == 2  # holds a checkpoint


def test_reads_a_transformers_save_pretrained_folder(tmp_path):
    from transformers import PhiConfig
    from transformers import PhiForCausalLM as HFPhi

    torch.manual_seed(1)
    hf = HFPhi(PhiConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, max_position_embeddings=32, partial_rotary_factor=0.375,
                         rope_theta=2000.0, initializer_range=0.3)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path)
    assert ours.config.rotary_dim == 6 and ours.config.padded_vocab_size == 320
    ids = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < TOL


def old_config(config: ModelConfig) -> dict:
    """config.json of the phi-1 MixFormer releases."""
    return {"model_type": "mixformer-sequential", "architectures": ["MixFormerSequentialForCausalLM"],
            "n_embd": config.hidden_size, "n_layer": config.num_layers, "n_head": config.num_attention_heads,
            "n_inner": config.ffn_hidden_size, "n_positions": config.max_position_embeddings,
            "rotary_dim": config.rotary_dim, "layer_norm_epsilon": config.layernorm_epsilon,
            "vocab_size": config.padded_vocab_size, "activation_function": "gelu_new", "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "initializer_range": config.init_std, "tie_word_embeddings": False}


@pytest.mark.parametrize("kind,fmt", [("phi-1", "bin"), ("mixformer", "safetensors")])
def test_old_phi1_namings_import_with_equal_logits(tmp_path, kind, fmt):
    from safetensors.torch import save_file

    config = CONFIG.replace(vocab_size=8064, make_vocab_size_divisible_by=64, rope_theta=10000.0)
    source = random_model(config, seed=2)
    weights = to_old_state_dict(source.state_dict(), config, kind)
    assert any("mixer.Wqkv" in k for k in weights) and not any("q_proj" in k for k in weights)
    weights[next(k for k in weights if k.endswith("Wqkv.weight")).replace("Wqkv.weight", "rotary_emb.inv_freq")] = \
        torch.ones(4)  # a saved buffer: ignored
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(old_config(config)))
    if fmt == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    assert from_hf_main(["--hf", str(folder), "--save", str(tmp_path / "ckpt")]) == 0
    converted = ckpt.load_model(tmp_path / "ckpt")
    assert converted.config == config
    ids = torch.randint(0, 8064, (2, 64))
    with torch.no_grad():
        assert torch.equal(converted(ids), source(ids))
    # The fused rows are all of Q, then K, then V: any other split changes the model.
    layer = converted.model.layers[0].self_attn
    assert torch.equal(layer.k_proj.weight, source.model.layers[0].self_attn.k_proj.weight)


def test_config_reading_and_errors():
    hf = {"hidden_size": 80, "num_attention_heads": 1, "num_hidden_layers": 1, "intermediate_size": 16,
          "vocab_size": 51200, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.4}}
    config = model_config_from_hf(hf, tokenizer_vocab_size=50295)
    assert config.rotary_dim == 32 and config.vocab_size == 50295 and config.padded_vocab_size == 51200
    assert model_config_from_hf(hf).vocab_size == 51200
    for bad, message in [({"num_key_value_heads": 2, "num_attention_heads": 4, "hidden_size": 64}, "key/value"),
                         ({"qk_layernorm": True}, "qk_layernorm"), ({"hidden_act": "relu"}, "activation"),
                         ({"rope_parameters": {"rope_type": "yarn"}}, "rope_type")]:
        with pytest.raises(ValueError, match=message):
            model_config_from_hf({**hf, **bad})
    with pytest.raises(ValueError, match="50295 tokens but the model only 50000"):
        model_config_from_hf({**hf, "vocab_size": 50000}, tokenizer_vocab_size=50295)
    assert all(int(h * rotary_factor(r, h)) == r for h in range(2, 257, 2) for r in range(2, h + 1, 2))
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 100_000 and parse_size("2MiB") == 2 << 20
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("lots")


def test_tensor_parallel_checkpoints_both_ways(tmp_path, hf_dir, sp_model):
    from megaphi.hf.weights import load_weights

    with pytest.raises(ValueError, match="divisible by 3"):  # 4 heads, hidden 64: no layout for 3 ranks
        convert_from_hf(hf_dir, tmp_path / "tp3", tensor_parallel_size=3)
    assert not (tmp_path / "tp3").exists()  # nothing half-written is left
    path = convert_from_hf(hf_dir, tmp_path / "tp2", tensor_parallel_size=2)["checkpoint"]
    assert ckpt.read_meta(path)["layout"]["tensor_parallel"] == 2
    back = ckpt.load_model(tmp_path / "tp2")
    for (name, a), b in zip(random_model().state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    # ... and a checkpoint saved at TP 2 converts to the same HF weights.
    convert_to_hf(tmp_path / "tp2", tmp_path / "hf2")
    original, again = load_weights(hf_dir), load_weights(tmp_path / "hf2")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_converted_checkpoint_fine_tunes(tmp_path, write_token_dataset, capsys):
    from megaphi.train.trainer import main as train_main

    # The tiny preset's rotary_dim (32) and vocabulary (512) with a smaller width: fits the trainer's flags.
    config = ModelConfig(vocab_size=512, num_layers=2, hidden_size=64, num_attention_heads=1, ffn_hidden_size=128,
                         max_position_embeddings=64, rotary_dim=32)
    pretrained = random_model(config, seed=3)
    hf = tmp_path / "hf"
    hf.mkdir()
    from megaphi.hf.config import hf_config
    from megaphi.hf.weights import save_safetensors
    (hf / "config.json").write_text(json.dumps(hf_config(config, 0, 0)))
    save_safetensors(pretrained.state_dict(), hf, 10**9)
    result = convert_from_hf(hf, tmp_path / "base")
    assert result["naming"] == "hf" and result["tokenizer"] is None
    data = write_token_dataset(100)
    flags = trainer_flags(config)  # what tools/convert_from_hf.py prints
    assert flags[0] == "--preset" and "--hidden-size" in flags
    flags += ["--data-path", data,
             "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--split", "100,0,0",
             "--eval-iters", "0", "--train-iters", "2", "--lr", "1e-4", "--lr-warmup-iters", "1", "--log-interval", "1",
             "--no-bf16", "--finetune", "--load", str(tmp_path / "base"), "--save", str(tmp_path / "ft")]
    run = train_main(flags, finetune=True)
    assert "fine-tuning from" in capsys.readouterr().out
    assert run.iteration == 2 and all(torch.isfinite(torch.tensor(v)) for v in run.losses.values())
    tuned = ckpt.load_model(tmp_path / "ft")
    changed = [not torch.equal(a, b) for a, b in zip(pretrained.state_dict().values(), tuned.state_dict().values())]
    assert any(changed)
