"""Deployed first-message latency: a real SuperLink and SuperNode on localhost, timed from `fedmri run`.

Each measured run is one coordinator's `fedmri run --stream` of a micro-encoder
federation with one site and one pretrain round of one local step, submitted to
a deployment started as docs/deployment.md starts one (TLS, a registered node
key). Every message makes the SuperNode start a ClientApp process, which imports
torch, Flower and fedmri before it answers, so the figures are:

- ``identity s``: from `fedmri run` starting to the coordinator logging the
  site's answer to its first message (the identity query): submission, the
  ServerApp's start and one ClientApp process start;
- ``round s``: the pretrain round as the coordinator times it (send, the site's
  ClientApp start, one training step, the reply);
- ``run s``: the whole `fedmri run` command, until it exits.

Times of log lines are taken when `fedmri run --stream` prints them, so they
carry the log stream's polling delay (about a second); compare trees measured
in the same run only.

``--tree DIR`` also measures another checkout (e.g. ``git worktree add /tmp/old
<rev>``): every process of its deployment (daemons, Flower's SuperLink,
SuperNode and ClientApp processes) imports that tree's fedmri, through a
``sitecustomize`` that points the installed editable finder at it. Runs
alternate between trees.

    python benchmarks/bench_deploy_latency.py [--tree /tmp/old] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import _tests_path  # noqa: F401 -- tests/ on sys.path: the shared test helpers

sys.path.insert(0, str(Path(_tests_path.TESTS) / "e2e"))
from deploy_helpers import FEDMRI, Daemon, free_port, stop_all, write_site  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONNECTED = r"connected to the SuperLink at .* as node \d+"
# The micro preset's overrides, spelled out: older trees measured with --tree lack the preset.
MICRO = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "ssl.head_hidden_dim=64",
         "ssl.head_bottleneck_dim=16", "ssl.local_crops_number=2", "align.embed_dim=32", "ssl.warmup_fraction=0"]
IDENTITY = re.compile(r"fedmri: site \d+ is ")
ROUND = re.compile(r"fedmri: pretrain round 1/1 done in ([\d.]+) s")

# Imported first by every Python process started with this folder on PYTHONPATH: the
# installed editable finder then maps the fedmri packages to FEDMRI_TREE's folders.
_SITECUSTOMIZE = textwrap.dedent("""
    import os, sys
    _tree = os.environ.get("FEDMRI_TREE")
    if _tree:
        for _name, _mod in list(sys.modules.items()):
            if _name.startswith("__editable___fedmri"):
                _home = _mod.MAPPING["fedmri"].rsplit("/", 1)[0]
                for _k, _v in list(_mod.MAPPING.items()):
                    _mod.MAPPING[_k] = _tree + _v[len(_home):]
                for _k, _v in list(_mod.NAMESPACES.items()):
                    _mod.NAMESPACES[_k] = [_tree + p[len(_home):] for p in _v]
""")


def _site(root: Path) -> Path:
    """One synthetic hospital (12 series), indexed for the micro preset."""
    from fedmri.config import load_config
    from fedmri.data.indexer import index_site
    from fedmri.simulations.synth import generate_site

    hospital, catalog = root / "hospital", root / "catalog"
    generate_site(hospital, site_index=1, seed=0, preset="tiny", series_per_site=12)
    index_site(hospital / "dicom", hospital / "reports.csv", catalog, labels=hospital / "labels.csv",
               cfg=load_config("tiny"))
    return catalog


class Deployment:
    """A SuperLink and one SuperNode of ``tree`` (empty: the installed fedmri), started by fedmri's commands."""

    def __init__(self, root: Path, tree: str, catalog: Path, boot: Path) -> None:
        from fedmri.certs import init_authority

        self.root, self.tree = root, tree
        self.env = os.environ | {"PYTHONPATH": str(boot), "FEDMRI_TREE": tree}
        certs = root / "certs"
        init_authority(certs, ["localhost", "127.0.0.1"], ["site-01"])
        port = free_port()
        self.state = root / "state"
        self.daemons: list[Daemon] = []
        os.environ.update(self.env)  # Daemon passes the environment on; restored in stop()
        try:
            self.daemons.append(Daemon(["server", "start", "--certs", str(certs), "--state", str(self.state),
                                        "--host", "127.0.0.1", "--port", str(port)], root / "server.log"))
            self.daemons[0].wait_for(r"SuperLink ready at https://", 120)
            site = write_site(root / "site-01", "site-01", f"127.0.0.1:{port}", certs / "ca.crt",
                              certs / "site-01.key", free_port(), catalog)
            self.daemons.append(Daemon(["client", "start", "--site", str(site)], root / "site-01.log"))
            self.daemons[1].wait_for(CONNECTED, 120)
        except BaseException:
            self.stop()
            raise

    def run(self, name: str, timeout: float = 600) -> dict[str, float]:
        """One `fedmri run --stream`; the seconds to the site's identity, the round's and the run's."""
        config = self.root / f"{name}.yaml"
        config.write_text(textwrap.dedent(f"""
            name: {name}
            preset: tiny
            overrides: {MICRO}
            min_sites: 1
            wait_for_sites_s: 60
            stages: [{{name: pretrain, rounds: 1, local_steps: 1}}]
        """))
        seen: dict[str, float] = {}
        lines: list[str] = []
        start = time.perf_counter()
        proc = subprocess.Popen([*FEDMRI, "run", "--config", str(config), "--state", str(self.state), "--stream"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                now = time.perf_counter() - start
                if "identity" not in seen and IDENTITY.search(line):
                    seen["identity"] = now
                if (match := ROUND.search(line)) is not None:
                    seen["round"] = float(match.group(1))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise RuntimeError(f"{name}: `fedmri run` still running after {timeout} s:\n{''.join(lines)[-3000:]}")
        reader.join(10)
        seen["run"] = time.perf_counter() - start
        if code != 0 or "identity" not in seen or "round" not in seen:
            raise RuntimeError(f"{name} ({self.tree or 'this tree'}): exit {code}, found {sorted(seen)}:\n"
                               f"{''.join(lines)[-3000:]}")
        return seen

    def stop(self) -> None:
        stop_all(self.daemons)
        for key in ("PYTHONPATH", "FEDMRI_TREE"):
            os.environ.pop(key, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="", help="another fedmri checkout to measure too")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree (median reported)")
    args = parser.parse_args()
    trees = ["", *([str(Path(args.tree).resolve())] if args.tree else [])]
    with tempfile.TemporaryDirectory(prefix="fedmri-deploy-") as tmp:
        root = Path(tmp)
        boot = root / "boot"
        boot.mkdir()
        (boot / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        print("[data] synthesising and indexing one hospital ...", flush=True)
        catalog = _site(root / "data")
        times: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
        deployments: dict[str, Deployment] = {}
        try:
            for i, tree in enumerate(trees):
                print(f"[deploy] starting {tree or 'this tree'} ...", flush=True)
                deployments[tree] = Deployment(root / f"tree{i}", tree, catalog, boot)
            for r in range(args.repeats):
                for i, tree in enumerate(trees):
                    result = deployments[tree].run(f"latency-{r}")
                    times[tree].append(result)
                    print(f"[run] {tree or 'this tree'} #{r + 1}: identity {result['identity']:.1f} s, round "
                          f"{result['round']:.1f} s, run {result['run']:.1f} s", flush=True)
        finally:
            for deployment in deployments.values():
                deployment.stop()
    print(f"\n{'tree':<28} {'identity s':>11} {'round s':>8} {'run s':>7}   (medians of {args.repeats})")
    for tree in trees:
        med = {k: statistics.median(t[k] for t in times[tree]) for k in ("identity", "round", "run")}
        print(f"{(tree or 'this tree')[-28:]:<28} {med['identity']:>11.1f} {med['round']:>8.1f} {med['run']:>7.1f}")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
