"""Several synthetic hospitals side by side: ``out_dir/site-01``, ``site-02``, ...

Site k is seeded from (seed, k) alone, so site-02 of a 3-site federation is
the same as site-02 of a 5-site one. Every folder is checked before anything
is written, so a bad folder fails the run before minutes are spent.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fedmri.errors import InputError
from fedmri.simulations.synth import site_dir as sd
from fedmri.simulations.synth.generate import Progress, SiteInfo, check_args, generate_site, site_name


class _QueueProgress:
    """Picklable progress callback that forwards to the parent process through a queue."""

    def __init__(self, q: queue.Queue) -> None:
        self.q = q

    def __call__(self, name: str, done: int, total: int) -> None:
        self.q.put((name, done, total))


def generate_federation(out_dir: str | Path, *, sites: int = 3, seed: int = 0, preset: str = "demo",
                        series_per_site: int = 40, progress: Progress | None = None,
                        workers: int = 1) -> list[SiteInfo]:
    """Generate a non-IID federation of synthetic hospitals.

    Args:
        out_dir: parent folder; sites go to ``out_dir/site-01`` ... (created if missing).
        sites: number of hospitals.
        seed: federation seed; the same seed gives the same files.
        preset: "demo" (small series, quick) or "full" (clinical sizes).
        series_per_site: DICOM series per hospital.
        progress: called as ``progress(site_name, done, total)`` as series are written.
        workers: processes to use (one site per process); 1 runs in this process.
            Processes are started with "spawn", so a script that calls this
            with workers > 1 must do so under ``if __name__ == "__main__":``.

    Returns:
        One :class:`SiteInfo` per site, in site order.

    Raises:
        ConfigError: an argument is out of range or the preset is unknown.
        InputError: ``out_dir`` is a file, or holds sites of another federation
            (other seed/preset/size, or more sites than requested), or foreign files.
    """
    check_args(sites, seed, preset, series_per_site, workers)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root} is a file; give a folder for the synthetic sites")
    if root.is_dir():
        extra = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and re.fullmatch(r"site-\d+", p.name) and int(p.name[5:]) > sites)
        if extra:
            raise InputError(f"{root} already holds {', '.join(extra)}, beyond the {sites} site(s) requested; "
                             "ask for as many sites, use another --out folder, or delete them")
    for k in range(1, sites + 1):  # fail before writing anything
        sd.site_state(root / site_name(k), sd.generator_params(seed, k, preset, series_per_site))
    root.mkdir(parents=True, exist_ok=True)
    jobs = [dict(out_dir=root / site_name(k), site_index=k, seed=seed, preset=preset, series_per_site=series_per_site)
            for k in range(1, sites + 1)]
    if workers == 1 or sites == 1:
        return [generate_site(**job, progress=progress) for job in jobs]
    ctx = mp.get_context("spawn")  # no fork: the caller may hold threads (progress bars) or torch
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=min(workers, sites), mp_context=ctx) as pool:
        q = manager.Queue()
        futures = [pool.submit(generate_site, **job, progress=_QueueProgress(q) if progress else None)
                   for job in jobs]
        while not all(f.done() for f in futures):
            _drain(q, progress, timeout=0.2)
        _drain(q, progress, timeout=0.0)
        return [f.result() for f in futures]


def _drain(q: queue.Queue, progress: Progress | None, timeout: float) -> None:
    try:
        item = q.get(timeout=timeout) if timeout else q.get_nowait()
        while True:
            if progress:
                progress(*item)
            item = q.get_nowait()
    except queue.Empty:
        return
