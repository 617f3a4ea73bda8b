"""The Hugging Face Hub: ``push_to_hub`` / ``cclm export --push-to-hub`` upload every file of a model folder and a
model card with Hub metadata (HfApi's create_repo/create_commit replaced by recorders: what they receive is
checked), and ``cclm.load("hf-hub:ORG/NAME")`` loads what was pushed from a local Hub cache with
``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, constants

import cclm
from cclm.errors import UserError
from cclm.inference.hub import HubError, hub_folder, push_to_hub
from cclm.train.export import main as export_main
from tests.faults.test_export_faults import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["a red circle above a blue square", "青い四角の上に赤い丸"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def hub(monkeypatch):
    """Records what HfApi.create_repo / create_commit receive: {repo: {path: bytes}} and the calls."""
    state = SimpleNamespace(repos={}, created=[], commits=[])

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kwargs):
        state.created.append({"repo": repo_id, "private": private, "exist_ok": exist_ok, "type": repo_type})

    def create_commit(self, repo_id, operations, commit_message=None, revision=None, **kwargs):
        files = {}
        for op in operations:
            with op.as_file() as handle:
                files[op.path_in_repo] = handle.read()
        state.repos[repo_id] = files
        state.commits.append({"repo": repo_id, "message": commit_message, "revision": revision})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return state


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, read offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """The Hub cache layout the Hub client writes: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_push_uploads_the_folder_with_a_hub_model_card_and_hf_hub_loads_it_offline(
    tiny_model_dir, hub, offline_cache
):
    url = push_to_hub(tiny_model_dir, "cclm-org/tiny", private=True)
    assert url == f"https://huggingface.co/cclm-org/tiny/commit/{COMMIT}"
    assert hub.created == [{"repo": "cclm-org/tiny", "private": True, "exist_ok": True, "type": "model"}]
    files = hub.repos["cclm-org/tiny"]
    local = {p.name for p in tiny_model_dir.iterdir() if p.is_file()}
    assert (
        set(files) == local and {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= local
    )
    for name in local - {"README.md"}:
        assert files[name] == (tiny_model_dir / name).read_bytes(), name
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: cclm" in card and "- vision-language" in card
    assert 'cclm.load("hf-hub:cclm-org/tiny")' in card
    assert (
        card.split("---\n", 2)[2].replace('\nLoad it with `cclm.load("hf-hub:cclm-org/tiny")`.\n', "", 1)
        == (tiny_model_dir / "README.md").read_text()
    )  # the save_pretrained card, unchanged but for the Hub line
    assert "## Architecture" in card and not (tiny_model_dir / "README.md").read_text().startswith("---")

    put_in_hub_cache(offline_cache, "cclm-org/tiny", files)
    from_hub = cclm.load("hf-hub:cclm-org/tiny", device="cpu")
    original = cclm.load(tiny_model_dir, device="cpu")
    torch.testing.assert_close(from_hub.encode_texts(TEXTS), original.encode_texts(TEXTS), rtol=0, atol=0)
    assert hub_folder(f"hf-hub:cclm-org/tiny@{COMMIT}") == offline_cache / (
        f"models--cclm-org--tiny/snapshots/{COMMIT}"
    )


def test_a_checkpoint_out_of_its_run_folder_exports_the_tokenizer_its_config_names(
    tmp_path, tiny_model_cfg, tiny_tokenizer
):
    from cclm.train.export import export

    named = tmp_path / "tokenizer-the-run-used"
    tiny_tokenizer.save_pretrained(str(named))
    tiny_model_cfg.text.tokenizer = str(
        named
    )  # the run config names it; no tokenizer/ beside the checkpoints
    ckpt = make_checkpoint(tmp_path / "copied", tiny_model_cfg)
    out = export(ckpt, tmp_path / "exported")
    assert (out / "tokenizer.json").read_bytes() == (named / "tokenizer.json").read_bytes()
    shutil.rmtree(named)  # the folder is whole without the path its config names
    assert cclm.load(out, device="cpu").encode_texts(TEXTS).shape[0] == 2
    with pytest.raises(UserError, match="no tokenizer folder .* does not load"):
        export(ckpt, tmp_path / "exported-again")
    assert not (tmp_path / "exported-again").exists()


def test_export_push_to_hub_uploads_the_exported_folder(
    tmp_path, tiny_model_cfg, tiny_tokenizer, hub, capsys
):
    run = tmp_path / "run"
    make_checkpoint(run, tiny_model_cfg, tokenizer=tiny_tokenizer, step=7, train={"max_steps": 9})
    out = tmp_path / "exported"
    assert export_main(["export", str(run), str(out), "--push-to-hub", "no-org"]) == 2
    assert (
        "expected hf-hub:ORG/NAME" in capsys.readouterr().err and not out.exists()
    )  # refused before exporting
    assert export_main(["export", str(run), str(out), "--push-to-hub", "cclm-org/run", "--private"]) == 0
    assert "pushed to https://huggingface.co/cclm-org/run" in capsys.readouterr().out
    assert hub.created[0]["private"] is True
    files = hub.repos["cclm-org/run"]
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "tokenizer.json" in files and "- steps: 7 (of max_steps 9)" in files["README.md"].decode()


def test_what_cannot_be_loaded_or_pushed_fails_naming_it(tmp_path, hub, offline_cache, tiny_model_dir):
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set.*hf download cclm-org/missing"):
        cclm.load("hf-hub:cclm-org/missing")
    put_in_hub_cache(offline_cache, "someone/bert", {"config.json": b'{"model_type": "bert"}'})
    with pytest.raises(HubError, match="not a cclm model folder"):
        cclm.load("hf-hub:someone/bert")
    with pytest.raises(HubError, match="expected hf-hub:ORG/NAME"):
        cclm.load("hf-hub:no-org")
    with pytest.raises(HubError, match="not a cclm model folder"):
        push_to_hub(tmp_path, "cclm-org/empty")
    assert hub.commits == []


def test_a_folder_whose_card_was_deleted_gets_the_card_save_pretrained_writes(tiny_model_dir, hub):
    (tiny_model_dir / "README.md").unlink()
    push_to_hub(tiny_model_dir, "cclm-org/no-card")
    card = hub.repos["cclm-org/no-card"]["README.md"].decode()
    assert "library_name: cclm" in card and "## Architecture" in card and "| text layers |" in card
    assert not (tiny_model_dir / "README.md").exists()  # the folder on disk is left as it was


def test_finetuning_and_pretraining_take_a_hub_name_where_they_took_a_folder(
    tmp_path, offline_cache, tiny_model_dir, monkeypatch
):
    """`pretrained=` of `cclm finetune` and `init_from=` of `cclm pretrain` name a model the way `cclm.load` does:
    hf-hub:ORG/NAME resolves to its cached snapshot (folders pass unchanged); a name that is neither is one error
    naming the key."""
    from cclm.cli_args import resolve_model_setting
    from cclm.errors import UserError
    from cclm.tasks import cli as finetune_cli

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    snapshot = put_in_hub_cache(offline_cache, "cclm-org/tiny", files)
    assert resolve_model_setting("hf-hub:cclm-org/tiny", "pretrained") == str(snapshot)
    assert resolve_model_setting(str(tiny_model_dir), "init_from") == str(tiny_model_dir)
    with pytest.raises(
        UserError, match=r"^init_from=no-such-model: 'no-such-model' is neither a model folder"
    ):
        resolve_model_setting("no-such-model", "init_from")

    pytest.importorskip("easy_vqa")
    from cclm.tasks import protocols

    seen, real_run_zero_shot = [], protocols.run_zero_shot

    def recording(cfg):
        seen.append(cfg.pretrained)
        return real_run_zero_shot(cfg)

    monkeypatch.setattr(protocols, "run_zero_shot", recording)
    config = REPO_CONFIGS / "finetune" / "easy_vqa.yaml"
    overrides = ["pretrained=hf-hub:cclm-org/tiny", f"output_dir={tmp_path / 'run'}", "data.max_examples=8"]
    overrides += ["train.max_steps=1", "train.batch_size=4", "train.device=cpu"]
    assert finetune_cli.main(["finetune", str(config), *overrides]) == 0
    assert seen == [str(snapshot)]
    assert (tmp_path / "run" / "results" / "easy_vqa" / "zero_shot.json").exists()


def test_pretraining_resolves_init_from_before_it_starts(
    tmp_path, offline_cache, tiny_model_dir, monkeypatch
):
    from cclm.train import cli as pretrain_cli
    from cclm.train import pretrain as pretrain_module

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    snapshot = put_in_hub_cache(offline_cache, "cclm-org/tiny", files)
    seen = []
    monkeypatch.setattr(pretrain_module, "pretrain", lambda cfg: seen.append(cfg.init_from) or {})
    argv = ["pretrain", str(REPO_CONFIGS / "pretrain" / "demo.yaml"), "init_from=hf-hub:cclm-org/tiny"]
    argv += [f"model.text.tokenizer={tiny_model_dir}", f"output_dir={tmp_path / 'run'}"]
    argv += [
        f"data.{stream}.shards={tmp_path}/shard-000000.tar" for stream in ("image_caption", "parallel_text")
    ]
    assert pretrain_cli.main(argv) == 0
    assert seen == [str(snapshot)]
