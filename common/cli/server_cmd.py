"""``fedmri server``: the coordinator runs the Flower SuperLink with TLS and node authentication."""

from __future__ import annotations

from pathlib import Path

import typer

server_app = typer.Typer(help="[coordinator] Run the Flower SuperLink with TLS and node authentication.",
                         no_args_is_help=True)


@server_app.command("start")
def start_command(
    certs: Path | None = typer.Option(None, "--certs", help="Folder from `fedmri certs init` (ca.crt, "
                                      "server.crt/.key, *.pub); required unless --insecure."),
    state: Path = typer.Option(..., "--state", help="Folder for the SuperLink's database, Flower CLI config and runs."),
    host: str = typer.Option("0.0.0.0", "--host", help="Interface to listen on."),
    port: int = typer.Option(9092, "--port", help="Port of the Fleet, Control and ServerAppIo APIs "
                             "(flwr 1.42 serves all three on one port)."),
    federation: str = typer.Option("fedmri", "--federation", help="Connection name written to STATE/flwr/config.toml."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS and no node authentication: local tests only."),
    store: str = typer.Option("memory", "--store", help="Where the SuperLink keeps runs, registrations and message "
                              "payloads: memory (lost on restart) or disk (STATE/state.db, SQLite); see "
                              "docs/deployment.md."),
) -> None:
    """Run the SuperLink in the foreground; register every site key in --certs once it is up.

    Ctrl-C (or SIGTERM) stops it. `fedmri run` and `fedmri status` reach it with --state.
    """
    from fedmri.server.daemon import ServerSettings, serve

    raise typer.Exit(serve(ServerSettings(certs=certs, state=state, host=host, port=port,
                                          federation=federation, insecure=insecure, store=store)))


@server_app.command("register")
def register_command(
    sites: list[str] = typer.Argument(None, help="Site names (NAME.pub in --certs); all *.pub if none."),
    certs: Path = typer.Option(..., "--certs", help="Folder holding the sites' .pub files."),
    state: Path = typer.Option(..., "--state", help="The --state of the running `fedmri server start`."),
    federation: str | None = typer.Option(None, "--federation", help="Connection name (default: the server's)."),
) -> None:
    """Register site public keys with the running SuperLink (a key already registered is fine)."""
    from fedmri.certs import site_public_keys
    from fedmri.errors import InputError
    from fedmri.server.daemon import flwr_home, read_connection, register_site

    home = flwr_home(state)
    name, _ = read_connection(home, federation)
    keys = site_public_keys(certs.expanduser().resolve())
    wanted = sites or list(keys)
    missing = [s for s in wanted if s not in keys]
    if missing or not wanted:
        raise InputError(f"no public key for {', '.join(missing) or 'any site'} in {certs}; "
                         "issue one with `fedmri certs add-site NAME --dir DIR`")
    for site in wanted:
        typer.echo(register_site(state, name, keys[site])[0])
