"""Several hosts measure one configuration through `jax.distributed` (the README's recipe): each
process measures its own seed block (key = its process index) on its local devices, and the
blocks pool into one measurement.  Two local CPU processes stand in for two hosts."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from normfield import Arch, measure_grad_norms
from normfield.profile import GradProfile, pool_seed_blocks

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ARCH_KW = dict(depth=2, placement="post", d_model=16, n_heads=2, d_ff=32, seq_len=4,
               batch_size=2, vocab_size=11)
SEEDS = 4

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    port, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid)
    from normfield import Arch, measure_grad_norms
    arch = Arch(**json.loads(sys.argv[4]))
    profile = measure_grad_norms(arch, seeds=int(sys.argv[5]), key=jax.process_index())
    profile.save(path)
    print(json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                      "global_devices": len(jax.devices())}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_jax_distributed_processes_measure_blocks_that_pool(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    paths = [str(tmp_path / f"block-{i}.json") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), paths[i],
                               json.dumps(ARCH_KW), str(SEEDS)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    infos = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [i["process"] for i in infos] == [0, 1]
    assert all(i["count"] == 2 and i["global_devices"] == 2 for i in infos)

    blocks = [GradProfile.load(p) for p in paths]
    arch = Arch(**ARCH_KW)
    for key, block in enumerate(blocks):  # each process: the single-process numbers of its key
        alone = measure_grad_norms(arch, seeds=SEEDS, key=key)
        for name, values in alone.per_seed_sq.items():
            np.testing.assert_allclose(block.per_seed_sq[name], values, rtol=1e-6)
    pooled = pool_seed_blocks(blocks)
    assert pooled.meta["seeds"] == 2 * SEEDS
    for name in pooled.grads:
        both = np.concatenate([b.per_seed_sq[name] for b in blocks])
        np.testing.assert_allclose(pooled.grads[name], np.sqrt(both.mean(axis=0)), rtol=1e-12)
