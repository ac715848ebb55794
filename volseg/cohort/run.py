"""``volseg run``: a cohort through the stages, resumable, failure-isolated, optionally sharded.

:func:`run_cohort` finds the scans (:mod:`volseg.cohort.inputs`), takes this shard's share
(:mod:`volseg.cohort.shard`), skips scans already complete for the same settings, processes
the others (:mod:`volseg.cohort.stages`, :mod:`volseg.cohort.export`) with ``jobs`` worker
processes, and rebuilds the tables and the report (:mod:`volseg.cohort.tables`). Logs and the
run's arguments and versions go to ``OUT/logs/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from volseg import __version__
from volseg.io import AtomicWriter, check_writable_dir

log = logging.getLogger("volseg")


@dataclass
class RunResult:
    done: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    scans: int = 0
    log_file: Path | None = None
    tables: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class RunOptions:
    """What a worker needs to rebuild the run's :class:`~volseg.cohort.stages.Context`."""

    stages: tuple[str, ...] | None = None
    config: str | None = None
    device: str = "auto"
    threads: int = 0
    tta: bool = False
    border_mm: float | None = None
    strip_model: str | None = None
    anomaly_model: str | None = None  # anomaly model folder (default: shipped)
    figures: bool = True
    batch_size: int | None = None  # scans per network pass; None: 4 on a GPU, 1 on the CPU
    overlap: bool | None = None  # export a batch while the next is computed; None: on a GPU only


def write_dataset_description(out: Path, sources: list[str]) -> Path:
    desc = {
        "Name": "volseg derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "volseg", "Version": __version__,
                         "Description": "N4 bias correction, skull stripping and anomaly maps"}],
        "SourceDatasets": [{"URL": Path(s).resolve().as_uri()} for s in sources if Path(s).is_dir()],
    }
    from volseg.cohort.tables import save_if_changed

    from volseg.io.derivatives import write_bidsignore

    path = Path(out) / "dataset_description.json"
    with AtomicWriter() as w:
        save_if_changed(w, json.dumps(desc, indent=2) + "\n", path)
    write_bidsignore(out)  # files BIDS has no name for: the map, pictures, tables, report, logs
    return path


@contextlib.contextmanager
def thread_limits(threads: int):
    """torch and SimpleITK thread counts for the run, restored afterwards."""
    if threads <= 0:
        yield
        return
    import SimpleITK as sitk
    import torch

    old_torch = torch.get_num_threads()
    old_itk = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_itk)


def _context(opts: RunOptions):
    from volseg.cohort.stages import build_context
    from volseg.device import pick_device
    from volseg.strip.config import load_strip_config

    cfg = load_strip_config(opts.config)
    return build_context(opts.stages, cfg, device=pick_device(opts.device), tta=opts.tta,
                         border_mm=opts.border_mm, figures=opts.figures,
                         strip_model=opts.strip_model, batch_size=opts.batch_size,
                         anomaly_model=opts.anomaly_model)


def process_batch(out: Path, scans, ctx, anomaly_only: bool = False) -> list[dict]:
    """Compute several scans together (networks batched), then export each; a failing scan is
    recorded with its error and its outputs removed, the others are exported.
    ``anomaly_only``: the scans are complete but for their anomaly outputs (a new anomaly model
    or map setting): their N4 image and brain mask are read back and only the anomaly stage runs."""
    return export_batch(out, scans, *compute_part(out, scans, ctx, anomaly_only), ctx)


def compute_part(out: Path, scans, ctx, anomaly_only: bool = False):
    """The compute half of :func:`process_batch`: (results, stored records or None)."""
    from volseg.cohort.export import read_record, start_scan
    from volseg.cohort.stages import compute_batch

    stored = [dict(read_record(out, s), root=str(out)) for s in scans] if anomaly_only else None
    for scan in scans:
        start_scan(out, scan)
    return compute_batch([s.path for s in scans], ctx, stored), stored


def export_batch(out: Path, scans, results, stored, ctx) -> list[dict]:
    """The export half of :func:`process_batch`: write each scan (or its failure)."""
    anomaly_only = stored is not None
    records = []
    for k, scan in enumerate(scans):
        res, results[k] = results[k], None  # let each scan's arrays go once it is written
        only = {key: v for key, v in stored[k].items() if key != "root"} if anomaly_only else None
        records.append(_export_one(out, scan, res, ctx, only))
    return records


def _export_one(out: Path, scan, res, ctx, only=None) -> dict:
    from volseg.cohort.export import base_record, export_scan, remove_outputs, write_record
    from volseg.cohort.stages import ScanFailure

    try:
        if isinstance(res, ScanFailure):
            raise res
        try:
            record = export_scan(out, scan, res, ctx, only)
        except Exception as exc:
            from volseg.errors import VolsegError

            if not isinstance(exc, VolsegError):
                log.exception("%s: unexpected error while writing outputs", scan.path)
            raise ScanFailure("export", str(exc) if isinstance(exc, VolsegError)
                              else f"{scan.path}: unexpected {type(exc).__name__} while writing "
                                   f"outputs: {exc}") from exc
        log.info("%s: done in %.1f s -> %s", scan.path, record["timings"]["total_s"],
                 Path(out) / scan.rel_dir)
        return record
    except ScanFailure as fail:
        log.error("%s (stage %s)", fail.error, fail.stage)
        remove_outputs(out, scan)
        record = base_record(scan, "failed")
        record.update(stage=fail.stage, error=fail.error)
        write_record(out, scan, record)
        return record


# -- worker processes (--jobs > 1) --------------------------------------------------------
_WORKER: dict = {}


def _init_worker(opts: RunOptions, threads: int, log_file: str | None) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    except ImportError:
        pass
    if log_file:
        _add_file_handler(Path(log_file))
    _WORKER["ctx"] = _context(opts)


def _worker_task(out: str, scans) -> list[dict]:
    return process_batch(Path(out), scans, _WORKER["ctx"])


def _add_file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s: %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        # INFO for the file only: hold the console handlers at the level they showed before
        shown = log.getEffectiveLevel()
        for h in logging.getLogger().handlers:
            if h.level == logging.NOTSET:
                h.setLevel(shown)
                _RESTORE.append(h)
        log.setLevel(logging.INFO)
    return handler


_RESTORE: list[logging.Handler] = []


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("volseg", "torch", "monai", "nibabel", "nilearn", "SimpleITK", "pybids", "nipype"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run_cohort(inputs, out, *, opts: RunOptions = RunOptions(), participants=(), jobs: int = 1,
               shard=None, overwrite: bool = False, report: bool = True, progress=None,
               argv=None) -> RunResult:
    """Run the cohort named by ``inputs`` into the BIDS-derivatives folder ``out``."""
    from tqdm import tqdm

    from volseg.cohort.export import (ANOMALY_ONLY, FLAGS_ONLY, base_record, is_complete, read_record,
                                      refresh_flags, stale_outputs)
    from volseg.cohort.inputs import discover, split_duplicates
    from volseg.cohort.shard import select_shard, shard_name
    from volseg.cohort.tables import gather, write_tables

    out = check_writable_dir(out)
    logs = check_writable_dir(out / "logs")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    tag = shard_name(shard)
    log_file = logs / f"volseg-run_{stamp}{'_' + tag if tag else ''}.log"
    handler = _add_file_handler(log_file)
    result = RunResult(log_file=log_file)
    old_level = log.level
    try:
        bad_inputs: list = []  # inputs that yield no scans: reported, the others still run
        scans = discover(inputs, tuple(participants), failures=bad_inputs)
        scans, dups = split_duplicates(scans)
        mine = select_shard(scans, shard)
        mine_dups = select_shard(dups, shard)
        result.scans = len(mine) + len(mine_dups)
        log.info("volseg %s run: %d scan(s)%s -> %s", __version__, result.scans,
                 f" (shard {shard[0]}/{shard[1]} of {len(scans) + len(dups)})" if shard else "", out)
        write_dataset_description(out, [str(i) for i in inputs])
        with thread_limits(opts.threads if jobs <= 1 else 0):
            ctx = _context(opts)
            fp = ctx.fingerprint()
            with AtomicWriter() as w:
                w.save_json({"argv": list(argv) if argv is not None else sys.argv, "inputs": [str(i) for i in inputs],
                             "shard": list(shard) if shard else None, "jobs": jobs,
                             "overwrite": overwrite, "scans": result.scans,
                             "settings": ctx.settings(), "fingerprint": fp,
                             "versions": _versions()}, log_file.with_suffix(".json"))
            dup_records = []
            for item, err in bad_inputs if shard is None or shard[0] == 0 else ():  # once per cohort
                log.error("%s", err)
                dup_records.append({"scan": Path(item).name, "subject": None, "session": None, "source": item,
                                    "status": "failed", "stage": "inputs", "error": err,
                                    "volseg_version": __version__})
            for scan, err in mine_dups:  # no record file: it would be the first scan's
                log.error("%s", err)
                rec = base_record(scan, "failed")
                rec.update(stage="inputs", error=err)
                dup_records.append(rec)
            result.failed += dup_records
            todo, anomaly_todo = [], []
            for scan in mine:
                if not overwrite and is_complete(out, scan, fp):
                    result.skipped.append(read_record(out, scan))
                    continue
                stale = None if overwrite else stale_outputs(out, scan, ctx)
                if stale == FLAGS_ONLY:  # recalibrated: re-threshold the stored map
                    try:
                        result.done.append(refresh_flags(out, scan, ctx))
                        log.info("%s: anomaly mask and flag updated for the new calibration", scan.path)
                        continue
                    except Exception as exc:  # anything unexpected on disk: recompute the scan
                        log.warning("%s: cannot update the anomaly flag alone (%s); recomputing", scan.path, exc)
                (anomaly_todo if stale == ANOMALY_ONLY else todo).append(scan)
            for group in chunks(anomaly_todo, ctx.batch_size):  # new anomaly model: that stage only
                for rec in process_batch(out, group, ctx, anomaly_only=True):
                    (result.done if rec["status"] == "ok" else result.failed).append(rec)
            if result.skipped:
                log.info("%d scan(s) already complete, skipped (--overwrite redoes them)",
                         len(result.skipped))
            bar = tqdm(total=len(todo), desc="volseg run", unit="scan", disable=progress is False
                       or (progress is None and not sys.stderr.isatty()) or not todo)
            for rec in _execute(out, todo, ctx, opts, jobs, log_file):
                (result.done if rec["status"] == "ok" else result.failed).append(rec)
                bar.update(1)
            bar.close()
        if shard is not None:
            mine_recs = [r for r in (read_record(out, s) for s in mine) if r]
            result.tables = list(write_tables(logs, mine_recs + dup_records, prefix=tag))
        else:
            result.tables = gather(out, report=report, extra=dup_records).paths
        log.info("finished: %d done, %d skipped, %d failed", len(result.done), len(result.skipped),
                 len(result.failed))
        return result
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(old_level)
        while _RESTORE:
            _RESTORE.pop().setLevel(logging.NOTSET)


def chunks(todo: list, batch_size: int, jobs: int = 1) -> list[list]:
    """``todo`` in consecutive groups of at most ``batch_size`` scans, made smaller when needed
    so that every one of ``jobs`` workers gets a group."""
    if not todo:
        return []
    size = max(1, min(int(batch_size), len(todo) // max(1, jobs)))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _execute(out: Path, todo: list, ctx, opts: RunOptions, jobs: int, log_file: Path):
    """Process ``todo`` in this process (``jobs <= 1``) or in ``jobs`` spawned workers, a batch
    of scans at a time (``ctx.batch_size``); yields one record per scan."""
    if jobs <= 1 or len(todo) <= 1:
        groups = chunks(todo, ctx.batch_size)
        overlap = opts.overlap if opts.overlap is not None else getattr(ctx.device, "type", str(ctx.device)) == "cuda"
        if not overlap or len(groups) <= 1:
            for group in groups:
                yield from process_batch(out, group, ctx)
            return
        # The CPU-only export (gzip, pictures) of one batch runs in a thread while the next batch
        # is loaded, corrected and sent through the networks, so a GPU does not wait for it; at
        # most one batch waits to be written. Each scan's outputs are still staged and renamed
        # as a whole (AtomicWriter), so a run killed in between resumes as before.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="volseg-export") as pool:
            pending = None
            for group in groups:
                computed = compute_part(out, group, ctx)
                if pending is not None:
                    yield from pending.result()
                pending = pool.submit(export_batch, out, group, *computed, ctx)
            yield from pending.result()
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    jobs = min(jobs, len(todo))
    total = opts.threads or os.cpu_count() or 1
    threads = max(1, total // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(opts, threads, str(log_file))) as pool:
        futures = {pool.submit(_worker_task, str(out), group): group for group in chunks(todo, ctx.batch_size, jobs)}
        for fut in as_completed(futures):
            try:
                yield from fut.result()
            except Exception as exc:  # a worker died (e.g. killed for memory)
                from volseg.cohort.export import base_record, remove_outputs, write_record

                for scan in futures[fut]:
                    msg = f"{scan.path}: worker process failed ({type(exc).__name__}: {exc})"
                    log.error("%s", msg)
                    remove_outputs(out, scan)
                    rec = base_record(scan, "failed")
                    rec.update(stage="worker", error=msg)
                    write_record(out, scan, rec)
                    yield rec
