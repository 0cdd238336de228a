"""A real deployment on localhost for the benchmarks: a SuperLink and N SuperNodes started by fedmri's
own commands (TLS, registered node keys), as docs/deployment.md starts them, and `fedmri run --stream`
timed line by line.

A deployment can run another checkout of fedmri (``tree``): every process it starts (daemons,
Flower's SuperLink, SuperNode, launcher, ServerApp and ClientApp processes) then imports that
tree's fedmri (:func:`_harness.tree_env`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import _tests_path  # noqa: F401 -- tests/ on sys.path: the shared test helpers
from _harness import tree_env

sys.path.insert(0, str(Path(_tests_path.TESTS) / "e2e"))
from deploy_helpers import (FEDMRI, Daemon, cmdline, free_port, process_tree, snapshot, stop_all,  # noqa: E402
                            write_site)

CONNECTED = r"connected to the SuperLink at .* as node \d+"

class Deployment:
    """A SuperLink and one SuperNode per catalog, of ``tree`` (empty: the installed fedmri).

    Args:
        root: Folder for certificates, state and logs.
        catalogs: One indexed catalog per site (``site-01``, ``site-02``, ...).
        tree: Another fedmri checkout; needs ``boot`` (:func:`_harness.boot_folder`).
        server_args: Extra arguments of ``fedmri server start``.
    """

    def __init__(self, root: Path, catalogs: Sequence[Path], tree: str = "", boot: Path | None = None,
                 server_args: Sequence[str] = ()) -> None:
        from fedmri.certs import init_authority

        self.root, self.tree = root, tree
        self.env = dict(os.environ) | (tree_env(tree, boot) if tree else {})
        names = [f"site-{i + 1:02d}" for i in range(len(catalogs))]
        certs = root / "certs"
        init_authority(certs, ["localhost", "127.0.0.1"], names)
        port = free_port()
        self.state = root / "state"
        self.daemons: list[Daemon] = []
        try:
            self.server = Daemon(["server", "start", "--certs", str(certs), "--state", str(self.state), "--host",
                                  "127.0.0.1", "--port", str(port), *server_args], root / "server.log", self.env)
            self.daemons.append(self.server)
            self.server.wait_for(r"SuperLink ready at https://", 120)
            self.sites = []
            for name, catalog in zip(names, catalogs, strict=True):
                site = write_site(root / name, name, f"127.0.0.1:{port}", certs / "ca.crt", certs / f"{name}.key",
                                  free_port(), catalog)
                self.sites.append(Daemon(["client", "start", "--site", str(site)], root / f"{name}.log", self.env))
                self.daemons.append(self.sites[-1])
            for site in self.sites:
                site.wait_for(CONNECTED, 120)
        except BaseException:
            self.stop()
            raise

    def run(self, config: Path, timeout: float = 600,
            patterns: dict[str, str] | None = None) -> tuple[int, dict[str, float], str]:
        """One `fedmri run --config CONFIG --stream`.

        Returns:
            ``(exit code, seconds from the start to the first line matching each of
            ``patterns`` (name -> regex; a group's float instead, if the regex has one), and
            "run": the whole command, the output)``.
        """
        seen: dict[str, float] = {}
        lines: list[str] = []
        start = time.perf_counter()
        proc = subprocess.Popen([*FEDMRI, "run", "--config", str(config), "--state", str(self.state), "--stream"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        compiled = {k: re.compile(v) for k, v in (patterns or {}).items()}

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                now = time.perf_counter() - start
                for name, pattern in compiled.items():
                    if name not in seen and (match := pattern.search(line)) is not None:
                        seen[name] = float(match.group(1)) if pattern.groups else now

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            code = -9
        reader.join(10)
        seen["run"] = time.perf_counter() - start
        return code, seen, "".join(lines)

    def processes(self) -> dict[str, list[int]]:
        """Live process ids by role: superlink, launcher, serverapp, supernode, clientapp."""
        roles: dict[str, list[int]] = {}
        snap = snapshot()
        for daemon in self.daemons:
            tree = process_tree(daemon.proc.pid, snap)
            warm = {pid for pid in tree if "fedmri.client.warm" in cmdline(pid)}
            forked = {kid for pid in warm for kid in snap[0].get(pid, [])}  # the starter's children: ClientApps
            for pid in tree:
                cmd = cmdline(pid)
                if pid in warm:
                    roles.setdefault("clientapp" if pid in forked else "warm starter", []).append(pid)
                    continue
                for role, needle in (("superlink", "flower-superlink"), ("launcher", "flower-superexec"),
                                     ("serverapp", "flwr-serverapp"), ("supernode", "flower-supernode"),
                                     ("clientapp", "flwr-clientapp")):
                    if needle in cmd:
                        roles.setdefault(role, []).append(pid)
        return roles

    def stop(self) -> None:
        stop_all(self.daemons)
