"""Dockerfile.cuda and apptainer/volseg.def, read (not built: the tests have neither Docker nor
Apptainer nor internet): a CUDA runtime base, a CUDA build of torch, volseg installed from the
files copied in, `volseg` as the entry point, and the two recipes agreeing."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUDA_RUNTIME = re.compile(r"^nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn\d*-)?runtime-\w+\d+(\.\d+)?$")
TORCH_CUDA_INDEX = re.compile(r"https://download\.pytorch\.org/whl/cu\d{3}$")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def _docker():
    ins = dockerfile_instructions((REPO / "Dockerfile.cuda").read_text())
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v.strip('"')
    return ins, args


def test_dockerfile_cuda_base_torch_volseg_and_entrypoint():
    ins, args = _docker()
    froms = [_expand(rest, args) for word, rest in ins if word == "FROM"]
    assert len(froms) == 1 and CUDA_RUNTIME.match(froms[0]), froms
    runs = [_expand(rest, args) for word, rest in ins if word == "RUN"]
    torch_runs = [r for r in runs if re.search(r"pip install \S*torch==", r)]
    assert torch_runs, "no RUN installs torch"
    words = shlex.split(torch_runs[0])
    assert TORCH_CUDA_INDEX.match(words[words.index("--index-url") + 1]), torch_runs[0]
    # volseg is installed from the source copied in, after torch
    copies = [shlex.split(rest) for word, rest in ins if word == "COPY"]
    src_dirs = {c[-1].rstrip("/") for c in copies if "pyproject.toml" in c[:-1]}
    assert src_dirs, "pyproject.toml is not copied into the image"
    installs = [r for r in runs if any(re.search(rf"pip install {re.escape(d)}(/|\s|$)", r) for d in src_dirs)]
    assert installs and runs.index(installs[0]) > runs.index(torch_runs[0])
    for c in copies:
        for src in c[:-1]:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["volseg"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and not {"volseg", "configs", "pyproject.toml", "README.md"} & set(ignored)


def _def_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.startswith("%"):
            current = line.split()[0][1:]
            sections[current] = []
        elif current is None:
            k, _, v = line.partition(":")
            header[k.strip()] = v.strip()
        else:
            sections[current].append(line.strip())
    return header, sections


def test_apptainer_definition_matches_the_dockerfile():
    header, sec = _def_sections((REPO / "apptainer" / "volseg.def").read_text())
    assert header["Bootstrap"] == "docker" and CUDA_RUNTIME.match(header["From"])
    _, args = _docker()
    assert header["From"] == args["CUDA_IMAGE"], "the two recipes use different CUDA images"
    for line in sec["files"]:
        src, dest = line.split()
        assert (REPO / src).exists(), f"%files {src}: not in the repository"
    post = " ".join(sec["post"])
    torch = re.search(r'pip install "?torch==([\w.]+)"? --index-url (\S+)', post)
    assert torch and torch.group(1) == args["TORCH_VERSION"] and TORCH_CUDA_INDEX.match(torch.group(2))
    assert torch.group(2) == args["TORCH_INDEX"]
    assert "pip install /opt/volseg/src" in post and post.index("torch==") < post.index("pip install /opt/volseg/src")
    assert sec["runscript"] == ['exec volseg "$@"']
    assert any("/opt/volseg/venv/bin" in line for line in sec["environment"])


def test_pinned_torch_satisfies_the_package_requirement():
    from packaging.requirements import Requirement  # matplotlib's dependency

    deps = re.findall(r'^\s*"(torch[^"]*)",', (REPO / "pyproject.toml").read_text(), re.M)
    assert len(deps) == 1, deps
    req = Requirement(deps[0])
    _, args = _docker()
    assert req.specifier.contains(args["TORCH_VERSION"]), (str(req), args["TORCH_VERSION"])
