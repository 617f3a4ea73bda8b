"""A cclm model in CLIP_benchmark (LAION's ``clip-benchmark`` package): the ``(model, transform, tokenizer)``
triple its loaders return, so its zero-shot retrieval harness (XM3600 ``crossmodal3600``, ``xtd10``,
``multilingual_mscoco_captions``, ``flickr30k-200``, ...) scores a cclm model exactly as it scores NLLB-CLIP,
mSigLIP and the multilingual open_clip models.

    python -m cclm.inference.clip_benchmark eval --model_type cclm --model cclm --pretrained cclm-4m-base \\
        --dataset crossmodal3600 --language de ja sw --dataset_root data/xm3600 --recall_k 1 5 10 \\
        --output "results/{dataset}_{language}_{model}.json"

``--pretrained`` is anything :func:`cclm.load` takes (a model folder, a released checkpoint's name,
``hf-hub:ORG/NAME``); ``--model_cache_dir`` is the cache of released checkpoints. The module registers the model
type ``cclm`` in CLIP_benchmark's loader table (:func:`register`) and runs its command line, creating the folder
of ``--output`` first (its fixed part, before the first ``{``).

What the harness gets, and why its numbers equal ``cclm evaluate retrieval`` with ``eval.rerank=false``:
  transform   the project's one image loader (:func:`cclm.data.images.load_image`: the whole image resized to the
              model's input, uint8); the model normalises, as in evaluation
  tokenizer   the model's text normaliser (``pre_caption`` for the released checkpoints), then its tokenizer
              (truncated at ``max_length``); returns a ``BatchEncoding`` (``.to(device)`` works)
  model       ``encode_image`` / ``encode_text`` return the ITC projections (L2-normalised) under the model's
              evaluation precision (fp32 weights, bf16 autocast on a GPU that has it, fp32 on CPU), whatever
              autocast the harness opens around them (``--no_amp`` changes nothing)
CLIP_benchmark ranks by these cosine similarities only: it has no cross-encoder stage, so this is the ITC
(first-stage) score; cclm's own evaluation re-ranks with the ITM head by default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from cclm.config import EvalConfig, Precision
from cclm.data.normalize import normalizer_for
from cclm.inference.api import eval_transform, load_model_tokenizer, resolve_model_folder
from cclm.runtime.env import autocast

MODEL_TYPE = "cclm"


class ClipBenchmarkTokenizer:
    """Texts -> ``BatchEncoding`` (input_ids, attention_mask), read as the model reads them."""

    def __init__(self, tokenizer, text_cfg):
        self.tokenizer = tokenizer
        self.normalize = normalizer_for(text_cfg)
        self.max_length = int(text_cfg.max_length)

    def __call__(self, texts: str | Sequence[str]):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(
            [self.normalize(t) for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )


class ClipBenchmarkModel(torch.nn.Module):
    """``encode_image`` / ``encode_text`` over a :class:`~cclm.model.CrossViewModel`: its ITC features."""

    def __init__(self, model, pad_token_id: int, precision: str | Precision = EvalConfig.precision):
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id
        self.precision = Precision(precision)

    def _precision(self, device: torch.device):
        # the harness's own autocast is switched off: features are computed as cclm's evaluation computes them
        return torch.autocast(device.type, enabled=False), autocast(device, self.precision)

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        outer, inner = self._precision(images.device)
        with outer, inner:
            return self.model.encode_image(images)[1].float()

    @torch.inference_mode()
    def encode_text(self, tokens) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):  # plain ids, as open_clip's tokenizers give
            ids, mask = tokens, (tokens != self.pad_token_id).long()
        else:
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
        outer, inner = self._precision(ids.device)
        with outer, inner:
            return self.model.encode_text(ids, mask)[1].float()


def load_for_clip_benchmark(
    model_name: str = MODEL_TYPE,
    pretrained: str | os.PathLike = "",
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    precision: str | Precision = EvalConfig.precision,
):
    """CLIP_benchmark's loader signature -> ``(model, transform, tokenizer)``. ``pretrained``: what
    :func:`cclm.load` takes; ``cache_dir``: the cache of released checkpoints; ``model_name`` is only a label."""
    if not pretrained:
        raise ValueError(
            "--pretrained must name the cclm model: a folder, a pretrained name or hf-hub:ORG/NAME"
        )
    folder = resolve_model_folder(pretrained, cache_dir=cache_dir)
    model, tokenizer = load_model_tokenizer(folder)
    adapter = ClipBenchmarkModel(model.eval(), tokenizer.pad_token_id, precision).to(device).eval()
    return (
        adapter,
        eval_transform(int(model.cfg.vision.image_size)),
        ClipBenchmarkTokenizer(tokenizer, model.cfg.text),
    )


def register() -> None:
    """Make ``--model_type cclm`` known to CLIP_benchmark (its loader table and the CLI's choices)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_for_clip_benchmark
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


def output_folder(output: str | None) -> Path | None:
    """The folder ``--output`` writes into, as far as it is fixed: the directory part before the first ``{`` of
    the template (``results/{dataset}_{language}.json`` -> ``results``). CLIP_benchmark does not create it, so
    without it the first result could not be written and the remaining languages and datasets would not run."""
    if not output:
        return None
    fixed = os.path.dirname(output.split("{", 1)[0])
    return Path(fixed) if fixed else None


def main(argv: list[str] | None = None) -> int:
    """CLIP_benchmark's command line (``eval`` / ``build``) with the ``cclm`` model type registered."""
    register()
    from clip_benchmark import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["clip-benchmark"]:  # called as `cclm clip-benchmark ...`
        args = args[1:]
    saved = sys.argv
    sys.argv = ["clip_benchmark", *args]
    try:
        _, parsed = cli.get_parser_args()  # its own parser reads --output (any spelling argparse accepts)
        folder = output_folder(getattr(parsed, "output", None))
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        cli.main()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
