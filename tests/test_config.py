"""Typed configs: composition, overrides, and errors that name the key."""

import pytest

from cclm.config import ConfigError, ModelConfig, PretrainConfig, load_config


def test_unknown_key_in_override_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"train\.max_stpes.*did you mean 'train\.max_steps'"):
        load_config(PretrainConfig, overrides=["train.max_stpes=5"])


def test_unknown_key_in_yaml_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  vision:\n    imge_size: 64\n")
    with pytest.raises(ConfigError, match=r"model\.vision\.imge_size.*model\.vision\.image_size"):
        load_config(PretrainConfig, path)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(PretrainConfig, overrides=["train.max_steps=many"])
    path = tmp_path / "bad.yaml"
    path.write_text("embed_dim: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"embed_dim"):
        load_config(ModelConfig, path)


def test_defaults_compose_and_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("defaults:\n  model: tiny\ntrain:\n  max_steps: 7\n")
    cfg = load_config(PretrainConfig, path, ["train.seed=3", "model.embed_dim=32"])
    assert cfg.model.vision.image_size == 32  # from configs/model/tiny.yaml
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3
    assert cfg.model.embed_dim == 32


def test_missing_file_and_unknown_default(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
    path = tmp_path / "run.yaml"
    path.write_text("defaults:\n  model: nonexistent\n")
    with pytest.raises(ConfigError, match="nonexistent"):
        load_config(PretrainConfig, path)


@pytest.mark.parametrize("name", ["tiny", "base", "base_swin", "large"])
def test_shipped_model_configs_load(name):
    from cclm.config import CONFIG_ROOT

    cfg = load_config(ModelConfig, CONFIG_ROOT / "model" / f"{name}.yaml")
    assert len(cfg.text.text_layers) >= 2 and len(cfg.text.fusion_layers) >= 2


@pytest.mark.parametrize("name", ["cclm_3m", "cclm_4m", "demo"])
def test_shipped_pretrain_configs_compose_and_name_what_must_be_filled_in(name):
    from cclm.config import CONFIG_ROOT, require

    path = CONFIG_ROOT / "pretrain" / f"{name}.yaml"
    cfg = load_config(PretrainConfig, path)
    with pytest.raises(ConfigError, match=r"data\.image_caption\.shards"):
        require(cfg, "data.image_caption.shards")
    filled = load_config(
        PretrainConfig,
        path,
        [
            "data.image_caption.shards=/data/a/{000000..000009}.tar",
            "data.parallel_text.shards=/data/p/{000000..000009}.tar",
        ],
    )
    require(filled, "data.image_caption.shards", "data.parallel_text.shards")
    if name != "demo":  # the paper's settings
        assert filled.data.image_caption.batch_size == 128 and filled.train.optimizer.lr == 1e-4
        assert (
            list(filled.train.optimizer.betas) == [0.9, 0.98] and filled.train.scheduler.warmup_steps == 2500
        )
        assert (
            filled.model.text.name_or_path == "xlm-roberta-large"
            and len(filled.model.text.fusion_layers) == 6
        )


def test_unset_mandatory_values_are_all_named():
    from cclm.config import CONFIG_ROOT, require_complete

    cfg = load_config(PretrainConfig, CONFIG_ROOT / "pretrain" / "cclm_3m.yaml")
    with pytest.raises(ConfigError, match=r"data\.image_caption\.shards, data\.parallel_text\.shards"):
        require_complete(cfg)
