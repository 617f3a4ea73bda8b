"""One rank of the ZeRO memory benchmark (started by bench_train.py through torchrun): builds the DeepSpeed engine
at the given ZeRO stage, takes 3 training steps of both views and reports the bytes of the distinct tensors this
rank holds for parameters and optimizer state, and its peak RSS."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import batch, model_cfg, pretraining_engine  # noqa: E402

# ~40M parameters: large enough that parameter and optimizer state dominate the per-rank footprint.
TEXT = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "num_attention_heads": 8,
    "intermediate_size": 2048,
    "max_position_embeddings": 66,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
VISION = {"image_size": 64, "patch_size": 8, "width": 512, "layers": 4, "head_width": 64, "mlp_ratio": 4.0}


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def state_tensors(engine):
    for p in engine.module.parameters():
        yield getattr(p, "ds_tensor", p.data)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in optimizer.param_groups:
        yield from group["params"]
    for state in optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "bit16_groups_flat"):
        yield from getattr(engine.optimizer, name, []) or []


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()

    from cclm.model import CrossViewModel
    from cclm.runtime.env import init_distributed

    info = init_distributed()
    torch.manual_seed(0)
    model = CrossViewModel(model_cfg(text=TEXT, vision=VISION), load_pretrained=False)
    n_params = sum(p.numel() for p in model.parameters())
    size = 8
    engine = pretraining_engine(model, info, args.stage, args.precision, micro_batch=size, steps=10)
    for step in range(3):
        view = "image" if step % 2 == 0 else "text"
        loss = engine(batch(view, TEXT["vocab_size"], VISION["image_size"], size), view)["loss"]
        engine.backward(loss)
        engine.step()
    state = _storage_bytes(state_tensors(engine))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    values = torch.tensor([state, rss], dtype=torch.float64)
    gathered = [torch.zeros_like(values) for _ in range(info.world_size)]
    torch.distributed.all_gather(gathered, values)
    if info.rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "params": n_params,
                    "state_bytes_per_rank": max(float(g[0]) for g in gathered),
                    "peak_rss_mb_per_rank": [round(float(g[1]) / 2**20, 1) for g in gathered],
                }
            )
        )
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
