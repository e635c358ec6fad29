"""Run under torchrun by test_distributed.py: train three coders data-parallel and write what rank 0 got.

    python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from mechscope.sae.synthetic import synthetic_data
from mechscope.sae.train import train_many

SPECS = [  # short dead window: latents die, AuxK and resampling run; batchtopk: global selection
    dict(arch="topk", k=2, n_latents=96, steps=24, batch_size=256, dead_window_tokens=256, seed=1, data_seed=0,
         resample_every=6),
    dict(arch="batchtopk", k=3, n_latents=48, steps=24, batch_size=256, seed=2, data_seed=0),
    dict(arch="relu", n_latents=48, steps=24, batch_size=256, seed=3, data_seed=0),
]


def data() -> torch.Tensor:
    return synthetic_data(8192, d=12, n_features=32, p_active=0.08, seed=0).x


def run(out: Path, checkpoint_dir: Path | None = None, stop_after: int | None = None) -> list:
    return train_many(data(), SPECS, progress=False, log_every=1, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=8, stop_after=stop_after)


def dump(coders, out: Path) -> None:
    logs = [c.cfg.extra["train_log"] for c in coders]
    stats = [c.cfg.extra["train_stats"] for c in coders]
    (out / "log.json").write_text(json.dumps({"logs": logs, "stats": stats}))
    from safetensors.torch import save_file

    save_file({f"{i}.{k}": v.contiguous() for i, c in enumerate(coders) for k, v in c.state_dict().items()},
              str(out / "weights.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    rank = int(__import__("os").environ["RANK"])
    run(out, out / "ckpt", stop_after=10)  # interrupted after step 10 ...
    coders = run(out, out / "ckpt")  # ... and resumed by the same 2 ranks
    if rank == 0:
        dump(coders, out)
    torch.distributed.destroy_process_group()
