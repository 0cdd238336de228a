"""``fedmri certs``: the coordinator issues the federation's CA, server certificate and site keys."""

from __future__ import annotations

from pathlib import Path

import typer

certs_app = typer.Typer(help="[coordinator] Issue the CA, server certificate and site keys.", no_args_is_help=True)


@certs_app.command("init")
def init_command(
    out: Path = typer.Option(..., "--out", help="Folder to write ca.crt/ca.key, server.crt/server.key, <site>.key/.pub."),
    san: list[str] = typer.Option([], "--san", help="Host name or IP address sites use to reach the server "
                                  "(repeat). localhost and 127.0.0.1 are always added."),
    site: list[str] = typer.Option([], "--site", help="Site name to issue a key pair for (repeat)."),
    days: int = typer.Option(825, "--days", help="Validity of the certificates in days."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (every site then needs the new ca.crt)."),
) -> None:
    """Create a new certificate authority, the SuperLink's TLS certificate and site keys."""
    from fedmri.certs import init_authority

    issued = init_authority(out, san, site, days=days, force=force)
    folder = issued.folder
    typer.echo(f"Wrote to {folder}:")
    typer.echo(f"  {'ca.crt':<22} CA certificate: give it to every site (server.root_certificates)")
    typer.echo(f"  {'ca.key':<22} CA private key (0600): keep it offline; it signs new server certificates")
    typer.echo(f"  {'server.crt, server.key':<22} SuperLink certificate and key (0600): stay on the server")
    for name, (key, pub) in issued.sites.items():
        typer.echo(f"  {key.name + ', ' + pub.name:<22} site {name}: give {key.name} (0600) and ca.crt to "
                   f"{name}'s admin (server.node_key); {pub.name} stays here")
    typer.echo(f"`fedmri server start --certs {folder} ...` registers every <site>.pub found here.")


@certs_app.command("add-site")
def add_site_command(
    name: str = typer.Argument(..., help="Site name; becomes NAME.key and NAME.pub."),
    folder: Path = typer.Option(..., "--dir", help="The folder made by `fedmri certs init`."),
) -> None:
    """Issue one more site key pair in an existing certs folder."""
    from fedmri.certs import issue_site_key

    key, pub = issue_site_key(folder, name)
    typer.echo(f"Wrote {key} (0600) and {pub}.")
    typer.echo(f"Give {key.name} and ca.crt to {name}'s admin. Register {pub.name} with the running server: "
               f"`fedmri server register {name} --certs {key.parent} --state STATE` "
               "(or restart `fedmri server start`, which registers every .pub).")
