"""The gateway image (infra/Dockerfile) holds every package the app imports.

No Docker daemon is needed. The files the Dockerfile copies from the build context, less what
.dockerignore keeps out, are laid out as the image's file system; the WORKDIR where it runs
``pip install .`` is built into a wheel and installed, not editable, into a fresh virtual
environment that sees the dependencies installed beside these tests but not the project's own
editable install. The image's commands then run from that environment, outside the repository.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: site-packages of the environment these tests run in: the dependencies the image installs
#: from PyPI, and the project's editable install, which the image's environment must not see.
DEPS = Path(sysconfig.get_paths()["purelib"])
START_TIMEOUT_S = 120.0


class DockerfileError(ValueError):
    """A Dockerfile form the parser below does not understand: teach it, do not skip it."""


@dataclass(frozen=True)
class Copy:
    """One ``COPY`` from the build context."""

    sources: tuple[str, ...]  # relative to the build context
    dest: PurePosixPath  # absolute, in the image
    into: bool  # the destination is a directory (it ends with ``/``)


@dataclass(frozen=True)
class Image:
    """What the tests need of a Dockerfile."""

    copies: tuple[Copy, ...]
    install_dir: PurePosixPath  # the WORKDIR of ``pip install .``
    runs: tuple[str, ...]
    cmd: tuple[str, ...]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped."""
    found: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if re.match(r"#\s*escape\s*=", stripped):
            raise DockerfileError(f"escape directive: {stripped}")
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, inside continuations too
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        word, _, args = (current + stripped).partition(" ")
        if re.search(r"<<-?[\"']?\w", args):
            raise DockerfileError(f"heredoc: {word} {args}")
        found.append((word.upper(), args.strip()))
        current = ""
    if current:
        raise DockerfileError("the Dockerfile ends inside a continuation line")
    return found


def _copy(args: str, workdir: PurePosixPath) -> Copy | None:
    """A ``COPY`` from the build context; None for one from another stage or image."""
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        if flag.startswith("--from="):
            return None
        if flag != "--link" and not flag.startswith(("--chown=", "--chmod=")):
            raise DockerfileError(f"COPY flag {flag} is not understood: COPY {args}")
    if rest.startswith("["):
        words = json.loads(rest)
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DockerfileError(f"COPY's JSON form is a list of strings: COPY {args}")
    else:
        if re.search(r"[\"'\\]", rest):
            raise DockerfileError(f"quoting in COPY's shell form: COPY {args}")
        words = rest.split()
    if len(words) < 2:
        raise DockerfileError(f"COPY needs a source and a destination: COPY {args}")
    *raw_sources, dest = words
    sources = []
    for raw in [*raw_sources, dest]:
        if re.search(r"[*?\[$]", raw):
            raise DockerfileError(f"wildcards and variables are not understood: COPY {args}")
    for raw in raw_sources:
        source = PurePosixPath(raw)
        if source.is_absolute() or ".." in source.parts:
            raise DockerfileError(f"a source outside the build context: COPY {args}")
        sources.append(str(source))
    into = dest.endswith("/")
    if len(sources) > 1 and not into:
        raise DockerfileError(f"several sources need a destination ending in /: COPY {args}")
    return Copy(tuple(sources), workdir / dest, into)


def parse_dockerfile(text: str) -> Image:
    workdir = PurePosixPath("/")
    copies: list[Copy] = []
    runs: list[str] = []
    install_dir: PurePosixPath | None = None
    cmd: tuple[str, ...] | None = None
    stages = 0
    for word, args in instructions(text):
        if word == "FROM":
            stages += 1
            if stages > 1:
                raise DockerfileError(f"a second stage is not understood: FROM {args}")
        elif word == "WORKDIR":
            if "$" in args or ".." in PurePosixPath(args).parts:
                raise DockerfileError(f"WORKDIR {args} is not understood")
            workdir = workdir / args
        elif word == "COPY":
            copy = _copy(args, workdir)
            if copy is not None:
                copies.append(copy)
        elif word in ("ADD", "ONBUILD"):
            raise DockerfileError(f"{word} is not understood: {word} {args}")
        elif word == "RUN":
            runs.append(args)
            if _installs_the_project(args):
                install_dir = workdir
        elif word == "CMD":
            argv = json.loads(args) if args.startswith("[") else None
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                raise DockerfileError(f"CMD in exec form (a JSON list) only: CMD {args}")
            cmd = tuple(argv)
    if install_dir is None:
        raise DockerfileError("no RUN installs the project with `pip install .`")
    if cmd is None:
        raise DockerfileError("no CMD")
    return Image(tuple(copies), install_dir, tuple(runs), cmd)


def _commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at ``&&``, ``||``, ``;`` and ``|``."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _installs_the_project(run: str) -> bool:
    for argv in _commands(run):
        if argv[:2] != ["pip", "install"]:
            continue
        if any(a == "." or a.startswith(".[") for a in argv[2:]):
            if "-e" in argv or "--editable" in argv:
                raise DockerfileError(f"an editable install of the project: RUN {run}")
            return True
    return False


def run_command(image: Image, *prefix: str) -> list[str]:
    """The first simple command of the image's RUN lines that starts with ``prefix``."""
    for run in image.runs:
        for argv in _commands(run):
            if tuple(argv[: len(prefix)]) == prefix:
                return argv
    raise AssertionError(f"no RUN runs {shlex.join(prefix)}")


def without(image: Image, source: str) -> Image:
    """The image with ``source`` dropped from its COPY lines."""
    assert any(source in c.sources for c in image.copies), f"nothing copies {source}"
    copies = tuple(
        replace(c, sources=tuple(s for s in c.sources if s != source)) for c in image.copies
    )
    return replace(image, copies=tuple(c for c in copies if c.sources))


@dataclass(frozen=True)
class DockerIgnore:
    """.dockerignore as Docker reads it: the last pattern that matches a path or one of its
    parent directories decides; ``!`` patterns take paths back in."""

    rules: tuple[tuple[re.Pattern[str], bool], ...]  # (pattern, is an exception)

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules = []
        for line in text.splitlines():
            pattern = line.strip()
            if not pattern or pattern.startswith("#"):
                continue
            exception = pattern.startswith("!")
            pattern = os.path.normpath(pattern.removeprefix("!").strip()).lstrip("/")
            if re.search(r"[\[\\]", pattern):
                raise DockerfileError(f".dockerignore pattern {pattern!r} is not understood")
            rules.append((re.compile(_pattern_regex(pattern)), exception))
        return cls(tuple(rules))

    def excluded(self, path: str) -> bool:
        parts = PurePosixPath(path).parts
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for pattern, exception in self.rules:
            if any(pattern.fullmatch(c) for c in candidates):
                result = not exception
        return result


def _pattern_regex(pattern: str) -> str:
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return regex


def lay_out(image: Image, context: Path, root: Path, ignore: DockerIgnore) -> None:
    """Copy what the image's COPY lines take from ``context`` to ``root``, its file system."""
    for copy in image.copies:
        target = root / copy.dest.relative_to("/")
        for source in copy.sources:
            path = context / source
            if source != "." and ignore.excluded(source):
                raise AssertionError(f"COPY {source}: .dockerignore keeps it out of the context")
            if path.is_dir():  # Docker copies a directory's contents, not the directory
                for dirpath, _, filenames in os.walk(path):
                    for name in filenames:
                        file = Path(dirpath) / name
                        if not ignore.excluded(file.relative_to(context).as_posix()):
                            dest = target / file.relative_to(path)
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(file, dest)
            elif path.is_file():
                dest = target / path.name if copy.into or target.is_dir() else target
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
            else:
                raise AssertionError(f"COPY {source}: not in the build context")


def clean_env(venv: Path, **extra: str) -> dict[str, str]:
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_") and k not in drop}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def run(
    argv: Sequence[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    args = [str(a) for a in argv]
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{shlex.join(args)} exited with {result.returncode}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return result


@dataclass(frozen=True)
class Built:
    """An image's files, built and installed the way its Dockerfile does."""

    folder: Path  # the WORKDIR of `pip install .`, with what COPY put there
    wheel: Path
    venv: Path
    cwd: Path  # an empty directory outside the repository

    @property
    def purelib(self) -> Path:
        return self.venv / DEPS.relative_to(DEPS.parents[2])

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(self.venv, **extra)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.venv / "bin" / "python"), "-c", code]
        return subprocess.run(
            argv,
            cwd=self.cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def build(image: Image, work: Path) -> Built:
    root, cwd = work / "root", work / "cwd"
    cwd.mkdir()
    lay_out(image, ROOT, root, DockerIgnore.parse(DOCKERIGNORE.read_text()))
    folder = root / image.install_dir.relative_to("/")
    venv = work / "venv"
    env = clean_env(venv)
    pip = ["--disable-pip-version-check", "--no-index", "--no-deps", "-q"]
    wheels = work / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", *pip, "--no-build-isolation", folder, "-w", wheels],
        cwd=cwd,
        env=env,
    )
    (wheel,) = wheels.glob("*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=cwd, env=env)
    built = Built(folder, wheel, venv, cwd)
    assert built.purelib.is_dir(), built.purelib
    # A line that names a directory puts it on sys.path and nothing else: the .pth files in it,
    # the project's editable finder among them, are not processed.
    (built.purelib / "_image_deps.pth").write_text(f"{DEPS}\n")
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", *pip, "--ignore-installed", wheel], cwd=cwd, env=env)
    return built


def top_level_packages() -> list[str]:
    """The repository's top-level packages that pyproject.toml ships."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, i) for i in include)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, then SIGKILL to what is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def image() -> Image:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def built(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(image, tmp_path_factory.mktemp("image"))


SAMPLE = """\
# syntax=docker/dockerfile:1
FROM python:3.11-slim
WORKDIR /app
COPY a.toml \\
    # a comment inside a continuation
    b.md ./
COPY pkg pkg
COPY --chown=app:app --link ["data", "/srv/data"]
COPY --from=builder /wheels /wheels
WORKDIR sub
COPY x.txt y.txt
RUN apt-get update && pip install --quiet ".[cpu]" && tollgate models prepare --data-dir "$D"
CMD ["tollgate", "serve"]
"""


def test_parser_reads_the_forms_it_knows() -> None:
    image = parse_dockerfile(SAMPLE)
    assert image.copies == (
        Copy(("a.toml", "b.md"), PurePosixPath("/app"), into=True),
        Copy(("pkg",), PurePosixPath("/app/pkg"), into=False),
        Copy(("data",), PurePosixPath("/srv/data"), into=False),
        Copy(("x.txt",), PurePosixPath("/app/sub/y.txt"), into=False),
    )
    assert image.install_dir == PurePosixPath("/app/sub")
    assert image.cmd == ("tollgate", "serve")
    argv = run_command(image, "tollgate", "models", "prepare")
    assert argv == ["tollgate", "models", "prepare", "--data-dir", "$D"]


@pytest.mark.parametrize(
    "line",
    [
        "ADD gateway gateway",
        "COPY gateway/*.py gateway/",
        "COPY $SRC src",
        "COPY a b /app",
        "COPY --parents gateway ./",
        "COPY --exclude=*.pyc gateway gateway",
        'COPY "a b" c',
        "COPY ../secrets ./",
        "COPY gateway",
        "COPY <<EOF /app/x\nhello\nEOF",
        "FROM python:3.12-slim",
        "RUN pip install -e .",
        "CMD tollgate serve",
    ],
)
def test_parser_refuses_forms_it_does_not_know(line: str) -> None:
    text = SAMPLE.replace("COPY pkg pkg\n", line + "\n")
    with pytest.raises(DockerfileError):
        parse_dockerfile(text)


def test_dockerignore_matching() -> None:
    ignore = DockerIgnore.parse("/build\n**/__pycache__\n*.log\ndocs\n!docs/keep.md\n")
    assert ignore.excluded("build/lib/x.py")
    assert not ignore.excluded("src/build/x.py")
    assert ignore.excluded("__pycache__/a.pyc")
    assert ignore.excluded("a/b/__pycache__/c.pyc")
    assert ignore.excluded("run.log")
    assert not ignore.excluded("logs/run.log")
    assert ignore.excluded("docs/other.md")
    assert not ignore.excluded("docs/keep.md")


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    ignore = DockerIgnore.parse(DOCKERIGNORE.read_text())
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".tollgate/tollgate.db",
        "gateway/__pycache__/app.cpython-311.pyc",
        "tollgate.egg-info/PKG-INFO",
        ".mypy_cache/3.11/gateway/app.meta.json",
        ".pytest_cache/README.md",
    ):
        assert ignore.excluded(path), path
    for path in (
        "pyproject.toml",
        "README.md",
        "gateway/app.py",
        "gateway/db/migrations/versions/0001_accounts.py",
        "serving/demo/catalog.toml",
        "billing/ledger.py",
    ):
        assert not ignore.excluded(path), path


def test_image_copies_every_package(built: Built) -> None:
    packages = top_level_packages()
    assert {"gateway", "serving", "billing"} <= set(packages)
    for package in packages:
        assert (built.folder / package / "__init__.py").is_file(), f"the image lacks {package}/"


def test_wheel_has_every_module_and_the_package_data(built: Built) -> None:
    names = set(zipfile.ZipFile(built.wheel).namelist())
    for package in top_level_packages():
        modules = [
            p.relative_to(built.folder).as_posix() for p in built.folder.glob(f"{package}/**/*.py")
        ]
        assert modules, package
        assert set(modules) <= names, sorted(set(modules) - names)
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            data = [
                p.relative_to(built.folder).as_posix()
                for p in (built.folder / package).glob(pattern)
            ]
            assert data, f"package data {package}/{pattern} matches nothing in the image"
            assert set(data) <= names, sorted(set(data) - names)
    assert "serving/demo/catalog.toml" in names
    assert "gateway/db/migrations/script.py.mako" in names
    assert "gateway/db/migrations/versions/0001_accounts.py" in names


def test_packages_resolve_in_the_image_environment(built: Built) -> None:
    result = built.python(
        "import importlib.metadata, importlib.util, json, sys\n"
        "names = ['gateway', 'serving', 'billing', 'litestar']\n"
        "dist = importlib.metadata.distribution('tollgate')\n"
        "print(json.dumps({\n"
        "    'origins': {n: importlib.util.find_spec(n).origin for n in names},\n"
        "    'meta_path': [repr(f) for f in sys.meta_path],\n"
        "    'path': sys.path,\n"
        "    'dist': str(dist.locate_file('')),\n"
        "    'direct_url': dist.read_text('direct_url.json'),\n"
        "}))\n"
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    for name in ("gateway", "serving", "billing"):
        origin = Path(found["origins"][name])
        assert origin.is_relative_to(built.purelib), (name, origin)
        assert not origin.is_relative_to(ROOT), (name, origin)
    assert Path(found["origins"]["litestar"]).is_relative_to(DEPS)
    assert str(DEPS) in found["path"]
    assert not [f for f in found["meta_path"] if "editable" in f.lower()], found["meta_path"]
    assert Path(found["dist"]) == built.purelib
    assert found["direct_url"] is None or '"editable": true' not in found["direct_url"]


def test_the_image_commands_run(image: Image, built: Built) -> None:
    """What the image runs: ``tollgate models prepare`` at build time, ``tollgate db upgrade``
    (compose's migrate service, here on SQLite), then its CMD, ``tollgate serve``."""
    data = built.cwd.parent / "data"
    env = built.env(TOLLGATE_DATA_DIR=str(data))
    tollgate = str(built.venv / "bin" / "tollgate")

    prepare = run_command(image, "tollgate", "models", "prepare")
    argv = [tollgate, *(string.Template(a).substitute(env) for a in prepare[1:])]
    out = run(argv, cwd=built.cwd, env=env).stdout
    assert "demo-chat:" in out, out
    assert "minilm:" in out, out
    assert (data / "models" / "demo-chat").is_dir()

    out = run([tollgate, "db", "upgrade"], cwd=built.cwd, env=env).stdout
    assert "database at head" in out, out
    assert (data / "tollgate.db").is_file()

    assert image.cmd[:2] == ("tollgate", "serve"), image.cmd
    port = free_port()
    log_path = built.cwd.parent / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [tollgate, *image.cmd[1:], "--host", "127.0.0.1", "--port", str(port)],
            cwd=built.cwd,
            env={**env, "TOLLGATE_ADMIN_TOKEN": "tga_" + secrets.token_hex(18)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"tollgate serve exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /healthz after {START_TIMEOUT_S} s:\n{_tail(log_path)}")
            time.sleep(0.2)
    finally:
        stop(process)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-6000:]


def test_without_billing_the_app_does_not_start(
    image: Image, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The check above can fail: an image that lacks a package the app imports breaks it."""
    broken = build(without(image, "billing"), tmp_path_factory.mktemp("broken"))
    assert not (broken.folder / "billing").exists()
    found = broken.python(
        "import importlib.util; print(importlib.util.find_spec('gateway').origin)"
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(broken.purelib), found.stdout
    result = broken.python("import gateway.app")
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'billing'" in result.stderr, result.stderr
