"""``segvol.memory.keep_large_arrays``: a freed large array's memory serves the next one without faulting it in
again, and numpy stops asking for huge pages. Each case runs in a fresh interpreter (the settings are per process)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"

PROBE = """
import json, resource, sys
sys.path.insert(0, {lib!r})
import numpy as np
from segvol.memory import keep_large_arrays
applied = keep_large_arrays() if {tune} else {{}}
faults = []
for _ in range(4):  # a click's pattern: a CT-sized array filled, freed, and another one
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.empty(64 << 20, np.uint8)
    block.fill(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
hugepages = np.core.multiarray._set_madvise_hugepage(False)  # returns the setting it replaces
print(json.dumps({{"applied": applied, "faults": faults, "hugepages_were_on": hugepages}}))
"""


def probe(tune: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(lib=str(LIB), tune=tune)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings (Linux only)")
def test_a_freed_large_array_is_reused_without_page_faults():
    plain, tuned = probe(False), probe(True)
    assert tuned["applied"] == {"malloc": True, "numpy_hugepages_off": True}
    # 64 MB is 16384 pages of 4 KB (or 32 huge pages): by default each new block is a fresh mapping, faulted in again
    assert min(plain["faults"][1:]) >= 32
    assert max(tuned["faults"][1:]) < 16, tuned["faults"]  # the heap's freed block is reused as it is
    assert plain["hugepages_were_on"] and not tuned["hugepages_were_on"]
