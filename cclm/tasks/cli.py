"""``cclm finetune CONFIG [key=value ...]`` and ``cclm evaluate CONFIG checkpoint=DIR [key=value ...]`` for the
IGLUE tasks and easy-VQA (configs in ``configs/finetune/``). Results: ``<output_dir>/results/<task>/``."""

from __future__ import annotations

import logging
import sys

from cclm.cli_args import resolve_model_setting
from cclm.config import ConfigError, FinetuneConfig, ModelConfig, check_finetune_values, load_config, require
from cclm.runtime.stop_signal import holds_stop_signal

USAGE_FINETUNE = (
    "usage: cclm finetune configs/finetune/<task>.yaml [protocol=zero_shot|few_shot] [key=value ...]\n"
    "       cclm finetune configs/finetune/<task>.yaml --check-images [key=value ...]   (list missing images)"
)
USAGE_EVALUATE = (
    "usage: cclm evaluate configs/finetune/<task>.yaml checkpoint=DIR [protocol=zero_shot|translate_test]\n"
    "       cclm evaluate configs/finetune/<task>.yaml --check-images [key=value ...]   (list missing images)"
)
log = logging.getLogger("cclm.finetune")
NO_TRANSLATE_TEST_FINETUNING = (
    "translate-test needs no fine-tuning: `cclm evaluate CONFIG checkpoint=DIR protocol=translate_test`"
    " (zero-shot fine-tuning also writes it when data.translate_test is set)"
)


def _load(args: list[str], usage: str, training: bool = True):
    if not args or args[0] in ("-h", "--help") or "=" in args[0]:
        print(usage, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return None
    cfg = load_config(FinetuneConfig, args[0], args[1:])
    require(cfg, "task")
    check_finetune_values(cfg, training)
    if training:
        _warn_long_warmup(cfg)
    return cfg


def _warn_long_warmup(cfg) -> None:
    """A warm-up ratio of 1 or more spans the whole run: the learning rate rises throughout and never decays."""
    ratios = {"train.warmup_ratio": cfg.train.warmup_ratio}
    if cfg.domain_pretrain.steps > 0:
        ratios["domain_pretrain.warmup_ratio"] = cfg.domain_pretrain.warmup_ratio
    for key, ratio in ratios.items():
        if ratio >= 1:
            log.warning(
                "%s=%s: the warm-up is as long as the run or longer: the learning rate rises for the whole run "
                "and never decays",
                key,
                ratio,
            )


def _report(tables: dict) -> None:
    for protocol, table in tables.items():
        average = table["average_non_english"]
        summary = ", ".join(f"{k} {v:.2f}" for k, v in average.items()) if average else "no non-English rows"
        print(
            f"{table['task']} {protocol}: {len(table['rows'])} language(s); average over non-English: {summary}"
        )


def _run(argv: list[str], command: str, usage: str) -> int:
    from cclm.tasks import few_shot, protocols

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = argv[1:] if argv and argv[0] == command else argv
    if "--check-images" in args:  # list every missing image of the files this run reads, then stop
        from cclm.tasks.iglue_cli import check_config_images

        return check_config_images([a for a in args if a != "--check-images"], command)
    cfg = _load(args, usage, training=command == "finetune")
    if cfg is None:
        return 0 if args and args[0] in ("-h", "--help") else 2
    if command == "finetune":
        if cfg.pretrained and cfg.checkpoint:  # one of them would be silently ignored
            raise ConfigError(
                "pretrained and checkpoint are both set: zero-shot fine-tuning starts from 'pretrained' (a cclm "
                "model), few-shot from 'checkpoint' (the English fine-tuned task model); set the one your protocol "
                "uses (`cclm evaluate CONFIG checkpoint=DIR` evaluates a fine-tuned model)"
            )
        _check_random_init_model(cfg)
        if cfg.pretrained:
            cfg.pretrained = resolve_model_setting(cfg.pretrained, "pretrained")
    if command == "evaluate":
        tables = protocols.evaluate_checkpoint(cfg)
    elif cfg.protocol == "few_shot":
        tables = few_shot.run_few_shot(cfg)
    elif cfg.protocol == "zero_shot":
        tables = protocols.run_zero_shot(cfg)
    else:
        raise ConfigError(NO_TRANSLATE_TEST_FINETUNING)
    _report(tables)
    return 0


def _check_random_init_model(cfg) -> None:
    """The model yaml and ``model_overrides`` of a random init, checked before any annotation file is read."""
    if cfg.pretrained or not cfg.model:
        return
    from cclm.model.text import check_text_config
    from cclm.model.vision import check_vision_config
    from cclm.tasks.protocols import _model_yaml

    model_cfg = load_config(ModelConfig, _model_yaml(cfg.model), list(cfg.model_overrides))
    try:
        check_vision_config(model_cfg.vision, "vision")
        check_text_config(model_cfg.text, "text")
    except ConfigError as err:
        raise ConfigError(f"model {cfg.model} (with model_overrides): {err}") from None


@holds_stop_signal
def main(argv: list[str]) -> int:
    """``cclm finetune``: argv[0] is the command name."""
    return _run(argv, "finetune", USAGE_FINETUNE)


def evaluate_main(argv: list[str]) -> int:
    """``cclm evaluate`` of a fine-tuning config (:func:`cclm.cli.evaluate` routes it here); argv[0] may be
    'evaluate'."""
    return _run(argv, "evaluate", USAGE_EVALUATE)
