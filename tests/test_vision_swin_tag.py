"""A timm tower named with a pretrained tag (``swin_base_patch4_window7_224.ms_in22k``, CCLM's ImageNet-22k
starting weights): timm resolves the tag, open_clip's timm tower passes the name through, the tower builds offline
without weights, with ``timm_model_pretrained`` it loads the tag's checkpoint less its 21841-class head (timm's
hub download is replaced here by a fake), and the config check accepts the tag and names a wrong one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg

from cclm.config import CONFIG_ROOT, ConfigError, ModelConfig, load_config
from cclm.model.vision import VisionTower, check_timm_model_name, check_vision_config

SWIN_B = "swin_base_patch4_window7_224"
SWIN_B_22K = f"{SWIN_B}.ms_in22k"


def tower_cfg(name: str = SWIN_B_22K, pretrained: bool = False) -> dict:
    return {
        "timm_model_name": name,
        "timm_model_pretrained": pretrained,
        "timm_pool": "",
        "timm_proj": "none",
        "timm_drop_path": 0.1,
        "image_size": 224,
    }


def test_the_tag_selects_the_imagenet_22k_weights_the_bare_name_does_not():
    tagged = get_pretrained_cfg(SWIN_B_22K)
    assert tagged.tag == "ms_in22k" and tagged.num_classes == 21841
    assert tagged.hf_hub_id == f"timm/{SWIN_B_22K}"
    default = get_pretrained_cfg(SWIN_B)  # timm's default tag for the bare name: 22k fine-tuned on 1k
    assert default.tag == "ms_in22k_ft_in1k" and default.num_classes == 1000


def test_tagged_tower_builds_offline_without_a_classifier_and_returns_tokens():
    tower = VisionTower(tower_cfg(), embed_dim=256)
    trunk = tower.visual.trunk
    assert trunk.pretrained_cfg["tag"] == "ms_in22k" and trunk.pretrained_cfg["num_classes"] == 21841
    assert trunk.num_classes == 0 and isinstance(trunk.head.fc, torch.nn.Identity)
    assert trunk.layers[0].blocks[0].attn.window_size == (7, 7) and tower.width == 1024
    assert tower.tower_cfg["timm_model_name"] == SWIN_B_22K
    tower.drop_clip_projection()
    with torch.no_grad():
        tokens = tower.eval()(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert tokens.shape == (1, 1 + 7 * 7, 1024)  # the mean token, then the 7x7 tokens of the last stage


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace timm's Hugging Face download with a checkpoint of the 22k model's layout (head included)."""
    import timm.models._builder as builder

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model(SWIN_B, num_classes=21841).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    checkpoint = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    calls = []

    def load_state_dict_from_hf(model_id, *args, **kwargs):
        calls.append(model_id)
        return dict(checkpoint)

    monkeypatch.setattr(builder, "load_state_dict_from_hf", load_state_dict_from_hf)
    return SimpleNamespace(checkpoint=checkpoint, calls=calls)


def test_pretrained_tagged_tower_loads_the_22k_checkpoint_less_its_head(fake_hub):
    assert fake_hub.checkpoint["head.fc.weight"].shape == (21841, 1024)
    tower = VisionTower(tower_cfg(pretrained=True), embed_dim=256)
    assert fake_hub.calls == [f"timm/{SWIN_B_22K}"]
    state = tower.visual.trunk.state_dict()
    assert not any(k.startswith("head.fc.") for k in state)
    # every trunk tensor comes from the checkpoint
    assert [k for k in state if not torch.equal(state[k], fake_hub.checkpoint[k])] == []


def test_a_saved_tower_is_rebuilt_without_fetching_the_starting_weights(fake_hub):
    tower = VisionTower(tower_cfg(pretrained=True), embed_dim=256, load_pretrained=False)
    assert fake_hub.calls == []
    assert tower.tower_cfg["timm_model_pretrained"] is True  # recorded as configured
    key = "patch_embed.proj.weight"
    assert not torch.equal(tower.visual.trunk.state_dict()[key], fake_hub.checkpoint[key])


def test_config_check_accepts_the_tagged_name_and_the_base_swin_config():
    check_timm_model_name(SWIN_B_22K)
    check_timm_model_name(SWIN_B)
    check_vision_config(SimpleNamespace(tower=tower_cfg(pretrained=True), pretrained=None, name="ViT-B-16"))
    cfg = load_config(ModelConfig, CONFIG_ROOT / "model" / "base_swin.yaml")
    check_vision_config(cfg.vision)


def test_config_check_names_a_wrong_tag_or_model():
    with pytest.raises(
        ConfigError, match=r"tower\.timm_model_name.*no pretrained tag 'in22k'.*ms_in22k_ft_in1k"
    ):
        check_vision_config(
            SimpleNamespace(tower=tower_cfg(f"{SWIN_B}.in22k"), pretrained=None, name="ViT-B-16")
        )
    with pytest.raises(
        ConfigError, match=r"not a timm model \(did you mean 'swin_base_patch4_window7_224'\?\)"
    ):
        check_timm_model_name("swin_base_patch4_windw7_224.ms_in22k")
