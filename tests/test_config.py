"""Typed configs: composition, overrides, and errors that name the key."""

import pytest

from cclm.config import ConfigError, ModelConfig, PretrainConfig, load_config

from .conftest import REPO


def test_unknown_key_in_override_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"train\.max_stpes.*did you mean 'train\.max_steps'"):
        load_config(PretrainConfig, overrides=["train.max_stpes=5"])


@pytest.mark.parametrize(
    "override, meant",
    [
        # names from other tools and from cclm's fine-tuning configs, put where a pretraining config has them
        ("train.lr=1e-4", "'train.optimizer.lr'"),
        ("train.optimizer.learning_rate=1e-4", "'train.optimizer.lr'"),
        ("train.warmup_steps=10", "'train.scheduler.warmup_steps'"),
        ("train.precision=bf16", "one of: deepspeed.precision, eval.precision"),
        ("train.batch_size=8", "data.image_caption.batch_size, data.parallel_text.batch_size"),
        ("data.regionz.shards=x", "'data.regions'"),  # an optional section (None by default) counts
        ("trian.max_steps=3", "'train'"),
    ],
)
def test_an_unknown_key_suggests_the_setting_meant_never_its_own_section(override, meant):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, overrides=[override])
    assert meant in str(err.value)
    assert "did you mean 'train'?" not in str(err.value) or override.startswith("trian")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.text.text_layers=[0,1",
            "override 'model.text.text_layers=[0,1' is not valid YAML: did not find",
        ),
        ('output_dir="abc', "is not valid YAML"),
        ("output_dir=*x", "is not valid YAML"),
        ("=5", "override '=5' must look like key=value, with a dotted key"),
        ("train..max_steps=3", "override 'train..max_steps=3' must look like key=value"),
        ("train=3", "config key 'train' is a section, not a value: set its keys, e.g. train.max_steps=..."),
        ("train.optimizer=adam", "config key 'train.optimizer' is a section"),
    ],
)
def test_an_override_that_is_no_setting_is_one_line_naming_it(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_list_key_takes_the_comma_form_and_a_single_value():
    from cclm.config import CONFIG_ROOT, FinetuneConfig

    cfg = load_config(PretrainConfig, overrides=["data.image_caption.languages=en,de"] + PRETRAIN_STREAMS)
    assert list(cfg.data.image_caption.languages) == ["en", "de"]
    cfg = load_config(PretrainConfig, overrides=["data.image_caption.languages=[en]"] + PRETRAIN_STREAMS)
    assert list(cfg.data.image_caption.languages) == ["en"]
    xvnli = CONFIG_ROOT / "finetune" / "xvnli.yaml"
    cfg = load_config(FinetuneConfig, xvnli, ["languages=ar,fr", "data.train=/x/snli_ve.jsonl"])
    assert list(cfg.languages) == ["ar", "fr"] and list(cfg.data.train) == ["/x/snli_ve.jsonl"]


def test_an_interpolation_that_does_not_resolve_in_a_yaml_file_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: ${world}/out\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, path)
    assert "'output_dir'" in str(err.value) and "world" in str(err.value) and "\n" not in str(err.value)


PRETRAIN_STREAMS = ["data.image_caption={shards: a.tar}"]


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


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match=r"'train\.seed' is given 2 times"):
        load_config(PretrainConfig, overrides=["train.seed=1", "train.seed=2"])
    # two paths: a key typed twice, or an expanded brace pattern; the error says both
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, overrides=["output_dir=out/a", "output_dir=out/b"])
    assert "'output_dir' is given 2 times (output_dir=out/a, output_dir=out/b): give it once" in str(
        err.value
    )
    assert "quote it: 'output_dir=out/{a,b}'" in str(err.value)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["k=/d/shard-000008.tar", "k=/d/shard-000009.tar", "k=/d/shard-000010.tar"],
            "/d/shard-{000008..000010}.tar",
        ),
        (["k=/d/shard-000000.tar", "/d/shard-000001.tar"], "/d/shard-{000000..000001}.tar"),
        (["k=/d/train.tar", "k=/d/val.tar"], "/d/{train,val}.tar"),
    ],
)
def test_a_brace_pattern_the_shell_expanded_is_named_with_its_quoted_form(overrides, pattern):
    from cclm.config import parse_overrides

    with pytest.raises(ConfigError, match="quote it") as err:
        parse_overrides(overrides)
    assert f"'k={pattern}'" in str(err.value)


def test_a_loose_word_that_is_no_path_is_not_taken_for_a_pattern():
    from cclm.config import parse_overrides

    with pytest.raises(ConfigError, match="override '0.002' must look like key=value"):
        parse_overrides(["train.optimizer.lr=0.001", "0.002"])


def test_null_drops_an_entry_of_a_mapping_and_names_a_missing_one():
    from cclm.config import CONFIG_ROOT, FinetuneConfig

    xvnli = CONFIG_ROOT / "finetune" / "xvnli.yaml"
    cfg = load_config(FinetuneConfig, xvnli, ["data.test.ar=null", "data.translate_test.ar="])
    assert "ar" not in cfg.data.test and "ar" not in cfg.data.translate_test and "es" in cfg.data.test
    with pytest.raises(ConfigError, match=r"'data\.test\.xx'.*no entry 'xx'"):
        load_config(FinetuneConfig, xvnli, ["data.test.xx=null"])
    # A field (not a mapping entry) keeps OmegaConf's meaning of null: refused where it is not optional.
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(PretrainConfig, overrides=["train.max_steps=null"])
    # A mapping whose values may be null keeps the null.
    cfg = load_config(
        ModelConfig, CONFIG_ROOT / "model" / "tiny.yaml", ["text.encoder.classifier_dropout=null"]
    )
    assert "classifier_dropout" in cfg.text.encoder and cfg.text.encoder.classifier_dropout is None


def test_type_errors_are_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, overrides=["train.max_steps=many"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("written", ["no", "0100", "12:30", "2024_11", "1e3", "off", "0x1F"])
def test_a_string_setting_keeps_the_text_yaml_1_1_would_read_as_a_bool_or_a_number(written, tmp_path):
    """``no`` is Norwegian, ``0100`` a folder: YAML 1.1 reads them as false and 64, and a string setting kept
    ``"False"`` and ``"64"``. Settings of other types still take YAML's reading."""
    from cclm.config import RetrievalRunConfig

    cfg = load_config(
        PretrainConfig,
        overrides=[f"output_dir={written}", f"data.image_caption.languages=en,{written}", "data.hflip=off"],
    )
    assert cfg.output_dir == written and cfg.data.image_caption.languages == ["en", written]
    assert cfg.data.hflip is False
    path = tmp_path / "run.yaml"
    path.write_text(
        f"output_dir: {written}\ndata:\n  parallel_text: {{shards: x.tar, languages: [{written}, de]}}\n"
        "train: {optimizer: {lr: 1e-4}}\n"
    )
    cfg = load_config(PretrainConfig, path)
    assert cfg.output_dir == written and cfg.data.parallel_text.languages == [written, "de"]
    assert cfg.train.optimizer.lr == 1e-4
    # a mapping keyed by language: the key, and an entry given as one value
    path.write_text(f"checkpoint: x\ndata:\n  captions:\n    {written}: [{written}.txt]\n")
    cfg = load_config(RetrievalRunConfig, path, [f"data.captions.de={written}"])
    assert dict(cfg.data.captions) == {written: [f"{written}.txt"], "de": [written]}


def test_a_home_path_in_a_setting_is_expanded(tmp_path, monkeypatch):
    """bash leaves ``~`` in ``output_dir=~/runs`` as it is: a run made a folder named ``~`` in the working
    directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("data: {image_caption: {shards: ~/shards/a.tar}}\n")
    cfg = load_config(PretrainConfig, path, ["output_dir=~/runs/a", "deepspeed.config_file=~/ds.json"])
    assert cfg.output_dir == f"{tmp_path}/runs/a" and cfg.deepspeed.config_file == f"{tmp_path}/ds.json"
    assert cfg.data.image_caption.shards == f"{tmp_path}/shards/a.tar"
    assert load_config(PretrainConfig, overrides=["output_dir=a~/b"]).output_dir == "a~/b"


def test_an_empty_file_a_merge_key_and_an_interpolated_home_path(tmp_path, monkeypatch):
    from cclm.config import RetrievalRunConfig

    path = tmp_path / "run.yaml"
    path.write_text("# every setting at its default\n")
    assert load_config(PretrainConfig, path).output_dir == PretrainConfig().output_dir
    # a merge key: the written mapping is not the one read, so nothing is paired (YAML's reading, refused here)
    path.write_text("checkpoint: x\ndata:\n  captions:\n    <<: {no: [no.jsonl]}\n    en: [en.jsonl]\n")
    with pytest.raises(ConfigError, match="data.captions"):
        load_config(RetrievalRunConfig, path)
    monkeypatch.setenv("HOME", str(tmp_path))
    path.write_text("output_dir: ~/runs/${model.text.max_length}\n")
    cfg = load_config(PretrainConfig, path)
    assert cfg.output_dir == f"{tmp_path}/runs/{cfg.model.text.max_length}"


def test_a_value_a_file_leaves_to_fill_in_is_named_even_over_a_default(tmp_path):
    """demo.yaml's ``model.text.tokenizer: ???`` over the model config's null: OmegaConf's merge kept the null,
    and the start-up check named the shard paths only (the run failed later, on another message)."""
    from cclm.config import require_complete

    with pytest.raises(ConfigError, match="model.text.tokenizer"):
        require_complete(load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo.yaml"))
    path = tmp_path / "run.yaml"
    path.write_text("defaults: {model: tiny}\nmodel:\n  text:\n    tokenizer: ???\n")
    cfg = load_config(PretrainConfig, path, ["model.text.tokenizer=/tok"])  # filled in: no longer missing
    assert cfg.model.text.tokenizer == "/tok"
