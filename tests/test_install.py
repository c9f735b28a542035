"""The constraints files say what they do: constraints.txt gives the CPU torch wheel on every platform
(or fails, never the CUDA build), constraints-gpu.txt has the same pins without that, and every
dependency the extras name is pinned in both. No network: the files are parsed, not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PLATFORMS = {  # marker environments of the wheels PyTorch publishes
    "linux": {"sys_platform": "linux", "platform_system": "Linux"},
    "win32": {"sys_platform": "win32", "platform_system": "Windows"},
    "darwin": {"sys_platform": "darwin", "platform_system": "Darwin"},
}


def parse(name: str) -> tuple[list[str], list[Requirement]]:
    """(option lines, requirement lines) of a constraints file, comments dropped."""
    options, reqs = [], []
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        (options if line.startswith("-") else reqs).append(line if line.startswith("-") else Requirement(line))
    return options, reqs


def active_pins(reqs: list[Requirement], platform: str) -> dict[str, str]:
    env = PLATFORMS[platform]
    pins: dict[str, str] = {}
    for r in reqs:
        if r.marker is None or r.marker.evaluate(env):
            assert r.name not in pins, f"two active pins for {r.name} on {platform}"
            pins[r.name] = str(r.specifier)
    return pins


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_cpu_constraints_pin_the_cpu_torch_wheel(platform):
    options, reqs = parse("constraints.txt")
    assert f"--extra-index-url {CPU_INDEX}" in options
    torch_pin = active_pins(reqs, platform)["torch"]
    assert torch_pin.startswith("=="), torch_pin
    if platform == "darwin":  # PyTorch's macOS wheels are CPU builds and carry no local label
        assert "+" not in torch_pin
    else:  # the local label excludes PyPI's Linux CUDA build: without the CPU index pip fails instead
        assert torch_pin.endswith("+cpu"), torch_pin


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_gpu_constraints_match_cpu_ones_except_the_torch_build(platform):
    _, cpu = parse("constraints.txt")
    gpu_options, gpu = parse("constraints-gpu.txt")
    assert not any(CPU_INDEX in o for o in gpu_options), "constraints-gpu.txt must not name the CPU index"
    cpu_pins, gpu_pins = active_pins(cpu, platform), active_pins(gpu, platform)
    assert cpu_pins.keys() == gpu_pins.keys()
    for name in cpu_pins:
        want = cpu_pins[name].split("+")[0]
        assert gpu_pins[name] == want, f"{name}: constraints-gpu.txt {gpu_pins[name]} vs constraints.txt {want}"


def test_every_extra_dependency_is_pinned():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {Requirement(d).name for d in project["dependencies"]}
    for deps in project["optional-dependencies"].values():
        names |= {Requirement(d).name for d in deps if not d.startswith("cbam-multi")}
    for file in ("constraints.txt", "constraints-gpu.txt"):
        pinned = {r.name for r in parse(file)[1]}
        assert names <= pinned, f"{file} does not pin {sorted(names - pinned)}"



def test_package_data_carries_every_kernel_source():
    """A non-editable install compiles the kernels from the files package-data ships: every source and header
    the two backends' builds read must match one of its globs (relative to the package's directory)."""
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    jax_kernel = pytest.importorskip("cbam_multi.jax.cpu_kernel")
    torch_kernel = pytest.importorskip("cbam_multi.torch.cpu_kernel")
    root = Path(jax_kernel.__file__).resolve().parents[2]  # the checkout the backends are installed from
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {pkg: (root / d).resolve() for pkg, d in tool["package-dir"].items()}
    files = [*jax_kernel._SOURCES, *jax_kernel._HEADERS, *torch_kernel._SOURCES, *torch_kernel._INCLUDED]
    missing = []
    for f in files:
        f = Path(f).resolve()
        shipped = any(f.is_relative_to(dirs[pkg]) and fnmatch(f.relative_to(dirs[pkg]).as_posix(), glob)
                      for pkg, globs in tool["package-data"].items() for glob in globs)
        if not shipped:
            missing.append(f.relative_to(root).as_posix())
    assert not missing, f"package-data does not ship {missing}: add a glob in pyproject.toml"
