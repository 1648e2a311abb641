"""``kvctl``: the kvcluster command line.

Exit status: 0 success; 1 failure (a key that ``get`` did not find, a node
that cannot be reached, a quorum that was not met, ...); 2 bad usage or
input. Failures print one line on stderr; with ``--json`` a JSON object
describing the error is printed on stdout as well.
"""

from __future__ import annotations

import base64
import binascii
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from kvcluster import errors
from kvcluster.cli import dev
from kvcluster.client import AllowListPolicy, Client, ReadResult
from kvcluster.client._core import parse_nodes

NODES_ENV = "KVCLUSTER_NODES"
DEFAULT_NODES = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"


class Ctx:
    def __init__(self, nodes: str, as_json: bool, timeout: float, direct: bool) -> None:
        self.nodes = nodes
        self.as_json = as_json
        self.timeout = timeout
        self.direct = direct

    def client(self) -> Client:
        policy = AllowListPolicy(parse_nodes(self.nodes)) if self.direct else None
        return Client(self.nodes, timeout=self.timeout, load_balancing=policy)

    def emit(self, obj: Any, text: str | Callable[[], None]) -> None:
        """Print ``obj`` as JSON with --json, else the human text."""
        if self.as_json:
            click.echo(json.dumps(obj, indent=None, sort_keys=True))
        elif callable(text):
            text()
        else:
            click.echo(text)

    def fail(self, err: Exception, code: int = 1) -> NoReturn:
        if isinstance(err, errors.KVError):
            data = errors.to_wire(err)
            message = err.message
            if isinstance(err, errors.InvalidArgument):
                code = 2
        else:
            data = {"kind": "error", "message": str(err)}
            message = str(err)
        if self.as_json:
            click.echo(json.dumps({"error": data}, sort_keys=True))
        click.echo(f"kvctl: {message}", err=True)
        sys.exit(code)


pass_ctx = click.make_pass_decorator(Ctx)


def _quorum_option(name: str, what: str) -> Callable[[Any], Any]:
    return click.option(
        f"--{name}",
        default=None,
        metavar="N|one|quorum|all",
        help=f"{what} quorum for this request (default: the node's).",
    )


def _decode_context(text: str | None, ctx: Ctx) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        ctx.fail(errors.InvalidArgument("--context is not valid base64", "context"))


def _show(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode()


def _values_json(values: list[bytes]) -> dict[str, Any]:
    try:
        return {"values": [v.decode() for v in values], "encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"values": [base64.b64encode(v).decode() for v in values], "encoding": "base64"}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--nodes",
    envvar=NODES_ENV,
    default=DEFAULT_NODES,
    show_default=True,
    metavar="HOST:PORT[,...]",
    help=f"Nodes to contact (env {NODES_ENV}).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds per request.")
@click.option(
    "--direct",
    is_flag=True,
    help="Send requests only to the --nodes given (no routing to other replicas).",
)
@click.version_option(package_name="kvcluster")
@click.pass_context
def cli(click_ctx: click.Context, nodes: str, as_json: bool, timeout: float, direct: bool) -> None:
    """Talk to a kvcluster cluster, or run a local one for development.

    \b
    kvctl dev up --nodes 3            start a local 3-node cluster
    kvctl put user:1 alice            write (replacing what a read would show)
    kvctl get user:1                  read; exit 1 if absent, one line per sibling
    kvctl cluster status              members, liveness, hints
    """
    try:
        parse_nodes(nodes)
    except errors.InvalidArgument as err:
        Ctx(nodes, as_json, timeout, direct).fail(err)
    click_ctx.obj = Ctx(nodes, as_json, timeout, direct)


# -- data -------------------------------------------------------------------------------


@cli.command()
@click.argument("key")
@click.argument("value", required=False)
@click.option(
    "--file", "value_file", type=click.File("rb"), help="Read the value from a file ('-' = stdin)."
)
@_quorum_option("w", "Write")
@_quorum_option("r", "Read")
@click.option(
    "--strict", is_flag=True, help="Count only primary replicas; fail rather than use fallbacks."
)
@click.option("--context", default=None, help="Causal context (base64) from an earlier get.")
@click.option(
    "--blind",
    is_flag=True,
    help="Do not read first: the value becomes a sibling of any existing one.",
)
@pass_ctx
def put(
    ctx: Ctx,
    key: str,
    value: str | None,
    value_file: Any,
    w: str | None,
    r: str | None,
    strict: bool,
    context: str | None,
    blind: bool,
) -> None:
    """Write VALUE under KEY.

    By default kvctl first reads KEY and writes with that read's context, so
    the new value replaces every version the read saw. --context uses a given
    context instead; --blind writes without one.
    """
    if (value is None) == (value_file is None):
        ctx.fail(errors.InvalidArgument("give exactly one of VALUE or --file", "value"))
    data = value.encode() if value is not None else value_file.read()
    if blind and context is not None:
        ctx.fail(errors.InvalidArgument("--blind and --context exclude each other", "context"))
    ctx_bytes = _decode_context(context, ctx)
    try:
        with ctx.client() as kv:
            if ctx_bytes is None and not blind:
                ctx_bytes = kv.get(key, r=r, strict=strict).context
            result = kv.put(key, data, context=ctx_bytes, w=w, strict=strict)
    except errors.KVError as err:
        ctx.fail(err)
    ctx.emit(
        {
            "ok": True,
            "context": base64.b64encode(result.context).decode(),
            **_values_json(result.values),
        },
        "OK",
    )


@cli.command()
@click.argument("key")
@_quorum_option("r", "Read")
@click.option("--strict", is_flag=True, help="Count only primary replicas.")
@pass_ctx
def get(ctx: Ctx, key: str, r: str | None, strict: bool) -> None:
    """Print the value of KEY; one line per sibling. Exit 1 if absent."""
    try:
        with ctx.client() as kv:
            result: ReadResult = kv.get(key, r=r, strict=strict)
    except errors.KVError as err:
        ctx.fail(err)
    obj = {
        "found": result.found,
        "context": base64.b64encode(result.context).decode(),
        **_values_json(result.values),
    }

    def text() -> None:
        if len(result.values) > 1:
            click.echo(f"# {len(result.values)} siblings", err=True)
        for v in result.values:
            click.echo(_show(v))

    ctx.emit(obj, text)
    if not result.found:
        if not ctx.as_json:
            click.echo(f"kvctl: {key}: not found", err=True)
        sys.exit(1)


@cli.command()
@click.argument("key")
@_quorum_option("w", "Write")
@_quorum_option("r", "Read")
@click.option("--strict", is_flag=True, help="Count only primary replicas.")
@click.option("--context", default=None, help="Delete only what this context (base64) saw.")
@pass_ctx
def delete(
    ctx: Ctx, key: str, w: str | None, r: str | None, strict: bool, context: str | None
) -> None:
    """Delete KEY (every version a quorum read sees, or what --context saw)."""
    ctx_bytes = _decode_context(context, ctx)
    try:
        with ctx.client() as kv:
            found = kv.delete(key, context=ctx_bytes, w=w, r=r, strict=strict)
    except errors.KVError as err:
        ctx.fail(err)
    ctx.emit({"ok": True, "found": found}, "OK" if found else "OK (nothing to delete)")


# -- cluster ------------------------------------------------------------------------------


@cli.group()
def cluster() -> None:
    """Inspect and repair the cluster."""


@cluster.command("status")
@click.option(
    "--node",
    default=None,
    metavar="HOST:PORT",
    help="Ask this node (default: the first that answers).",
)
@pass_ctx
def cluster_status(ctx: Ctx, node: str | None) -> None:
    """Members as one node sees them: up/suspect/down, partitions, hints pending."""
    try:
        with ctx.client() as kv:
            st = kv.status(node)
    except errors.KVError as err:
        ctx.fail(err)

    def text() -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        ready = "ready" if st["ready"] else "NOT READY (no agreed ring)"
        console.print(
            f"node {st['node_id']} ({st['address']}), {ready}, ring epoch {st['ring_epoch']}, "
            f"Q={st['partitions']} N={st['n_val']} R={st['r']} W={st['w']}, "
            f"{st['keys']} keys, hints pending {st['hints_pending']}"
        )
        table = Table("member", "address", "state", "partitions", "primaries", "hints", "phi")
        colour = {"up": "green", "self": "green", "suspect": "yellow", "down": "red"}
        for m in st["members"]:
            state = m["state"]
            table.add_row(
                m["id"],
                m["address"],
                f"[{colour.get(state, 'white')}]{state}[/]",
                str(m["partitions"]),
                str(m["primaries"]),
                str(m["hints_pending"]),
                f"{m['phi']:.1f}",
            )
        console.print(table)

    ctx.emit(st, text)


@cluster.command("ring")
@pass_ctx
def cluster_ring(ctx: Ctx) -> None:
    """The agreed ring: owners of each partition."""
    try:
        with ctx.client() as kv:
            ring = kv.ring()
    except errors.KVError as err:
        ctx.fail(err)

    def text() -> None:
        click.echo(f"epoch {ring['epoch']}, {ring['partitions']} partitions, N={ring['n_val']}")
        for m in ring["members"]:
            click.echo(f"  member {m['id']} {m['address']}")
        for i, p in enumerate(ring["owners"]):
            click.echo(f"  partition {i:5d}: {' '.join(p['owners'])}")

    ctx.emit(ring, text)


@cluster.command("repair")
@click.option("--partition", type=click.IntRange(min=0), default=None, help="Only this partition.")
@click.option("--node", default=None, metavar="HOST:PORT", help="Node that runs the repair.")
@pass_ctx
def cluster_repair(ctx: Ctx, partition: int | None, node: str | None) -> None:
    """Run anti-entropy now: compare Merkle trees with the other replicas and
    exchange the keys that differ. Shows progress; --json prints a summary."""
    last: dict[str, Any] = {}
    try:
        with ctx.client() as kv:
            stream = kv.repair(partition, node, timeout=max(ctx.timeout, 3600.0))
            if ctx.as_json:
                last = _last_of(stream)
            else:
                from rich.progress import Progress

                with Progress(transient=False) as progress:
                    task = progress.add_task("repairing", total=None)
                    for last in stream:
                        progress.update(
                            task,
                            total=last["partitions_total"] or None,
                            completed=last["partitions_done"],
                            description=f"repairing ({last['keys_repaired']} keys repaired)",
                        )
    except errors.KVError as err:
        ctx.fail(err)
    summary = {
        "partitions_compared": last.get("partitions_done", 0),
        "keys_compared": int(last.get("keys_compared", 0)),
        "keys_exchanged": int(last.get("keys_exchanged", 0)),
        "keys_repaired": int(last.get("keys_repaired", 0)),
        "bytes_exchanged": int(last.get("bytes_exchanged", 0)),
        "seconds": last.get("seconds", 0.0),
        "errors": last.get("errors", []),
    }
    ctx.emit(
        summary,
        f"repaired {summary['keys_repaired']} keys; {summary['partitions_compared']} partitions "
        f"compared, {summary['keys_exchanged']} keys / {summary['bytes_exchanged']} bytes "
        f"exchanged in {summary['seconds']:.2f}s",
    )
    if summary["errors"]:
        click.echo(f"kvctl: repair incomplete: {summary['errors'][0]}", err=True)
        sys.exit(1)


def _last_of(stream: Any) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for last in stream:  # noqa: B007 (the last progress message is the summary)
        pass
    return last


# -- dev ----------------------------------------------------------------------------------

_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=dev.DEFAULT_DIR,
    show_default=True,
    help="Directory holding cluster.json, data and logs.",
)


@cli.group("dev")
def dev_group() -> None:
    """Run a local cluster of real node processes (for development and tests)."""


def _dev(ctx: Ctx, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except dev.DevError as err:
        ctx.fail(err)


@dev_group.command("up")
@click.option("--nodes", "count", type=int, default=3, show_default=True, help="Number of nodes.")
@click.option(
    "--base-port",
    type=int,
    default=7101,
    show_default=True,
    help="Port of n1; n2 uses the next, ...",
)
@click.option("--n-val", type=int, default=None, help="Replicas per key (default min(3, nodes)).")
@click.option("--r", type=int, default=None, help="Default read quorum (default N/2+1).")
@click.option("--w", type=int, default=None, help="Default write quorum (default N/2+1).")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="Extra node setting, e.g. --set request_timeout=2.",
)
@_dir_option
@pass_ctx
def dev_up(
    ctx: Ctx,
    count: int,
    base_port: int,
    n_val: int | None,
    r: int | None,
    w: int | None,
    settings: tuple[str, ...],
    directory: Path,
) -> None:
    """Start a local cluster in the background and wait until it is ready."""
    extra: dict[str, str] = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep:
            ctx.fail(errors.InvalidArgument(f"--set {item!r} is not NAME=VALUE", "set"))
        extra[name.strip()] = value.strip()
    cluster = _dev(ctx, lambda: dev.up(directory, count, base_port, n_val, r, w, settings=extra))
    nodes = ",".join(cluster.addresses)

    def text() -> None:
        state = cluster.dir / dev.STATE_FILE
        click.echo(f"started {len(cluster.nodes)} nodes (state in {state}):")
        for n in cluster.nodes:
            click.echo(
                f"  {n.id}  {n.address}  pid {n.pid}  "
                f"metrics http://{n.metrics}/metrics  log {n.log}"
            )
        click.echo("\nreach it with:")
        click.echo(f"  export {NODES_ENV}={nodes}")
        click.echo("  kvctl put hello world && kvctl get hello")
        click.echo(
            f"  python -c \"from kvcluster import Client; print(Client('{nodes}').get('hello'))\""
        )
        click.echo(f"stop it with: kvctl dev down --dir {directory}")

    ctx.emit(
        {"nodes": [{"id": n.id, "address": n.address, "pid": n.pid} for n in cluster.nodes]}, text
    )


@dev_group.command("status")
@_dir_option
@pass_ctx
def dev_status(ctx: Ctx, directory: Path) -> None:
    """Which local nodes run and answer."""
    rows = _dev(ctx, lambda: dev.status(directory))

    def text() -> None:
        for row in rows:
            state = "ready" if row["ready"] else ("running" if row["running"] else "stopped")
            click.echo(f"{row['id']:4} {row['address']:21} pid {row['pid']:<8} {state}")

    ctx.emit(rows, text)


def _signal_command(name: str, doc: str, fn: Callable[[Path, str], dev.DevNode]) -> None:
    @dev_group.command(name, help=doc)
    @click.argument("node")
    @_dir_option
    @pass_ctx
    def command(ctx: Ctx, node: str, directory: Path) -> None:
        n = _dev(ctx, lambda: fn(directory, node))
        ctx.emit({"ok": True, "node": n.id, "pid": n.pid}, f"{name}: {n.id} (pid {n.pid})")


_signal_command(
    "kill",
    "SIGKILL NODE (id like n1, or its address).",
    lambda d, n: dev.kill(d, n, signal.SIGKILL),
)
_signal_command("pause", "SIGSTOP NODE: it stops answering but keeps its connections.", dev.pause)
_signal_command("resume", "SIGCONT a paused NODE.", dev.resume)
_signal_command(
    "restart",
    "Stop NODE if it runs, start it again, wait until ready.",
    dev.restart,
)


@dev_group.command("fault")
@click.argument("node")
@click.option("--block", default="", metavar="ID[,ID...]", help="Peers NODE stops talking to.")
@click.option("--loss", type=float, default=0.0, help="Probability of losing each message (0..1).")
@click.option(
    "--delay", default="0", metavar="MS[:MS]", help="Added latency per message, or a range."
)
@click.option("--clock-offset", type=int, default=0, metavar="MS", help="Skew NODE's clock by MS.")
@_dir_option
@pass_ctx
def dev_fault(
    ctx: Ctx,
    node: str,
    block: str,
    loss: float,
    delay: str,
    clock_offset: int,
    directory: Path,
) -> None:
    """Inject faults into NODE's node-to-node traffic (replaces earlier ones)."""
    lo, _, hi = delay.partition(":")
    try:
        delay_ms = (float(lo), float(hi or lo))
    except ValueError:
        ctx.fail(errors.InvalidArgument(f"--delay {delay!r} is not MS or MS:MS", "delay"))
    target = _dev(ctx, lambda: dev.DevCluster.load(directory).node(node))
    blocked = [b.strip() for b in block.split(",") if b.strip()]
    _dev(
        ctx,
        lambda: dev.set_faults(
            target.address,
            blocked=blocked,
            loss=loss,
            delay_ms=delay_ms,
            clock_offset_ms=clock_offset,
        ),
    )
    ctx.emit({"ok": True, "node": target.id}, f"faults set on {target.id}")


@dev_group.command("partition")
@click.argument("groups", nargs=-1, required=True)
@_dir_option
@pass_ctx
def dev_partition(ctx: Ctx, groups: tuple[str, ...], directory: Path) -> None:
    """Cut the cluster into GROUPS, e.g. `kvctl dev partition n1 n2,n3`.

    Nodes not named form one more group. Heal with `kvctl dev heal`."""
    parts = [[i.strip() for i in g.split(",") if i.strip()] for g in groups]
    blocked = _dev(ctx, lambda: dev.partition(directory, parts))
    ctx.emit(blocked, "\n".join(f"{n} blocks {', '.join(b) or '-'}" for n, b in blocked.items()))


@dev_group.command("heal")
@_dir_option
@pass_ctx
def dev_heal(ctx: Ctx, directory: Path) -> None:
    """Remove every injected fault from every node."""
    healed = _dev(ctx, lambda: dev.heal(directory))
    ctx.emit({"ok": True, "healed": healed}, f"healed {healed} nodes")


@dev_group.command("down")
@click.option("--clean", is_flag=True, help="Also delete the data and logs.")
@_dir_option
@pass_ctx
def dev_down(ctx: Ctx, clean: bool, directory: Path) -> None:
    """Stop every local node (SIGTERM, then SIGKILL after 10 s)."""
    stopped = _dev(ctx, lambda: dev.down(directory, clean=clean))
    ctx.emit({"ok": True, "stopped": stopped}, f"stopped {stopped} nodes")


def main() -> None:
    """Entry point: click's usage errors become one line on stderr, exit 2."""
    try:
        rv = cli.main(prog_name="kvctl", standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "kvctl"
        click.echo(f"kvctl: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"kvctl: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("kvctl: aborted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
