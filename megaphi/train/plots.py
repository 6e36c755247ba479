"""Loss and throughput curves from a metrics.jsonl, drawn to PNG with matplotlib."""

import json
from pathlib import Path


def read_metrics(path: str | Path) -> dict[str, list[dict]]:
    """Records of a metrics.jsonl grouped by type (train, valid, test); a later record for an iteration wins."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: metrics file not found")
    by_type: dict[str, dict[int, dict]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # the line a killed (or still running) training was writing
            raise ValueError(f"{path}:{number}: not a JSON record") from None
        by_type.setdefault(record.get("type", "train"), {})[record["iteration"]] = record
    return {kind: [records[i] for i in sorted(records)] for kind, records in by_type.items()}


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Writes loss.png (train and validation loss) and throughput.png (tokens/s, MFU) to out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = records.get("train", [])
    if not train:
        raise ValueError(f"{metrics_path}: no training records to plot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*_series(train, "loss"), label="train")
    for split in ("valid", "test"):
        x, y = _series(records.get(split, []), f"{split}_loss")
        if x:
            ax.plot(x, y, "o-" if split == "valid" else "s", label=split)
    ax.set(xlabel="iteration", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    mfu_x, mfu_y = _series(train, "mfu")
    fig, axes = plt.subplots(1, 2 if mfu_x else 1, figsize=(12 if mfu_x else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(*_series(train, "tokens_per_s"))
    ax.set(xlabel="iteration", ylabel="tokens/s", title="throughput")
    ax.grid(alpha=0.3)
    if mfu_x:
        ax = axes[0][1]
        ax.plot(mfu_x, [100 * v for v in mfu_y])
        ax.set(xlabel="iteration", ylabel="MFU (%)", title="model FLOPs utilisation")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out_dir / "throughput.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
