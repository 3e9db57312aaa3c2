"""The ``tollgate`` command: ``serve`` and ``models prepare``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("tollgate")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import Settings, SettingsError
    from serving import CatalogError

    try:
        settings = Settings.from_env(
            host=args.host, port=args.port, models=args.models, data_dir=args.data_dir
        )
    except SettingsError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_ready() -> None:
        print(f"Tollgate is ready on http://{settings.host}:{settings.port}/v1", flush=True)

    def on_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(settings, on_ready=on_ready, on_startup_failure=on_failure)
    except CatalogError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
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


def _prepare(args: argparse.Namespace) -> int:
    from gateway.settings import Settings
    from serving.demo import prepare_demo_models

    _setup_logging("INFO")
    data_dir = Path(args.data_dir) if args.data_dir else Settings.from_env().data_path
    built = prepare_demo_models(data_dir / "models", force=args.force)
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollgate", description="Tollgate inference gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--host", help="address to bind (TOLLGATE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (TOLLGATE_PORT, default 8000)")
    serve.add_argument("--models", "--config", dest="models", help="models file (TOLLGATE_MODELS)")
    serve.add_argument("--data-dir", help="data directory (TOLLGATE_DATA_DIR, default .tollgate)")
    serve.set_defaults(func=_serve)

    models = commands.add_parser("models", help="manage local models")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    prepare = model_commands.add_parser("prepare", help="build the demo models under the data dir")
    prepare.add_argument("--data-dir", help="data directory (default .tollgate)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if present")
    prepare.set_defaults(func=_prepare)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
