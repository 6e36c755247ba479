"""The learned quality filter's parts: judge-score parsing, labels, samples, embeddings of a real tiny checkpoint
(checked against transformers running the converted HF folder), classifiers with held-out metrics, and scoring."""

import base64
import json
import pickle
import random

import numpy as np
import pytest
import torch

from megaphi.curate import quality
from megaphi.curate.embed import Embedder, EmbedderSpec
from megaphi.hf import convert_to_hf, save_weights_checkpoint
from megaphi.model import ModelConfig, PhiForCausalLM

CONFIG = ModelConfig(vocab_size=8000, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     max_position_embeddings=128, rotary_dim=8, init_std=0.2)


def labeled_corpus(code_texts, n=60, seed=0):
    """Records with ids: real source files (label 1) and base64 blobs / number tables made from them (label 0)."""
    rng = random.Random(seed)
    records = [{"id": f"code-{i}", "text": t, "label": 1} for i, t in enumerate(code_texts[:n])]
    for i, t in enumerate(code_texts[n:n + n // 2]):
        records.append({"id": f"b64-{i}", "text": base64.b64encode(t[:800].encode()).decode(), "label": 0})
    for i in range(n - n // 2):
        rows = [[round(rng.uniform(-1e3, 1e3), 3) for _ in range(6)] for _ in range(rng.randint(5, 30))]
        records.append({"id": f"num-{i}", "text": json.dumps(rows), "label": 0})
    return records


@pytest.fixture(scope="module")
def code_texts(megatron_fixtures):
    with open(megatron_fixtures / "code_sample.jsonl") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, megatron_fixtures):
    torch.manual_seed(0)
    model = PhiForCausalLM(CONFIG)
    meta = {"config": {"data": {"tokenizer_type": "sentencepiece",
                                "tokenizer_model": str(megatron_fixtures / "code8k.model")}}}
    path = save_weights_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model.state_dict(), CONFIG, meta=meta)
    return path.parent


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return Embedder(EmbedderSpec(load=str(checkpoint), max_tokens=96, batch_size=8, device="cpu"))


@pytest.mark.parametrize("reply,score", [
    (" 7", 7.0), ("Score: 8\nThe code is clear.", 8.0), ("**Score:** 3", 3.0), ("score=10", 10.0),
    ("I would give it 6/10.", 6.0), ("6 out of 10", 6.0), (" 4.5 because", 4.5), ("Score: 11", None),
    ("Score: -3", None), ("no number here", None), ("", None), (" 12345", None), ("The year 1999 code", None),
])
def test_parse_score(reply, score):
    assert quality.parse_score(reply) == score


def test_judge_prompt_asks_for_educational_value_and_truncates():
    prompt = quality.judge_prompt("x = 1\n" * 1000, max_chars=60)
    assert "educational value for a student whose goal is to learn basic coding concepts" in prompt
    assert prompt.count("x = 1") == 10 and prompt.endswith("Score:")


def test_read_labels_forms_thresholds_and_errors(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [{"id": "a", "label": "high"}, {"id": "b", "label": False}, {"path": "c.py", "score": 7},
            {"id": "d", "score": 4.9, "text": "print(1)"}, {"id": "e", "score": None, "label": None},
            {"text": "def f(): pass", "label": 1}, {"id": "b", "label": "yes"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, skipped = quality.read_labels([str(path)], label_threshold=5)
    assert skipped == 1
    got = {i.id: (i.label, i.text) for i in items}
    text_id = quality.record_id({"text": "def f(): pass"})
    assert got == {"a": (1, None), "c.py": (1, None), "d": (0, "print(1)"), text_id: (1, "def f(): pass"),
                   "b": (1, None)}  # the later label of "b" wins
    path.write_text('{"id": "a", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"labels.jsonl:1: label must be"):
        quality.read_labels([str(path)])
    path.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=r":1: no \"label\" or \"score\""):
        quality.read_labels([str(path)])
    with pytest.raises(ValueError, match="--labels .*missing.jsonl: no such file"):
        quality.read_labels([str(tmp_path / "missing.jsonl")])


def test_ids_of_records_without_id_come_from_the_text_key():
    records = [{"content": f"x = {i}"} for i in range(5)]
    ids = {quality.record_id(r, text_key="content") for r in records}
    assert len(ids) == 5  # not one shared id: the judge would see one record of the five
    assert len(quality.sample_records(records, 5, text_key="content")) == 5
    with pytest.raises(ValueError, match="no 'id', 'path' or 'text' field"):
        quality.record_id({"content": "x"})


def test_attach_texts_joins_the_corpus_and_names_missing_ids():
    items = [quality.LabeledItem("a", 1), quality.LabeledItem("p.py", 0), quality.LabeledItem("z", 1, "kept")]
    quality.attach_texts(items, [{"id": "a", "text": "A"}, {"path": "p.py", "text": "P"}, {"id": "z", "text": "Z"}])
    assert [i.text for i in items] == ["A", "P", "kept"]
    with pytest.raises(ValueError, match=r"1 labels have no text .*\(e.g. nope\)"):
        quality.attach_texts([quality.LabeledItem("nope", 1)], [{"id": "a", "text": "A"}])


def test_sample_is_reproducible_nested_and_in_input_order():
    records = [{"id": f"r{i}", "text": str(i)} for i in range(500)]
    small = quality.sample_records(iter(records), 20, seed=3)
    assert small == quality.sample_records(records, 20, seed=3) and len(small) == 20
    assert [records.index(r) for r in small] == sorted(records.index(r) for r in small)
    big = quality.sample_records(records, 50, seed=3)
    assert all(r in big for r in small)  # a bigger sample extends a smaller one: annotation can grow
    assert quality.sample_records(records, 20, seed=4) != small
    assert len(quality.sample_records(records[:5], 20)) == 5


def test_embeddings_match_transformers_on_the_converted_folder(tmp_path, checkpoint, embedder, code_texts):
    texts = code_texts[:10] + ["", "x = 1"]
    ours = embedder.embed(texts)
    assert ours.shape == (12, 64) and ours.dtype == np.float32
    hf = tmp_path / "hf"
    convert_to_hf(checkpoint, hf)
    theirs = Embedder(EmbedderSpec(hf=str(hf), backend="transformers", max_tokens=96, batch_size=5, device="cpu"))
    assert theirs.backend == "transformers" and theirs.tokenize(texts) == embedder.tokenize(texts)
    assert np.abs(theirs.embed(texts) - ours).max() < 1e-4  # attention masks there, right padding here
    auto = Embedder(EmbedderSpec(hf=str(hf), max_tokens=96, batch_size=1, device="cpu"))
    assert auto.backend == "megaphi" and np.abs(auto.embed(texts) - ours).max() < 1e-4  # batch 1: no padding


def test_embedding_truncates_to_max_tokens(embedder, code_texts):
    long = code_texts[0]
    ids = embedder.tokenize([long, ""])
    assert len(ids[0]) == 96 and len(ids[1]) == 1
    a, b = embedder.embed([long, long + "\nprint('more')\n" * 50])
    assert np.array_equal(a, b)
    assert embedder.describe()["hidden_size"] == 64 and embedder.describe()["max_tokens"] == 96


def test_spec_errors():
    with pytest.raises(ValueError, match="exactly one of --load"):
        EmbedderSpec()
    with pytest.raises(ValueError, match="--embed-backend transformers needs --hf"):
        EmbedderSpec(load="x", backend="transformers")
    with pytest.raises(ValueError, match="--max-tokens and --batch-size must be >= 1"):
        EmbedderSpec(load="x", max_tokens=0)


def test_heldout_metrics_by_hand():
    m = quality.heldout_metrics(np.array([1, 1, 0, 0, 1]), np.array([0.9, 0.4, 0.6, 0.1, 0.8]))
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["auc"] == pytest.approx(5 / 6)
    assert m["n"] == 5 and m["positives"] == 3


@pytest.fixture(scope="module")
def trained(embedder, code_texts):
    records = labeled_corpus(code_texts)
    features = embedder.embed([r["text"] for r in records])
    labels = np.array([r["label"] for r in records])
    return records, features, quality.train_classifiers(features, labels, seed=0, n_estimators=50)


def test_classifiers_separate_code_from_blobs_on_heldout(trained):
    records, _, results = trained
    assert set(results) == {"random_forest", "logistic_regression"}
    for r in results.values():
        m = r.metrics
        assert m["n"] == 24 and m["positives"] == 12 and m["train_n"] == 96
        assert m["auc"] >= 0.9 and m["precision"] >= 0.8 and m["recall"] >= 0.8, (r.name, m)
    assert "random_forest" in quality.format_metrics(results)


def test_training_needs_both_classes():
    with pytest.raises(ValueError, match="at least 2 labeled files of each class"):
        quality.train_classifiers(np.zeros((10, 4)), np.ones(10, dtype=int))
    with pytest.raises(ValueError, match="--test-fraction must be between 0 and 1"):
        quality.train_classifiers(np.zeros((10, 4)), np.array([0, 1] * 5), test_fraction=1.5)


def test_save_load_and_score_records(tmp_path, trained, embedder):
    records, features, results = trained
    path = str(tmp_path / "q.joblib")
    quality.save_classifier(path, results["random_forest"].model, {"embedder": embedder.describe()})
    model, meta = quality.load_classifier(path)
    assert meta["format"] == quality.FORMAT and meta["embedder"]["hidden_size"] == 64
    want = results["random_forest"].model.predict_proba(features)[:, 1]
    assert np.array_equal(model.predict_proba(features)[:, 1], want)

    scorer = pickle.loads(pickle.dumps(quality.QualityScorer(path, threshold=0.5)))  # as a worker gets it
    batch = [dict(r) for r in records[::7]]
    outcome = scorer(batch)
    scores = {r["id"]: r["quality_score"] for r in batch}
    assert all(abs(scores[r["id"]] - round(float(w), 6)) < 1e-6 for r, w in zip(records[::7], want[::7]))
    assert {r["id"] for r in outcome.kept} == {i for i, s in scores.items() if s >= 0.5}
    assert all(reason == quality.DROP_REASON and d["quality_score"] < 0.5 for _, reason, d in outcome.dropped)
    assert len(outcome.kept) + len(outcome.dropped) == len(batch) and outcome.counts["tokens_embedded"] > 0
    assert all(r["label"] == 1 for r in outcome.kept) and outcome.dropped  # the classifier is right here
    with pytest.raises(ValueError, match="--threshold must be between 0 and 1"):
        quality.QualityScorer(path, threshold=5)
    (tmp_path / "q.joblib.json").unlink()
    with pytest.raises(ValueError, match="--classifier .*q.joblib: needs the file and"):
        quality.load_classifier(path)
