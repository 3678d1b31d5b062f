"""The efficient-LIC study of issue 14 as one resumable driver.

    python benchmarks/codecs/lic_study.py --data-root /path/to/data            # everything
    python benchmarks/codecs/lic_study.py --data-root /path/to/data --dry-run  # the commands

Phases, in order; each is skipped when its outputs exist, and a killed training resumes
bit-identically (every training command runs with ``--resume``), so the same command
continues an interrupted study:

1. ``grid``: every transform x context of ``lic_study.yaml`` (3 x 3), one λ, the same
   training-time budget each (``--grid-minutes``), each followed in the same job by its
   Kodak evaluation (one point, with complexity: parameters, encoder/decoder kMACs per
   pixel, latency) into ``RESULTS/grid/<model>/``; JPEG once into ``RESULTS/grid/JPEG/``.
2. ``grid-eval``: whatever ``grid`` left unevaluated. Each model's rate saving against
   JPEG at its PSNR; the grid is ranked by validation loss (Kodak never chooses).
3. ``final``: the ``--best`` models (or ``--final SPEC ...``), one after the other: the
   four final λ (``--final-minutes`` each, one command per λ), then at once, while the
   weights exist, the model's Kodak R-D curve beside JPEG, WebP, AVIF and the published
   anchors into ``RESULTS/final/<model>/`` (BD-rates against JPEG and WebP, R-D plot,
   complexity). A session may finish one model; the same command goes on with the next.
4. ``final-eval``: whatever ``final`` left unevaluated.
5. ``report``: ``RESULTS/README.md``: grid table, final BD table, the Pareto plot of the
   final models' BD-rate against decoder kMACs/pixel, training curves, the commands as run.

``--jobs N`` runs N trainings at once (grid models, or one λ each in the final phase),
each with ``--threads`` threads: ``--jobs 2 --threads 1`` keeps both cores of a 2-core
machine busy with two single-thread trainings; an evaluation that runs alone gets
``N x --threads``.

Runs go to ``--runs`` (weights stay there: 18-46 MB each, never committed), results to
``--results``. Each finished training's ``train_log.json`` (which says it finished, and its
best validation loss) is copied to ``RESULTS/logs/``, which is committed: a later session
without the weights skips the trainings and evaluations already done and ranks the grid
from those logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
Cmd = tuple[list[str], str]  # a clbench command's arguments, and why it runs


def load_settings(argv: list[str] | None = None) -> argparse.Namespace:
    cfg = yaml.safe_load((HERE / "lic_study.yaml").read_text())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.environ.get("CLBENCH_DATA_ROOT"))
    p.add_argument("--runs", default="runs/lic-study", help="training run folders")
    p.add_argument("--results", default="results/codecs/lic-study", help="reports")
    p.add_argument("--transforms", nargs="+", default=cfg["transforms"])
    p.add_argument("--contexts", nargs="+", default=cfg["contexts"])
    p.add_argument("--N", type=int, default=cfg["N"])
    p.add_argument("--M", type=int, default=cfg["M"])
    p.add_argument("--grid-lambda", type=float, default=cfg["grid_lambda"])
    p.add_argument("--grid-minutes", type=float, default=cfg["grid_minutes"])
    p.add_argument("--best", type=int, default=cfg["best"])
    p.add_argument("--final", nargs="+", metavar="SPEC", help="final architectures (skip ranking)")
    p.add_argument("--final-lambdas", nargs="+", type=float, default=cfg["final_lambdas"])
    p.add_argument("--final-minutes", type=float, default=cfg["final_minutes"])
    p.add_argument("--threads", type=int, default=cfg["threads"])
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    p.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training option of the recipe (e.g. lr=3e-4)",
    )
    p.add_argument(
        "--phases",
        nargs="+",
        default=["grid", "grid-eval", "final", "final-eval", "report"],
        choices=["grid", "grid-eval", "final", "final-eval", "report"],
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N Kodak images (checks)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    if not a.data_root:
        p.error("pass --data-root or set CLBENCH_DATA_ROOT")
    a.recipe_opts = dict(cfg["recipe"])
    for item in a.recipe:
        key, _, val = item.partition("=")
        a.recipe_opts[key.strip().replace("_", "-")] = yaml.safe_load(val)
    a.data, a.classic = cfg["data"], cfg["classic"]
    a.runs, a.results = Path(a.runs), Path(a.results)
    return a


def arch(transform: str, context: str, a: argparse.Namespace) -> str:
    return f"eff-lic:transform={transform},context={context},N={a.N},M={a.M}"


def label(spec: str) -> str:
    """``eff-lic:transform=convnext,context=channel,...`` -> ``convnext-channel``."""
    opts = dict(kv.split("=", 1) for kv in spec.partition(":")[2].split(","))
    return f"{opts['transform']}-{opts['context']}"


class Study:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.log = a.results / "commands.md"
        self._lock = threading.Lock()

    # -- running commands ---------------------------------------------------------------
    def run_all(self, jobs: list[Cmd | list[Cmd]]) -> None:
        """Run jobs, ``--jobs`` at a time; a job is one ``clbench`` command or a list run in
        order (a training, then its evaluation, while its weights exist). Stops after them
        if any failed."""
        seqs = [j if isinstance(j, list) else [j] for j in jobs]
        with ThreadPoolExecutor(max(1, self.a.jobs)) as pool:
            failed = [f for f in pool.map(self._run_seq, seqs) if f]
        if failed:
            sys.exit(f"lic_study: {failed[0]}")

    def _run_seq(self, cmds: list[Cmd]) -> str | None:
        for args, why in cmds:
            failed = self._run_one(args, why)
            if failed:
                return failed
        return None

    def _run_one(self, args: list[str], why: str) -> str | None:
        text = shlex.join(["clbench", *args])
        with self._lock:
            print(f"\n# {why}\n{text}", flush=True)
            if self.a.dry_run:
                return None
            self.a.results.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a") as f:
                f.write(f"\n- {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {why}:\n\n")
                f.write(f"  ```bash\n  {text}\n  ```\n")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.a.threads)}
        res = subprocess.run([sys.executable, "-m", "clbench", *args], env=env)
        if res.returncode:
            return f"this command failed (exit {res.returncode}); fix it and rerun: {text}"
        return None

    def train_cmd(
        self, spec: str, lambdas: list[float], minutes: float, out: Path, why: str
    ) -> tuple[list[str], str]:
        a = self.a
        args = ["codec", "train", spec, "--data-root", a.data_root]
        args += ["--train", a.data["train"], "--val", a.data["val"], "--out", str(out)]
        args += ["--lambda", *(f"{lm:g}" for lm in lambdas), "--minutes", f"{minutes:g}"]
        args += ["--threads", str(a.threads), "--resume", "--no-progress"]
        for k, v in a.recipe_opts.items():
            args += _flag(k, v).split()
        return args, why

    def eval_cmd(
        self, name: str, curves: dict[str, Any], anchors: list[str], why: str, threads: int = 0
    ) -> Cmd:
        """Write the benchmark YAML beside its results; the ``clbench codec eval`` command."""
        a = self.a
        bench = {
            "name": f"lic-study-{name}",
            "description": why,
            "images": a.data["kodak"],
            "anchor": anchors,
            "anchors": a.data["anchors"],
            "curves": curves,
        }
        path = a.results / f"{name}.yaml"
        if not a.dry_run:
            from clbench.atomic import write_text_atomic

            write_text_atomic(path, yaml.safe_dump(bench, sort_keys=False, width=200))
        args = [
            "codec",
            "eval",
            str(path),
            "--data-root",
            a.data_root,
            "--out",
            str(a.results / name),
        ]
        args += ["--threads", str(threads or a.threads), "--no-progress"]
        args += ["--limit", str(a.limit)] if a.limit else []
        return args, why

    # -- phases -------------------------------------------------------------------------
    def grid_specs(self) -> list[str]:
        return [arch(t, c, self.a) for t in self.a.transforms for c in self.a.contexts]

    def grid_ckpt(self, spec: str) -> Path:
        return self.a.runs / "grid" / label(spec) / "best.pth"

    def grid(self) -> None:
        """Each grid model's training, then at once its one-point Kodak evaluation (with
        complexity) in the same job: a session that ends keeps every finished model's
        figures, though the weights are not kept."""
        a = self.a
        jobs: list[Cmd | list[Cmd]] = self._jpeg_eval()
        for spec in self.grid_specs():
            why = f"grid: {label(spec)} at lambda {a.grid_lambda:g}, {a.grid_minutes:g} min"
            out = a.runs / "grid" / label(spec)
            evals = self._model_eval(spec)
            # a finished run whose weights went with an earlier session, unevaluated: again
            if not self._finished(out) or (evals and not self.grid_ckpt(spec).is_file()):
                job = [self.train_cmd(spec, [a.grid_lambda], a.grid_minutes, out, why), *evals]
            else:
                job = evals
            if job:
                jobs.append(job)
        self.run_all(jobs)
        self.archive()

    def _jpeg_eval(self) -> list[Cmd]:
        """JPEG's grid evaluation, unless it is on disk."""
        if self._fresh(self.grid_result("JPEG"), []):
            return []
        return [self.grid_eval_cmd("JPEG", self.a.classic["JPEG"])]

    def _model_eval(self, spec: str) -> list[Cmd]:
        """A grid model's evaluation, unless it is on disk and newer than its weights."""
        ckpt = self.grid_ckpt(spec)
        if self._fresh(self.grid_result(label(spec)), [ckpt]):
            return []
        return [self.grid_eval_cmd(label(spec), f"eff-lic:checkpoint={ckpt}")]

    def grid_result(self, name: str) -> Path:
        return self.a.results / "grid" / name / "results.json"

    def grid_eval_cmd(self, name: str, spec: str) -> Cmd:
        why = f"grid-eval: Kodak, {name}"
        return self.eval_cmd(f"grid/{name}", {name: spec}, [], why)

    def grid_eval(self) -> None:
        """What ``grid`` left unevaluated (its weights must still be here)."""
        self.run_all(
            [*self._jpeg_eval(), *(c for s in self.grid_specs() for c in self._model_eval(s))]
        )

    def ranking(self) -> list[dict[str, Any]]:
        """Grid models, best first by their best validation R-D loss (Tiny-ImageNet val, the
        training λ): Kodak only reports, it never chooses. Each row also has the model's
        Kodak point, its rate saving against JPEG at that PSNR and its complexity."""

        def points(name: str) -> list[dict[str, Any]]:
            f = self.grid_result(name)
            return json.loads(f.read_text())["curves"][0]["points"] if f.is_file() else []

        jp = sorted((p["psnr"], math.log(p["bpp"])) for p in points("JPEG"))
        rows = []
        for spec in self.grid_specs():
            pts = points(label(spec))
            if not pts or not jp:
                continue
            pt = pts[0]
            inside = jp[0][0] <= pt["psnr"] <= jp[-1][0]
            jpeg_bpp = math.exp(np.interp(pt["psnr"], *zip(*jp, strict=True)))
            rows.append(
                {
                    "label": label(spec),
                    "spec": spec,
                    "val_loss": self._best_val(self.a.runs / "grid" / label(spec)),
                    "bpp": pt["bpp"],
                    "psnr": pt["psnr"],
                    "saving_vs_jpeg_pct": 100 * (pt["bpp"] / jpeg_bpp - 1) if inside else math.nan,
                    **{k: pt.get(k) for k in ("params", "enc_kmacs_px", "dec_kmacs_px")},
                    **{k: pt.get(k) for k in ("enc_latency_ms", "dec_latency_ms")},
                }
            )
        return sorted(rows, key=lambda r: r["val_loss"])

    def final_specs(self) -> list[str]:
        if self.a.final:
            return self.a.final
        rows = self.ranking()
        if self.a.dry_run and not rows:
            return ["<best grid model 1>", "<best grid model 2>"][: self.a.best]
        return [r["spec"] for r in rows[: self.a.best]]

    def final_dir(self, spec: str) -> Path:
        return self.a.runs / "final" / _name(spec)

    def final_ckpts(self, spec: str) -> list[Path]:
        return [d / "best.pth" for d in self.final_run_dirs(_name(spec))]

    def final_run_dirs(self, name: str) -> list[Path]:
        """The run folders of final model ``name``, one per λ (the folder itself for one)."""
        lams = self.a.final_lambdas
        d = self.a.runs / "final" / name
        return [d] if len(lams) == 1 else [d / f"lambda-{lm:g}" for lm in lams]

    def final(self) -> None:
        """Each final model in turn: its λ trainings (``--jobs`` at once), then at once its
        Kodak R-D evaluation into ``RESULTS/final/<model>/`` while its weights exist. A
        session that ends keeps every finished model's figures (weights are not kept); the
        same command then goes on with the next model."""
        from clbench.provenance import cpu_info

        here = cpu_info()["model"]
        other = {r["label"]: r["cpu"] for r in self.final_rows() if r["cpu"] not in (here, None)}
        if other:  # the budget is minutes: a faster CPU trains more steps
            print(
                f"warning: final models trained on another CPU ({other}), this one is {here!r}: "
                "equal minutes are not equal steps, compare within one CPU",
                file=sys.stderr,
            )
        for spec in self.final_specs():
            evals = self._final_eval(spec)
            # finished runs whose weights went with an earlier session, unevaluated: again
            redo = bool(evals) and not all(c.is_file() for c in self.final_ckpts(spec))
            self.run_all(self._final_trains(spec, redo))
            self.archive()
            self.run_all(evals)

    def _final_trains(self, spec: str, redo: bool) -> list[Cmd]:
        a = self.a
        d, lams = self.final_dir(spec), a.final_lambdas
        todo = [  # each λ's run folder is its checkpoint's (final_ckpts has the layout)
            (lm, ckpt.parent)
            for lm, ckpt in zip(lams, self.final_ckpts(spec), strict=True)
            if not self._finished(ckpt.parent) or (redo and not ckpt.is_file())
        ]
        if not todo:
            return []
        if a.jobs > 1 and len(lams) > 1:  # one command per λ, in the folders one would make
            why = f"final: {spec} at lambda {{:g}}, {a.final_minutes:g} min"
            return [
                self.train_cmd(spec, [lm], a.final_minutes, out, why.format(lm)) for lm, out in todo
            ]
        why = f"final: {spec} at {len(lams)} lambdas, {a.final_minutes:g} min each"
        return [self.train_cmd(spec, lams, a.final_minutes, d, why)]

    def final_result(self, spec: str) -> Path:
        return self.a.results / "final" / _name(spec) / "results.json"

    def _final_eval(self, spec: str) -> list[Cmd]:
        """A final model's Kodak R-D curve beside JPEG, WebP, AVIF and the published
        anchors (BD-rates against JPEG and WebP, R-D and Pareto plots), unless on disk
        and newer than its weights. Alone on the machine: all ``--jobs x --threads``."""
        ckpts = self.final_ckpts(spec)
        if self._fresh(self.final_result(spec), ckpts):
            return []
        arch_name = spec.partition(":")[0]
        curves: dict[str, Any] = {_name(spec): [f"{arch_name}:checkpoint={c}" for c in ckpts]}
        curves.update(self.a.classic)
        why = f"final-eval: Kodak R-D of {_name(spec)}, BD-rates vs JPEG and WebP"
        threads = max(1, self.a.jobs) * self.a.threads
        return [self.eval_cmd(f"final/{_name(spec)}", curves, ["JPEG", "WebP"], why, threads)]

    def final_eval(self) -> None:
        """What ``final`` left unevaluated (its weights must still be here)."""
        self.run_all([c for s in self.final_specs() for c in self._final_eval(s)])

    def final_rows(self) -> list[dict[str, Any]]:
        """One row per evaluated final model: its BD-rates (PSNR) against JPEG and WebP,
        the PSNR range they cover, and its complexity (the mean over its λ). Every model
        evaluated so far counts, whichever session (or ``--final``) made it."""
        from clbench.codecs._io import train_log_cpu

        rows = []
        for f in sorted((self.a.results / "final").glob("*/results.json")):
            res = json.loads(f.read_text())
            name = f.parent.name
            pts = next(c["points"] for c in res["curves"] if c["label"] == name)
            row: dict[str, Any] = {"label": name, "points": len(pts)}
            for k in ("params", "enc_kmacs_px", "dec_kmacs_px", "enc_latency_ms", "dec_latency_ms"):
                vals = [p[k] for p in pts if p.get(k) is not None]
                row[k] = float(np.mean(vals)) if vals else None
            # Steps per λ and the CPU they ran on (the budget is minutes): the training logs'
            # own provenance, else the evaluation's (it runs in the training's job).
            docs = [self._log_doc(d) for d in self.final_run_dirs(name)]
            steps = [doc["history"][-1]["step"] for doc in docs if doc.get("history")]
            row["steps"] = [min(steps), max(steps)] if steps else None
            row["histories"] = [doc.get("history", []) for doc in docs]  # one per λ
            cpus = {train_log_cpu(doc) for doc in docs}
            cpus.discard(None)
            row["cpu"] = (
                ", ".join(sorted(cpus))
                if cpus
                else res.get("environment", {}).get("cpu", {}).get("model")
            )
            row["bpp"] = [min(p["bpp"] for p in pts), max(p["bpp"] for p in pts)]
            row["psnr"] = [min(p["psnr"] for p in pts), max(p["psnr"] for p in pts)]
            row["classic_bd"] = []  # the other codecs against JPEG, for scale
            for r in res["bd_rate"]:
                if r["metric"] != "psnr":
                    continue
                if r["curve"] == name:
                    row[f"bd_vs_{r['anchor']}"] = r["bd_rate_pct"]
                    row[f"range_vs_{r['anchor']}"] = r.get("psnr_range")
                elif r["anchor"] == "JPEG":
                    row["classic_bd"].append(r)
            rows.append(row)
        return rows

    def report(self) -> None:
        from clbench.atomic import write_bytes_atomic, write_text_atomic
        from clbench.plots import curves_png

        a = self.a
        self.archive()
        lines = [
            "# The efficient-LIC study (issue 14)",
            "",
            "Written by `benchmarks/codecs/lic_study.py` (the commands it ran, with times, are in",
            "[commands.md](commands.md)). Training data: Tiny-ImageNet train (64x64); Kodak is never",
            "trained on nor used to choose a model (validation: Tiny-ImageNet val).",
            "",
            f"Recipe: `{' '.join(_flag(k, v) for k, v in a.recipe_opts.items())}`, threads: {a.threads}.",
            "",
        ]
        rows = self.ranking()
        if rows:
            lines += [
                f"## Grid: {len(self.grid_specs())} models, lambda {a.grid_lambda:g}, {a.grid_minutes:g} min each",
                "",
                "Ranked by the best validation loss (λ·255²·MSE + bpp on Tiny-ImageNet val, the",
                f"training λ); the best {a.best} go on to the final λ. Rate saving vs JPEG: the",
                "model's Kodak bpp against JPEG's at the same PSNR (JPEG interpolated linearly in",
                "log-bpp), a one-point BD-rate (n/a outside JPEG's PSNR range). Each model's",
                "report (with its complexity): `grid/<model>/report.md`.",
                "",
                "| model | params | enc kMACs/px | dec kMACs/px | steps | val loss | Kodak bpp | PSNR dB | saving vs JPEG |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                log = self._log(a.runs / "grid" / r["label"])
                lines.append(
                    f"| {r['label']} | {_f(r['params'], 0)} | {_f(r['enc_kmacs_px'], 1)} | "
                    f"{_f(r['dec_kmacs_px'], 1)} | {log[-1]['step'] if log else ''} | "
                    f"{_f(r['val_loss'], 4)} | {r['bpp']:.4f} | {r['psnr']:.2f} | "
                    f"{_f(r['saving_vs_jpeg_pct'], 1, ' %')} |"
                )
            lines.append("")
            lines += self._pareto(
                rows,
                "saving_vs_jpeg_pct",
                "grid_pareto.png",
                ylabel="rate saving vs JPEG at equal PSNR (%)",
                title=f"Grid: R-D against decoder complexity (lambda {a.grid_lambda:g})",
            )
        finals = self.final_rows()
        if finals:
            lams = ", ".join(f"{x:g}" for x in a.final_lambdas)
            lines += [
                f"## Final: the best {len(finals)} at lambda {lams}, {a.final_minutes:g} min each",
                "",
                "BD-rate on PSNR-RGB (akima, CompressAI's convention) of each model's 4-point",
                "Kodak curve against JPEG and WebP, over the PSNR range both cover (negative: fewer",
                "bits). Complexity: the mean over the model's λ. The budget is minutes, so the steps",
                "it buys depend on the CPU: compare models trained on the same one. Each model's full",
                "report (R-D plot with AVIF and the published anchors, BD table, per-image CSV):",
                "`final/<model>/report.md`.",
                "",
                "| model | params | enc kMACs/px | dec kMACs/px | dec ms (Kodak) | steps per λ | trained on | bpp | PSNR dB | BD-rate vs JPEG | PSNR range | BD-rate vs WebP | PSNR range |",
                "|---|---:|---:|---:|---:|---|---|---|---|---:|---|---:|---|",
            ]
            for r in finals:
                rng = [r.get(f"range_vs_{x}") for x in ("JPEG", "WebP")]
                rng_s = [f"{g[0]:.2f}-{g[1]:.2f} dB" if g else "n/a" for g in rng]
                lines.append(
                    f"| [{r['label']}](final/{r['label']}/report.md) | {_f(r['params'], 0)} | "
                    f"{_f(r['enc_kmacs_px'], 1)} | {_f(r['dec_kmacs_px'], 1)} | "
                    f"{_f(r['dec_latency_ms'], 0)} | {_range(r['steps'])} | {r['cpu'] or '?'} | "
                    f"{r['bpp'][0]:.3f}-{r['bpp'][1]:.3f} | "
                    f"{r['psnr'][0]:.2f}-{r['psnr'][1]:.2f} | {_f(r.get('bd_vs_JPEG'), 1, ' %')} | "
                    f"{rng_s[0]} | {_f(r.get('bd_vs_WebP'), 1, ' %')} | {rng_s[1]} |"
                )
            ref = [f"{r['curve']} {_f(r['bd_rate_pct'], 1, ' %')}" for r in finals[0]["classic_bd"]]
            lines += (
                ["", f"In the same evaluation, against JPEG: {', '.join(ref)}.", ""]
                if ref
                else [""]
            )
            lines += self._equal_steps(finals)
            lines += self._pareto(
                finals,
                "bd_vs_JPEG",
                "final_pareto.png",
                ylabel="BD-rate vs JPEG on Kodak (%)",
                title="Final models: R-D against decoder complexity",
            )
        curves: dict[str, tuple[list[float], list[float]]] = {}
        logs = a.results / "logs"
        run_dirs = {a.runs / f.parent.relative_to(logs) for f in logs.rglob("train_log.json")}
        run_dirs |= {f.parent for f in a.runs.rglob("train_log.json")}
        for run_dir in sorted(run_dirs):
            log = [r for r in self._log(run_dir) if "psnr" in r]
            if log:
                name = str(run_dir.relative_to(a.runs))
                curves[name] = ([r["step"] for r in log], [r["psnr"] for r in log])
        if curves and not a.dry_run:
            png = curves_png(
                curves,
                xlabel="step",
                ylabel="validation PSNR (dB)",
                title="Training curves (Tiny-ImageNet val)",
            )
            write_bytes_atomic(a.results / "training_curves.png", png)
            lines += ["## Training curves", "", "![validation PSNR](training_curves.png)", ""]
        if a.dry_run:
            print("\n".join(lines))
            return
        write_text_atomic(a.results / "README.md", "\n".join(lines))
        print(f"\n# report: {a.results / 'README.md'}")

    def _equal_steps(self, finals: list[dict[str, Any]]) -> list[str]:
        """When the final models' minute budgets bought different steps (a costlier model,
        or another CPU), the one comparison the logs still allow: validation at the last
        step every model logged, per λ. Not a fair race either (each cosine decays over its
        own plan: see the lr)."""
        steps = [r["steps"] for r in finals if r["steps"]]
        if len(steps) < 2 or max(s[1] for s in steps) <= 1.1 * min(s[0] for s in steps):
            return []
        lines = [
            "### Validation at equal steps",
            "",
            "The minute budget bought the models different numbers of steps (a step's cost",
            "depends on the model and on the CPU: see 'trained on'), so the Kodak BD-rates above",
            "compare budgets as much as designs. The training logs allow one step-matched look:",
            "each model's Tiny-ImageNet validation at the last step all of them logged, per λ.",
            "The learning rate (lr) is where each model's own cosine had got to by then.",
            "",
            "| λ | step | model | val loss | PSNR dB | bpp | lr |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for i, lm in enumerate(self.a.final_lambdas):
            logs = {
                f["label"]: {r["step"]: r for r in f["histories"][i] if "loss" in r} for f in finals
            }
            common = set.intersection(*(set(v) for v in logs.values()))
            if not common:
                continue
            at = max(common)
            for n, by_step in logs.items():
                r = by_step[at]
                lines.append(
                    f"| {lm:g} | {at} | {n} | {r['loss']:.4f} | {_f(r.get('psnr'), 2)} | "
                    f"{_f(r.get('bpp'), 4)} | {_f(r.get('lr'), 6)} |"
                )
        return [*lines, ""]

    def _pareto(
        self, rows: list[dict[str, Any]], key: str, png: str, *, ylabel: str, title: str
    ) -> list[str]:
        """Rows' ``key`` against decoder kMACs/pixel as ``RESULTS/png``; its Markdown."""
        from clbench.atomic import write_bytes_atomic
        from clbench.plots import scatter_png

        pts = {
            r["label"]: (r["dec_kmacs_px"], r[key])
            for r in rows
            if r["dec_kmacs_px"] and math.isfinite(r.get(key, math.nan))
        }
        if not pts or self.a.dry_run:
            return []
        img = scatter_png(
            pts, xlabel="decoder kMACs / pixel", ylabel=ylabel, title=title, logx=True
        )
        write_bytes_atomic(self.a.results / png, img)
        return [f"![{title}]({png})", ""]

    # -- helpers ------------------------------------------------------------------------
    def archive(self) -> None:
        """Copy the log of every finished training under ``--runs`` to ``RESULTS/logs/``."""
        from clbench.atomic import write_text_atomic

        if self.a.dry_run:
            return
        for f in sorted(self.a.runs.rglob("train_log.json")):
            doc = json.loads(f.read_text())
            if doc.get("complete"):
                rel = f.parent.relative_to(self.a.runs)
                write_text_atomic(self.a.results / "logs" / rel / "train_log.json", f.read_text())

    def _log_doc(self, run_dir: Path) -> dict[str, Any]:
        """A run's train_log.json: the live one, else the archived copy, else {}."""
        for f in (run_dir / "train_log.json", self._archived(run_dir)):
            if f.is_file():
                return json.loads(f.read_text())
        return {}

    def _archived(self, run_dir: Path) -> Path:
        return self.a.results / "logs" / run_dir.relative_to(self.a.runs) / "train_log.json"

    def _log(self, run_dir: Path) -> list[dict[str, Any]]:
        return self._log_doc(run_dir).get("history", [])

    def _finished(self, run_dir: Path) -> bool:
        """Finished by its archived log (a live unfinished run resumes with ``--resume``)."""
        f = self._archived(run_dir)
        return f.is_file() and bool(json.loads(f.read_text()).get("complete"))

    def _best_val(self, run_dir: Path) -> float:
        doc = self._log_doc(run_dir)
        losses = [r["loss"] for r in doc.get("history", []) if "loss" in r]
        best = doc.get("best_val", min(losses) if losses else None)
        return math.inf if best is None else best

    def _fresh(self, out: Path, inputs: list[Path]) -> bool:
        """``out`` exists and is newer than every input; inputs that are gone (weights
        from another session) count as older when their run's archived log is finished."""
        if not out.is_file():
            return False
        for p in inputs:
            if p.is_file():
                if p.stat().st_mtime >= out.stat().st_mtime:
                    return False
            elif not self._finished(p.parent):
                return False
        return True


def _range(v: list[int] | None) -> str:
    if not v:
        return "?"
    return f"{v[0]:,}" if v[0] == v[1] else f"{v[0]:,}-{v[1]:,}"


def _name(spec: str) -> str:
    """A final model's folder and curve name: its grid label, else the spec itself."""
    return label(spec) if spec.startswith("eff-lic:") else spec


def _flag(key: str, value: Any) -> str:
    if isinstance(value, bool):  # --mosaic
        return f"--{key}" if value else ""
    return f"--{key} {value}"


def _f(v: Any, nd: int, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:,.{nd}f}{unit}"


def main(argv: list[str] | None = None) -> int:
    a = load_settings(argv)
    study = Study(a)
    phases = {
        "grid": study.grid,
        "grid-eval": study.grid_eval,
        "final": study.final,
        "final-eval": study.final_eval,
        "report": study.report,
    }
    for name in a.phases:
        phases[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
