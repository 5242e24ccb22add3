"""``dvla topo new|validate|show|plan|render``: author and check topology files.

* ``new`` writes a topology from a few flags (racks, hosts per rack, roles, bandwidths); the text
  is validated before it is written, so what ``new`` prints always passes ``validate``.
* ``validate FILE`` checks a file: exit 0 with a one-line summary, or exit 2 naming the file and
  the key path of the first mistake.
* ``show FILE`` prints racks, hosts, the nodes each runs and the replication tree.
* ``plan FILE --params N --dtype D`` predicts one weight distribution (:mod:`dvla_bus.planner`).
* ``render FILE -o OUT.svg|png`` draws racks, hosts, roles and the replication tree.

Nothing here touches the network: everything is computed from the file. Every read-only verb
takes ``--json`` (one JSON document on stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from dvla_bus.errors import ConfigError
from dvla_bus.planner import DTYPE_BYTES, Plan, PlanModel, StrategyPlan, parse_params, plan
from dvla_bus.topology import (
    CHECKSUMS,
    ENCRYPT_MODES,
    Topology,
    format_bandwidth,
    format_duration,
    format_size,
    load_topology,
    parse_bandwidth,
    parse_duration,
    parse_size,
    parse_topology,
)
from dvla_bus.tree import ReplicationTree, replication_tree
from dvla_nodes.roles import known_roles

# `show` lists at most this many hosts (and tree lines) unless --all.
SHOW_LIMIT = 64
# Beyond this depth the tree is listed rack by rack instead of drawn with indentation.
DRAW_DEPTH = 24


def register(sub: Any, name: str, help_text: str) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    new = verbs.add_parser("new", help="write a topology file from a few flags")
    new.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    new.add_argument("--force", action="store_true", help="overwrite an existing --output")
    new.add_argument("--name", default="cluster", help="topology name (default: cluster)")
    new.add_argument("--racks", type=int, default=1, help="number of racks (default 1)")
    new.add_argument("--hosts-per-rack", type=int, default=1, help="hosts in each rack (default 1)")
    new.add_argument(
        "--root-roles",
        default="coordinator=1,producer=1",
        help="roles of the first host, ROLE=N,... (default: coordinator=1,producer=1)",
    )
    new.add_argument(
        "--roles", default="consumer=1", help="roles of every other host (default: consumer=1)"
    )
    new.add_argument(
        "--source",
        help="role whose host is the replication root (default: the first non-hub root role)",
    )
    new.add_argument("--nic", help="host NIC bandwidth, e.g. 25Gbit")
    new.add_argument("--uplink", help="rack uplink bandwidth, e.g. 400Gbit")
    new.add_argument("--spine", help="spine aggregate bandwidth, e.g. 12.8Tbit")
    new.add_argument("--latency", help="one-way latency of a hop inside a rack, e.g. 20us")
    new.add_argument("--fanout", type=int, default=2, help="children per host (default 2)")
    new.add_argument("--rack-fanout", type=int, help="child racks per rack (default: --fanout)")
    new.add_argument("--chunk", default="4MiB", help="replication chunk size (default 4MiB)")
    new.add_argument("--checksum", default="blake2b", choices=CHECKSUMS)
    new.add_argument("--encrypt", default="always", choices=ENCRYPT_MODES)
    new.add_argument("--subnet", default="10.77", help="first two octets of addresses (10.77)")
    new.add_argument("--port", type=int, default=5555, help="control hub TCP port (5555)")
    new.add_argument(
        "--compact", action="store_true", help="rack templates instead of one table per host"
    )
    new.set_defaults(func=_new)

    validate = verbs.add_parser("validate", help="check a file; exit 2 naming the bad key")
    validate.add_argument("file", type=Path)
    validate.add_argument("--json", action="store_true", help="machine-readable output")
    validate.set_defaults(func=_validate)

    show = verbs.add_parser("show", help="racks, hosts, nodes and the replication tree")
    show.add_argument("file", type=Path)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--all", action="store_true", help=f"list every host (else {SHOW_LIMIT})")
    show.set_defaults(func=_show)

    plan_p = verbs.add_parser("plan", help="predict the time and bytes of one distribution")
    plan_p.add_argument("file", type=Path)
    plan_p.add_argument("--params", required=True, help="parameter count: 7e9, 7B, 1T, 125M")
    plan_p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    plan_p.add_argument("--fanout", type=int, help="override replication.fanout")
    plan_p.add_argument("--rack-fanout", type=int, help="override replication.rack_fanout")
    plan_p.add_argument(
        "--hop-overhead",
        default="1ms",
        help="what a relay adds per hop besides the chunk time (default 1ms)",
    )
    plan_p.add_argument("--json", action="store_true", help="machine-readable output")
    plan_p.set_defaults(func=_plan)

    render = verbs.add_parser("render", help="draw racks, hosts, roles and the tree")
    render.add_argument("file", type=Path)
    render.add_argument("-o", "--output", type=Path, required=True, help="OUT.svg or OUT.png")
    render.add_argument("--json", action="store_true", help="print what was written as JSON")
    render.set_defaults(func=_render)


def _load(path: Path) -> Topology:
    return load_topology(path, known_roles())


# ---------------------------------------------------------------------------------------- new


def _role_counts(text: str, flag: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        role, sep, count = item.partition("=")
        try:
            out[role.strip()] = int(count) if sep else 1
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected ROLE=N,... (e.g. consumer=2)") from None
    return out


def _toml_table(d: dict[str, int]) -> str:
    return "{ " + ", ".join(f"{k} = {v}" for k, v in d.items()) + " }"


def scaffold(args: argparse.Namespace) -> str:
    """The text of a new topology (see ``dvla topo new --help``); raises :class:`ConfigError`
    for a bad flag. Host ``r<R>h<H>`` has address ``<subnet>.<R+1>.<H+1>``."""
    racks, per = args.racks, args.hosts_per_rack
    if racks < 1 or per < 1:
        raise ConfigError(f"--racks and --hosts-per-rack must be >= 1, got {racks} and {per}")
    octets = args.subnet.split(".")
    if len(octets) != 2 or not all(o.isdigit() and int(o) < 256 for o in octets):
        raise ConfigError(f"--subnet {args.subnet!r}: expected two octets, e.g. 10.77")
    if racks > 254 or per > 254:
        raise ConfigError("at most 254 racks and 254 hosts per rack fit the address scheme")
    root_roles = _role_counts(args.root_roles, "--root-roles")
    roles = _role_counts(args.roles, "--roles")
    hub = "coordinator"
    source = args.source or next((r for r in root_roles if r != hub), hub)
    # Check the flags with units now, so a mistake names the flag rather than the file.
    for flag, value, parse in (
        ("--nic", args.nic, parse_bandwidth),
        ("--uplink", args.uplink, parse_bandwidth),
        ("--spine", args.spine, parse_bandwidth),
        ("--latency", args.latency, parse_duration),
        ("--chunk", args.chunk, parse_size),
    ):
        if value is not None:
            try:
                parse(value)
            except ConfigError as exc:
                raise ConfigError(f"{flag}: {exc}") from None

    one_host = racks * per == 1
    lines = [
        f"# Written by `dvla topo new`: {racks} rack(s) x {per} host(s).",
        "# Schema: topologies/README.md.",
        "schema = 1",
        f'name = "{args.name}"',
        "",
        "[control]",
        'endpoint = "ipc://{run_dir}/control.sock"'
        if one_host
        else f'endpoint = "tcp://{args.subnet}.1.1:{args.port}"',
        f'hosted_by = "{hub}"',
        "",
    ]
    links = [
        ("host_nic", args.nic),
        ("rack_uplink", args.uplink),
        ("spine", args.spine),
        ("host_latency", args.latency),
    ]
    if any(v for _, v in links):
        lines += ["[links]", *(f'{k} = "{v}"' for k, v in links if v), ""]
    rack_fanout = args.rack_fanout if args.rack_fanout is not None else args.fanout
    lines += [
        "[replication]",
        f'source = "{source}"',
        f"fanout = {args.fanout}",
        f"rack_fanout = {rack_fanout}",
        f'chunk = "{args.chunk}"',
        f'checksum = "{args.checksum}"',
        "",
        "[data]",
        f'encrypt = "{args.encrypt}"',
        "",
    ]
    address = "127.0.0.1" if one_host else f"{args.subnet}.1.1"
    root_host = [
        "# The root: the weights' source and the control hub.",
        "[[hosts]]",
        'name = "r0h0"',
        'rack = "r0"',
        f'address = "{address}"',
        f"roles = {_toml_table(root_roles)}",
        "",
    ]
    if args.compact:
        rest = f'address = "{args.subnet}.1.{{h+2}}", roles = {_toml_table(roles)}'
        lines += ["[[racks]]", 'name = "r0"']
        if per > 1:
            lines.append(f'hosts = {{ name = "r0h{{h+1}}", count = {per - 1}, {rest} }}')
        lines.append("")
        if racks > 1:
            lines += [
                "[[racks]]",
                'name = "r{r+1}"',
                f"count = {racks - 1}",
                f'hosts = {{ name = "r{{r+1}}h{{h}}", count = {per}, '
                f'address = "{args.subnet}.{{r+2}}.{{h+1}}", roles = {_toml_table(roles)} }}',
                "",
            ]
        lines += root_host
    else:
        for r in range(racks):
            lines += ["[[racks]]", f'name = "r{r}"', ""]
        lines += root_host
        for r in range(racks):
            for h in range(per):
                if r == h == 0:
                    continue
                lines += [
                    "[[hosts]]",
                    f'name = "r{r}h{h}"',
                    f'rack = "r{r}"',
                    f'address = "{args.subnet}.{r + 1}.{h + 1}"',
                    f"roles = {_toml_table(roles)}",
                    "",
                ]
    text = "\n".join(lines)
    parse_topology(tomllib.loads(text), "<dvla topo new>", known_roles())
    return text


def _new(args: argparse.Namespace) -> int:
    text = scaffold(args)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        raise ConfigError(f"{args.output} exists; pass --force to overwrite it")
    args.output.write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------- validate


def _validate(args: argparse.Namespace) -> int:
    topo = _load(args.file)
    nodes = len(topo.placements())
    if args.json:
        doc = {
            "file": str(args.file),
            "ok": True,
            "hosts": len(topo.hosts),
            "racks": len(topo.racks),
            "nodes": nodes,
        }
        print(json.dumps(doc, indent=2))
        return 0
    counts = f"{len(topo.hosts)} host(s), {len(topo.racks)} rack(s), {nodes} node(s)"
    print(f"{args.file}: ok ({counts})")
    return 0


# --------------------------------------------------------------------------------------- show


def _bw(value: float | None) -> str:
    return "unlimited" if value is None else format_bandwidth(value)


def _show_doc(topo: Topology, tree: ReplicationTree) -> dict[str, Any]:
    rep = topo.replication
    links = topo.links
    by_rack = topo.rack_hosts()
    return {
        "name": topo.name,
        "file": topo.file,
        "control": {"endpoint": topo.control.endpoint, "hosted_by": topo.control.hosted_by},
        "links": {
            "host_nic_bps": links.host_nic_bps,
            "rack_uplink_bps": links.rack_uplink_bps,
            "spine_bps": links.spine_bps,
            "host_latency_s": links.host_latency_s,
            "uplink_latency_s": links.uplink_latency_s,
            "spine_latency_s": links.spine_latency_s,
        },
        "replication": {
            "source": rep.source,
            "root": tree.root,
            "fanout": rep.fanout,
            "rack_fanout": rep.rack_fanout,
            "chunk_bytes": rep.chunk_bytes,
            "checksum": rep.checksum,
        },
        "data": {"port": topo.data.port, "encrypt": topo.data.encrypt},
        "racks": [
            {
                "name": r.name,
                "uplink_bps": topo.uplink_bps(r.name),
                "hosts": len(by_rack[r.name]),
                "head": tree.heads.get(r.name),
            }
            for r in topo.racks
        ],
        "hosts": [
            {
                "name": h.name,
                "address": h.address,
                "rack": h.rack,
                "nic_bps": topo.nic_bps(h.name),
                "python": h.python,
                "nodes": [p.node_id for p in topo.placements(h.name)],
            }
            for h in topo.hosts
        ],
        "tree": {
            "root": tree.root,
            "depth": tree.depth,
            "cross_rack_edges": len(tree.cross_rack_edges()),
            "nodes": [
                {
                    "host": n.host,
                    "parent": n.parent,
                    "depth": n.depth,
                    "crosses_rack": n.crosses_rack,
                    "children": list(n.children),
                    "readers": list(n.readers),
                }
                for n in tree.nodes.values()
            ],
        },
    }


def _tree_lines(tree: ReplicationTree) -> list[str]:
    """The tree drawn with box characters (iteratively: chains can be thousands deep)."""

    def label(host: str) -> str:
        n = tree.nodes[host]
        cross = "  ⇢ enters rack " + n.rack if n.crosses_rack else ""
        return f"{host} [{n.rack}]{cross}"

    if tree.depth > DRAW_DEPTH:
        out = [f"(depth {tree.depth}: listed as host ⇐ parent, parents first)"]
        for n in tree.nodes.values():
            if n.parent is not None:
                out.append(f"{label(n.host)} ⇐ {n.parent}  (depth {n.depth})")
            else:
                out.append(f"{label(n.host)}  (root)")
        return out
    out = [label(tree.root)]
    top = tree.nodes[tree.root].children
    stack = [(c, "", i == len(top) - 1) for i, c in enumerate(top)][::-1]
    while stack:
        host, prefix, last = stack.pop()
        out.append(f"{prefix}{'└─ ' if last else '├─ '}{label(host)}")
        kids = tree.nodes[host].children
        child_prefix = prefix + ("   " if last else "│  ")
        stack.extend(reversed([(c, child_prefix, i == len(kids) - 1) for i, c in enumerate(kids)]))
    return out


def _show(args: argparse.Namespace) -> int:
    topo = _load(args.file)
    tree = replication_tree(topo)
    if args.json:
        print(json.dumps(_show_doc(topo, tree), indent=2))
        return 0
    hub = topo.control
    rep = topo.replication
    limit = None if args.all else SHOW_LIMIT
    print(f"topology {topo.name}  (control hub: {hub.endpoint}, in the {hub.hosted_by})")
    links = topo.links
    print(
        f"links: host NIC {_bw(links.host_nic_bps)}, rack uplink {_bw(links.rack_uplink_bps)}, "
        f"spine {_bw(links.spine_bps)}; latency in rack {format_duration(links.host_latency_s)}"
    )
    by_rack = topo.rack_hosts()
    shown = 0
    for rack in topo.racks:
        hosts = by_rack[rack.name]
        print(
            f"rack {rack.name}: {len(hosts)} host(s), uplink {_bw(topo.uplink_bps(rack.name))}, "
            f"head {tree.heads.get(rack.name)}"
        )
        for name in hosts:
            if limit is not None and shown >= limit:
                break
            shown += 1
            h = topo.host(name)
            nodes = ", ".join(p.node_id for p in topo.placements(name)) or "no nodes"
            py = "".join(f"  [{r}: {exe}]" for r, exe in h.python.items())
            print(f"  {name} ({h.address}, NIC {_bw(topo.nic_bps(name))}): {nodes}{py}")
    if limit is not None and len(topo.hosts) > limit:
        print(f"  ... {len(topo.hosts) - limit} more host(s); --all lists every one")
    print(
        f"replication tree: root {tree.root} (source role {rep.source}), fanout {rep.fanout}, "
        f"rack fanout {rep.rack_fanout}, depth {tree.depth}, "
        f"{len(tree.cross_rack_edges())} rack crossing(s), chunk {format_size(rep.chunk_bytes)}, "
        f"checksum {rep.checksum}, data encryption {topo.data.encrypt}"
    )
    lines = _tree_lines(tree)
    for line in lines if limit is None else lines[: limit + 1]:
        print(f"  {line}")
    if limit is not None and len(lines) > limit + 1:
        print(f"  ... {len(lines) - limit - 1} more line(s); --all shows the whole tree")
    return 0


# --------------------------------------------------------------------------------------- plan


def _seconds(s: float) -> str:
    if s >= 3600:  # "190h" reads better than "6.85e+05s"
        return f"{s / 3600:.3g}h"
    return format_duration(s, digits=3)


def _count(n: int) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.4g}{suffix}"
    return str(n)


def _strategy_row(p: StrategyPlan, bound: float) -> str:
    ratio = f"{p.time_s / bound:.2f}" if bound > 0 else "-"
    return (
        f"  {p.strategy:<5} {_seconds(p.time_s):>9} {_seconds(p.stream_s):>9} "
        f"{_seconds(p.fill_s):>9} {ratio:>7} {p.depth:>6} {p.max_streams_per_host:>8}  "
        f"{p.bottleneck}"
    )


def _print_plan(pl: Plan) -> None:
    print(
        f"plan {pl.file}: {_count(pl.params)} params x {pl.dtype} = "
        f"{format_size(pl.weight_bytes)}, "
        f"{pl.n_chunks} chunk(s) of {format_size(pl.chunk_bytes)}, checksum {pl.checksum}, "
        f"data encryption {pl.encrypt}"
    )
    print(
        f"{pl.hosts} host(s) in {pl.racks} rack(s); tree fanout {pl.fanout}, rack fanout "
        f"{pl.rack_fanout}; weight pool {format_size(pl.pool_bytes_per_host)} per host (2 slots)"
    )
    print(f"lower bound {_seconds(pl.bound_s)} ({pl.bound_by})")
    print(
        f"  {'':<5} {'time':>9} {'stream':>9} {'fill':>9} {'x bound':>7} {'depth':>6} "
        f"{'streams':>8}  bottleneck"
    )
    for s in (pl.tree, pl.flat, pl.ring):
        print(_strategy_row(s, pl.bound_s))
    for s in (pl.tree, pl.flat, pl.ring):
        parts = [
            f"{ll.link_class} {format_size(ll.bytes)} (busiest {ll.busiest}: "
            f"{format_size(ll.max_link_bytes)})"
            for ll in s.links
            if ll.bytes
        ]
        print(
            f"bytes ({s.strategy}): "
            + ("; ".join(parts) or "none")
            + f"; across rack boundaries {format_size(s.cross_rack_bytes)}"
        )
    if pl.best_fanout != pl.fanout:
        print(
            f"hint: fanout = rack_fanout = {pl.best_fanout} would take "
            f"{_seconds(pl.best_fanout_time_s)} (vs {_seconds(pl.tree.time_s)})"
        )


def _plan(args: argparse.Namespace) -> int:
    topo = _load(args.file)
    for flag, value in (("--fanout", args.fanout), ("--rack-fanout", args.rack_fanout)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    try:
        overhead = parse_duration(args.hop_overhead)
    except ConfigError as exc:
        raise ConfigError(f"--hop-overhead: {exc}") from None
    result = plan(
        topo,
        parse_params(args.params),
        args.dtype,
        model=PlanModel(hop_overhead_s=overhead),
        fanout=args.fanout,
        rack_fanout=args.rack_fanout,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_plan(result)
    return 0


# ------------------------------------------------------------------------------------- render


def _layout(topo: Topology, tree: ReplicationTree) -> dict[str, tuple[float, float]]:
    """Host -> (x, y): racks side by side (one unit wide each), a rack's hosts in rows by their
    depth below the rack's head, spread across the rack's width."""
    pos: dict[str, tuple[float, float]] = {}
    for i, (rack, hosts) in enumerate(topo.rack_hosts().items()):
        if not hosts:
            continue
        base = tree.nodes[tree.heads[rack]].depth
        rows: dict[int, list[str]] = {}
        for h in hosts:
            rows.setdefault(tree.nodes[h].depth - base, []).append(h)
        for level, members in rows.items():
            for j, h in enumerate(members):
                pos[h] = (i + (j + 0.5) / len(members) * 0.9 + 0.05, -float(level))
    return pos


def render_topology(topo: Topology, output: Path) -> dict[str, Any]:
    """Draw ``topo`` to ``output`` (format from the suffix: .svg or .png); returns a summary.
    Uses matplotlib's object API with the Agg/SVG canvases (no pyplot, no display)."""
    suffix = output.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ConfigError(f"{output}: the output must end in .svg or .png")
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    tree = replication_tree(topo)
    pos = _layout(topo, tree)
    n_racks = len(topo.racks)
    rows = 1 + max((-y for _, y in pos.values()), default=0.0)
    labels = len(topo.hosts) <= 64
    fig = Figure(figsize=(min(3.0 + 2.4 * n_racks, 40.0), min(2.5 + 1.1 * rows, 30.0)))
    ax = fig.add_subplot()
    for i, rack in enumerate(topo.racks):
        ax.add_patch(
            Rectangle(
                (i + 0.01, -rows + 0.45), 0.98, rows + 0.05, fill=True, alpha=0.08, color="C0"
            )
        )
        if n_racks <= 64:
            ax.text(i + 0.5, 0.75, rack.name, ha="center", va="bottom", fontsize=9, weight="bold")
    inside = [(pos[u], pos[v]) for u, v in tree.edges() if not tree.nodes[v].crosses_rack]
    across = [(pos[u], pos[v]) for u, v in tree.edges() if tree.nodes[v].crosses_rack]
    ax.add_collection(LineCollection(inside, colors="0.45", linewidths=0.8, zorder=1))
    ax.add_collection(
        LineCollection(across, colors="C3", linewidths=1.4, linestyles="dashed", zorder=1)
    )
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    colors = ["C3" if h == tree.root else "C0" for h in pos]
    ax.scatter(xs, ys, s=60 if labels else 4, c=colors, zorder=2)
    if labels:
        for h, (x, y) in pos.items():
            roles = ", ".join(
                f"{r} x{n}" if n > 1 else r for r, n in topo.host(h).roles.items() if n
            )
            ax.text(x, y - 0.12, f"{h}\n{roles}", ha="center", va="top", fontsize=7)
    rep = topo.replication
    ax.set_title(
        f"{topo.name}: {len(topo.hosts)} hosts in {n_racks} racks; tree from {tree.root}, "
        f"fanout {rep.fanout}, rack fanout {rep.rack_fanout}, depth {tree.depth} "
        "(dashed red: crosses a rack)",
        fontsize=10,
    )
    ax.set_xlim(0, n_racks)
    ax.set_ylim(-rows + 0.4, 1.1)
    ax.set_axis_off()
    fig.savefig(output, format=suffix[1:], dpi=100, bbox_inches="tight")
    return {
        "file": topo.file,
        "output": str(output),
        "hosts": len(topo.hosts),
        "racks": n_racks,
        "depth": tree.depth,
        "bytes": output.stat().st_size,
    }


def _render(args: argparse.Namespace) -> int:
    summary = render_topology(_load(args.file), args.output)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {args.output} ({summary['hosts']} hosts, {summary['racks']} racks)")
    return 0
