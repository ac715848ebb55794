"""Distributed training: `volseg train strip` under torchrun with 2 CPU processes (gloo) ends
with identical weights on both ranks, each rank having trained on its own samples, and only
rank 0 writing; the helpers in volseg.distributed are no-ops for one process."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from volseg.config import Config, config_to_dict
from volseg import distributed as dist
from volseg.strip.config import AugmentConfig, DataConfig, NetConfig, StripConfig, TrainConfig

TINY_NET = NetConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
NO_AUG = AugmentConfig(prob=0, flip_lr=0, bias=0, gamma=0, contrast=0, blur=0, noise=0,
                       salt_pepper=0, thick_slices=0, histogram=0, lesion=0)

# Runs in every rank: records which samples the rank's loader drew and the rank's final weights
# (build_unet is wrapped to keep a handle on the network train() builds), then calls the CLI.
RANK_SCRIPT = textwrap.dedent("""\
    import os, sys
    import torch
    import volseg.strip.train as T
    from volseg.cli import main

    rank, out = os.environ["RANK"], sys.argv[1]
    nets, build = [], T.build_unet
    T.build_unet = lambda cfg: nets.append(build(cfg)) or nets[-1]
    get = T.MixedGridDataset.__getitem__

    def getitem(self, i):
        with open(os.path.join(out, f"samples-rank{rank}.txt"), "a") as fh:  # loader worker
            fh.write(f"{i + self.start}\\n")
        return get(self, i)

    T.MixedGridDataset.__getitem__ = getitem
    code = main(sys.argv[2:])
    torch.save(nets[0].state_dict(), os.path.join(out, f"weights-rank{rank}.pt"))
    sys.exit(code)
""")


def test_two_cpu_ranks_train_with_ddp_and_end_with_identical_weights(tmp_path, tiny_head):
    image, mask = tiny_head
    val_dir = tmp_path / "val"  # a copy under another path: validation scans are kept out of training
    val_dir.mkdir()
    shutil.copy(image, val_dir / image.name)
    shutil.copy(mask, val_dir / mask.name)
    run = tmp_path / "run"
    cfg = StripConfig(
        net=TINY_NET,
        data=DataConfig(real=(str(image.parent),), validation=(str(val_dir / image.name),), synth_count=0,
                        cache_dir=str(tmp_path / "cache")),
        augment=NO_AUG,
        train=TrainConfig(steps=6, steps_per_epoch=3, lr=1e-2, threads=1, device="cpu", amp=False,
                          out_dir=str(run)),
        preprocess=dataclasses.replace(Config(), n4=dataclasses.replace(Config().n4, backend="none")),
    )
    cfg_path = tmp_path / "strip.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in dist.TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(script), str(tmp_path), "train", "strip", "-c", str(cfg_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, f"torchrun failed\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"

    w0 = torch.load(tmp_path / "weights-rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights-rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"{key} differs between the ranks"

    # each rank drew its own samples: rank r takes r, r+2, ... of the 12 (6 steps x 2 ranks)
    drawn = [sorted(int(x) for x in (tmp_path / f"samples-rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert drawn == [list(range(0, 12, 2)), list(range(1, 12, 2))]

    # rank 0 alone wrote: one header and one row per validation in log.csv
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["3", "6"]
    assert (run / "best" / "model.safetensors").exists() and (run / "final" / "model.safetensors").exists()
    assert (run / "last.pt").exists() and (run / "summary.json").exists()
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 6
    for key in w0:  # the checkpoint holds the unwrapped network's weights, no "module." prefix
        assert torch.equal(ckpt["model"][key], w0[key])
    # and the weights moved away from the initial ones
    from monai.utils import set_determinism

    from volseg.nets import build_unet

    set_determinism(seed=0)
    init = build_unet(TINY_NET).state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0 if w0[k].is_floating_point())


def test_helpers_are_no_ops_for_one_process(monkeypatch):
    for var in dist.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not dist.launched_by_torchrun()
    ctx = dist.setup("cpu")
    try:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.distributed) == (0, 1, None, False)
        assert ctx.device == torch.device("cpu") and ctx.is_main and dist.is_main()
        net = torch.nn.Linear(2, 2)
        assert dist.wrap_model(net, ctx) is net and dist.unwrap(net) is net
        assert dist.shard_sampler(list(range(5)), ctx) is None
        assert dist.all_reduce_mean(torch.tensor(2.5)) == 2.5
        assert dist.broadcast_object({"a": 1}) == {"a": 1}
        dist.barrier()
        with dist.main_first():
            pass
    finally:
        dist.teardown(ctx)


def test_shard_indices_partition_and_check_the_rank():
    parts = [list(dist.shard_indices(11, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11)) and parts[1] == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="0 <= rank < world size"):
        dist.shard_indices(5, 3, 3)
    assert dist.launched_by_torchrun({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
