"""The codec evaluation wing: ``clbench codec eval``.

Codecs x rate points over a set of items (images, labelled images, clips), measured by
pluggable metrics, with BD figures against anchors, complexity, and a report. Rooms:

- :mod:`.config`      the YAML (``benchmarks/codecs/*.yaml``) as validated dataclasses
- :mod:`.sources`     what is coded: ``SOURCES`` registry (image folder, dataset split)
- :mod:`.metrics`     what is measured: ``METRICS`` registry (PSNR-RGB, MS-SSIM, plug-ins)
- :mod:`.measure`     the loop: code every item at every point, per item and per frame
- :mod:`.bd`          BD-rate and BD-quality (BD-PSNR, BD-accuracy) over any metric column
- :mod:`.complexity`  parameters, kMACs/pixel (torch.utils.flop_counter), CPU latency
- :mod:`.report`      CSV, results.json, plots, report.md/html
- :mod:`.evaluate`    ``run`` (checks, then measures, then writes) and the CLI command

See docs/codecs.md ("Evaluation") for the plug points.
"""

from clbench.codecs.evaluation.complexity import complexity, count_macs
from clbench.codecs.evaluation.config import (
    Benchmark,
    Compare,
    ComplexityConfig,
    Curve,
    load_benchmark,
)
from clbench.codecs.evaluation.evaluate import run, run_eval_command
from clbench.codecs.evaluation.metrics import (
    METRICS,
    Coded,
    Column,
    Item,
    ItemSet,
    Metric,
    get_metric,
    register_metric,
)
from clbench.codecs.evaluation.sources import SOURCES, register_source

__all__ = [
    "METRICS",
    "SOURCES",
    "Benchmark",
    "Coded",
    "Column",
    "Compare",
    "ComplexityConfig",
    "Curve",
    "Item",
    "ItemSet",
    "Metric",
    "complexity",
    "count_macs",
    "get_metric",
    "load_benchmark",
    "register_metric",
    "register_source",
    "run",
    "run_eval_command",
]
