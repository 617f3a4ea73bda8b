"""Fine-tuning images under a tester's faults: an image file that exists but does not decode (truncated, garbage)
in the training, dev or test set stops the run before a model is built, in one line naming it, instead of failing
mid-training or after training; ``check-images`` lists it too, and checks exactly the examples a run would use
(``languages=``, ``data.max_examples``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cclm.cli import main as cclm_main
from cclm.errors import UserError
from cclm.tasks import get_task, images, protocols
from cclm.tasks.images import ImageRef, require_images

from ..test_tasks_finetune import REPO, iglue, pretrained_dir
from .test_iglue_runs import xvnli

__all__ = ["pretrained_dir"]
pytestmark = pytest.mark.usefixtures("one_thread")


def used_image(cfg, path: str) -> Path:
    task = get_task(cfg.task)
    refs = task.read(path, task.labels(cfg.data), cfg.data.max_examples).used_image_refs
    return sorted(refs)[0].resolve(cfg.data.image_roots)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("key", ["train", "dev", "test"])
def test_an_undecodable_image_stops_the_run_before_a_model_is_built(
    iglue_dir, tmp_path, pretrained_dir, monkeypatch, key
):
    """Before, only existence was checked: a corrupt training image crashed the run mid-way, a test image after
    training."""
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir)
    file = {"train": cfg.data.train[0], "dev": cfg.data.dev[0], "test": cfg.data.test["ar"]}[key]
    bad = used_image(cfg, file)
    truncate(bad)
    monkeypatch.setattr(protocols.TaskRunner, "start_model", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(UserError, match=r"^1 of \d+ image\(s\) do not decode: ") as caught:
        protocols.run_zero_shot(cfg)
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_each_image_is_decoded_once_while_unchanged(tmp_path, monkeypatch):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    Image.new("RGB", (64, 48), "red").save(good)
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    opened = []
    real_open = images.Image.open
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    many = [ImageRef(None, str(good))] * 50  # one image in many questions (xGQA)
    require_images(many, {})
    require_images(many, {})
    assert len(opened) == 1
    with pytest.raises(UserError, match=rf"1 of 2 image\(s\) do not decode: {bad} \("):
        require_images([*many, ImageRef(None, str(bad))], {})
    Image.new("RGB", (64, 48), "blue").save(bad)  # repaired: checked again
    require_images([*many, ImageRef(None, str(bad))], {})


def test_check_images_lists_undecodable_images(tmp_path, iglue_dir, capsys):
    file = iglue(iglue_dir, "XVNLI/annotations/ar/test.jsonl")
    refs = get_task("xvnli").read(file).image_refs
    for ref in refs:
        Image.new("RGB", (8, 8)).save(ref.resolve({"flickr30k": str(tmp_path)}), format="PNG")
    bad = sorted(refs)[0].resolve({"flickr30k": str(tmp_path)})
    bad.write_bytes(b"garbage")
    code = cclm_main(["iglue", "check-images", "--task", "xvnli", "--root", f"flickr30k={tmp_path}", file])
    out = capsys.readouterr()
    assert code == 1
    assert out.out.splitlines() == [f"{bad}\tdoes not decode: cannot identify image file"]
    assert f"{len(refs)} of {len(refs)} images found, 0 missing, 1 do not decode" in out.err


def test_check_images_checks_only_what_the_run_uses(iglue_dir, tmp_path, pretrained_dir, capsys):
    """Before, `--check-images languages=[ar] data.max_examples=6` checked every language and every example:
    exit 1 for images the run never opens."""
    cfg = xvnli(iglue_dir, tmp_path, pretrained_dir)  # images of the first 6 examples of en, ar and fr only
    args = [
        str(REPO / "configs/finetune/xvnli.yaml"),
        f"data.root={iglue_dir}",
        f"data.image_roots.flickr30k={cfg.data.image_roots['flickr30k']}",
        f"data.train=[{cfg.data.train[0]}]",
        f"data.dev=[{cfg.data.dev[0]}]",
        "data.max_examples=6",
    ]
    assert cclm_main(["finetune", *args, "--check-images", "languages=[ar]"]) == 0
    assert cclm_main(["iglue", "check-images", *args, "languages=[ar]"]) == 0
    assert "0 missing" in capsys.readouterr().err
    used = used_image(cfg, cfg.data.test["ar"])
    used.unlink()  # the run's own images are still checked
    assert cclm_main(["iglue", "check-images", *args, "languages=[ar]"]) == 1
    assert capsys.readouterr().out.split() == [str(used)]
    assert cclm_main(["iglue", "check-images", *args, "languages=[xx]"]) == 2  # a config error
    assert "languages: xx not named by this config's files" in capsys.readouterr().err
