"""Evidence for issue 15 (learned image compression II), resumable: every training is a
`clbench codec train ... --resume` run in its own folder (a finished one is skipped, a
killed one continues), every Kodak evaluation is a `clbench codec eval` whose results.json
is kept, and `report` rebuilds the figures from what is on disk.

Parts (run them in this order; `all` runs the four, then `report`):

- ``balanced``: one architecture, ``--seeds`` x ``--lambdas``, ``--steps`` steps each:
  ``standard`` and ``balanced-rd`` (Solution 1) from scratch; then, from each standard
  model, ``--ft-steps`` more steps of ``balanced-rd-qp`` (Solution 2) and, as its control,
  of ``standard``. Kodak BD-rate of each against its own seed's reference curve, mean and
  spread over seeds; per-step training time from the runs' own logs.
- ``stdet``: ``stdet-sma`` with the same architecture, seeds, lambdas and steps (the
  standard runs are shared with ``balanced``): validation steps and training time until it
  first reaches the standard run's final validation R-D loss, the trainable-parameter
  count over training, and the final Kodak BD-rate.
- ``bgvae``: the teacher (``bound=true``, wider), one variable-rate student with bound
  guidance and one without (equal steps), fixed-rate students (``lmin=lmax``) at the
  ``--lambdas``, Kodak R-D of the variable-rate models at ``--bg-lambdas`` (>= 5 rates from
  one model) with JPEG and WebP, the teacher's bound curve, progressive decoding of a
  partial bitstream, and a check that every Kodak bitstream decodes exactly.
- ``bgvae-seeds``: the guided and unguided students again at the other ``--bg-seeds``
  (same teacher), evaluated on Kodak: the guidance gain's spread over student seeds.

    python benchmarks/codecs/lic2_evidence.py all --data-root /path/to/data --jobs 2

Across sessions: the weights under runs/ are not committed, the training logs and the
evaluations are; a part whose Kodak evaluation exists is skipped whole, a part without one
is trained again where its weights are gone (finish a part within one session).

Data: Tiny-ImageNet train (64x64 crops) for training and its val split for validation;
Kodak (never trained on) for evaluation; all through --data-root / CLBENCH_DATA_ROOT.
Outputs: results/codecs/lic2/ (runs/ holds the checkpoints and training logs).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REF = {"balanced-rd": "standard", "stdet-sma": "standard", "balanced-rd-qp": "standard-ft"}


def run_cmd(cmd: list[str], log: Path) -> None:
    """Run one command, its output to ``log``; a failure stops the script with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        tail = log.read_text().splitlines()[-5:]
        sys.exit(f"failed ({rc}): {shlex.join(cmd)}\n" + "\n".join(tail))


def _cpus(runs: Path) -> str:
    """The CPUs the runs' logs say they trained on; logs from before logs said so are
    taken to be this machine's (a part is trained within one session)."""
    from clbench.codecs._io import train_log_cpu
    from clbench.provenance import cpu_info

    seen = {train_log_cpu(json.loads(f.read_text())) for f in runs.rglob("train_log.json")}
    here = cpu_info()["model"]
    if None in seen:
        seen.discard(None)
        seen.add(here if here in seen else f"{here} (assumed)")
    return ", ".join(sorted(seen)) or here


def _num(v: float, spec: str) -> str:
    """A table figure; n/a where it could not be computed (the notes under the table say why)."""
    return format(v, spec) if math.isfinite(v) else "n/a"


def _mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample std of the finite values (NaN: no overlap, or not monotone)."""
    ok = [v for v in vals if math.isfinite(v)]
    return (
        statistics.fmean(ok) if ok else math.nan,
        statistics.stdev(ok) if len(ok) > 1 else math.nan,
    )


def _last(run: Path) -> dict[str, Any]:
    """The last validation record of a training run."""
    return json.loads((run / "train_log.json").read_text())["history"][-1]


def complete(run: Path) -> bool:
    """A finished run (its last checkpoint says so)."""
    log = run / "train_log.json"
    if not (run / "last.pth").is_file() or not log.is_file():
        return False
    import torch

    meta = torch.load(run / "last.pth", map_location="cpu", weights_only=True)["clbench"]
    return bool(meta.get("complete"))


class Evidence:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.out = Path(a.out)
        self.runs = self.out / "runs"
        self.cli = [sys.executable, "-m", "clbench.codecs.cli"]
        self.jobs: list[tuple[list[str], Path]] = []
        # an evaluation runs alone, on the cores the --jobs trainings shared
        self.eval_threads = a.jobs * a.threads

    # -- training ------------------------------------------------------------------------
    def train(
        self,
        run: Path,
        spec: str,
        lmbda: float,
        steps: int,
        method: str,
        seed: int,
        opts: dict[str, Any] | None = None,
        lr: float | None = None,
    ) -> None:
        """Queue one `clbench codec train` run (skipped when complete)."""
        if complete(run):
            return
        a = self.a
        cmd = [
            *self.cli, "train", spec, "--train", a.train, "--val", a.val, "--data-root", a.data_root,
            "--out", str(run), "--lambda", str(lmbda), "--steps", str(steps),
            "--patch", str(a.patch), "--batch-size", str(a.batch_size), "--lr", str(lr or a.lr),
            "--schedule", "cosine", "--val-every", str(a.val_every), "--val-images", str(a.val_images),
            "--ckpt-every", str(a.val_every), "--method", method, "--seed", str(seed),
            "--threads", str(a.threads), "--no-progress", "--resume",
        ]  # fmt: skip
        for k, v in (opts or {}).items():
            cmd += ["--method-opt", f"{k}={v}"]
        self.jobs.append((cmd, run.parent / f"{run.name}.log"))

    def flush(self) -> None:
        """Run the queued trainings, ``--jobs`` at a time."""
        jobs, self.jobs = self.jobs, []
        with ThreadPoolExecutor(self.a.jobs) as pool:
            list(pool.map(lambda j: run_cmd(*j), jobs))

    def folder(self, method: str, seed: int, lmbda: float) -> Path:
        return self.runs / f"{method}-s{seed}" / f"lambda-{lmbda:g}"

    def train_beside_standard(self, method: str) -> None:
        """``method`` and its ``standard`` control, from scratch, at every seed and lambda."""
        a = self.a
        for s in a.seeds:
            for lm in a.lambdas:
                for m in ("standard", method):
                    self.train(self.folder(m, s, lm), a.arch, lm, a.steps, m, s)
        self.flush()

    def done(self, part: str) -> bool:
        """A part is done when its Kodak evaluation is on disk: its weights (not committed)
        are then no longer needed, and a later session skips its trainings."""
        return (self.out / f"eval-{part}" / "results.json").is_file()

    def balanced(self) -> None:
        a = self.a
        if self.done("balanced"):
            return
        self.train_beside_standard("balanced-rd")
        name = a.arch.partition(":")[0]
        for s in a.seeds:
            for lm in a.lambdas:
                start = f"{name}:checkpoint={self.folder('standard', s, lm) / 'best.pth'}"
                # fine-tuning: --ft-steps more steps at --ft-lr (cosine to lr_min), from the
                # standard model's best weights; its control continues with `standard`
                for m in ("standard-ft", "balanced-rd-qp"):
                    method = "standard" if m == "standard-ft" else m
                    self.train(self.folder(m, s, lm), start, lm, a.ft_steps, method, s, lr=a.ft_lr)
        self.flush()
        self.evaluate("balanced", ["standard", "balanced-rd", "standard-ft", "balanced-rd-qp"])

    def stdet(self) -> None:
        if self.done("stdet"):
            return
        self.train_beside_standard("stdet-sma")
        self.evaluate("stdet", ["standard", "stdet-sma"])

    @property
    def bg_spec(self) -> str:
        """The variable-rate student's architecture (every seed, guided or not)."""
        return f"bgvae:pretrained=false,width={self.a.bg_width}"

    def guided_opts(self) -> dict[str, Any]:
        """The ``--method-opt`` of a bound-guided student."""
        teacher = self.runs / "bgvae-teacher" / "best.pth"
        return {"teacher": teacher, "w_feat": self.a.w_feat, "w_rec": self.a.w_rec}

    def bg_student(self, kind: str, seed: int) -> Path:
        """A BG-VAE student's run folder: seed 0's are the ``bgvae`` part's own."""
        return self.runs / (f"bgvae-{kind}" if seed == 0 else f"bgvae-{kind}-s{seed}")

    def vr_curve(self, run: Path) -> str:
        """A variable-rate model's Kodak curve: its checkpoint at every ``--bg-lambdas``."""
        lams = ",".join(f"{v:g}" for v in self.a.bg_lambdas)
        return f"bgvae:checkpoint={run / 'best.pth'},lmbda=[{lams}]"

    def bgvae(self) -> None:
        a = self.a
        if self.done("bgvae") and (self.out / "eval-bgvae" / "extras.json").is_file():
            return
        bg = self.bg_spec
        teacher = self.runs / "bgvae-teacher"
        self.train(teacher, f"bgvae:pretrained=false,bound=true,width={a.teacher_width}",
                   a.bg_val_lambda, a.bg_steps, "bgvae", 0)  # fmt: skip
        self.train(self.bg_student("plain", 0), bg, a.bg_val_lambda, a.bg_steps, "bgvae", 0)
        fixed = [(self.runs / f"bgvae-fixed-{lm:g}", lm) for lm in a.lambdas]

        def queue_fixed(some: list[tuple[Path, float]]) -> None:
            for run, lm in some:
                self.train(run, f"{bg},lmin={lm},lmax={lm}", lm, a.fixed_steps, "bgvae", 0)

        # the guided student needs the finished teacher: the first fixed-rate run fills the
        # second worker beside the teacher and the rest run beside the guided student
        queue_fixed(fixed[:1])
        self.flush()
        self.train(self.bg_student("guided", 0), bg, a.bg_val_lambda, a.bg_steps, "bgvae", 0,
                   self.guided_opts())  # fmt: skip
        queue_fixed(fixed[1:])
        self.flush()
        curves = {
            "BG-VAE guided": self.vr_curve(self.bg_student("guided", 0)),
            "BG-VAE unguided": self.vr_curve(self.bg_student("plain", 0)),
            "fixed-rate": [
                f"bgvae:checkpoint={self.runs / f'bgvae-fixed-{lm:g}' / 'best.pth'}"
                for lm in a.lambdas
            ],
            "JPEG": "jpeg:q=[5,10,20,30,40,50,60,70,80,90]",
            "WebP": "webp:q=[5,10,20,30,40,50,60,70,80,90]",
        }
        self.eval_yaml("bgvae", curves, anchor="BG-VAE unguided")
        self.bgvae_extras()

    def bgvae_seeds(self) -> None:
        """The guided and unguided students again at ``--bg-seeds`` (the seed moves the
        student's initialisation and data order; the teacher is seed 0's), to measure the
        spread of the guidance gain. Seed 0 is the ``bgvae`` part's pair."""
        a = self.a
        seeds = [s for s in a.bg_seeds if s != 0]
        if not seeds or self.done("bgvae-seeds"):
            return
        guided = self.guided_opts()
        if not guided["teacher"].is_file():
            raise SystemExit(f"error: {guided['teacher']} missing: run the `bgvae` part first")
        for kind, opts in (("plain", None), ("guided", guided)):
            for s in seeds:
                self.train(self.bg_student(kind, s), self.bg_spec, a.bg_val_lambda, a.bg_steps,
                           "bgvae", s, opts)  # fmt: skip
        self.flush()
        curves = {
            f"BG-VAE {label}-s{s}": self.vr_curve(self.bg_student(kind, s))
            for s in seeds
            for kind, label in (("guided", "guided"), ("plain", "unguided"))
        }
        self.eval_yaml("bgvae-seeds", curves, anchor=f"BG-VAE unguided-s{seeds[0]}")

    # -- evaluation ----------------------------------------------------------------------
    def eval_yaml(self, part: str, curves: dict[str, Any], anchor: str) -> Path:
        dest = self.out / f"eval-{part}"
        if (dest / "results.json").is_file():
            return dest
        doc = {"name": f"lic2-{part}", "images": self.a.kodak, "anchor": anchor, "curves": curves}
        path = self.out / f"eval-{part}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        cmd = [*self.cli, "eval", str(path), "--data-root", self.a.data_root, "--out", str(dest),
               "--no-complexity", "--no-progress", "--threads", str(self.eval_threads)]  # fmt: skip
        run_cmd(cmd, self.out / f"eval-{part}.log")
        return dest

    def evaluate(self, part: str, methods: list[str]) -> None:
        name = self.a.arch.partition(":")[0]
        curves = {
            f"{m}-s{s}": [
                f"{name}:checkpoint={self.folder(m, s, lm) / 'best.pth'}" for lm in self.a.lambdas
            ]
            for m in methods
            for s in self.a.seeds
        }
        self.eval_yaml(part, curves, anchor=f"standard-s{self.a.seeds[0]}")

    def bgvae_extras(self) -> None:
        """Teacher bound curve, progressive decoding, exact decoding: extras.json."""
        dest = self.out / "eval-bgvae" / "extras.json"
        if dest.is_file():
            return
        import numpy as np
        import torch

        from clbench.codecs import get_codec
        from clbench.codecs._io import data_path, find_images
        from clbench.codecs.bgvae import bound_point, progressive_points
        from clbench.data import load_rgb

        torch.set_num_threads(self.eval_threads)
        files = find_images(data_path(self.a.kodak, self.a.data_root), "Kodak folder")
        images = [load_rgb(f) for f in files][: self.a.limit or None]
        teacher = get_codec(f"bgvae:checkpoint={self.runs / 'bgvae-teacher' / 'best.pth'}").model
        torch.manual_seed(0)
        bound = [bound_point(teacher, images, lm) for lm in self.a.bg_lambdas]
        mid = self.a.bg_lambdas[len(self.a.bg_lambdas) // 2]
        student = get_codec(
            f"bgvae:checkpoint={self.runs / 'bgvae-guided' / 'best.pth'},lmbda={mid:g}"
        )
        data = student.encode(images)
        decoded = student.decode(data)
        exact = 0
        for img, d in zip(images, decoded, strict=True):
            x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous().float() / 255
            with torch.inference_mode():
                ref = student.model(x)["x_hat"].clamp(0, 1)
            exact += int(np.array_equal(d, (ref[0] * 255).round().byte().permute(1, 2, 0).numpy()))
        progressive = [
            {k: p[k] for k in ("segments", "bpp_payload", "psnr")}
            for p in progressive_points(student, images, data)
        ]
        out = {
            "teacher_bound": bound,
            "progressive": {"lmbda": mid, "points": progressive},
            "exact_decodes": {"lmbda": mid, "exact": exact, "images": len(images)},
        }
        dest.write_text(json.dumps(out, indent=2))

    # -- report --------------------------------------------------------------------------
    def report(self) -> None:
        from clbench.codecs.evaluation.bd import bd
        from clbench.codecs.evaluation.config import Curve
        from clbench.codecs.evaluation.metrics import get_metric

        col = get_metric("psnr").columns[0]
        lines = ["# Learned image compression II (issue 15): evidence", ""]
        lines += ["Every figure below was computed by `benchmarks/codecs/lic2_evidence.py report`",
                  "from the runs and evaluations in this folder; the commands are in each",
                  "`runs/*.log`, `eval-*.log` and `eval-*/results.json`.", ""]  # fmt: skip
        a = self.a
        # the settings the runs record, not this call's flags (every part ends in a report,
        # and a part run with other --steps would otherwise misstate the others' settings)
        c = {"steps": a.steps, "batch_size": a.batch_size, "patch": a.patch, "lr": a.lr,
             "threads": a.threads}  # fmt: skip
        ft = {"steps": a.ft_steps, "lr": a.ft_lr}
        for d, m in ((c, "standard"), (ft, "standard-ft")):
            rec = self.folder(m, a.seeds[0], a.lambdas[0]) / "train_log.json"
            if rec.is_file():
                d.update({k: json.loads(rec.read_text())["config"][k] for k in d})
        lines += [f"Settings: `{a.arch}`, seeds {' '.join(map(str, a.seeds))}, λ "
                  f"{' '.join(f'{v:g}' for v in a.lambdas)}, {c['steps']} steps from scratch and "
                  f"{ft['steps']} fine-tuning steps (lr {ft['lr']:g}), batch {c['batch_size']} of "
                  f"{c['patch']}² crops, lr {c['lr']:g} cosine, {c['threads']} thread per training (how many "
                  "ran at once, and beside what, is in docs/lic-training.md: it moves the "
                  f"s/step columns); CPU: {_cpus(self.runs)}.", ""]  # fmt: skip
        summary: list[dict[str, Any]] = []

        def curves(part: str) -> dict[str, Curve]:
            res = json.loads((self.out / f"eval-{part}" / "results.json").read_text())
            return {c["label"]: Curve(c["label"], [], points=c["points"]) for c in res["curves"]}

        @functools.cache
        def log(m: str, s: int, lm: float) -> dict[str, Any]:
            """The train log of ``m``'s run at seed ``s`` and λ ``lm`` (read once)."""
            return json.loads((self.folder(m, s, lm) / "train_log.json").read_text())

        def logs(m: str) -> list[dict[str, Any]]:
            """The train logs of ``m``'s runs, every seed and λ."""
            return [log(m, s, lm) for s in self.a.seeds for lm in self.a.lambdas]

        def step_time(m: str) -> float:
            return statistics.fmean(
                r["history"][-1]["elapsed"] / r["history"][-1]["step"] for r in logs(m)
            )

        def method_opts(m: str) -> str:
            """The options the runs of ``m`` trained with, as their logs record them."""
            from clbench.codecs.train_methods import method_defaults

            seen = set()
            for r in logs(m):
                o = r["config"].get("method_opts") or {}
                if not o and method_defaults().get(r["config"]["method"]):
                    seen.add("not recorded (the YAML defaults of the commit that trained "
                             "them; see docs/lic-training.md)")  # fmt: skip
                else:
                    seen.add(f"`{json.dumps(o, sort_keys=True)}`" if o else "none")
            return " / ".join(sorted(seen))

        opts: dict[str, str] = {}

        def bd_rows(part: str, methods: list[str]) -> None:
            cs = curves(part)
            lines.extend(["| method | vs | BD-rate % per seed | mean | std | BD-PSNR dB per seed | mean | std | s/step | x ref |",
                          "|---|---|---|---:|---:|---|---:|---:|---:|---:|"])  # fmt: skip

            notes: list[str] = []
            for m in methods:
                ref = REF.get(m, "standard")
                res = [bd(cs[f"{ref}-s{s}"], cs[f"{m}-s{s}"], col) for s in self.a.seeds]
                vals = [r["bd_rate_pct"] for r in res]
                dbs = [r.get(col.bd, math.nan) for r in res]
                (mean, std), (mdb, sdb) = _mean_std(vals), _mean_std(dbs)
                t, tr = step_time(m), step_time(ref)
                opts[m] = method_opts(m)
                lines.append(
                    f"| {m} | {ref} | {', '.join(_num(v, '+.2f') for v in vals)} | "
                    f"{_num(mean, '+.2f')} | {_num(std, '.2f')} | "
                    f"{', '.join(_num(v, '+.3f') for v in dbs)} | {_num(mdb, '+.3f')} | "
                    f"{_num(sdb, '.3f')} | {t:.3f} | {t / tr:.2f} |"
                )
                notes += [f"`{m}` seed {s}: {r['note']}" for s, r in zip(self.a.seeds, res, strict=True)
                          if "note" in r]  # fmt: skip
                summary.append({"part": part, "method": m, "reference": ref, "bd_rate_mean_pct": mean,
                                "bd_rate_std_pct": std, "bd_rate_per_seed": vals,
                                "bd_psnr_mean_db": mdb, "bd_psnr_std_db": sdb, "bd_psnr_per_seed": dbs,
                                "s_per_step": t, "step_time_ratio": t / tr})  # fmt: skip
            lines.append("")
            lines.extend(f"- n/a: {n}" for n in notes)
            lines.extend(f"- `{m}` options: {opts[m]}" for m in methods)
            # the points themselves: where a BD figure is n/a they are the result
            lams = " ".join(f"{v:g}" for v in self.a.lambdas)
            lines.extend(["", f"Kodak points (bpp / PSNR dB at λ {lams}):", "",
                          "| curve | points |", "|---|---|"])  # fmt: skip
            for label, c in cs.items():
                pts = ", ".join(f"{p['bpp']:.3f} / {p['psnr']:.2f}" for p in c.points)
                lines.append(f"| {label} | {pts} |")
            lines.append("")

        lines += ["## Balanced R-D (Kodak BD-rate, PSNR, paired by seed)", ""]
        if (self.out / "balanced-m0" / "README.md").is_file():
            lines += ["The earlier run with offsets m = [0, 0]: [balanced-m0/](balanced-m0/README.md).", ""]  # fmt: skip
        if (self.out / "eval-balanced" / "results.json").is_file():
            bd_rows("balanced", ["balanced-rd", "standard-ft", "balanced-rd-qp"])
        else:
            lines += ["Not evaluated yet: `lic2_evidence.py balanced` resumes the trainings.", ""]
        if (self.out / "eval-stdet" / "results.json").is_file():
            lines += ["## STDET + SMA", ""]
            bd_rows("stdet", ["stdet-sma"])
            lines += ["| seed | lambda | standard final val loss | steps (s) to reach it: standard | stdet-sma | trainable at end |",
                      "|---|---|---:|---|---|---:|"]  # fmt: skip
            for s in self.a.seeds:
                for lm in self.a.lambdas:
                    hs, ht = (log(m, s, lm)["history"] for m in ("standard", "stdet-sma"))
                    target = hs[-1]["loss"]
                    hit = next((r for r in ht if r.get("loss", math.inf) <= target), None)
                    reach = f"{hit['step']} ({hit['elapsed']:.0f})" if hit else "not reached"
                    frac = ht[-1]["trainable_params"] / ht[0]["trainable_params"]
                    lines.append(
                        f"| {s} | {lm:g} | {target:.4f} | {hs[-1]['step']} ({hs[-1]['elapsed']:.0f}) | "
                        f"{reach} | {100 * frac:.0f}% |"
                    )
                    summary.append({"part": "stdet-reach", "seed": s, "lambda": lm, "target": target,
                                    "standard_steps": hs[-1]["step"], "standard_s": hs[-1]["elapsed"],
                                    "stdet_steps": hit["step"] if hit else None,
                                    "stdet_s": hit["elapsed"] if hit else None,
                                    "trainable": [(r["step"], r["trainable_params"]) for r in ht]})  # fmt: skip
            lines.append("")
        if (self.out / "eval-bgvae" / "results.json").is_file():
            cs = curves("bgvae")
            lines += ["## BG-VAE (Kodak)", "",
                      f"Students `bgvae:width={a.bg_width}`, teacher `bound=true,width={a.teacher_width}`, "
                      f"{a.bg_steps} steps each (validation λ {a.bg_val_lambda:g}), guidance w_feat "
                      f"{a.w_feat:g}, w_rec {a.w_rec:g}; fixed-rate students (`lmin=lmax=λ`) {a.fixed_steps} "
                      "steps each; seed 0; evaluated at λ "
                      f"{' '.join(f'{v:g}' for v in a.bg_lambdas)}. Trainings:", "",
                      "| run | steps | s | final val loss | val bpp | val PSNR dB |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
            bg_runs = ["teacher", "plain", "guided", *(f"fixed-{v:g}" for v in a.lambdas)]
            for r in bg_runs:
                h = _last(self.runs / f"bgvae-{r}")
                lines.append(f"| bgvae-{r} | {h['step']} | {h['elapsed']:.0f} | {h['loss']:.4f} | "
                             f"{h['bpp']:.3f} | {h['psnr']:.2f} |")  # fmt: skip
            lines += [
                "",
                "| curve | points (bpp / PSNR dB) | BD-rate % vs unguided |",
                "|---|---|---:|",
            ]
            for label, c in cs.items():
                b = bd(cs["BG-VAE unguided"], c, col)["bd_rate_pct"]
                pts = ", ".join(f"{p['bpp']:.3f}/{p['psnr']:.2f}" for p in c.points)
                lines.append(f"| {label} | {pts} | {_num(b, '+.2f')} |")
                summary.append({"part": "bgvae", "curve": label, "bd_rate_vs_unguided_pct": b,
                                "points": [(p["bpp"], p["psnr"]) for p in c.points]})  # fmt: skip
            ex = self.out / "eval-bgvae" / "extras.json"
            if ex.is_file():
                e = json.loads(ex.read_text())
                pts = ", ".join(f"{p['bpp']:.3f}/{p['psnr']:.2f}" for p in e["teacher_bound"])
                prog = ", ".join(
                    f"{p['segments']}: {p['bpp_payload']:.3f}/{p['psnr']:.2f}"
                    for p in e["progressive"]["points"]
                )
                x = e["exact_decodes"]
                lines += ["", f"Teacher bound (KL bpp / PSNR of its sampled reconstruction): {pts}", "",
                          f"Progressive decoding at lambda {e['progressive']['lmbda']:g} (segments: bpp / PSNR): {prog}", "",
                          f"Exact decoding: {x['exact']} of {x['images']} Kodak bitstreams decode to the forward pass's quantised reconstruction."]  # fmt: skip
                summary.append({"part": "bgvae-extras", **e})
            self.plot_bgvae(cs)
            if (self.out / "eval-bgvae-seeds" / "results.json").is_file():
                self.report_bgvae_seeds(cs, curves("bgvae-seeds"), lines, summary)
        (self.out / "README.md").write_text("\n".join(lines) + "\n")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        # the same figures flat, one row each (list-valued cells as JSON), for spreadsheets
        import pandas as pd

        flat = [
            {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
            for r in summary
        ]
        pd.DataFrame(flat).to_csv(self.out / "summary.csv", index=False)
        print("\n".join(lines))

    def report_bgvae_seeds(
        self,
        cs0: dict[str, Any],
        cs: dict[str, Any],
        lines: list[str],
        summary: list[dict[str, Any]],
    ) -> None:
        """Guided vs unguided per student seed (seed 0 from ``eval-bgvae``): the spread."""
        from clbench.codecs.evaluation.bd import bd
        from clbench.codecs.evaluation.metrics import get_metric

        col = get_metric("psnr").columns[0]
        pairs = {0: (cs0["BG-VAE unguided"], cs0["BG-VAE guided"])}
        pairs |= {
            s: (cs[f"BG-VAE unguided-s{s}"], cs[f"BG-VAE guided-s{s}"])
            for s in self.a.bg_seeds
            if s != 0 and f"BG-VAE guided-s{s}" in cs
        }
        lines += ["", "### Guidance over student seeds (same teacher)", "",
                  "| seed | guided val loss | unguided val loss | BD-rate % guided vs unguided | BD-PSNR dB |",
                  "|---:|---:|---:|---:|---:|"]  # fmt: skip
        rates, dbs = [], []
        for s, (u, g) in pairs.items():
            r = bd(u, g, col)
            rates.append(r["bd_rate_pct"])
            dbs.append(r.get(col.bd, math.nan))
            val = [_last(self.bg_student(k, s))["loss"] for k in ("guided", "plain")]
            lines.append(f"| {s} | {val[0]:.4f} | {val[1]:.4f} | {_num(rates[-1], '+.2f')} | "
                         f"{_num(dbs[-1], '+.3f')} |")  # fmt: skip
            summary.append({"part": "bgvae-seeds", "seed": s, "val_loss_guided": val[0],
                            "val_loss_unguided": val[1], "bd_rate_pct": rates[-1],
                            "bd_psnr_db": dbs[-1]})  # fmt: skip
        (mean, std), (mdb, sdb) = _mean_std(rates), _mean_std(dbs)
        n = sum(map(math.isfinite, rates))
        if n > 1:
            lines += ["", f"Mean over {n} seeds: BD-rate {mean:+.2f} % (std {std:.2f}), "
                      f"BD-PSNR {mdb:+.3f} dB (std {_num(sdb, '.3f')})."]  # fmt: skip

    def plot_bgvae(self, cs: dict[str, Any]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for label, c in cs.items():
            ax.plot([p["bpp"] for p in c.points], [p["psnr"] for p in c.points], "o-", label=label)
        ex = self.out / "eval-bgvae" / "extras.json"
        if ex.is_file():
            e = json.loads(ex.read_text())
            b = e["teacher_bound"]
            ax.plot([p["bpp"] for p in b], [p["psnr"] for p in b], "k--", label="teacher (bound)")
            pr = e["progressive"]["points"]
            ax.plot(
                [p["bpp_payload"] for p in pr], [p["psnr"] for p in pr], "x:", label="progressive"
            )
        ax.set_xlabel("bpp")
        ax.set_ylabel("PSNR RGB (dB)")
        ax.set_title("Kodak: BG-VAE")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out / "bgvae_rd.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["balanced", "stdet", "bgvae", "bgvae-seeds", "all", "report"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="results/codecs/lic2")
    p.add_argument("--train", default="tiny-imagenet-200/train")
    p.add_argument("--val", default="tiny-imagenet-200/val")
    p.add_argument("--kodak", default="kodak")
    p.add_argument(
        "--arch", default="eff-lic:pretrained=false,transform=conv,context=hyperprior,N=64,M=96"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0035, 0.0067, 0.013, 0.025])
    p.add_argument(
        "--steps",
        type=int,
        default=3000,
        help="steps of every from-scratch run (the per-run budget)",
    )
    p.add_argument(
        "--ft-steps", type=int, default=600, help="fine-tuning steps (Solution 2 and its control)"
    )
    p.add_argument("--ft-lr", type=float, default=1e-4, help="learning rate of fine-tuning")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--val-images", type=int, default=256)
    p.add_argument("--bg-width", type=int, default=64)
    p.add_argument("--teacher-width", type=int, default=96)
    p.add_argument("--bg-steps", type=int, default=6000, help="steps of each variable-rate run")
    p.add_argument(
        "--fixed-steps", type=int, default=3000, help="steps of each fixed-rate bgvae run"
    )
    p.add_argument("--bg-val-lambda", type=float, default=0.013)
    p.add_argument(
        "--bg-lambdas", type=float, nargs="+", default=[0.0025, 0.005, 0.01, 0.02, 0.04, 0.08]
    )
    p.add_argument(
        "--bg-seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (bgvae-seeds)"
    )
    p.add_argument("--w-feat", type=float, default=1.0)
    p.add_argument("--w-rec", type=float, default=0.1)
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (1 thread each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="only the first N Kodak images (extras)")
    a = p.parse_args()
    from clbench.data import resolve_data_root

    a.data_root = str(resolve_data_root(a.data_root))
    ev = Evidence(a)
    parts = ["balanced", "stdet", "bgvae", "bgvae-seeds"] if a.part == "all" else [a.part]
    for part in parts:
        if part != "report":
            getattr(ev, part.replace("-", "_"))()
    ev.report()


if __name__ == "__main__":
    main()
