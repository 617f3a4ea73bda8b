"""Pretraining under DeepSpeed on CPU (gloo): ZeRO stages, export from ZeRO-3, and configs that must fail before
writing anything (resume and checkpoint faults: tests/faults/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .pretrain_runs import CONFIG, REPO, metrics, overrides, quiet_env, run_pretrain, small_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("world") / "w")


def _view_losses(records: list[dict], view: str) -> list[float]:
    return [r[f"{view}/loss"] for r in records if f"{view}/loss" in r]


# Each stage also exercises one training option: activation checkpointing, the X2-VLM "sum" schedule with
# gradient accumulation, and CCLM's alternating schedule.
STAGE_OPTIONS = {
    1: {"train.activation_checkpointing": True},
    2: {"train.view_schedule": "sum", "train.grad_accum": 2},
    3: {"deepspeed.precision": "null"},  # unset: the run records the precision it resolved to (the card's)
}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_process_pretraining_per_zero_stage(world, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    options = {
        "deepspeed.zero_stage": stage,
        "train.max_steps": 16,
        "train.save_every": 16,
        **STAGE_OPTIONS[stage],
    }
    if stage == 3:  # periodic evaluation on ZeRO-3-partitioned weights (gathered for it)
        options.update({"train.eval_every": 8, "eval.datasets": f"{{world: {world / 'heldout'}}}"})
    run_pretrain(2, overrides(world, out, **options))
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 17))
    for view in ("image", "text"):
        losses = _view_losses(records, view)
        assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, (view, losses)
    assert (out / "checkpoints" / "step_00000016" / "complete.json").exists()
    assert (out / "checkpoints" / "step_00000016" / "rank1_state.json").exists()
    if stage == 1:  # `cclm plot` renders the run's curves
        from cclm.train.plot import plot_curves

        picture = plot_curves(out)
        assert picture.is_file() and picture.stat().st_size > 10_000
    if stage == 3:
        _check_export_round_trip(out / "checkpoints" / "step_00000016", tmp_path / "exported")
        _check_periodic_eval_sees_whole_weights(records, world, tmp_path / "exported")


def _check_export_round_trip(ckpt: Path, out: Path) -> None:
    """Export (fp32 gathered at save time) equals DeepSpeed's own ZeRO-3 consolidation, and the exported folder
    reloads with identical outputs."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cclm.model import CrossViewModel
    from cclm.train.export import export

    export(ckpt, out)
    loaded = CrossViewModel.from_pretrained(out).eval()
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    ours = loaded.state_dict()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor.float()), name
    again = CrossViewModel.from_pretrained(out).eval()
    ids = torch.randint(5, 50, (2, 7))
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(
            loaded.encode_image(images) + loaded.encode_text(ids, torch.ones_like(ids)),
            again.encode_image(images) + again.encode_text(ids, torch.ones_like(ids)),
        ):
            assert torch.equal(a, b)
    assert (out / "tokenizer.json").exists()
    assert "; precision fp32" in (out / "README.md").read_text()  # auto on a CPU, made concrete


def _check_periodic_eval_sees_whole_weights(records: list[dict], world: Path, exported: Path) -> None:
    """The step-16 evaluation, run by 2 ranks on gathered ZeRO-3 partitions, equals evaluating the exported
    step-16 weights in one process, up to near-ties: two ranks embed in other batch shapes, so a score may move
    by float rounding and a query whose gold and best other candidate are within ``NEAR_TIE`` may flip. Every
    logged metric must lie between the metrics of the exported model's ranks with such ties resolved for and
    against the gold, and most queries must have no near-tie (else the check would prove nothing)."""
    import functools

    from cclm.config import EvalConfig, load_config
    from cclm.data.images import load_image
    from cclm.data.tokenize import load_tokenizer
    from cclm.evaluation.retrieval import (
        _gold_mask,
        embed_gallery,
        gold_matrix,
        metrics_from_ranks,
        tokenize_texts,
    )
    from cclm.evaluation.run import load_periodic_sets
    from cclm.model import CrossViewModel

    near_tie = 1e-5  # well above float32 rounding of a cosine (~1e-7), well below the typical gap
    logged = {r["step"]: r for r in records if "eval/world/en/txt_r1" in r}
    assert sorted(logged) == [8, 16]
    eval_cfg = load_config(EvalConfig, None, [f"datasets={{world: {world / 'heldout'}}}"])
    model = CrossViewModel.from_pretrained(exported).eval()
    tokenizer = load_tokenizer(str(exported))
    queries = flips = 0
    for retrieval_set in load_periodic_sets(eval_cfg)["world"]:
        with torch.no_grad():
            emb = embed_gallery(
                model,
                retrieval_set.images,
                tokenize_texts(tokenizer, retrieval_set.texts, int(model.cfg.text.max_length)),
                functools.partial(load_image, size=32),
                tokenizer.pad_token_id,
                32,
                "cpu",
                keep_tokens=False,
            )
        sims = (emb.image_feats @ emb.text_feats.t()).double()
        bounds = []
        for scores, gold in ((sims, retrieval_set.img2txt), (sims.t(), retrieval_set.txt2img)):
            gold_mask = _gold_mask(gold_matrix(gold, scores.shape[1]), scores.shape[1])
            best_gold = scores.masked_fill(~gold_mask, float("-inf")).amax(dim=1, keepdim=True)
            best = 1 + ((scores >= best_gold + near_tie) & ~gold_mask).sum(dim=1)
            worst = 1 + ((scores >= best_gold - near_tie) & ~gold_mask).sum(dim=1)
            bounds.append((best, worst))
            queries += len(best)
            flips += int((best != worst).sum())
        optimistic = metrics_from_ranks(bounds[0][0], bounds[1][0])
        pessimistic = metrics_from_ranks(bounds[0][1], bounds[1][1])
        for key in optimistic:
            low, high = sorted((optimistic[key], pessimistic[key]))
            value = logged[16][f"eval/world/{retrieval_set.lang}/{key}"]
            assert low - 1e-6 <= value <= high + 1e-6, (retrieval_set.lang, key, value, low, high)
    assert flips <= queries // 10, (
        f"{flips} of {queries} queries have a near-tie: the comparison is too loose"
    )


def test_incomplete_checkpoint_is_never_latest(tmp_path):
    from cclm.runtime import checkpoint

    root = checkpoint.checkpoint_root(tmp_path)
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = root / checkpoint.tag_for(step)
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if complete:
            (folder / checkpoint.COMPLETE).write_text("{}")
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000008"
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000008"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"train.optimizer.name": "adamax"}, "unknown optimizer 'adamax'"),
        ({"data.image_caption.shards": "/nonexistent/shard-{000000..000003}.tar"}, "/nonexistent"),
        ({"deepspeed.config_file": "BATCH_FILE"}, "batch size mismatch"),
        ({"train.view_schedule": "interleaved"}, "train.view_schedule"),
    ],
)
def test_bad_config_fails_at_start_and_writes_nothing(world, tmp_path, extra, message):
    if extra.get("deepspeed.config_file") == "BATCH_FILE":
        bad = tmp_path / "ds.json"
        bad.write_text(json.dumps({"train_batch_size": 1000, "zero_optimization": {"stage": 1}}))
        extra = {"deepspeed.config_file": str(bad)}
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "cclm.cli", "pretrain", str(CONFIG), *overrides(world, out, **extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
