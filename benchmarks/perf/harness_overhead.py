"""Harness overhead: `clbench run --strategy finetune` vs a bare PyTorch loop.

Same model, data (the benchmark's first experience), transforms, epochs, batch size and
optimiser; the two are interleaved in one process (A B A B ...) so that machine noise hits
both alike, and the ratio of median training times is reported (goal <= 1.05). The
harness side trains through ``clbench.engine`` (the loop every strategy uses), so this is
the engine's per-step cost. The result file names the CPU it ran on.

    python benchmarks/perf/harness_overhead.py tinyimagenet --data-root ../shared/data \
        --set train.epochs=1 --repeats 3 --out results/perf/harness_overhead.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clbench.atomic import write_json_atomic
from clbench.backbones import create_backbone
from clbench.config import load_config
from clbench.provenance import cpu_info
from clbench.runner import run_one, seed_everything
from clbench.scenarios import build_scenario
from clbench.strategies.heads import IncrementalHead


def bare_loop(cfg, scenario, seed: int) -> float:
    """What a researcher would write by hand: DataLoader, model, SGD, cosine, CE."""
    seed_everything(seed)
    exp = scenario.train_stream[0]
    backbone = create_backbone(cfg.backbone, scenario.image_size)
    head = IncrementalHead(backbone.num_features, scenario.num_classes)
    model = torch.nn.Sequential(backbone, head.fc)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    n_seen = len(scenario.experience_classes[0])
    t = cfg.train
    # the same uint8 images and transform the harness uses, without Avalanche's dataset layer
    data = exp.dataset.with_transforms("raw")
    xs = torch.stack([data[i][0] for i in range(len(data))])
    ys = torch.tensor([data[i][1] for i in range(len(data))])
    tf = scenario.transforms["train"]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(ys)

        def __getitem__(self, i):
            return tf(xs[i]), ys[i]

    loader = DataLoader(DS(), batch_size=t.batch_size, shuffle=True)
    opt = torch.optim.SGD(
        model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, t.epochs * len(loader)))
    model.train()
    t0 = time.perf_counter()
    for _ in range(t.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x.contiguous(memory_format=fmt))[:, :n_seen], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - t0


def harness(cfg, scenario, seed: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        run_one(cfg, scenario, "finetune", seed, Path(d), stop_after=1, log=lambda s: None)
        rec = json.loads((Path(d) / "runs" / f"{cfg.name}__finetune__s{seed}.json").read_text())
    return rec["costs"]["train_time_s"][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmark", nargs="?", default="tinyimagenet")
    p.add_argument("--data-root")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/perf/harness_overhead.json")
    a = p.parse_args()
    cfg = load_config(a.benchmark, ["scenario.class_order=icarl", *a.set])
    if cfg.train.scheduler != "cosine" or cfg.train.optimizer != "sgd":
        sys.exit("this comparison mirrors SGD + cosine; use a benchmark configured so")
    scenario = build_scenario(cfg, a.data_root)
    times = {"clbench": [], "bare": []}
    for r in range(a.repeats):
        times["clbench"].append(harness(cfg, scenario, r))
        times["bare"].append(bare_loop(cfg, scenario, r))
        print(
            f"repeat {r}: clbench {times['clbench'][-1]:.2f}s  bare {times['bare'][-1]:.2f}s",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "benchmark": cfg.name,
        "images": len(scenario.train_stream[0].dataset),
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "threads": torch.get_num_threads(),
        "cpu": cpu_info(),
        "times_s": times,
        "median_s": med,
        "ratio_clbench_over_bare": med["clbench"] / med["bare"],
    }
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_clbench_over_bare")}))
    write_json_atomic(Path(a.out), result)


if __name__ == "__main__":
    main()
