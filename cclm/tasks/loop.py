"""The fine-tune loop shared by every task: AdamW with warmup + linear decay, bf16 autocast on GPU, periodic
evaluation on the dev set, and the best dev checkpoint kept (model selection never looks at a test set)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from cclm.tasks.batching import to_device
from cclm.tasks.heads import TaskModel

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory: bf16 autocast on GPU for ``auto``/``bf16``, full precision otherwise."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision must be auto, fp32 or bf16, got '{precision}'")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_optimizer(
    model: TaskModel, lr: float, weight_decay: float, head_lr_mult: float
) -> torch.optim.AdamW:
    """AdamW; no decay for biases, norms and the temperature; the new task head at ``lr * head_lr_mult``."""
    heads = model.head_parameter_names()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or name.endswith(".temp")
        groups.setdefault((name in heads, no_decay), []).append(param)
    param_groups = [
        {
            "params": params,
            "lr": lr * (head_lr_mult if is_head else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        for (is_head, no_decay), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_linear(warmup_ratio: float) -> Callable[[float], float]:
    """Learning-rate factor of the training progress p in [0, 1]: linear warmup over the first ``warmup_ratio``,
    then linear decay to 0 at p = 1."""

    def factor(progress: float) -> float:
        if progress < warmup_ratio:
            return max(progress / warmup_ratio, 1e-3)
        return max(0.0, (1.0 - progress) / max(1e-8, 1.0 - warmup_ratio))

    return factor


@dataclass
class Selection:
    """Outcome of a fine-tuning run: the best dev score and where it was reached."""

    best_score: float = -math.inf
    best_step: int = 0
    steps: int = 0
    history: list[dict] = field(default_factory=list)  # {"step", "epoch", "dev", "loss"}


def finetune(
    model: TaskModel,
    loader: DataLoader,
    dev_score: Callable[[TaskModel], float],
    *,
    lr: float,
    epochs: int,
    max_steps: int = 0,
    weight_decay: float = 0.01,
    head_lr_mult: float = 1.0,
    warmup_ratio: float = 0.1,
    grad_clip: float = 1.0,
    eval_every: int = 0,
    device: torch.device,
    autocast=contextlib.nullcontext,
    time_limit_s: float = 0.0,
) -> Selection:
    """Train ``model`` on ``loader``; evaluate ``dev_score`` every ``eval_every`` steps (0: each epoch) and at the
    end; leave the model holding the weights of its best dev evaluation."""
    if len(loader) == 0:
        raise ValueError("no training examples")
    total = max_steps if max_steps > 0 else epochs * len(loader)
    optimizer = build_optimizer(model, lr, weight_decay, head_lr_mult)
    selection, best_state = Selection(), None
    start, step, epoch, running = time.monotonic(), 0, 0, []

    def progress() -> float:
        """Fraction of the run done: by steps, or by wall time when a time limit ends the run sooner, so the
        schedule anneals to 0 whichever limit comes first."""
        by_time = (time.monotonic() - start) / time_limit_s if time_limit_s > 0 else 0.0
        return min(1.0, max(step / total, by_time))

    schedule = warmup_linear(warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: schedule(progress()))

    def evaluate() -> None:
        nonlocal best_state
        model.eval()
        score = float(dev_score(model))
        model.train()
        loss = sum(running) / len(running) if running else float("nan")
        selection.history.append({"step": step, "epoch": epoch, "dev": score, "loss": loss})
        running.clear()
        log.info("step %d epoch %d: train loss %.4f, dev %.2f", step, epoch, loss, score)
        if score > selection.best_score:
            selection.best_score, selection.best_step = score, step
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    model.to(device).train()
    done = False
    while not done:
        epoch += 1
        for batch in loader:
            with autocast():
                loss = model.loss(to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            step += 1
            scheduler.step()
            running.append(loss.item())
            out_of_time = time_limit_s > 0 and time.monotonic() - start > time_limit_s
            done = step >= total or out_of_time
            if done or (eval_every > 0 and step % eval_every == 0):
                evaluate()
            if done:
                break
        else:
            if eval_every <= 0:
                evaluate()
    selection.steps = step
    model.load_state_dict(best_state)
    return selection


@torch.no_grad()
def predict(model: TaskModel, batches: Iterable[dict], device: torch.device, autocast=contextlib.nullcontext):
    """(predicted class ids, gold labels) over ``batches``."""
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    for batch in batches:
        with autocast():
            logits = model(to_device(batch, device))
        predictions.append(logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(predictions), torch.cat(labels)
