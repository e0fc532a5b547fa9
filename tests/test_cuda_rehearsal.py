"""A rehearsal of the CUDA training step on the CPU, as far as the CPU allows: two gloo processes with the sync-free
BatchNorm, bf16 autocast, channels-last, DirectPredictor on the triton backend (interpreted) and torch.compile.

So that the first time on a GPU is spent on speed, not on crashes: the step must run, keep DirectPredictor's
statistics fp32 and equal on both ranks, wait on the host nowhere (counted with a TorchDispatchMode) and compile
without a graph break. What only a GPU shows (NCCL, inductor's CUDA code, CUDA graphs) is left to .ci/gpu-check.
"""

import json
import os
import subprocess
import sys

import pytest
from fastpred.kernels._launch import interpreted

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(not interpreted(), reason="the CPU rehearsal runs the triton backend under TRITON_INTERPRET=1")
def test_two_process_cuda_step_rehearsal(tmp_path):
    path = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "rehearsal_worker.py"), str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["host_syncs"] == [], r  # nothing in a step waits on the host
        # ResNet-18's 20 BatchNorms and the projector's: all synchronised, in the online and the target network.
        assert r["sync_bn_layers"] == r["target_sync_bn_layers"] == 21
        assert r["amp"] and r["channels_last"]
        assert r["F_dtype"] == r["W_dtype"] == "torch.float32" and r["F_equal_on_ranks"]
        assert r["loss_finite"] and r["unconverged_solves"] == 0
        assert r["compile_graphs"] == 4 and r["compile_graph_breaks"] == 0  # backbones and projectors, whole
