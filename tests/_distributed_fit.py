"""Helpers of tests/test_patterns.py: the small test network and its data, and a worker
that fits patterns in one process of a ``torch.distributed`` (gloo, CPU) group.

Run as a script, once per rank::

    python tests/_distributed_fit.py RANK WORLD INIT_FILE OUT_DIR

Every rank builds the same model and batches (seeded), initialises the process group
with ``file://INIT_FILE`` and fits the patterns

* ``dealt``   -- over a plain list of batches (``fit_patterns`` deals them round-robin),
  with checkpoints, and measures ``layer_quality`` of those patterns on the same dealt
  batches; ``resumed`` reuses the finished checkpoints on the same data, ``other_data``
  on other data (which must fail on every rank),
* ``sampled`` -- over a DataLoader with a ``DistributedSampler`` (each rank its shard),
* ``starved`` -- over a single batch, so one rank gets nothing: every rank must raise a
  clear error instead of hanging in the all-reduce,

and writes ``OUT_DIR/<case>.rank<RANK>.safetensors`` (or ``starved.rank<RANK>.txt`` with
the error message). The test compares the files with a single-process fit.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

IMAGE_SHAPE = (3, 23, 23)


def conv_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Conv(stride 2, pad 1, dil 2, bias)-BN-ReLU(inplace)-MaxPool-Conv(stride 2, pad 1,
    dil 2, no bias)-ReLU-Flatten-Linear on 3x23x23 inputs, in eval mode, with BatchNorm
    statistics and affine parameters far from the identity."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=2),
        bn1=nn.BatchNorm2d(6),
        relu1=nn.ReLU(inplace=True),
        pool=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 5, 3, stride=2, padding=1, dilation=2, bias=False),
        relu2=nn.ReLU(),
        flatten=nn.Flatten(),
        fc=nn.Linear(5 * 2 * 2, 4),
    ))
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.3, 3.0)
        net.bn1.weight.uniform_(0.5, 2.0)
        net.bn1.bias.uniform_(-0.3, 0.3)
        net.conv1.bias.uniform_(-0.2, 0.2)
        net.double().eval()
        # centre the output neurons on typical inputs, so each is active on about half
        y = net[:-1](images(64, seed=99)) @ net.fc.weight.T
        net.fc.bias.copy_(-y.median(0).values)
    return net.to(dtype)


def images(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` random inputs with a non-zero mean (so the mean terms matter)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *IMAGE_SHAPE, generator=g, dtype=torch.float64) + 0.3).to(dtype)


N_IMAGES = 48
BATCH = 5  # 10 batches, the last one short


def batches() -> list[torch.Tensor]:
    return list(torch.split(images(N_IMAGES), BATCH))


def run_workers(script: Path, world: int, out_dir: Path, timeout: float = 180) -> None:
    """Run ``script RANK WORLD INIT_FILE OUT_DIR`` once per rank (gloo on the CPU, one
    thread each) and wait; fail with every rank's log if any rank does."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    workers = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(out_dir / "init"),
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
    """rho(S) per neuron of every layer and estimator, keyed ``layer/estimator``."""
    from toolkit.quality import layer_quality

    result = layer_quality(model, patterns, batches(), progress=False)
    return {f"{layer}/{estimator}": rho.contiguous()
            for layer, per_estimator in result.per_neuron.items()
            for estimator, rho in per_estimator.items()}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from safetensors.torch import save_file

    from toolkit.patterns import fit_patterns

    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = conv_net()
        patterns = fit_patterns(model, batches(), progress=False, checkpoint=out / "dealt.ckpt",
                                checkpoint_every=2)
        patterns.save(out / f"dealt.rank{rank}.safetensors")
        # the finished checkpoints, reused with the same data and with other data
        again = fit_patterns(model, batches(), progress=False, checkpoint=out / "dealt.ckpt")
        again.save(out / f"resumed.rank{rank}.safetensors")
        try:
            fit_patterns(model, [b + 1 for b in batches()], progress=False, checkpoint=out / "dealt.ckpt")
            message = "no error"
        except ValueError as error:
            message = str(error)
        (out / f"other_data.rank{rank}.txt").write_text(message)
        save_file(quality_tensors(model, patterns), str(out / f"quality.rank{rank}.safetensors"))

        dataset = TensorDataset(images(N_IMAGES))
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
        fit_patterns(model, loader, progress=False).save(out / f"sampled.rank{rank}.safetensors")

        try:
            fit_patterns(model, batches()[:1], progress=False)
            message = "no error"
        except ValueError as error:
            message = str(error)
        (out / f"starved.rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
