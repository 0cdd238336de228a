"""How long a site's ClientApp process takes to start: cold, and forked from the warm starter.

Flower starts one ``flwr-clientapp`` process per message a site receives. fedmri's
launcher (``fedmri client start`` puts it first on the SuperNode's PATH) either runs
the ClientApp itself, importing torch, Flower and fedmri first (cold), or hands it to
the site's warm starter, which has imported them once and forks (:mod:`fedmri.client.warm`).

Both are timed here the same way, in the same run: the launcher is run with
``--help``, so that Flower's ClientApp parses its arguments and exits; the time is
from starting the launcher to its exit, i.e. what a message waits before its
ClientApp can pull it. Prints each median, the spread and the ratio warm / cold.

    python benchmarks/bench_clientapp_start.py --runs 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmri.client.guard import write_launcher
from fedmri.client.warm import socket_path


def _time(launcher: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    if out.returncode != 0 or "usage: flwr-clientapp" not in out.stdout:
        raise SystemExit(f"the launcher failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        launcher = write_launcher(Path(tmp) / "bin")
        _time(launcher)  # warm the page cache for both
        cold = [_time(launcher) for _ in range(args.runs)]  # no starter listens yet: the launcher runs it
        starter = subprocess.Popen([sys.executable, "-m", "fedmri.client.warm", str(socket_path(launcher.parent))],
                                   stderr=subprocess.PIPE, text=True)
        try:
            t0 = time.perf_counter()
            if "ready" not in starter.stderr.readline():
                raise SystemExit("the warm starter did not start")
            ready = time.perf_counter() - t0
            warm = [_time(launcher) for _ in range(args.runs)]
        finally:
            starter.terminate()
            starter.wait(30)
    for name, values in (("cold", cold), ("warm", warm)):
        print(f"{name}: median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f}, "
              f"n {len(values)})")
    print(f"warm starter ready after {ready:.1f} s (once per `fedmri client start`)")
    print(f"ratio warm / cold: {statistics.median(warm) / statistics.median(cold):.3f}")


if __name__ == "__main__":
    main()
