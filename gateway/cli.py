"""The ``tollgate`` command: ``serve``, ``db upgrade``, ``billing`` and ``models prepare``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import msgspec

if TYPE_CHECKING:
    from gateway.settings import Settings

__all__ = ["main"]

logger = logging.getLogger("tollgate")


def _setup_logging(level: str, stream: TextIO | None = None) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream or sys.stderr,
    )


def _console_and_engine_log(path: Path | None) -> TextIO:
    """Keep the console for Tollgate, and send everything else to the engines' log.

    The engine processes (and the libraries under them) write to this process's standard
    output and error, which they inherit: those move to ``path``, appended to. Tollgate's
    own log and messages keep a copy of the original standard error: the console.
    """
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    if path is None:
        return console
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return console


class _ProgressLines:
    """One console line per engine per phase of its start-up, with the seconds since launch."""

    def __init__(self, console: TextIO) -> None:
        self._console = console
        self._began = time.monotonic()
        self._lock = threading.Lock()
        self._width = 0

    def widen(self, names: list[str]) -> None:
        self._width = max((len(n) for n in names), default=0)

    def __call__(self, model: str, phase: str) -> None:
        elapsed = time.monotonic() - self._began
        with self._lock:
            print(f"  {model:<{self._width}}  {phase:<9} {elapsed:6.1f} s", file=self._console)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app, host_for
    from gateway.credentials import check_admin_token
    from gateway.settings import Settings, SettingsError
    from serving import Catalog, CatalogError, load_catalog
    from serving.progress import EngineLogWatcher

    try:
        settings = Settings.from_env(
            host=args.host, port=args.port, models=args.models, data_dir=args.data_dir
        )
    except SettingsError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
    engine_log = settings.engine_log_path
    console = _console_and_engine_log(engine_log)
    _setup_logging(settings.log_level, console)
    if engine_log is not None:
        # vLLM's own log lines belong with the rest of the engines' output.
        engines = logging.getLogger("vllm")
        engines.propagate = False
        engines.addHandler(logging.StreamHandler(sys.stderr))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if args.demo and settings.auth:
        settings = _demo(settings, console)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None
    progress = _ProgressLines(console)
    watcher: EngineLogWatcher | None = None

    def on_ready() -> None:
        if watcher is not None:
            watcher.stop()
        print(f"Tollgate is ready on http://{settings.host}:{settings.port}/v1", file=console)

    def on_failure(exc: BaseException) -> None:
        if watcher is not None:
            watcher.stop()
        if engine_log is not None:
            print(f"tollgate: the engines' own output is in {engine_log}", file=console)
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    try:
        if settings.auth:  # refused before anything else is looked at
            check_admin_token(settings.admin_token)
        catalog = (
            load_catalog(settings.models_path, settings.data_path)
            if settings.engines == "local"
            else Catalog([])
        )
        host = host_for(settings, catalog, progress=progress)
        app = create_app(settings, host=host, on_ready=on_ready, on_startup_failure=on_failure)
    except (CatalogError, SettingsError) as exc:
        print(f"tollgate: {exc}", file=console)
        return 2
    except Exception:  # a bug: on the console, not in the engines' log
        traceback.print_exc(file=console)
        return 1
    progress.widen([spec.name for spec in catalog])
    if settings.engines == "workers":
        print("Engines: on the workers in the registry", file=console)
    elif engine_log is not None:
        print(f"Starting {len(catalog)} model(s); engine output: {engine_log}", file=console)
        watcher = EngineLogWatcher(
            engine_log, {spec.resolved_source: spec.name for spec in catalog}, progress
        )
        watcher.start()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # no proxy is trusted to speak for the client
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    return 1 if failed else 0


def _worker(args: argparse.Namespace) -> int:
    from serving import CatalogError
    from serving.worker import WorkerSettings, run_worker

    try:
        settings = WorkerSettings.from_env(
            host=args.host, port=args.port, models=args.models, data_dir=args.data_dir
        )
    except ValueError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
    engine_log = (
        None
        if settings.engine_log == "-"
        else Path(settings.engine_log or Path(settings.data_dir) / "logs" / "worker-engines.log")
    )
    console = _console_and_engine_log(engine_log)
    _setup_logging(settings.log_level, console)
    if engine_log is not None:
        engines = logging.getLogger("vllm")
        engines.propagate = False
        engines.addHandler(logging.StreamHandler(sys.stderr))
    try:
        return run_worker(settings)
    except (CatalogError, ValueError) as exc:
        print(f"tollgate: {exc}", file=console)
        return 2


def _demo(settings: Settings, console: TextIO | None = None) -> Settings:
    """Local runs: an admin token kept under the data dir, a demo tenant and key, and prices
    for the demo models."""
    import asyncio

    import msgspec

    from billing.ledger import Ledger
    from gateway.bootstrap import bootstrap_demo, local_admin_token, seed_demo_prices
    from gateway.credentials import load_secret
    from gateway.db import AccountStore, make_engine, upgrade
    from serving import load_catalog

    out = console or sys.stdout
    if not settings.admin_token:
        settings = msgspec.structs.replace(
            settings, admin_token=local_admin_token(settings.data_path)
        )
        print(f"Admin token: in {settings.data_path / 'admin-token'}", file=out, flush=True)
    upgrade(settings.database)
    try:
        models = {spec.name for spec in load_catalog(settings.models_path, settings.data_path)}
    except ValueError:  # the catalog is wrong: serve says so with the entry named
        models = set()

    async def run() -> tuple[str | None, list[str]]:
        engine = make_engine(settings.database)
        accounts = AccountStore(engine)
        try:
            created = await bootstrap_demo(accounts, load_secret(settings), settings.data_path)
            return created, await seed_demo_prices(Ledger(engine), models)
        finally:
            await accounts.close()

    created, priced = asyncio.run(run())
    key_file = settings.data_path / "demo-key"
    if created is not None:
        print(f"Created tenant `demo` with API key: {created}", file=out, flush=True)
    elif key_file.exists():
        print(f"Demo API key: {key_file.read_text().strip()}", file=out, flush=True)
    if priced:
        print(f"Demo prices set for {', '.join(sorted(priced))}", file=out, flush=True)
    return settings


def _db_upgrade(args: argparse.Namespace) -> int:
    from gateway.db import redact_url, upgrade
    from gateway.settings import Settings, SettingsError

    _setup_logging("INFO")
    try:
        settings = Settings.from_env(data_dir=args.data_dir)
    except SettingsError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
    upgrade(settings.database)
    print(f"database at head: {redact_url(settings.database)}")
    return 0


def _billing_invoice(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from billing.invoices import build_invoice, invoice_to_dict, period_bounds
    from billing.ledger import Ledger
    from gateway.db import AccountStore, NotFound, make_engine
    from gateway.settings import Settings

    settings = Settings.from_env(data_dir=args.data_dir)
    try:
        start, end = period_bounds(args.period)
    except ValueError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2

    async def run() -> dict[str, object] | None:
        engine = make_engine(settings.database)
        accounts, ledger = AccountStore(engine), Ledger(engine)
        try:
            tenant = await accounts.get_tenant(args.tenant)
        except NotFound:
            return None
        try:
            rows = await ledger.invoice_rows(tenant.id, start, end)
            device_ms = await ledger.device_ms(tenant.id, start, end)
            devices = await ledger.device_rows(tenant.id, start, end)
            invoice = build_invoice(tenant.id, tenant.name, args.period, rows, device_ms, devices)
            return invoice_to_dict(invoice)
        finally:
            await accounts.close()

    invoice = asyncio.run(run())
    if invoice is None:
        print(f"tollgate: no tenant {args.tenant!r}", file=sys.stderr)
        return 2
    print(json.dumps(invoice, indent=2))
    return 0


def _billing_export(args: argparse.Namespace) -> int:
    import asyncio
    from datetime import UTC, datetime

    from billing import export as exports
    from billing.ledger import Ledger
    from billing.pricing import Price
    from gateway.db import AccountStore, make_engine
    from gateway.settings import Settings

    settings = Settings.from_env(data_dir=args.data_dir)
    try:
        start = datetime.fromisoformat(args.start).replace(tzinfo=UTC)
        end = datetime.fromisoformat(args.end).replace(tzinfo=UTC)
    except ValueError as exc:
        print(f"tollgate: {exc} (dates as YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS, UTC)", file=sys.stderr)
        return 2
    engine = make_engine(settings.database)
    accounts, ledger = AccountStore(engine), Ledger(engine)

    async def lookups() -> tuple[dict[str, str], dict[int, Price]]:
        names = {t.id: t.name for t in await accounts.list_tenants()}
        return names, {p.id: p for p in await ledger.prices()}

    names, prices = asyncio.run(lookups())
    events = ledger.iter_events(start=start, end=end, tenant_id=args.tenant)
    chunks = exports.export(events, args.format, tenant_names=names, prices=prices)
    out = sys.stdout.buffer if args.output == "-" else Path(args.output).open("wb")  # noqa: SIM115 (closed below)
    try:
        for chunk in chunks:
            out.write(chunk)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    engine.dispose()
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from gateway.settings import Settings
    from serving.demo import prepare_demo_models

    _setup_logging("INFO")
    data_dir = Path(args.data_dir) if args.data_dir else Settings.from_env().data_path
    built = prepare_demo_models(data_dir / "models", force=args.force)
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


def _placement_simulate(args: argparse.Namespace) -> int:
    from serving import placement

    trace_path = Path(args.trace)
    profiles_path = Path(args.profiles) if args.profiles else _profiles_beside(trace_path)
    try:
        trace = placement.load_trace(trace_path)
        costs = (
            placement.COSTS[args.costs]
            if args.costs in placement.COSTS
            else json.loads(Path(args.costs).read_text())
        )
        sizes = json.loads(profiles_path.read_text())
        profiles = placement.profiles_from(sizes, costs)
        missing = sorted({r.model for r in trace} - set(profiles))
        if missing:
            raise ValueError(f"{profiles_path} has no profile for {', '.join(missing)}")
        plan = placement.plan_fleet(trace, profiles, args.device_gb, args.slo_ms, args.goal)
    except (OSError, ValueError, msgspec.ValidationError) as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(placement.dumps(plan) + "\n" if args.json else placement.report(plan, trace))
    return 0


def _profiles_beside(trace: Path) -> Path:
    return trace.with_name(trace.name.removesuffix(".jsonl") + ".models.json")


def _placement_trace(args: argparse.Namespace) -> int:
    from serving import placement

    trace, sizes = placement.generate_trace(
        models=args.models, requests=args.requests, zipf_s=args.zipf, seed=args.seed
    )
    out = Path(args.output)
    placement.write_trace(trace, out)
    _profiles_beside(out).write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    print(
        f"{out}: {len(trace)} requests for {args.models} models; sizes in {_profiles_beside(out)}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollgate", description="Tollgate inference gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--host", help="address to bind (TOLLGATE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (TOLLGATE_PORT, default 8000)")
    serve.add_argument("--models", "--config", dest="models", help="models file (TOLLGATE_MODELS)")
    serve.add_argument("--data-dir", help="data directory (TOLLGATE_DATA_DIR, default .tollgate)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="local runs: keep an admin token under the data dir and make a demo tenant and key "
        "on an empty database",
    )
    serve.set_defaults(func=_serve)

    worker = commands.add_parser(
        "worker", help="serve one device's models to gateways (TOLLGATE_ENGINES=workers)"
    )
    worker.add_argument("--host", help="address to bind (TOLLGATE_HOST, default 127.0.0.1)")
    worker.add_argument("--port", type=int, help="port (TOLLGATE_PORT, default 8100)")
    worker.add_argument("--models", help="models file (TOLLGATE_MODELS)")
    worker.add_argument("--data-dir", help="data directory (TOLLGATE_DATA_DIR, default .tollgate)")
    worker.set_defaults(func=_worker)

    db = commands.add_parser("db", help="manage the database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="migrate TOLLGATE_DATABASE_URL to head")
    db_upgrade.add_argument("--data-dir", help="data directory (default .tollgate)")
    db_upgrade.set_defaults(func=_db_upgrade)

    billing = commands.add_parser("billing", help="invoices and finance exports")
    billing_commands = billing.add_subparsers(dest="billing_command", required=True)
    invoice = billing_commands.add_parser("invoice", help="a tenant's invoice for a month")
    invoice.add_argument("--tenant", required=True, help="tenant id")
    invoice.add_argument("--period", required=True, help="YYYY-MM")
    invoice.add_argument("--data-dir", help="data directory (default .tollgate)")
    invoice.set_defaults(func=_billing_invoice)
    export = billing_commands.add_parser("export", help="usage events for a time range")
    export.add_argument("--start", required=True, help="YYYY-MM-DD[THH:MM:SS] UTC, inclusive")
    export.add_argument("--end", required=True, help="YYYY-MM-DD[THH:MM:SS] UTC, exclusive")
    export.add_argument("--format", choices=["csv", "jsonl", "parquet", "focus"], default="csv")
    export.add_argument("--tenant", help="one tenant's events only")
    export.add_argument("--output", default="-", help="file to write (default: stdout)")
    export.add_argument("--data-dir", help="data directory (default .tollgate)")
    export.set_defaults(func=_billing_export)

    models = commands.add_parser("models", help="manage local models")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    prepare = model_commands.add_parser("prepare", help="build the demo models under the data dir")
    prepare.add_argument("--data-dir", help="data directory (default .tollgate)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if present")
    prepare.set_defaults(func=_prepare)

    place = commands.add_parser("placement", help="plan which models go on which devices")
    place_commands = place.add_subparsers(dest="placement_command", required=True)
    simulate = place_commands.add_parser(
        "simulate", help="replay a demand trace: devices needed, cold starts, TTFT within target"
    )
    simulate.add_argument("--trace", required=True, help="JSONL: t, model, prompt/output tokens")
    simulate.add_argument(
        "--profiles", help="JSON of each model's memory_gb (default: <trace>.models.json)"
    )
    simulate.add_argument(
        "--costs",
        default="cpu",
        help="switch costs: cpu, gpu-sleep, or a JSON file of start_s, stop_s, sleep_s, wake_s",
    )
    simulate.add_argument("--device-gb", type=float, default=80.0, help="memory per device")
    simulate.add_argument("--slo-ms", type=float, default=5000.0, help="time to first token target")
    simulate.add_argument("--goal", type=float, default=0.99, help="share within the target")
    simulate.add_argument("--json", action="store_true", help="the whole plan as JSON")
    simulate.set_defaults(func=_placement_simulate)
    make_trace = place_commands.add_parser("trace", help="generate a long-tail demand trace")
    make_trace.add_argument("--output", required=True, help="JSONL file to write")
    make_trace.add_argument("--models", type=int, default=20)
    make_trace.add_argument("--requests", type=int, default=10_000)
    make_trace.add_argument("--zipf", type=float, default=1.5, help="popularity skew over models")
    make_trace.add_argument("--seed", type=int, default=0)
    make_trace.set_defaults(func=_placement_trace)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
