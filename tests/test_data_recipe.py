"""examples/data_recipe_phi1.py end to end, as a user runs it: 60 standard-library files plus planted duplicates
and a planted HumanEval solution, tools/serve.py on a tiny real checkpoint as the endpoint and embedder, into
indexed datasets; then the same command again, which must find every stage done and change nothing."""

import hashlib
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from megaphi.data.indexed_dataset import IndexedDataset
from megaphi.data.tokenizer import build_tokenizer
from megaphi.eval.problems import load_humaneval
from megaphi.hf import save_weights_checkpoint
from megaphi.model import ModelConfig, PhiForCausalLM

CONFIG = ModelConfig(vocab_size=8000, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     max_position_embeddings=512, rotary_dim=8, init_std=0.2)
# code8k ids: "\n" -> "    " -> "return" -> " data" -> "\n": the model's whole repertoire, so every exercise body
# it writes is "    return data\n" repeated (parses), and every textbook is non-empty.
NEXT_TOKEN = {12: 259, 259: 343, 343: 1018, 1018: 12}
PLANTED = "HumanEval/2"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def bigram_checkpoint(folder: Path, tokenizer_model: Path) -> Path:
    """A real checkpoint whose next token depends only on the last one (NEXT_TOKEN, else "    ")."""
    torch.manual_seed(0)
    model = PhiForCausalLM(CONFIG)
    with torch.no_grad():
        for layer in model.model.layers:  # attention and MLP add nothing: the last hidden state is LN(embedding)
            for linear in (layer.self_attn.dense, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        head = model.lm_head
        head.bias[259] = 20.0  # from any other token, enter the chain
        for source, target in NEXT_TOKEN.items():
            hidden = model.model.final_layernorm(model.model.embed_tokens.weight[source])
            head.weight[target] += 100.0 * hidden / hidden.square().sum()
    meta = {"config": {"data": {"tokenizer_type": "sentencepiece", "tokenizer_model": str(tokenizer_model)}}}
    return save_weights_checkpoint(folder, model.state_dict(), CONFIG, meta=meta).parent


def stdlib_corpus(path: Path) -> dict:
    """60 stdlib modules of 2-12 kB, 2 exact copies of two of them and a module holding a HumanEval solution."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(stdlib.glob("*.py")) if 2000 <= f.stat().st_size <= 12000][:60]
    rows = [{"id": f"stdlib/{f.name}", "text": f.read_text(encoding="utf-8")} for f in files]
    rows += [{"id": f"copy/{r['id']}", "text": r["text"]} for r in (rows[3], rows[17])]
    problem = next(p for p in load_humaneval() if p.task_id == PLANTED)
    planted = (f'"""Number helpers."""\nimport math\n\n\n{problem.prompt}{problem.reference}\n\n'
               "print(truncate_number(3.5))\n")
    rows.append({"id": "planted/humaneval.py", "text": planted})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": rows, "duplicates": 2}


def digests(folder: Path) -> dict:
    """sha256 of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_recipe_end_to_end_then_rerun_does_no_new_work(tmp_path, repo_root, megatron_fixtures):
    tokenizer = megatron_fixtures / "code8k.model"
    checkpoint = bigram_checkpoint(tmp_path / "tiny", tokenizer)
    corpus = stdlib_corpus(tmp_path / "stdlib.jsonl")
    work = tmp_path / "recipe"
    cmd = [sys.executable, str(repo_root / "examples" / "data_recipe_phi1.py"),
           "--input", str(tmp_path / "stdlib.jsonl"), "--workdir", str(work), "--serve-checkpoint", str(checkpoint),
           "--embed-load", str(checkpoint),
           "--embed-max-tokens", "128", "--proxy-labels", "--annotate-sample", "40", "--threshold", "0",
           "--num-textbooks", "4", "--num-exercises", "6", "--textbook-max-tokens", "24",
           "--exercise-max-tokens", "16", "--exercise-style", "completion", "--concurrency", "2",
           "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(tokenizer), "--workers", "2"]

    start = time.perf_counter()
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    first_seconds = time.perf_counter() - start
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((work / "recipe_summary.json").read_text())
    stages = summary["stages"]

    # Every stage reports, and each one's input is the previous one's output.
    assert set(stages) >= {"1_heuristics", "2_dedup", "3_quality", "4_textbooks", "5_exercises", "6_code",
                           "6_textbooks", "6_exercises", "quality_classifier"}
    for name, s in stages.items():
        if "records_in" in s:
            assert s["kept"] + sum(s["dropped"].values()) == s["records_in"], (name, s)
    assert stages["1_heuristics"]["records_in"] == len(corpus["rows"])
    assert stages["2_dedup"]["records_in"] == stages["1_heuristics"]["kept"]
    assert stages["3_quality"]["records_in"] == stages["2_dedup"]["kept"] == stages["3_quality"]["kept"]  # threshold 0
    assert stages["6_code"]["records_in"] == stages["3_quality"]["kept"]
    assert stages["4_textbooks"]["records_in"] == 4 and stages["5_exercises"]["records_in"] == 6
    assert stages["6_textbooks"]["records_in"] == stages["4_textbooks"]["kept"] > 0
    assert stages["6_exercises"]["records_in"] == stages["5_exercises"]["kept"] > 0
    assert len(read_jsonl(work / "3_labels_proxy.jsonl")) == 40

    # The planted copies are gone, and so is the HumanEval solution, with the task it came from.
    heuristics_kept = {r["id"] for r in read_jsonl(work / "1_heuristics.jsonl")}
    assert {"copy/" + corpus["rows"][i]["id"] for i in (3, 17)} <= heuristics_kept, "pick copies that pass"
    assert "planted/humaneval.py" in heuristics_kept
    assert sum(stages["2_dedup"]["dropped"].values()) >= corpus["duplicates"]
    dedup_kept = [r["id"] for r in read_jsonl(work / "2_dedup.jsonl")]
    assert sum(i.startswith("copy/") or i in {corpus["rows"][3]["id"], corpus["rows"][17]["id"]}
               for i in dedup_kept) == 2  # one of each pair
    assert [r["id"] for r in read_jsonl(work / "reports" / "heuristics.jsonl")] == ["stdlib/token.py"]  # generated
    report = {r["id"]: r for r in read_jsonl(work / "reports" / "decontaminate_code.jsonl")}
    assert report["planted/humaneval.py"]["matched"] == PLANTED, report
    assert "planted/humaneval.py" not in {r["id"] for r in read_jsonl(work / "6_code.jsonl")}
    assert stages["6_code"]["records_in"] - stages["6_code"]["kept"] >= 1

    # Three indexed datasets, one document per clean record, with the summary's token counts.
    assert set(summary["datasets"]) == {"code", "textbooks", "exercises"}
    for name, prefix in summary["datasets"].items():
        dataset = IndexedDataset(prefix)
        assert len(dataset) == stages[f"6_{name}"]["kept"], name
        assert int(dataset.sequence_lengths.sum()) == summary["tokens"][name] > 0, name
    exercise = read_jsonl(work / "6_exercises.jsonl")[0]
    assert exercise["solution"].startswith("    return data\n") and exercise["text"].startswith("# ")
    sp = build_tokenizer("GPTSentencePieceTokenizer", tokenizer)  # the documents are the records' tokens + EOD
    assert list(IndexedDataset(summary["datasets"]["exercises"])[0]) == sp.encode(exercise["text"]) + [sp.eod]
    assert summary["finetune_data_path"] == summary["datasets"]["exercises"]
    datasets = summary["datasets"]
    assert summary["pretrain_data_path"].split()[1::2] == [datasets["code"], datasets["textbooks"]]
    assert "pretrain:  --data-path" in first.stdout

    # The same command again: every stage finds its work done and leaves every output as it was.
    before = digests(work)
    mtimes = {p: p.stat().st_mtime_ns for p in work.rglob("*.jsonl")}
    start = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    again_seconds = time.perf_counter() - start
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = digests(work)
    changed = sorted(p for p in before if after.get(p) != before[p] and not p.endswith(".summary.json")
                     and p != "recipe_summary.json")
    assert changed == [], changed
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.jsonl")} == mtimes
    for name in ("4_textbooks", "5_exercises"):
        assert json.loads((work / f"{name}.jsonl.summary.json").read_text())["requested"] == 0
    stages_run = ["heuristics", "dedup", "quality: proxy labels", "quality: train", "quality: score", "textbook",
                  "exercises", "decontaminate code", "decontaminate textbooks", "decontaminate exercises",
                  "tokenize code", "tokenize textbooks", "tokenize exercises"]
    assert summary["up_to_date"] == [] and set(summary["seconds"]) == set(stages_run) - {"quality: proxy labels"}
    resummary = json.loads((work / "recipe_summary.json").read_text())
    assert resummary["up_to_date"] == stages_run, again.stdout[-3000:]
    assert "up to date, nothing redone: heuristics, dedup" in again.stdout
    for name in ("4_textbooks", "5_exercises"):  # totals over both runs; the second sent nothing
        assert resummary["stages"][name]["kept"] == stages[name]["kept"]
        assert resummary["stages"][name]["last_run"]["requests"] == 0
    assert resummary["stages"] == stages | {k: resummary["stages"][k] for k in ("4_textbooks", "5_exercises")}
    assert resummary["tokens"] == summary["tokens"]
    assert again_seconds < first_seconds, (again_seconds, first_seconds)
    print(f"first run {first_seconds:.1f} s, rerun {again_seconds:.1f} s")
