"""Replay overhead of compressed exemplars: training step time of er-compressed (JPEG, a
learned codec) over raw er, and decoding throughput of the buffer inside the data loader.

Side by side in one process, interleaved (raw, jpeg, learned, raw, ...), on 64x64 images,
the Tiny-ImageNet ResNet-18 of benchmarks/tinyimagenet.yaml, a buffer of 2,000 exemplars,
batch 64 new + 64 replayed. The buffer decodes per batch in ``__getitems__`` (no cache of
decoded pixels, which would hold bytes the budget does not count). Goal: <= 15% for JPEG.

    python benchmarks/perf/replay_overhead.py --learned \
        "bmshj2018-factorized:checkpoint=runs/codecs/tin64-fact-N64M96-l0.0067/best.pth" \
        --out results/perf/replay_overhead.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from clbench.backbones import ResNet18
from clbench.codecs import get_codec
from clbench.memory import ExemplarBuffer
from clbench.records import write_json_atomic
from clbench.strategies.base import BackboneClassifier


def smooth_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c, f = rng.uniform(0, 1, 4)
        base = np.stack([a * xx + b * yy, b * np.sin(6 * f * xx) + c * yy, c * xx + a * yy], -1)
        out.append(np.clip(base * 180 + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--learned", default="bmshj2018-factorized:q=1,pretrained=false")
    p.add_argument("--exemplars", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/perf/replay_overhead.json")
    a = p.parse_args()
    torch.manual_seed(0)
    images = smooth_images(a.exemplars, 64, 0)
    tf = v2.Compose(
        [
            v2.RandomCrop(64, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    buffers = {}
    for name, spec in (("raw", "raw"), ("jpeg", "jpeg:q=50"), ("learned", a.learned)):
        buf = ExemplarBuffer(get_codec(spec), max_exemplars=a.exemplars)
        per = a.exemplars // 100
        buf.add_classes({c: images[c * per : (c + 1) * per] for c in range(100)})
        buffers[name] = buf
    model = BackboneClassifier(ResNet18(stem="imagenet", width=32), 100).to(
        memory_format=torch.channels_last
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    new_x = torch.stack([tf(torch.from_numpy(im).permute(2, 0, 1)) for im in images[:64]])
    new_y = torch.randint(0, 100, (64,))

    def loader(buf):
        return torch.utils.data.DataLoader(buf.dataset(tf), batch_size=64, shuffle=True)

    def step_time(buf) -> float:
        it = iter(loader(buf))
        t = time.perf_counter()
        for _ in range(a.steps):
            xm, ym, _ = next(it)
            x = torch.cat([new_x, xm]).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x, 100), torch.cat([new_y, ym]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t) / a.steps

    def decode_rate(buf) -> float:
        t = time.perf_counter()
        n = 0
        for xm, _, _ in loader(buf):
            n += len(xm)
        return n / (time.perf_counter() - t)

    times = {k: [] for k in buffers}
    rates = {k: [] for k in buffers}
    for r in range(a.repeats):
        for k, buf in buffers.items():
            times[k].append(step_time(buf))
            rates[k].append(decode_rate(buf))
        print(
            f"repeat {r}: " + "  ".join(f"{k} {times[k][-1] * 1000:.0f} ms/step" for k in times),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "threads": torch.get_num_threads(),
        "exemplars": a.exemplars,
        "buffer_bytes": {k: b.nbytes() for k, b in buffers.items()},
        "mean_bpp": {k: 8 * b.payload_bytes() / (len(b) * 64 * 64) for k, b in buffers.items()},
        "step_time_s": times,
        "median_step_time_s": med,
        "overhead_vs_raw": {k: med[k] / med["raw"] - 1 for k in med},
        "loader_images_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "learned_codec": a.learned,
    }
    print(
        json.dumps(
            {k: res[k] for k in ("overhead_vs_raw", "loader_images_per_s", "mean_bpp")}, indent=1
        )
    )
    write_json_atomic(Path(a.out), res)


if __name__ == "__main__":
    main()
