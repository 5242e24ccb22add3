"""``dvla keys new DIR``: CURVE key pairs for an authenticated deployment.

Writes ``server.key``/``server.key_secret`` (presented by every server socket) and one
``<host>.key``/``<host>.key_secret`` per host (presented by that host's nodes) into DIR (mode
0700; secret files 0600). Copy DIR to every host and point the topology at it with
``[security] keys = "DIR"``. Servers admit exactly the client keys in DIR: to revoke a host,
delete its ``.key`` file and restart the servers. Existing pairs are kept unless
``--overwrite``. ``--topology FILE`` makes a pair for every host the file names.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dvla_bus.errors import ConfigError
from dvla_bus.security import generate_keys
from dvla_bus.topology import load_topology


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=__doc__)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    new = verbs.add_parser("new", help="create the server pair and one client pair per host")
    new.add_argument("directory", type=Path)
    new.add_argument("--host", action="append", default=[], help="a host name (repeatable)")
    new.add_argument("--topology", type=Path, help="make pairs for every host of this file")
    new.add_argument("--overwrite", action="store_true", help="replace existing pairs")
    new.set_defaults(func=_new)


def _new(args: argparse.Namespace) -> int:
    hosts = list(args.host)
    if args.topology is not None:
        hosts += [h.name for h in load_topology(args.topology).hosts]
    if not hosts:
        raise ConfigError("dvla keys new: give --host NAME (repeatable) or --topology FILE")
    written = generate_keys(args.directory, dict.fromkeys(hosts), overwrite=args.overwrite)
    for path in written:
        print(path)
    print(f"{len(written)} file(s) written to {args.directory}")
    return 0
