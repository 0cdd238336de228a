"""The site daemon's reaper: which run a ClientApp belongs to, and stopping those of ended runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedmri.client.reaper import ClientAppReaper

# What flwr 1.42's SuperNode prints around a message (start_client_internal).
RECEIVING = ["INFO :      [RUN 7, ROUND ]", "INFO :      Receiving: train message"]
ENDED = "INFO :      Run ID 7 is not in `RUNNING` status. Ignoring message 3f2a..."


def test_the_supernodes_lines_name_the_run_of_each_message_and_the_runs_that_ended() -> None:
    reaper = ClientAppReaper(say=lambda _: None)
    for line in RECEIVING:
        reaper.line(line)
    reaper.line("INFO :      [RUN 8, ROUND ]")  # a header alone is no message of run 8
    assert reaper.ended == set()
    reaper.line(ENDED)
    assert reaper.ended == {7}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the reaper reads /proc")
def test_a_clientapp_of_an_ended_run_is_stopped_and_one_of_a_live_run_is_not() -> None:
    # A stand-in parent (the SuperNode) with a child whose command line names flwr-clientapp
    # and which, like Flower's, handles SIGTERM.
    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
             "time.sleep(60)  # flwr-clientapp")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"])
    said: list[str] = []
    try:
        reaper = ClientAppReaper(grace_s=5, say=said.append)
        for line in RECEIVING:
            reaper.line(line)
        deadline = time.monotonic() + 20
        while not reaper._apps and time.monotonic() < deadline:  # the child has appeared under the parent
            reaper.sweep(parent.pid)
            time.sleep(0.2)
        reaper.sweep(parent.pid)
        assert said == [] and parent.poll() is None, "run 7 is live: nothing stopped"
        reaper.line(ENDED)
        deadline = time.monotonic() + 20
        while parent.poll() is None and time.monotonic() < deadline:
            reaper.sweep(parent.pid)
            time.sleep(0.2)
        assert parent.poll() is not None, "the child stopped, so its parent ended"
        assert len(said) == 1 and "of run 7, which has ended" in said[0]
    finally:
        parent.kill()
        parent.wait()
