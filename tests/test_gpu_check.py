"""scripts/gpu_check.sh, on a machine without a CUDA GPU: it parses, and refuses in one line before doing anything.
(What it runs on a GPU is checked by running it there.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0


@pytest.mark.parametrize("nvidia_smi", [False, True], ids=["no-nvidia-smi", "nvidia-smi-but-no-cuda-for-torch"])
def test_without_a_cuda_gpu_it_refuses_in_one_line_and_writes_nothing(tmp_path, nvidia_smi):
    work = tmp_path / "gpu-check"
    # No GPU visible to torch even on a machine that has one: the refusal is what is tested, never the checks.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ALIGN_GPU_CHECK_DIR": str(work)}
    if nvidia_smi:  # one that lists a GPU: torch.cuda, which sees none, must refuse
        fake = tmp_path / "bin" / "nvidia-smi"
        fake.parent.mkdir()
        fake.write_text("#!/bin/sh\necho 'GPU 0: a listed GPU'\n")
        fake.chmod(0o755)
        env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["gpu_check: no CUDA GPU here (nvidia-smi and torch.cuda must both see one): "
                                        "run it on a machine with one"]
    assert not work.exists()
