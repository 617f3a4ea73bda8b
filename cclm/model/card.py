"""The model card: a README.md that ``CrossViewModel.save_pretrained`` writes next to the weights.

It says what the model is (architecture and sizes, read from the model), how it was made (from ``extra``:
``training`` = {step, checkpoint, run} from ``cclm export``; ``task`` from fine-tuning; ``converted_from`` from
``cclm convert-reference``) and how well it does (``extra["eval_results"]`` or an ``eval_results.json`` in the
folder: {benchmark: {metric: value}} or {benchmark: {language: {metric: value}}}). Call :func:`write_model_card`
again after an evaluation to refresh it. A README.md that a person wrote (one without our marker line) is never
overwritten. What has an unexpected shape (a damaged ``eval_results.json``, a section that is not a mapping) is
left out with a warning; the rest is rendered.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("cclm.inference")
MARKER = "<!-- cclm model card: written by save_pretrained; delete this line to keep your own edits -->"
EVAL_RESULTS = "eval_results.json"


def _vision_line(cfg) -> str:
    tower = dict(cfg.vision.tower)
    if tower.get("timm_model_name"):
        name = f"timm `{tower['timm_model_name']}` (open_clip timm tower)"
    elif cfg.vision.name and not tower.get("width"):
        name = f"open_clip `{cfg.vision.name}`"
    else:
        name = f"open_clip ViT (width {tower.get('width')}, {tower.get('layers')} layers, patch {tower.get('patch_size')})"
    pretrained = f", initialised from `{cfg.vision.pretrained}`" if cfg.vision.pretrained else ""
    return f"{name}, {cfg.vision.image_size} px images{pretrained}"


def describe_normalizer(text_cfg) -> str:
    """The text normaliser of a model's ``text`` config in a few words: ``none``, ``pre_caption (max_words 40)``
    or ``pre_caption (all words)``."""
    name = str(getattr(text_cfg, "normalize", "none"))
    if name == "none":
        return name
    words = int(getattr(text_cfg, "max_words", 0) or 0)
    return f"{name} ({f'max_words {words}' if words > 0 else 'all words'})"


def _normalizer_line(text_cfg) -> str:
    name = str(getattr(text_cfg, "normalize", "none"))
    if name == "none":
        return "`none`: texts are tokenised as given (case and punctuation kept)"
    if name == "pre_caption":
        words = int(getattr(text_cfg, "max_words", 0) or 0)
        cut = f", first {words} words kept" if words > 0 else ""
        return (
            "`pre_caption` (the CCLM reference's): lower-cased, punctuation to spaces, whitespace collapsed"
            f"{cut}; `cclm.load`, evaluation, search and fine-tuning apply it before tokenising"
        )
    return f"`{name}`"


def architecture_section(model) -> list[str]:
    cfg, enc = model.cfg, model.encoder_config
    n_params = sum(p.numel() for p in model.parameters())
    source = f" from `{cfg.text.name_or_path}`" if cfg.text.name_or_path else ""
    return [
        "## Architecture",
        "",
        "CCLM cross-view model (Zeng et al., 2022): one fusion stack serves image-caption pairs and parallel "
        "sentences alike; its cross-attention reads image tokens or the other language's text tokens.",
        "",
        "| part | |",
        "| --- | --- |",
        f"| vision tower | {_vision_line(cfg)}; {model.vision.width} wide |",
        f"| text layers | {len(cfg.text.text_layers)} XLM-R-style layers (encoder layers {list(cfg.text.text_layers)})"
        f"{source}; hidden {enc.hidden_size}, {enc.num_attention_heads} heads, vocabulary {enc.vocab_size} |",
        f"| fusion layers | {len(cfg.text.fusion_layers)} layers with cross-attention (encoder layers "
        f"{list(cfg.text.fusion_layers)}) |",
        f"| contrastive | `vision_proj` / `text_proj` to {cfg.embed_dim} dims, learnable temperature |",
        "| heads | one matching head (ITM and TTM), MLM head tied to the word embeddings |",
        f"| parameters | {n_params / 1e6:.1f} M |",
        f"| max text length | {cfg.text.max_length} tokens |",
        f"| text normaliser | {_normalizer_line(cfg.text)} |",
        "",
    ]


def usage_section() -> list[str]:
    return [
        "## Use",
        "",
        "```python",
        "import cclm",
        'model = cclm.load("path/to/this/folder")',
        'texts = model.encode_texts(["a red circle", "ein roter Kreis"])',
        'images = model.encode_images(["photo.jpg"])',
        'print(model.match(["photo.jpg"], ["a red circle"]))',
        "```",
        "",
        'or `cclm index IMAGE_DIR --model path/to/this/folder --out INDEX` and `cclm search INDEX "query"`.',
        "",
    ]


def _streams(data: dict[str, Any]) -> list[str]:
    lines = []
    for name in ("image_caption", "parallel_text"):
        stream = _mapping(data.get(name), f"the run's {name} stream")
        if stream:
            langs = ", ".join(stream.get("languages") or []) or "all"
            lines.append(
                f"- {name.replace('_', '-')}: `{stream.get('shards')}` (batch {stream.get('batch_size')}, "
                f"weight {stream.get('weight')}, languages: {langs})"
            )
    return lines


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """``value`` when it is a mapping; an empty one (with a warning naming ``what``) when it is something else."""
    if isinstance(value, dict):
        return value
    if value:
        log.warning("model card: %s is a %s, not a mapping; left out of the card", what, type(value).__name__)
    return {}


def _items(value: Any) -> list[str]:
    """A mapping as ``key (value)`` items, a list as its items."""
    if isinstance(value, dict):
        return [f"{k} ({v})" for k, v in sorted(value.items())]
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


def provenance_section(extra: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    training = _mapping(extra.get("training"), 'extra["training"]')
    if training:
        run = _mapping(training.get("run"), 'extra["training"]["run"]')
        train = _mapping(run.get("train"), "the run's train config")
        opt = _mapping(train.get("optimizer"), "the run's optimizer config")
        lines += ["## Training", ""]
        lines.append(
            f"- steps: {training.get('step', '?')} (of max_steps {train.get('max_steps', '?')}), "
            f"view schedule `{train.get('view_schedule', '?')}`"
        )
        deepspeed = _mapping(run.get("deepspeed"), "the run's deepspeed config")
        lines.append(
            f"- optimizer: {opt.get('name', '?')}, lr {opt.get('lr', '?')}, weight decay "
            f"{opt.get('weight_decay', '?')}; precision {deepspeed.get('precision', '?')}"
        )
        objectives = _mapping(
            _mapping(run.get("model"), "the run's model config").get("objectives"), "its objectives"
        )
        if objectives:
            weights = ", ".join(
                f"{k.split('_')[0]} {v}" for k, v in objectives.items() if k.endswith("_weight")
            )
            lines.append(f"- objective weights: {weights}")
        streams = _streams(_mapping(run.get("data"), "the run's data config"))
        if streams:
            lines += ["- data:", *[f"  {s}" for s in streams]]
        if training.get("checkpoint"):
            lines.append(f"- exported from `{training['checkpoint']}`")
        lines.append("")
    task = _task(extra)
    if task:
        lines += ["## Fine-tuning", ""]
        for key, value in task.items():
            if key == "labels" and isinstance(value, list):
                value = f"{len(value)} labels"
            if isinstance(value, (str, int, float, bool)) or value is None or key == "labels":
                lines.append(f"- {key}: {value}")
        lines.append("")
    converted = _mapping(extra.get("converted_from"), 'extra["converted_from"]')
    if converted:
        lines += [
            "## Origin",
            "",
            f"Converted by `cclm convert-reference` from `{converted.get('checkpoint')}` "
            f"({converted.get('layout', 'reference layout')}); position ids: {converted.get('position_ids')}.",
        ]
        dropped = converted.get("dropped")
        if dropped:
            lines.append("Dropped source tensors: " + ", ".join(_items(dropped)) + ".")
        if converted.get("left_at_init"):
            lines.append(
                f"Not in the source, left at initialisation: {', '.join(_items(converted['left_at_init']))}."
            )
        lines.append("")
    return lines


def _task(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra["task"]``: the fine-tuning record; a bare string is the task's name."""
    task = extra.get("task")
    if isinstance(task, str):
        return {"task": task}
    return _mapping(task, 'extra["task"]')


def _flatten(results: dict[str, Any], prefix: str = "") -> dict[str, dict[str, float]]:
    """{row name: {metric: value}} from nested result dicts."""
    rows: dict[str, dict[str, float]] = {}
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        rows[prefix or "result"] = scalars
    for key, value in results.items():
        if isinstance(value, dict):
            rows.update(_flatten(value, f"{prefix} / {key}" if prefix else str(key)))
    return rows


def evaluation_section(results: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    rows = _flatten(results or {})
    if not rows:
        return lines + ["No evaluation results were recorded with this model (see `cclm evaluate`).", ""]
    metrics = list(dict.fromkeys(m for row in rows.values() for m in row))
    lines += ["| | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    for name, row in rows.items():
        cells = [f"{row[m]:.2f}" if isinstance(row.get(m), float) else str(row.get(m, "")) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_model_card(
    model, extra: dict[str, Any] | None = None, results: dict[str, Any] | None = None
) -> str:
    extra = _mapping(extra, "extra")
    extra = {**extra, "task": _task(extra)}  # checked (and warned about) once
    title = "cclm cross-view model"
    if extra["task"].get("task"):
        title += f", fine-tuned for {extra['task']['task']}"
    lines = [MARKER, f"# {title}", ""]
    lines += architecture_section(model)
    lines += usage_section()
    lines += provenance_section(extra)
    lines += evaluation_section(
        _mapping(results, "the evaluation results")
        or _mapping(extra.get("eval_results"), 'extra["eval_results"]')
    )
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(directory: str | Path, model, extra: dict[str, Any] | None = None) -> Path | None:
    """Write ``directory/README.md``; returns its path, or None when a hand-written README.md is kept."""
    directory = Path(directory)
    path = directory / "README.md"
    if path.exists() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        log.warning("%s was written by hand; the model card is not written over it", path)
        return None
    path.write_text(render_model_card(model, extra, read_eval_results(directory)), encoding="utf-8")
    return path


def read_eval_results(directory: Path) -> dict[str, Any] | None:
    """``directory/eval_results.json`` when there is one; a damaged one (not JSON, not an object) is named in a
    warning and left out, so that a model is saved whatever state the file is in."""
    path = directory / EVAL_RESULTS
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("%s cannot be read (%s); the model card leaves the evaluation results out", path, err)
        return None
    if not isinstance(results, dict):
        log.warning(
            "%s holds a JSON %s, not {benchmark: {metric: value}}; the model card leaves the evaluation results out",
            path,
            type(results).__name__,
        )
        return None
    return results
