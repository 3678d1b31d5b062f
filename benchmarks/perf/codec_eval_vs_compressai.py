"""`clbench codec eval` against CompressAI's own `python -m compressai.utils.eval_model`.

Same architecture, same checkpoint, same images, one thread each: the mean bpp (ours:
entropy-coded payload, CompressAI's definition) and PSNR must agree to 1e-3, and we
report the wall-time ratio of the two commands (each a fresh process, as users run them).

    python benchmarks/perf/codec_eval_vs_compressai.py --arch bmshj2018-factorized \
        --checkpoint runs/codecs/x/last.pth --images /path/to/kodak
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clbench.codecs._io import write_json, write_text
from clbench.provenance import cpu_info


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if res.returncode:
        sys.exit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return wall, res.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", default="results/perf/codec_eval_vs_compressai")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        theirs_cmd = [
            py,
            "-m",
            "compressai.utils.eval_model",
            "checkpoint",
            args.images,
            "-a",
            args.arch,
            "-p",
            args.checkpoint,
        ]
        t_theirs, out = run(theirs_cmd, env)
        theirs = json.loads(out[out.index("{") :])["results"]
        ours_cmd = [
            py,
            "-m",
            "clbench.codecs.cli",
            "eval",
            "--images",
            args.images,
            "--codec",
            f"{args.arch}:checkpoint={args.checkpoint}",
            "--threads",
            "1",
            "--no-progress",
            # CompressAI's eval_model measures no complexity; compare like with like
            "--no-complexity",
            "--out",
            tmp,
        ]
        t_ours, _ = run(ours_cmd, env)
        ours = json.loads((Path(tmp) / "results.json").read_text())["curves"][0]["points"][0]

    def first(v):
        return v[0] if isinstance(v, list) else v

    cmp = {
        "bpp": (ours["bpp_payload"], first(theirs["bpp"])),
        "psnr_rgb": (ours["psnr"], first(theirs["psnr-rgb"])),
        "ms_ssim_rgb": (ours["ms_ssim"], first(theirs["ms-ssim-rgb"])),
        "encoding_time_s": (ours["enc_s"], first(theirs["encoding_time"])),
        "decoding_time_s": (ours["dec_s"], first(theirs["decoding_time"])),
    }
    result = {
        "commands": {"compressai": " ".join(theirs_cmd), "clbench": " ".join(ours_cmd)},
        "means": {k: {"clbench": a, "compressai": b, "diff": a - b} for k, (a, b) in cmp.items()},
        "bpp_with_container": ours["bpp"],
        "wall_s": {
            "clbench": t_ours,
            "compressai": t_theirs,
            "ratio_clbench_over_compressai": t_ours / t_theirs,
        },
        "agree_to_1e-3": abs(cmp["bpp"][0] - cmp["bpp"][1]) < 1e-3
        and abs(cmp["psnr_rgb"][0] - cmp["psnr_rgb"][1]) < 1e-3,
        "loadavg_at_end": os.getloadavg(),
        "cpu": cpu_info(),
    }
    write_json(Path(args.out).with_suffix(".json"), result)
    lines = [
        "# `clbench codec eval` vs `compressai.utils.eval_model`",
        "",
        f"- CompressAI: `{result['commands']['compressai']}`",
        f"- clbench: `{result['commands']['clbench']}`",
        f"- reproduce: `python {' '.join(sys.argv)}`",
        "",
        "| mean over images | clbench | CompressAI | difference |",
        "|---|---:|---:|---:|",
    ]
    for k, v in result["means"].items():
        lines.append(f"| {k} | {v['clbench']:.6f} | {v['compressai']:.6f} | {v['diff']:+.2e} |")
    w = result["wall_s"]
    lines += [
        "",
        f"bpp and PSNR agree to 1e-3: **{result['agree_to_1e-3']}** (bpp here is the entropy-coded payload, "
        f"CompressAI's definition; with our container framing it is {ours['bpp']:.5f}).",
        "",
        f"Wall time of the whole command: clbench {w['clbench']:.1f} s, CompressAI {w['compressai']:.1f} s, "
        f"ratio {w['ratio_clbench_over_compressai']:.3f} (shared machine, load average at the end "
        f"{result['loadavg_at_end'][0]:.1f}; CPU {result['cpu']['model']}, "
        f"{result['cpu']['logical_cores']} logical cores).",
        "",
    ]
    write_text(Path(args.out).with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
