"""trainer.host_memory: glibc keeps freed memory mapped on the CPU (core/hostmem.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from rlfuse import hostmem
from support import compose


def test_auto_keeps_on_cpu_and_releases_on_an_accelerator():
    assert hostmem.resolve("auto", torch.device("cpu")) == "keep"
    assert hostmem.resolve("auto", torch.device("cuda", 0)) == "release"
    assert hostmem.resolve("release", torch.device("cpu")) == "release"
    with pytest.raises(ValueError, match="trainer.host_memory must be one of auto, keep, release"):
        hostmem.resolve("always", torch.device("cpu"))


def test_bad_value_names_the_key():
    from rlfuse.config import check_ranges
    from rlfuse.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.host_memory"):
        check_ranges(compose(["trainer.host_memory=forever"]))


@pytest.mark.skipif(hostmem._glibc() is None, reason="needs glibc's mallopt")
def test_keep_stops_large_blocks_from_page_faulting_again():
    """In a fresh process: a 64 MiB tensor made anew each 'step' page-faults every time under
    glibc's defaults (mmap + munmap), and not after keep (the pages stay mapped)."""
    code = textwrap.dedent(
        """
        import resource, torch
        from rlfuse import hostmem

        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def steps():
            torch.zeros(16 * 2**20).sum()  # warm
            f = faults()
            for _ in range(20):
                torch.zeros(16 * 2**20).sum()  # 64 MiB: above glibc's mmap threshold
            return faults() - f

        before = steps()
        assert hostmem.apply("release", torch.device("cpu")) == "release"
        assert hostmem.apply("auto", torch.device("cpu")) == "keep"
        after = steps()
        print(before, after)
        assert before > 20 * 10000, before  # ~16k faults of 4 KiB per 64 MiB and step
        assert after < before / 4, (before, after)  # the heap grows a few times, then reuses
        assert hostmem.apply("release", torch.device("cpu")) == "keep"  # process-wide, once
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
