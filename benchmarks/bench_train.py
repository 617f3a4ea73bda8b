"""``make bench-train``: training-step speed and memory, each against a peer measured in the same run.

1. ITC-only step of our model vs an open_clip CLIP training step with the same towers (the same open_clip
   vision config; an HF XLM-R text tower with as many layers as our text stack, CLS pooling, linear projection),
   same batch, same optimizer (torch AdamW): ``itc_step_ratio_vs_open_clip`` = our steps/s / open_clip's.
   Timed in alternating rounds so that load from other processes hits both sides alike.
2. The full CCLM step broken down by objective (ITC, +ITM, +MLM) for both views, ms per forward+backward.
3. Parameter+optimizer memory per rank under DeepSpeed ZeRO 0/1/2/3 with 2 gloo processes, bf16 (bytes of the
   distinct tensors each rank holds: bf16 module parameters or their ZeRO-3 shards, fp32 master partitions and
   Adam states; gradients excluded), plus each rank's peak RSS. ~51M-parameter model.
GPU samples/s and MFU of the base architecture: ``make bench-gpu`` (benchmarks/bench_gpu.py).

Writes ``benchmarks/results/train.json`` and appends a line to ``benchmarks/RESULTS.md``; ``--itc-only`` runs
section 1 alone and only prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.results_md import append_to_section  # noqa: E402

VISION = {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 64, "mlp_ratio": 4.0}
TEXT = {
    "vocab_size": 8000,
    "hidden_size": 192,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "max_position_embeddings": 66,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
TEXT_LAYERS, FUSION_LAYERS = 4, 2
BATCH, LENGTH, EMBED = 32, 32, 128


def model_cfg(
    objectives: dict | None = None,
    text_layers: int = TEXT_LAYERS,
    fusion_layers: int = FUSION_LAYERS,
    vision: dict | None = None,
    text: dict | None = None,
):
    from cclm.config import ModelConfig, from_dict

    text_cfg = dict(text or TEXT, num_hidden_layers=text_layers + fusion_layers)
    vision_cfg = dict(vision or VISION)
    return from_dict(
        ModelConfig,
        {
            "vision": {"tower": vision_cfg, "image_size": vision_cfg["image_size"]},
            "text": {
                "encoder": text_cfg,
                "text_layers": list(range(text_layers)),
                "fusion_layers": list(range(text_layers, text_layers + fusion_layers)),
                "max_length": LENGTH,
            },
            "embed_dim": EMBED,
            "objectives": objectives or {},
        },
    )


def batch(view: str, vocab: int, image_size: int = VISION["image_size"], size: int = BATCH) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (size, LENGTH), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=g) < 0.4
    pick[:, 0] = pick[:, -1] = False
    labels[pick] = ids[pick]
    out = {
        "text_ids": ids,
        "text_mask": mask,
        "mlm_ids": ids.masked_fill(pick, 4),
        "mlm_labels": labels,
        "group_ids": torch.arange(size),
    }
    if view == "image":
        out["images"] = torch.randint(
            0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, generator=g
        )
    else:
        out["other_ids"], out["other_mask"] = ids.flip(0), mask
    return out


# --------------------------------------------------------------------------------------- 1. ITC vs open_clip
def open_clip_peer(tmp: Path):
    import open_clip
    from open_clip.loss import ClipLoss
    from transformers import XLMRobertaConfig

    text_dir = tmp / "xlmr_text_tower"
    XLMRobertaConfig(**dict(TEXT, num_hidden_layers=TEXT_LAYERS)).save_pretrained(text_dir)
    text_cfg = {
        "hf_model_name": str(text_dir),
        "hf_model_pretrained": False,
        "hf_pooler_type": "cls_pooler",
        "hf_proj_type": "linear",
        "context_length": LENGTH,
        "vocab_size": TEXT["vocab_size"],
    }
    model = open_clip.model.CustomTextCLIP(EMBED, VISION, text_cfg)
    return model, ClipLoss()


def pretraining_engine(model, env, zero_stage: int, precision: str, micro_batch: int, steps: int):
    """``model`` under the runtime's DeepSpeed engine with pretraining's default AdamW and schedule."""
    from cclm.config import PretrainConfig, from_dict
    from cclm.runtime.engine import build_engine

    cfg = from_dict(
        PretrainConfig,
        {"train": {"max_steps": steps}, "deepspeed": {"zero_stage": zero_stage, "precision": precision}},
    )
    engine, *_ = build_engine(
        model,
        env=env,
        optimizer_cfg=cfg.train.optimizer,
        scheduler_cfg=cfg.train.scheduler,
        deepspeed_cfg=cfg.deepspeed,
        micro_batch=micro_batch,
        max_steps=steps,
    )
    return engine


def time_steps(step_fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - start) / steps


def bench_itc(rounds: int, steps: int) -> dict:
    from cclm.model import CrossViewModel

    torch.manual_seed(0)
    ours = CrossViewModel(model_cfg({"itm_weight": 0.0, "mlm_weight": 0.0}), load_pretrained=False).train()
    with tempfile.TemporaryDirectory() as tmp:
        peer, clip_loss = open_clip_peer(Path(tmp))
    peer.train()
    data = batch("image", TEXT["vocab_size"])
    data.pop("mlm_ids")
    # The same batch for both: normalised float images (our model also accepts uint8 and normalises itself,
    # which moves that work from the data workers to the accelerator; not what is compared here).
    images = (data["images"].float() / 255 - ours.vision.mean) / ours.vision.std
    data["images"] = images
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4)

    def ours_step():
        loss = ours(data, "image")["loss"]
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def peer_step():
        img = peer.encode_image(images, normalize=True)
        txt = peer.encode_text(data["text_ids"], normalize=True)
        loss = clip_loss(img, txt, peer.logit_scale.exp())
        opt_peer.zero_grad(set_to_none=True)
        loss.backward()
        opt_peer.step()

    ours_step(), peer_step()  # warm-up
    ours_times, peer_times = [], []
    for _ in range(rounds):
        ours_times.append(time_steps(ours_step, steps))
        peer_times.append(time_steps(peer_step, steps))
    ours_s, peer_s = sorted(ours_times)[len(ours_times) // 2], sorted(peer_times)[len(peer_times) // 2]
    params = {
        "ours_itc_path": sum(
            p.numel()
            for n, p in ours.named_parameters()
            if not n.startswith(("fusion.", "itm_head.", "mlm_head.", "image_to_fusion."))
        ),
        "open_clip": sum(p.numel() for p in peer.parameters()),
    }
    return {
        "ours_steps_per_s": 1 / ours_s,
        "open_clip_steps_per_s": 1 / peer_s,
        "itc_step_ratio_vs_open_clip": peer_s / ours_s,
        "params": params,
    }


# ------------------------------------------------------------------------------------- 2. objective breakdown
def bench_objectives(steps: int) -> dict:
    from cclm.model import CrossViewModel

    settings = {
        "itc": {"itm_weight": 0.0, "mlm_weight": 0.0},
        "itc+itm": {"mlm_weight": 0.0},
        "itc+itm+mlm": {},
    }
    out: dict = {}
    for view in ("image", "text"):
        data = batch(view, TEXT["vocab_size"])
        for name, objectives in settings.items():
            torch.manual_seed(0)
            model = CrossViewModel(model_cfg(objectives), load_pretrained=False).train()

            def step(model=model, data=data, view=view):
                model(data, view)["loss"].backward()

            step()
            out[f"{view}/{name}_ms"] = 1000 * time_steps(step, steps)
        out[f"{view}/itm_added_ms"] = out[f"{view}/itc+itm_ms"] - out[f"{view}/itc_ms"]
        out[f"{view}/mlm_added_ms"] = out[f"{view}/itc+itm+mlm_ms"] - out[f"{view}/itc+itm_ms"]
    return out


# --------------------------------------------------------------------------------------- 3. ZeRO memory
def bench_zero_memory(stages=(0, 1, 2, 3)) -> dict:
    from cclm.runtime.env import free_port

    out = {}
    for stage in stages:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "memory.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                f"--master_port={free_port()}",
                str(HERE / "zero_memory_worker.py"),
                "--stage",
                str(stage),
                "--out",
                str(result),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True, text=True)
            out[str(stage)] = json.loads(result.read_text())
    return out


SECTION = "## Training step and ZeRO memory (`make bench-train`)"


def append_result_line(path: Path, text: str) -> None:
    """Add ``text`` at the end of this benchmark's section of RESULTS.md (made at the file's end if missing)."""
    append_to_section(path, SECTION, text, match="## Training step and ZeRO memory")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "train.json"))
    parser.add_argument("--itc-only", action="store_true", help="section 1 only, printed, nothing written")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    itc = bench_itc(args.rounds, args.steps)
    print(
        f"ITC step: ours {itc['ours_steps_per_s']:.2f}/s vs open_clip {itc['open_clip_steps_per_s']:.2f}/s "
        f"-> ratio {itc['itc_step_ratio_vs_open_clip']:.2f}"
    )
    if args.itc_only:
        return 0
    objectives = bench_objectives(args.steps)
    print("objectives (ms per forward+backward):", {k: round(v, 1) for k, v in objectives.items()})
    memory = bench_zero_memory()
    mem_mb = {stage: round(m["state_bytes_per_rank"] / 2**20, 1) for stage, m in memory.items()}
    print("param+optimizer MiB per rank by ZeRO stage:", mem_mb)
    result = {
        "itc_step_ratio_vs_open_clip": itc["itc_step_ratio_vs_open_clip"],
        "peak_memory_mb_by_zero_stage": mem_mb,
        "itc": itc,
        "objectives_ms": objectives,
        "zero_memory": memory,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "config": {
            "batch": BATCH,
            "text_length": LENGTH,
            "vision": VISION,
            "text_hidden": TEXT["hidden_size"],
            "text_layers": TEXT_LAYERS,
            "fusion_layers": FUSION_LAYERS,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    line = (
        f"- {datetime.date.today()} bench-train (CPU, {os.cpu_count()} cores, batch {BATCH}, ViT w{VISION['width']}"
        f"x{VISION['layers']} @ {VISION['image_size']}px + XLM-R-style w{TEXT['hidden_size']} {TEXT_LAYERS}+"
        f"{FUSION_LAYERS} layers): ITC-only step {itc['ours_steps_per_s']:.2f}/s vs open_clip "
        f"{itc['open_clip_steps_per_s']:.2f}/s, ratio **{itc['itc_step_ratio_vs_open_clip']:.2f}** (target >= 1.0); "
        f"full step ms (image view) ITC {objectives['image/itc_ms']:.0f}, +ITM "
        f"{objectives['image/itm_added_ms']:.0f}, +MLM {objectives['image/mlm_added_ms']:.0f}; "
        f"bf16 param+optimizer MiB/rank ZeRO-0/1/2/3 (2 ranks, 51M params): {mem_mb['0']}/{mem_mb['1']}/{mem_mb['2']}/{mem_mb['3']}"
        f" (ZeRO-3/ZeRO-0 = {mem_mb['3'] / mem_mb['0']:.2f})"
    )
    line += "; GPU samples/s and MFU: `make bench-gpu`"
    append_result_line(HERE / "RESULTS.md", line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
