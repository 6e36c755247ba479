"""phi-1's learned quality filter: LLM-judge (or human) labels, a classifier on code-model embeddings, scoring.

    annotate(records, LLMClient(cfg), "labels.jsonl")           # {"id", "score", "label", "reply", ...} per file
    items, skipped = read_labels(["labels.jsonl"])              # LabeledItem(id, label, text or None)
    results = train_classifiers(features, labels)               # random forest + logistic regression, held out
    save_classifier("quality.joblib", results["random_forest"].model, meta)
    run_filter_stage("quality", inputs, output, QualityScorer("quality.joblib", threshold=0.5))

A record's id is its `id` field, else its `path`, else "sha1:" + the hash of its text, so labels made from a
sample join the corpus they came from. The classifier file is a joblib pickle with QUALITY.joblib.json beside it
(the embedding model it expects, its held-out metrics, the label counts); load only classifiers you trust.
"""

import hashlib
import heapq
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

from megaphi.curate.records import read_jsonl, write_atomic
from megaphi.curate.stage import Outcome

JUDGE_PROMPT = """Below is a source file. Determine its educational value for a student whose goal is to learn \
basic coding concepts. Clear, self-contained code that teaches algorithms, data structures or language features \
is worth a lot; configuration, boilerplate, auto-generated, data-heavy or obscure code is worth little.

```
{code}
```

Reply with one line "Score: N", N an integer from 0 (no educational value) to 10 (excellent textbook code).
Score:"""
SCORE_SCALE = 10
CLASSIFIERS = ("random_forest", "logistic_regression")
FORMAT = "megaphi-quality-classifier/1"
DROP_REASON = "quality below threshold"
LABEL_WORDS = {"1": 1, "true": 1, "yes": 1, "high": 1, "good": 1, "positive": 1,
               "0": 0, "false": 0, "no": 0, "low": 0, "bad": 0, "negative": 0}
_NUMBER = r"(-?\d+(?:\.\d+)?)"  # a minus sign is read, so "-3" is out of range rather than 3
_SCORE_PATTERNS = (re.compile(r"score[^\w-]{0,4}" + _NUMBER, re.IGNORECASE),  # "Score: 7", "**Score**: 7"
                   re.compile(_NUMBER + r"\s*(?:/|out of)\s*10\b", re.IGNORECASE),  # "7/10", "7 out of 10"
                   re.compile(r"^[^\w-]{0,3}" + _NUMBER + r"(?!\.?\d)"))  # a reply that starts with the number


def record_id(record: dict, id_key: str = "id", text_key: str = "text") -> str:
    """The record's id_key field, else its path, else "sha1:" + the hash of its text_key field (as a string)."""
    for key in (id_key, "path"):
        if record.get(key) is not None:
            return str(record[key])
    text = record.get(text_key)
    if not isinstance(text, str):  # every such record would share one id: the annotator would judge only one
        raise ValueError(f"a record has no {id_key!r}, 'path' or {text_key!r} field to name it by")
    return "sha1:" + hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()[:20]


def judge_prompt(text: str, max_chars: int = 4000) -> str:
    """The judge's prompt for one file, the file cut to its first max_chars characters."""
    return JUDGE_PROMPT.format(code=text[:max_chars])


def parse_score(reply: str, scale: int = SCORE_SCALE) -> float | None:
    """The 0..scale score in a judge's reply ("Score: 7", "7/10", or a reply starting with the number), or None."""
    for pattern in _SCORE_PATTERNS:
        match = pattern.search(reply)
        if match:
            value = float(match.group(1))
            return value if 0 <= value <= scale else None
    return None


def parse_label(value, threshold: float | None = None, where: str = "") -> int:
    """0 or 1 from a label (bool, 0/1, "yes"/"no", "high"/"low", ...) or, with threshold, a score >= threshold."""
    if threshold is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: score must be a number, got {value!r}")
        return int(value >= threshold)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise ValueError(f"{where}: label must be 0/1, true/false, yes/no, high/low or good/bad, got {value!r}")


@dataclass
class LabeledItem:
    """One labeled file: its id, 0/1 label, and its text when the label file carries it."""

    id: str
    label: int
    text: str | None = None


def read_labels(paths, id_key: str = "id", text_key: str = "text",
                label_threshold: float = SCORE_SCALE / 2) -> tuple[list[LabeledItem], int]:
    """(items, skipped) from label jsonl: a "label", else a "score" >= label_threshold; later lines win."""
    # Lines whose label and score are both null (an unparseable judge reply) are skipped and counted.
    items, skipped = {}, 0
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--labels {path}: no such file")
        for number, row in enumerate(read_jsonl(path), 1):
            where = f"--labels {path}:{number}"
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            if row.get("label") is not None:
                label = parse_label(row["label"], where=where)
            elif row.get("score") is not None:
                label = parse_label(row["score"], label_threshold, where)
            elif "label" in row or "score" in row:
                skipped += 1
                continue
            else:
                raise ValueError(f"{where}: no \"label\" or \"score\" field")
            text = row.get(text_key)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{where}: {text_key!r} is not a string")
            try:
                rid = record_id(row, id_key, text_key)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            items.pop(rid, None)  # a relabeled file moves to its latest position
            items[rid] = LabeledItem(rid, label, text)
    return list(items.values()), skipped


def attach_texts(items: list[LabeledItem], records, id_key: str = "id", text_key: str = "text") -> list[LabeledItem]:
    """Fills in the texts the labels lack from the corpus records; ValueError naming ids that are not there."""
    missing = {item.id: item for item in items if item.text is None}
    for record in records:
        if not missing:
            break
        item = missing.pop(record_id(record, id_key, text_key), None)
        if item is not None:
            item.text = record[text_key]
    if missing:
        some = ", ".join(sorted(missing)[:3])
        raise ValueError(f"{len(missing)} labels have no text and name ids not in --input (e.g. {some}); pass the "
                         "corpus they were annotated from as --input, or labels with a text field")
    return items


def sample_records(records, n: int, seed: int = 0, id_key: str = "id", text_key: str = "text") -> list[dict]:
    """A reproducible sample of n records (the n smallest hashes of seed and id), in input order; streams once."""
    heap = []  # (-hash, position, record): a max-heap of the n smallest
    for position, record in enumerate(records):
        h = hashlib.sha256(f"{seed}:{record_id(record, id_key, text_key)}".encode()).digest()[:8]
        key = -int.from_bytes(h, "big")
        if len(heap) < n:
            heapq.heappush(heap, (key, position, record))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, position, record))
    return [record for _, _, record in sorted(heap, key=lambda entry: entry[1])]


def annotate(records, client, output: str, *, id_key: str = "id", text_key: str = "text", max_chars: int = 4000,
             max_tokens: int = 16, temperature: float = 0.0, seed: int | None = 0,
             label_threshold: float = SCORE_SCALE / 2, concurrency: int = 8, progress: bool = True) -> dict:
    """Asks the judge about each record not yet in output (jsonl, appended, resumable); returns the counts."""
    # Each output line: {"id", "path"?, "score" (0..10 or null), "label" (0/1 or null), "reply", "model", "usage"};
    # an unparseable reply is written too (score null), so a rerun does not ask again.
    from megaphi.curate.llm import ResumableJsonl, run_concurrently

    jobs = []
    for record in records:
        job = {"id": record_id(record, id_key, text_key), "prompt": judge_prompt(record[text_key], max_chars),
               "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        if "path" in record:
            job["path"] = record["path"]
        jobs.append(job)
    counts, lock = {"scored": 0, "unparseable": 0, "positive": 0}, threading.Lock()
    with ResumableJsonl(output) as out:
        def write(job, completion):
            score = parse_score(completion.text)
            label = None if score is None else int(score >= label_threshold)
            line = {"id": job["id"], id_key: job["id"], **({"path": job["path"]} if "path" in job else {}),
                    "score": score, "label": label, "reply": completion.text[:200], "model": client.cfg.model,
                    "usage": completion.usage()}
            out.append(line)
            with lock:  # on_result runs in the request threads
                counts["unparseable" if score is None else "scored"] += 1
                counts["positive"] += label or 0

        run = run_concurrently(client, jobs, out.done_ids("id"), write, concurrency, progress, desc="annotate")
    return {"sample": len(jobs), "skipped_done": run.skipped, **counts, "failed": len(run.failed),
            "seconds": round(run.seconds, 3), **client.stats()}


@dataclass
class TrainedClassifier:
    """A fitted classifier and its metrics on the held-out split."""

    name: str
    model: object
    metrics: dict


def build_classifier(name: str, seed: int = 0, n_estimators: int = 200):
    """An unfitted scikit-learn classifier: "random_forest" (phi-1's) or the "logistic_regression" baseline."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "random_forest":
        return RandomForestClassifier(n_estimators=n_estimators, class_weight="balanced", random_state=seed,
                                      n_jobs=1)
    if name == "logistic_regression":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    raise ValueError(f"--classifier-type must be one of {CLASSIFIERS}, got {name!r}")


def heldout_metrics(y_true, scores, threshold: float = 0.5) -> dict:
    """Precision, recall, F1, accuracy (at threshold) and ROC AUC of scores against 0/1 labels."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    pred = (np.asarray(scores) >= threshold).astype(int)
    return {"precision": float(precision_score(y_true, pred, zero_division=0)),
            "recall": float(recall_score(y_true, pred, zero_division=0)),
            "f1": float(f1_score(y_true, pred, zero_division=0)),
            "accuracy": float(accuracy_score(y_true, pred)),
            "auc": float(roc_auc_score(y_true, scores)), "threshold": threshold,
            "n": int(len(y_true)), "positives": int(np.sum(y_true))}


def train_classifiers(features: np.ndarray, labels, names=CLASSIFIERS, test_fraction: float = 0.2, seed: int = 0,
                      n_estimators: int = 200) -> dict[str, TrainedClassifier]:
    """Each classifier fitted on a stratified train split and scored on the held-out rest (the same split)."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels, dtype=int)
    if len(y) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(y)} labels")
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    per_class = np.bincount(y, minlength=2)
    n_test = math.ceil(len(y) * test_fraction)
    if per_class.min() < 2 or n_test < 2 or len(y) - n_test < 2:
        raise ValueError(f"need at least 2 labeled files of each class and room for a held-out split of both: got "
                         f"{per_class[1]} positive and {per_class[0]} negative (--test-fraction {test_fraction})")
    x_train, x_test, y_train, y_test = train_test_split(features, y, test_size=n_test, stratify=y,
                                                        random_state=seed)
    results = {}
    for name in names:
        model = build_classifier(name, seed, n_estimators)
        model.fit(x_train, y_train)
        metrics = heldout_metrics(y_test, model.predict_proba(x_test)[:, 1])
        metrics["train_n"], metrics["train_positives"] = int(len(y_train)), int(y_train.sum())
        results[name] = TrainedClassifier(name, model, metrics)
    return results


def format_metrics(results: dict[str, TrainedClassifier]) -> str:
    """A table of held-out metrics, one row per classifier."""
    lines = [f"{'classifier':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'auc':>6} {'accuracy':>8}  held-out"]
    for r in results.values():
        m = r.metrics
        lines.append(f"{r.name:<20} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} {m['auc']:>6.3f} "
                     f"{m['accuracy']:>8.3f}  {m['n']} ({m['positives']} positive)")
    return "\n".join(lines)


def meta_path(path: str) -> str:
    """Where a classifier's metadata json lives: beside it, with .json appended."""
    return os.fspath(path) + ".json"


def save_classifier(path: str, model, meta: dict) -> None:
    """Writes the classifier (joblib) and its metadata json, each atomically (metadata last)."""
    import joblib
    import sklearn

    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        joblib.dump(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    meta = {"format": FORMAT, **meta, "sklearn_version": sklearn.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(meta_path(path), json.dumps(meta, indent=1) + "\n")


def load_classifier(path: str) -> tuple[object, dict]:
    """(classifier, metadata) that save_classifier wrote; ValueError naming --classifier when either is missing."""
    import joblib

    path = os.fspath(path)
    if not os.path.isfile(path) or not os.path.isfile(meta_path(path)):
        raise ValueError(f"--classifier {path}: needs the file and {meta_path(path)} (written by --train)")
    with open(meta_path(path)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"--classifier {path}: {meta_path(path)} is not a {FORMAT} file")
    return joblib.load(path), meta


class QualityScorer:
    """A picklable stage filter: keeps records whose classifier probability (written as quality_score) >= threshold."""
    # The embedding model and classifier load lazily, once per worker process (never pickled).

    def __init__(self, classifier: str, threshold: float = 0.5, text_key: str = "text", embed_overrides=None,
                 torch_threads: int | None = None, score_key: str = "quality_score"):
        if not 0 <= threshold <= 1:
            raise ValueError(f"--threshold must be between 0 and 1 (a probability), got {threshold}")
        self.classifier, self.threshold, self.text_key = os.fspath(classifier), threshold, text_key
        self.embed_overrides = dict(embed_overrides or {})
        self.torch_threads, self.score_key = torch_threads, score_key
        self._loaded = None

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None}  # workers load their own copy

    def load(self):
        """(embedder, classifier), loaded on first use."""
        if self._loaded is None:
            from megaphi.curate.embed import Embedder, EmbedderSpec

            if self.torch_threads:
                import torch

                torch.set_num_threads(self.torch_threads)
            model, meta = load_classifier(self.classifier)
            spec = embed_spec_from_meta(meta, self.embed_overrides)
            embedder = Embedder(spec)
            if embedder.dim != meta["embedder"]["hidden_size"]:
                raise ValueError(f"--classifier {self.classifier} was trained on {meta['embedder']['hidden_size']}-"
                                 f"dim features, but the embedding model gives {embedder.dim}")
            self._loaded = embedder, model
        return self._loaded

    def scores(self, texts) -> tuple[np.ndarray, int]:
        """(probabilities of the positive class, tokens embedded) of texts."""
        embedder, model = self.load()
        ids = embedder.tokenize(texts)
        return model.predict_proba(embedder.embed_ids(ids))[:, 1], sum(len(i) for i in ids)

    def __call__(self, records: list[dict]) -> Outcome:
        scores, tokens = self.scores([r[self.text_key] for r in records])
        outcome = Outcome(kept=[], counts={"tokens_embedded": tokens})
        for record, score in zip(records, scores):
            record[self.score_key] = round(float(score), 6)
            if score >= self.threshold:
                outcome.kept.append(record)
            else:
                outcome.dropped.append((record, DROP_REASON, {self.score_key: record[self.score_key]}))
        return outcome


def embed_spec_from_meta(meta: dict, overrides: dict):
    """The EmbedderSpec a classifier was trained with, with the given fields replaced (e.g. device, load)."""
    from megaphi.curate.embed import EmbedderSpec

    fields = {k: v for k, v in meta["embedder"].items() if k in EmbedderSpec.__dataclass_fields__}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if (overrides.get("load") or overrides.get("hf")) and overrides.get("backend") is None:
        fields["backend"] = "auto"  # another model: its own folder decides
    if overrides.get("load") is not None:
        fields["hf"] = None
    elif overrides.get("hf") is not None:
        fields["load"] = None
    return EmbedderSpec(**fields)
