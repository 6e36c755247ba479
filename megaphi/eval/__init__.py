"""Code evaluation: HumanEval and MBPP pass@k, every program run in a sandbox (CLI: tools/evaluate_code.py).

sandbox.py runs untrusted programs (sandbox_child.py is the confined side), problems.py holds the benchmarks,
metrics.py pass@k, samplers.py the completion sources, evaluate.py the scoring and training_hook.py
`--code-eval`. Import from the modules: this package imports nothing, so the sandbox needs no torch.
"""
