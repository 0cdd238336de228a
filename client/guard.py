"""The site's ClientApp process: the coordinator's app bundle is checked before any of it can be imported.

fedmri's design: the code that runs at a hospital is the fedmri that hospital
installed; the coordinator sends configuration and weights only. A Flower App
Bundle (FAB) could carry code of its own, and Flower's ClientApp process puts
the bundle's folder first on ``sys.path`` before it imports the ClientApp the
bundle names. So a bundle holding a ``fedmri/`` package (or ``torch/``, or any
module fedmri imports lazily) would run the coordinator's code at the site.

``fedmri client start`` runs the SuperNode with this module as its
``flwr-clientapp`` (a launcher of that name first on the SuperNode's PATH;
Flower's SuperExec starts ClientApp processes by that name; the launcher has the
site's warm starter fork the process, :mod:`fedmri.client.warm`). Here, in order:

1. the installed ``fedmri.client.app`` is imported, while no bundle folder is
   on ``sys.path``; Python's module cache then answers every later
   ``import fedmri...`` with the installed modules;
2. the bundle is checked before Flower unpacks it (:func:`check_bundle`): it
   may hold ``pyproject.toml`` and Flower's ``.info/`` metadata, nothing else;
   it must name fedmri's ServerApp and ClientApp; its fedmri version must be
   one the site's ``policy.fedmri_versions`` accepts;
3. the ClientApp Flower loads must be the installed ``fedmri.client.app.app``.

A refused bundle never reaches step 3: Flower logs the error in the site's
output, replies to the coordinator with it, and the SuperNode keeps running.
The check lives here, in the installed package that runs first, not in a
module the bundle could shadow. Flower's own ``--trusted-entities`` verifies
who signed a bundle; it does not look at what the bundle holds.
"""

from __future__ import annotations

import functools
import io
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLIENTAPP = "fedmri.client.app:app"
SERVERAPP = "fedmri.server.app:app"
# What a genuine bundle (`fedmri run`) holds: its pyproject.toml; Flower adds .info/ (hashes, signatures).
ALLOWED_FILES = ("pyproject.toml",)
ALLOWED_PREFIX = ".info/"
LAUNCHER = "flwr-clientapp"
# How the ClientApp polls its own SuperNode (localhost) for the message's content while the
# SuperNode is still receiving it. Flower backs off 1, 2, 4, 8, then every 10 s, so a ClientApp
# that asks early (a warm start, fedmri.client.warm) could wait up to 10 s after a 446 MB base
# message had arrived. Every 0.5 s instead; the pull's overall limit (2 h) stays Flower's.
MESSAGE_PULL = {"initial_backoff": 0.1, "backoff_cap": 0.5, "max_tries_per_object": None}


class BundleRefused(RuntimeError):
    """The coordinator's app bundle carries something this site does not run."""


@dataclass(frozen=True)
class Bundle:
    files: list[str]
    version: str | None
    clientapp: str | None
    serverapp: str | None


def read_bundle(content: bytes) -> Bundle:
    """The file list and the pyproject fields of a FAB (a zip), without unpacking it to disk.

    Raises:
        BundleRefused: Not a zip, or no readable pyproject.toml.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            files = sorted(fab.namelist())
            project = tomllib.loads(fab.read("pyproject.toml").decode("utf-8")) if "pyproject.toml" in files else None
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleRefused(f"the app bundle is not a readable Flower app bundle ({exc})") from None
    if project is None:
        raise BundleRefused("the app bundle has no pyproject.toml")
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return Bundle(files, project.get("project", {}).get("version"), components.get("clientapp"),
                  components.get("serverapp"))


def check_bundle(content: bytes, accepted_versions: str | None = None) -> Bundle:
    """Refuse a bundle that brings code, names other components, or a fedmri version the site does not accept.

    Args:
        content: The FAB's bytes, as the SuperNode hands them over.
        accepted_versions: The site's ``policy.fedmri_versions`` (a PEP 440 specifier such as
            ``">=0.9,<0.10"``); None accepts any version.

    Raises:
        BundleRefused: With the reason, for the site's log and the coordinator.
    """
    bundle = read_bundle(content)
    extra = [f for f in bundle.files if f not in ALLOWED_FILES and not f.startswith(ALLOWED_PREFIX)]
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise BundleRefused(f"the app bundle carries files besides pyproject.toml ({shown}); this site runs only "
                            "the fedmri it installed: send the bundle `fedmri run` builds")
    if bundle.clientapp != CLIENTAPP or bundle.serverapp != SERVERAPP:
        raise BundleRefused(f"the app bundle names clientapp {bundle.clientapp!r} and serverapp {bundle.serverapp!r}; "
                            f"this site runs only {CLIENTAPP!r} with {SERVERAPP!r}")
    refusal = version_refusal(bundle.version, accepted_versions)
    if refusal is not None:
        raise BundleRefused(refusal)
    return bundle


def version_refusal(version: str | None, accepted: str | None) -> str | None:
    """Why the coordinator's fedmri ``version`` is outside the site's ``accepted`` range; None if it is inside."""
    if not accepted:
        return None
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        spec = SpecifierSet(accepted)
    except InvalidSpecifier:
        return f"the site's policy.fedmri_versions {accepted!r} is not a version range (e.g. '>=0.9,<0.10')"
    try:
        ok = version is not None and Version(version) in spec
    except InvalidVersion:
        ok = False
    if ok:
        return None
    return (f"the coordinator runs fedmri {version or '(no version given)'}; this site accepts fedmri {accepted} "
            "(policy.fedmri_versions): run a fedmri in that range, or ask the site to widen it")


def _site_versions(context: Any) -> str | None:
    """The site's ``policy.fedmri_versions``, from the site file its node config names (None if unset)."""
    site_file = getattr(context, "node_config", {}).get("site-config") if context is not None else None
    if not site_file:
        return None
    from fedmri.client.site import load_site

    return load_site(str(site_file)).policy.get("fedmri_versions")


_installed = False  # install_guard ran in this process: its ClientApp runtime checks bundles


def unguarded_reason() -> str | None:
    """Why this ClientApp must not run: a Flower ClientApp process that fedmri's launcher did not start.

    That is a SuperNode started by hand (``flower-supernode``) rather than with ``fedmri client
    start``: its ClientApps load whatever the coordinator's bundle names, unchecked. None in a
    guarded process, and outside ClientApp processes (simulations, tests).
    """
    if Path(sys.argv[0]).name != LAUNCHER or _installed:
        return None
    return ("this site's ClientApp was started without fedmri's launcher (a SuperNode run by hand?), so the "
            "coordinator's app bundle went unchecked: the site admin should start it with `fedmri client start`")


def install_guard(say: Any = None) -> None:
    """Wrap Flower's ClientApp runtime so that every bundle is checked before it is installed or loaded."""
    global _installed
    import fedmri.client.app as installed  # step 1: the installed modules, before any bundle is on sys.path
    from flwr.supernode.runtime import run_clientapp as runtime

    say = say or (lambda line: print(f"fedmri: {line}", file=sys.stderr, flush=True))
    seen: dict[str, Any] = {}
    pull, install, load_fn = runtime.pull_task_input, runtime.install_from_fab, runtime.get_load_client_app_fn

    def pull_task_input(*args: Any, **kwargs: Any) -> Any:
        out = pull(*args, **kwargs)
        seen["context"] = out[1]
        return out

    def install_from_fab(content: bytes, *args: Any, **kwargs: Any) -> Path:
        try:
            check_bundle(content, _site_versions(seen.get("context")))
        except BundleRefused as exc:
            say(f"refused the coordinator's app bundle: {exc}; the site keeps running")
            raise
        return install(content, *args, **kwargs)

    def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Any:
        inner = load_fn(*args, **kwargs)

        def load(*a: Any, **k: Any) -> Any:
            app = inner(*a, **k)
            if app is not installed.app:
                raise BundleRefused("the ClientApp Flower loaded is not the installed fedmri.client.app:app")
            return app

        return load

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab
    runtime.get_load_client_app_fn = get_load_client_app_fn
    runtime.pull_and_inflate_object_from_tree = functools.partial(runtime.pull_and_inflate_object_from_tree,
                                                                  **MESSAGE_PULL)
    _installed = True


def main() -> None:
    """``flwr-clientapp`` as the SuperNode starts it, with the bundle checks in front."""
    install_guard()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def write_launcher(folder: Path) -> Path:
    """``folder/flwr-clientapp``: a script run by this interpreter that runs the ClientApp with these checks.

    It hands the ClientApp to the site's warm starter when one listens beside it
    (:mod:`fedmri.client.warm`), else enters :func:`main` itself. The name is Flower's (the
    SuperExec starts ClientApps by it, and the site's reaper finds them by it); put
    ``folder`` first on the SuperNode's PATH.
    """
    from fedmri.client.warm import write_script

    return write_script(folder, LAUNCHER)
