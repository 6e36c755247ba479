"""The phi model: parameter counts, loss, causality, parity with transformers, checkpointing and the KV cache."""

import pytest
import torch
import torch.nn.functional as F

from megaphi.model import (PRESETS, KVCache, ModelConfig, PhiForCausalLM, flops_per_token, get_preset,
                           num_parameters, padded_vocab_size, peak_tflops)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return PhiForCausalLM(get_preset("tiny", **overrides))


def hf_model(config):
    """transformers' PhiForCausalLM with the same shape as config."""
    from transformers import PhiConfig
    from transformers import PhiForCausalLM as HFPhi

    # Dropout off: parity is checked in eval and train mode alike.
    return HFPhi(PhiConfig(**config.replace(hidden_dropout=0.0, attention_dropout=0.0,
                                            embedding_dropout=0.0).to_hf_config()))


@pytest.mark.parametrize("name,expected", [("phi-1", 1_418_270_720), ("phi-1-small", 356_794_368)])
def test_parameter_counts(name, expected):
    config = get_preset(name)
    assert num_parameters(config) == expected
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    assert model.num_parameters() == expected


@pytest.mark.parametrize("name", ["phi-1", "phi-1-small"])
def test_phi_presets_pad_the_codegen_tokenizer_to_51200(name):
    # phi-1 trains with codegen-350M-mono's 50295-token vocabulary; the released model has 51200 rows.
    assert get_preset(name, vocab_size=50295).padded_vocab_size == 51200


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_counts_match(name):
    with torch.device("meta"):
        model = PhiForCausalLM(get_preset(name))
    assert model.num_parameters() == num_parameters(model.config)


def test_hf_parameter_names():
    names = set(tiny_model().state_dict())
    expected = {"model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias",
                "lm_head.weight", "lm_head.bias"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "input_layernorm.bias"}
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                    "mlp.fc1", "mlp.fc2"):
            expected |= {p + lin + ".weight", p + lin + ".bias"}
    assert names == expected


def test_init():
    model = tiny_model(init_std=0.05)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith("layernorm.weight"):
            assert torch.all(p == 1)
        elif name.endswith(".bias"):
            assert torch.all(p == 0)
        else:
            assert abs(p.std().item() - 0.05) < 0.005, name
            assert abs(p.mean().item()) < 0.005, name


def test_shapes_and_loss_equal_manual_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, 500, (3, 20))
    labels = torch.randint(0, 500, (3, 20))
    labels[1, 5:] = -100
    logits = model(ids)
    assert logits.shape == (3, 20, 512)
    loss = model(ids, labels=labels)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 512), labels.view(-1), ignore_index=-100))


def test_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 30))
    changed = ids.clone()
    changed[:, 17:] = torch.randint(0, 512, (2, 13))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :17], b[:, :17], atol=1e-5, rtol=1e-5)
    assert (a[:, 17:] - b[:, 17:]).abs().max() > 1e-3


def test_logits_and_grads_match_transformers():
    ours = tiny_model(seed=3)
    hf = hf_model(ours.config)
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 512, (2, 64))
    logits = ours(ids)
    hf_logits = hf(ids).logits
    assert (logits - hf_logits).abs().max().item() < 1e-4
    # transformers shifts labels inside its loss; ours takes them already shifted.
    loss = ours(ids[:, :-1], labels=ids[:, 1:])
    hf_loss = hf(ids, labels=ids).loss
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    hf_loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=2e-5, rtol=1e-3, msg=name)


def test_activation_checkpointing_gives_same_grads_even_with_dropout():
    overrides = dict(hidden_dropout=0.1, attention_dropout=0.1, embedding_dropout=0.1)
    ids, labels = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    grads = []
    for enabled in (False, True):
        model = tiny_model(seed=4, **overrides)
        model.set_activation_checkpointing(enabled)
        calls = []
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(99)
        model(ids, labels=labels).backward()
        # Really recomputed: each block runs again in the backward pass.
        assert len(calls) == model.config.num_layers * (2 if enabled else 1)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_dropout_only_in_training():
    model = tiny_model(hidden_dropout=0.2)
    ids = torch.randint(0, 512, (1, 16))
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_kv_cache_incremental_logits_equal_full_forward():
    model = tiny_model(seed=5).eval()
    ids = torch.randint(0, 512, (2, 24))
    full = model(ids)
    cache = KVCache(model.config.num_layers, batch_size=2, max_length=24)
    pieces = [model(ids[:, :10], kv_cache=cache)]  # prompt
    for i in range(10, 14):  # one token at a time
        pieces.append(model(ids[:, i:i + 1], kv_cache=cache))
    pieces.append(model(ids[:, 14:24], kv_cache=cache))  # a chunk after the cache: bottom-right causal mask
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KVCache holds batch 2 x 24 tokens"):
        model(ids[:, :1], kv_cache=cache)


def test_config_validation_names_the_field():
    base = PRESETS["tiny"]
    with pytest.raises(ValueError, match="num_attention_heads=3 must divide hidden_size=128"):
        ModelConfig(**{**base, "num_attention_heads": 3})
    with pytest.raises(ValueError, match="rotary_dim=33 must be even"):
        ModelConfig(**{**base, "rotary_dim": 33})
    with pytest.raises(ValueError, match="rotary_dim=128 must be even and at most head_dim=64"):
        ModelConfig(**{**base, "rotary_dim": 128})
    with pytest.raises(ValueError, match="ModelConfig.num_layers must be a positive integer"):
        ModelConfig(**{**base, "num_layers": 0})
    with pytest.raises(ValueError, match="ModelConfig.hidden_dropout must be in"):
        ModelConfig(**{**base, "hidden_dropout": 1.0})
    with pytest.raises(ValueError, match="ModelConfig.layernorm_epsilon must be positive"):
        ModelConfig(**{**base, "layernorm_epsilon": 0.0})
    with pytest.raises(ValueError, match="unknown model preset 'phi-2'.*'phi-1'"):
        get_preset("phi-2")
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['hidden'\]"):
        get_preset("tiny", hidden=3)


def test_vocab_padding():
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(51200) == 51200
    config = get_preset("demo", vocab_size=8001)
    assert config.vocab_size == 8001 and config.padded_vocab_size == 8064
    assert get_preset("demo", vocab_size=8001, make_vocab_size_divisible_by=128).padded_vocab_size == 8064
    assert tiny_model(vocab_size=500)(torch.zeros(1, 3, dtype=torch.long)).shape[-1] == 512


def test_flops_match_megatron_formula_and_peaks():
    config = get_preset("phi-1")
    b, s, L, h, V = 8, 2048, 24, 2048, 51200
    megatron = 72 * b * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert flops_per_token(config, s) * b * s == pytest.approx(megatron, rel=1e-12)
    assert flops_per_token(config, s, training=False) * 3 == flops_per_token(config, s)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("Some Future GPU") is None


def test_bf16_autocast_training_and_cached_decoding():
    model = tiny_model(seed=6)
    ids, labels = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - model(ids, labels=labels).item()) < 0.05
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()
    cache = KVCache(model.config.num_layers, batch_size=2, max_length=32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        full = model(ids).float()
        steps = torch.cat([model(ids[:, :16], kv_cache=cache)] +
                          [model(ids[:, i:i + 1], kv_cache=cache) for i in range(16, 32)], dim=1).float()
    assert cache.keys[0].dtype == torch.bfloat16
    # Logits have std ~0.23 here; bf16 rounding moves them by ~0.005, a different computation by far more.
    assert (steps - full).abs().max() < 0.02
    assert (full - model(ids)).abs().max() < 0.02
