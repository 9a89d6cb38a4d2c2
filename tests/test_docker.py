"""The Dockerfiles stay in step with the tested install path (no docker daemon here to build them).

CI runs ``launch/install.sh`` on every change; the images must install through that same
script and the same torch version, and everything they copy or run must exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [tuple(item.split(None, 1)) if " " in item else (item, "") for item in logical]


def install_sh_torch_pin() -> str:
    match = re.search(
        r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (REPO_ROOT / "launch" / "install.sh").read_text()
    )
    assert match, "launch/install.sh no longer sets a default TORCH_SPEC"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_installs_through_launch_install_sh_with_the_ci_torch_pin(dockerfile: str):
    steps = instructions(REPO_ROOT / dockerfile)
    runs = [args for name, args in steps if name == "RUN"]
    install_runs = [args for args in runs if "bash launch/install.sh" in args]
    assert len(install_runs) == 1, (
        f"{dockerfile}: one RUN of launch/install.sh (the CI install path), got {runs}"
    )
    assert not any("pip install" in args for args in runs), (
        f"{dockerfile}: install only through launch/install.sh"
    )
    [torch_arg] = [args for name, args in steps if name == "ARG" and args.startswith("TORCH_SPEC=")]
    assert shlex.split(torch_arg.split("=", 1)[1]) == [install_sh_torch_pin()], (
        f"{dockerfile} pins {torch_arg}, launch/install.sh (what CI tests) {install_sh_torch_pin()}"
    )
    assert 'TORCH_SPEC="$TORCH_SPEC"' in install_runs[0]

    # non-root at run time, and the install runs as that user (the venv belongs to it)
    users = [(index, args) for index, (name, args) in enumerate(steps) if name == "USER"]
    assert users and users[-1][1] not in ("root", "0"), f"{dockerfile}: the image must not run as root"
    install_index = next(index for index, (name, args) in enumerate(steps) if args == install_runs[0])
    assert users[0][0] < install_index

    # what the image copies from and runs exists in the repository
    assert ("COPY", "--chown=unetdist . .") in steps
    assert (REPO_ROOT / f"{dockerfile}.dockerignore").is_file(), (
        "keep .venv/.git/runs out of the build context"
    )
    command = " ".join(args for name, args in steps if name in ("CMD", "ENTRYPOINT"))
    for referenced in re.findall(r"(?:configs|launch)/[\w./-]+", command):
        assert (REPO_ROOT / referenced).exists(), f"{dockerfile} runs {referenced}, which does not exist"


def test_gpu_image_starts_torchrun_as_documented():
    steps = dict(instructions(REPO_ROOT / "docker" / "Dockerfile"))
    assert steps["ENTRYPOINT"] == '["torchrun"]'
    assert steps["FROM"].startswith("nvidia/cuda:") and "runtime" in steps["FROM"]
    readme = (REPO_ROOT / "docker" / "README.md").read_text()
    assert install_sh_torch_pin() in readme, "docker/README.md names the torch version the images install"
    assert "--ipc=host" in readme and "--shm-size" in readme


def test_ci_installs_through_the_same_script():
    assert "bash launch/install.sh" in (REPO_ROOT / ".ci" / "run").read_text()
