"""Generation with the KV cache against plain full-forward loops, sampling reproducibility, top-p and stops."""

import pytest
import torch

from megaphi.generate import generate, sample_next
from megaphi.model import PhiForCausalLM, get_preset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A larger init spreads the logits so greedy continuations vary instead of repeating one token.
    return PhiForCausalLM(get_preset("tiny", init_std=0.2)).eval()


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_equals_argmax_loop_without_cache(model):
    prompts = torch.randint(0, 512, (3, 7))
    out = generate(model, prompts, max_new_tokens=12)
    assert len(out) == 3
    for prompt, got in zip(prompts.tolist(), out):
        assert got == greedy_without_cache(model, prompt, 12)
    assert len({tuple(o) for o in out}) > 1


def test_prompts_of_different_lengths_each_match_their_own_run(model):
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 100], [3, 3, 3], [42]]
    out = generate(model, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, out):
        assert got == greedy_without_cache(model, prompt, 6)


def test_model_mode_is_restored(model):
    model.train()
    try:
        generate(model, [[1, 2]], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_sampling_is_reproducible_with_a_generator(model):
    prompts = torch.randint(0, 512, (2, 5))
    runs = [generate(model, prompts, 16, temperature=1.0, generator=torch.Generator().manual_seed(seed))
            for seed in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0] != generate(model, prompts, 16)  # not greedy


def test_top_p_keeps_the_smallest_set_holding_top_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=1.0, top_p=0.8, generator=gen)
    assert set(drawn.tolist()) == {1, 3}  # 0.5 + 0.3 reaches 0.8
    frac = (drawn == 1).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.03  # renormalized over the kept tokens
    assert set(sample_next(logits, 1.0, 0.81, gen).tolist()) == {1, 2, 3}
    assert set(sample_next(logits, 1.0, 0.1, gen).tolist()) == {1}  # the top token always stays
    assert set(sample_next(logits, 1.0, 1.0, gen).tolist()) == {0, 1, 2, 3}
    assert sample_next(logits[:2], 0.0).tolist() == [1, 1]


def test_low_temperature_approaches_greedy(model):
    prompts = torch.randint(0, 512, (2, 5))
    sampled = generate(model, prompts, 8, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert sampled == generate(model, prompts, 8)


def test_eod_stop_ids_and_stop_strings(model):
    prompt = [[11, 22, 33]]
    full = generate(model, prompt, 10)[0]
    stop_token = full[4]
    first = full.index(stop_token)
    assert generate(model, prompt, 10, eod=stop_token) == [full[:first]]
    assert generate(model, prompt, 10, stop_ids=[stop_token]) == [full[:first]]

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    stop = f"<{full[2]}>"
    got = generate(model, prompt, 10, stop_strings=[stop], decode=decode)[0]
    assert got == full[:full.index(full[2]) + 1]  # the token that completed the stop string is kept


def test_vocab_size_masks_padded_rows(model):
    out = generate(model, [[1, 2, 3]], 5, vocab_size=2)
    assert all(t in (0, 1) for t in out[0])


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=64"):
        generate(model, [[1] * 60], 5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 5, top_p=0.0)
    with pytest.raises(ValueError, match="decode callback"):
        generate(model, [[1]], 5, stop_strings=["x"])
    assert generate(model, [[1, 2]], 0) == [[]]
