"""The phi-1 data recipe: heuristic and learned code filters, synthetic textbooks and exercises, dedup, decontamination.

Each stage streams records (json objects with a text field; every other field is kept) from jsonl, parquet or
source trees to jsonl or parquet, in parallel and resumably (`stage.run_filter_stage`). Only `embed` touches a model.
"""
