"""Why does a CL-LoRA run forget? Task-ID vs within-task accuracy, and prototype drift.

Loads a CL-LoRA run checkpoint (``results/checkpoints/<run>.pt``, written after every
experience; copy it before the run completes, which deletes it) and, on the test images of
every seen task, reports:

- ``cil``: class-incremental accuracy (argmax over all seen classes, what the run records);
- ``til``: within-task accuracy (argmax over the true task's classes only);
- ``task_id``: how often the argmax falls in the true task;
- ``cil_fresh``: class-incremental accuracy with every task's prototypes recomputed under the
  CURRENT shared adapters (a diagnostic, not the method): if it recovers the old tasks, the
  shared adapters' drift since those prototypes were taken is what forgets.

    python benchmarks/analysis/cl_lora_diagnose.py tinyimagenet-ptm CKPT --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json

import torch

from clbench.config import load_config
from clbench.runner import build_strategy
from clbench.scenarios import build_scenario


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchmark")
    ap.add_argument("checkpoint")
    ap.add_argument("--strategy", default="cl-lora")
    ap.add_argument("--data-root")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.benchmark)
    sc = build_scenario(cfg, args.data_root)
    s = build_strategy(cfg, args.strategy, sc, 0, torch.device("cpu"), False)
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    s.load_state_dict(ck["strategy"])
    T = len(s.task_classes)
    tests = [e.dataset.eval() for e in sc.test_stream[:T]]
    trains = [e.dataset.eval() for e in sc.train_stream[:T]]
    stale = s.prototypes.clone()
    fresh = stale.clone()
    with torch.no_grad():  # every task's prototypes under the current shared adapters
        for t, data in enumerate(trains):
            f, y = s.extract(lambda x, t=t: s.net.features(x, t), data, 250)
            for c in s.task_classes[t]:
                fresh[c] = f[y == c].mean(0)
    rows = []
    for t, data in enumerate(tests):
        classes = torch.as_tensor(s.task_classes[t])
        stats = {"task": t, "n": 0, "cil": 0, "til": 0, "task_id": 0, "cil_fresh": 0}
        for x, y, *_ in torch.utils.data.DataLoader(data, batch_size=250):
            y = torch.as_tensor(y)
            s.prototypes = stale
            logits = s.predict(x)
            pred = logits.argmax(1)
            stats["cil"] += int((pred == y).sum())
            stats["til"] += int((classes[logits[:, classes].argmax(1)] == y).sum())
            stats["task_id"] += int(torch.isin(pred, classes).sum())
            s.prototypes = fresh
            stats["cil_fresh"] += int((s.predict(x).argmax(1) == y).sum())
            stats["n"] += len(y)
        n = stats.pop("n")
        rows.append({k: (v if k == "task" else round(v / n, 4)) for k, v in stats.items()})
    drift = torch.nn.functional.cosine_similarity(stale, fresh, dim=1)
    out = {
        "checkpoint": args.checkpoint,
        "tasks_seen": T,
        "per_task": rows,
        "mean": {
            k: round(sum(r[k] for r in rows) / T, 4) for k in ("cil", "til", "task_id", "cil_fresh")
        },
        "prototype_cosine_stale_vs_fresh_per_task": [
            round(float(drift[torch.as_tensor(c)].mean()), 4) for c in s.task_classes
        ],
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
