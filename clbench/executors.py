"""Executors: where the jobs of a sweep run, found by name in a registry.

A job is one ``clbench run`` of one (benchmark, strategy, seed) as a command line
(:class:`Job`); :func:`run_job` runs it in a fresh Python process with its output in a log
file and returns a :class:`JobResult` with the one-line error of a failed run. Executors only
decide where and how many at once: none of them schedules anything itself.

- ``local`` (default): at most ``workers`` jobs at once on this machine, each limited to
  ``threads_per_job`` threads, so that workers x threads does not oversubscribe the cores.
- ``submitit``: SLURM through submitit's ``AutoExecutor``, one job array (``map_array``) with
  ``array_parallelism``; preempted or timed-out jobs are requeued through submitit's
  checkpointing and resume from the run's last checkpoint. ``cluster: local`` runs the same
  path on this machine (submitit's LocalExecutor starts every job at once: no cap).
- ``ray``: one Ray task per job on a Ray cluster (``address``), or on a local instance.

Why a fresh process per job rather than a function call in a worker: a killed job leaves no
half-initialised interpreter state behind, torch's global settings (threads, determinism,
RNG) cannot leak from one run into the next, memory is returned after every run, and what
submitit and Ray pickle is a list of strings, not a model or a config object.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from clbench.errors import ERROR_PREFIX, ClbenchError, ConfigError
from clbench.registry import Registry


@dataclass(frozen=True)
class Job:
    """One ``clbench run`` invocation of a sweep.

    ``argv`` is the command without the interpreter (``["run", CONFIG, "--strategy", ...]``);
    it is run as ``python -m clbench ARGV`` with ``threads`` as the thread count of every
    numeric library, output appended to ``log``.
    """

    run_id: str
    argv: tuple[str, ...]
    log: Path
    threads: int | None = None
    cwd: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def command(self, python: str | None = None) -> list[str]:
        return [python or sys.executable, "-m", "clbench", *self.argv]


@dataclass
class JobResult:
    """How a job ended: exit code, its one-line error (None when it succeeded), its log."""

    run_id: str
    returncode: int
    error: str | None
    log: Path
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _thread_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def error_line(log_tail: str, returncode: int) -> str | None:
    """The one-line reason a job failed, read from the end of its log.

    ``clbench: error: ...`` (a user error the CLI printed) wins; otherwise the last non-empty
    line (a traceback's exception line), or the signal that killed the process.
    """
    if returncode == 0:
        return None
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(ERROR_PREFIX):
            return ln[len(ERROR_PREFIX) :]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return lines[-1][:300] if lines else f"exit code {returncode} with no output"


def run_job(job: Job, python: str | None = None) -> JobResult:
    """Run ``job`` to completion in a child process; never raises for a failed run."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    cmd = job.command(python)
    t0 = time.perf_counter()
    with open(job.log, "ab") as log:
        start = log.tell()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== {stamp} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_thread_env(job.threads),
            cwd=job.cwd,
        )
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C or a cancelled task: never leave the child running
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    with open(job.log, "rb") as f:
        f.seek(max(start, os.path.getsize(job.log) - 8192))
        tail = f.read().decode("utf-8", "replace")
    return JobResult(job.run_id, rc, error_line(tail, rc), job.log, time.perf_counter() - t0)


# --------------------------------------------------------------------------- the registry


class Executor(ABC):
    """Runs a list of jobs and reports each result as it arrives.

    Subclasses declare their options as keyword-only ``__init__`` parameters (the
    ``executor:`` section of a sweep YAML; an unknown one is an error naming the valid ones)
    and the Python modules they need with the pip extra that installs them.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None  # pip extra of clbench that installs ``requires``

    def check_available(self) -> None:
        """Raise one line naming the pip extra when a required module is not installed."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ClbenchError(
                    f"executor {self.name!r} needs the {module!r} package, which is not "
                    f"installed; install it with: pip install 'clbench[{self.extra}]'"
                ) from None

    @abstractmethod
    def describe(self) -> str:
        """One line for the sweep's header: where and how many jobs at once."""

    @abstractmethod
    def run(self, jobs: Sequence[Job], on_result: Callable[[JobResult], None]) -> None:
        """Run every job; call ``on_result`` (in this process) as each one ends."""


EXECUTORS: Registry[type[Executor]] = Registry("executor", group="clbench.executors")


def register_executor(name: str) -> Callable[[type[Executor]], type[Executor]]:
    return EXECUTORS.register_named(name)


def create_executor(spec: dict[str, Any] | None) -> Executor:
    """Build the executor named by ``spec["name"]`` (default ``local``) with the other keys
    as its options; unknown names and options are one-line errors, checked before any job."""
    spec = dict(spec or {})
    name = spec.pop("name", "local")
    try:
        executor = EXECUTORS.build(str(name), spec)
    except ClbenchError as e:
        raise ConfigError(str(e)) from None
    executor.check_available()
    return executor


def _positive(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@register_executor("local")
class LocalExecutor(Executor):
    """At most ``workers`` jobs at once on this machine, ``threads_per_job`` threads each.

    The pool's threads only wait on the child processes (:func:`run_job`); the work happens
    in the children, so the GIL is not a bottleneck.
    """

    def __init__(self, *, workers: int = 1, threads_per_job: int | None = None):
        self.workers = _positive("workers", workers)
        self.threads = _positive("threads_per_job", threads_per_job, allow_none=True)
        if self.threads is None:  # share the cores between the workers
            self.threads = max(1, (os.cpu_count() or 1) // self.workers)

    def describe(self) -> str:
        return f"local: {self.workers} worker(s) x {self.threads} thread(s)"

    def run(self, jobs: Sequence[Job], on_result: Callable[[JobResult], None]) -> None:
        jobs = [_with_threads(j, self.threads) for j in jobs]
        with cf.ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(run_job, j) for j in jobs]
            try:
                for fut in cf.as_completed(futures):
                    on_result(fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _with_threads(job: Job, threads: int | None) -> Job:
    if job.threads is not None or threads is None:
        return job
    return Job(job.run_id, job.argv, job.log, threads, job.cwd, job.meta)


class _SubmititJob:
    """The callable submitit pickles: one job, requeued on preemption or time-out.

    ``checkpoint`` is submitit's hook (``submitit.helpers.Checkpointable``): on SIGUSR2 /
    time-out it resubmits the same call; the run itself resumes from its last per-experience
    checkpoint because every sweep job passes ``--resume``.
    """

    def __init__(self, python: str):
        self.python = python

    def __call__(self, job: Job) -> JobResult:
        return run_job(job, self.python)

    def checkpoint(self, job: Job) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, job)


@register_executor("submitit")
class SubmititExecutor(Executor):
    """SLURM through submitit's ``AutoExecutor``: one job array for the sweep.

    Options map to submitit's parameters: ``partition`` -> ``slurm_partition``,
    ``array_parallelism`` -> ``slurm_array_parallelism``, ``cpus_per_task`` (default
    ``threads_per_job``), ``gpus_per_node``, ``mem_gb``, ``timeout_min``, and
    ``slurm_additional_parameters`` as is. ``cluster``: ``None`` lets submitit choose (SLURM
    when ``sbatch`` is there), ``local`` or ``debug`` run on this machine.
    """

    requires = ("submitit",)
    extra = "sweep-slurm"

    def __init__(
        self,
        *,
        folder: str | None = None,
        cluster: str | None = None,
        partition: str | None = None,
        array_parallelism: int = 64,
        threads_per_job: int | None = None,
        cpus_per_task: int | None = None,
        gpus_per_node: int = 0,
        mem_gb: float | None = None,
        timeout_min: int = 24 * 60,
        slurm_additional_parameters: dict[str, Any] | None = None,
        python: str | None = None,
    ):
        self.folder = folder
        self.cluster = cluster
        self.partition = partition
        self.array_parallelism = _positive("array_parallelism", array_parallelism)
        self.threads = _positive("threads_per_job", threads_per_job, allow_none=True)
        self.cpus = _positive("cpus_per_task", cpus_per_task, allow_none=True) or self.threads
        self.gpus = gpus_per_node
        self.mem_gb = mem_gb
        self.timeout_min = _positive("timeout_min", timeout_min)
        self.additional = slurm_additional_parameters or {}
        self.python = python or sys.executable

    def describe(self) -> str:
        where = f"partition {self.partition}" if self.partition else (self.cluster or "auto")
        return f"submitit ({where}): array parallelism {self.array_parallelism}"

    def run(self, jobs: Sequence[Job], on_result: Callable[[JobResult], None]) -> None:
        import submitit

        if not jobs:
            return
        folder = Path(self.folder) if self.folder else jobs[0].log.parent.parent / "submitit"
        ex = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        params: dict[str, Any] = {
            "timeout_min": self.timeout_min,
            "name": "clbench-sweep",
            "slurm_array_parallelism": self.array_parallelism,
        }
        optional = {
            "cpus_per_task": self.cpus,
            "gpus_per_node": self.gpus or None,
            "mem_gb": self.mem_gb,
            "slurm_partition": self.partition,
            "slurm_additional_parameters": self.additional or None,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        ex.update_parameters(**params)
        jobs = [_with_threads(j, self.threads or self.cpus) for j in jobs]
        submitted = ex.map_array(_SubmititJob(self.python), jobs)
        pending = dict(zip(submitted, jobs, strict=True))
        while pending:
            finished = [s for s in pending if s.done()]
            for s in finished:
                job = pending.pop(s)
                try:
                    on_result(s.result())
                except submitit.core.utils.UncompletedJobError as e:
                    on_result(_infra_failure(job, e, s.paths.stderr))
                except submitit.core.utils.FailedJobError as e:
                    on_result(_infra_failure(job, e, s.paths.stderr))
            if pending and not finished:
                time.sleep(1.0)


def _infra_failure(job: Job, exc: BaseException, log: Path) -> JobResult:
    """A job whose executor failed it (not the run): its exception's first line."""
    text = str(exc).strip().splitlines()
    return JobResult(job.run_id, 1, f"{type(exc).__name__}: {text[0] if text else ''}", log)


@register_executor("ray")
class RayExecutor(Executor):
    """One Ray task per job (``num_cpus`` = ``threads_per_job``, ``num_gpus`` per job).

    ``address``: a Ray cluster (``ray://host:10001``, ``auto``), or None for the instance
    this process already joined or else a new local one with ``num_cpus`` CPUs. The results
    folder must be on a file system that every node sees.
    """

    requires = ("ray",)
    extra = "sweep-ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        threads_per_job: int = 1,
        gpus_per_job: float = 0,
        python: str | None = None,
    ):
        self.address = address
        self.num_cpus = _positive("num_cpus", num_cpus, allow_none=True)
        self.threads = _positive("threads_per_job", threads_per_job)
        self.gpus = gpus_per_job
        self.python = python or sys.executable

    def describe(self) -> str:
        return f"ray ({self.address or 'local'}): {self.threads} CPU(s) per job"

    def run(self, jobs: Sequence[Job], on_result: Callable[[JobResult], None]) -> None:
        import ray

        if not jobs:
            return
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                num_cpus=None if self.address else self.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
            )
        task = ray.remote(num_cpus=self.threads, num_gpus=self.gpus)(run_job)
        refs = {task.remote(_with_threads(j, self.threads), self.python): j for j in jobs}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    job = refs.pop(ref)
                    try:
                        on_result(ray.get(ref))
                    except ray.exceptions.RayError as e:
                        on_result(_infra_failure(job, e, job.log))
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
