"""Fits in several processes of a ``torch.distributed`` (gloo, CPU) group, for the tests.

:func:`run_workers` starts this file once per rank and waits::

    python tests/_distributed.py JOB RANK WORLD INIT_FILE OUT_DIR

Every rank builds the same model and batches (seeded, from ``tests/_nets.py``),
initialises the process group with ``file://INIT_FILE``, runs the job and writes its
files to ``OUT_DIR``; the tests compare them with a single-process fit.

``conv_net`` (tests/test_patterns.py) fits the patterns of :func:`_nets.conv_net`

* ``dealt``   -- over a plain list of batches (``fit_patterns`` deals them round-robin),
  with checkpoints, and measures ``layer_quality`` of those patterns on the same dealt
  batches; ``resumed`` reuses the finished checkpoints on the same data, ``other_data``
  on other data (which must fail on every rank),
* ``sampled`` -- over a DataLoader with a ``DistributedSampler`` (each rank its shard),
* ``starved`` -- over a single batch, so one rank gets nothing: every rank must raise a
  clear error instead of hanging in the all-reduce,

and writes ``<case>.rank<RANK>.safetensors`` (``quality.rank<RANK>.safetensors`` for the
quality; ``other_data`` and ``starved`` as ``.txt`` with the error message).

``tiny_residual`` (tests/test_resnet.py) fits the patterns of :func:`_nets.tiny_residual`
with both activity masks over the dealt batches and writes ``<mask>.rank<RANK>.safetensors``.

``families`` (tests/test_reach.py) fits the DenseNet- and Inception-like networks of
``tests/_families.py`` and writes ``<family>.rank<RANK>.safetensors``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from _nets import BATCH, N_IMAGES, batches, conv_net, images, residual_batches, tiny_residual

HERE = Path(__file__).resolve().parent


def run_workers(job: str, world: int, out_dir: Path, timeout: float = 180) -> None:
    """Run ``job`` in ``world`` processes (gloo on the CPU, one thread each) and wait;
    fail with every rank's log if any rank does. Skips the calling test where this
    torch build has no ``torch.distributed``."""
    if not torch.distributed.is_available():
        import pytest

        pytest.skip("this torch build has no torch.distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    workers = [subprocess.Popen([sys.executable, __file__, job, str(rank), str(world), str(out_dir / "init"),
                                 str(out_dir)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    try:
        logs = [w.communicate(timeout=timeout)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)


def quality_tensors(model, patterns) -> dict[str, torch.Tensor]:
    """rho(S) per neuron of every layer and estimator on :func:`_nets.batches`, keyed
    ``layer/estimator``."""
    from toolkit.quality import layer_quality

    result = layer_quality(model, patterns, batches(), progress=False)
    return {f"{layer}/{estimator}": rho.contiguous()
            for layer, per_estimator in result.per_neuron.items()
            for estimator, rho in per_estimator.items()}


def error_of(fit) -> str:
    """The message of the ValueError that ``fit()`` raises, or ``"no error"``."""
    try:
        fit()
    except ValueError as error:
        return str(error)
    return "no error"


def fit_conv_net(rank: int, world: int, out: Path) -> None:
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from toolkit.patterns import fit_patterns

    model = conv_net()
    patterns = fit_patterns(model, batches(), progress=False, checkpoint=out / "dealt.ckpt",
                            checkpoint_every=2, keep_statistics=True)
    patterns.save(out / f"dealt.rank{rank}.safetensors", statistics=True)
    # the finished checkpoints, reused with the same data and with other data
    again = fit_patterns(model, batches(), progress=False, checkpoint=out / "dealt.ckpt")
    again.save(out / f"resumed.rank{rank}.safetensors")
    (out / f"other_data.rank{rank}.txt").write_text(error_of(lambda: fit_patterns(
        model, [b + 1 for b in batches()], progress=False, checkpoint=out / "dealt.ckpt")))
    save_file(quality_tensors(model, patterns), str(out / f"quality.rank{rank}.safetensors"))

    dataset = TensorDataset(images(N_IMAGES))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    fit_patterns(model, loader, progress=False, keep_statistics=True).save(
        out / f"sampled.rank{rank}.safetensors", statistics=True)

    (out / f"starved.rank{rank}.txt").write_text(error_of(lambda: fit_patterns(
        model, batches()[:1], progress=False)))


def fit_tiny_residual(rank: int, world: int, out: Path) -> None:
    from toolkit.patterns import fit_patterns

    net = tiny_residual()
    for mask in ("output", "relu_input"):
        fit_patterns(net, residual_batches(), progress=False, mask=mask).save(
            out / f"{mask}.rank{rank}.safetensors")


def fit_families(rank: int, world: int, out: Path) -> None:
    from _families import family, family_images
    from toolkit.patterns import fit_patterns

    for name in ("densenet", "inception"):
        batches_ = list(torch.split(family_images(30), 6))
        fit_patterns(family(name), batches_, progress=False).save(out / f"{name}.rank{rank}.safetensors")


JOBS = {"conv_net": fit_conv_net, "tiny_residual": fit_tiny_residual, "families": fit_families}


def main(job: str, rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        JOBS[job](rank, world, Path(out_dir))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
