"""The CCLM reference's task heads (``head: cclm``): the generative answer decoder of xGQA / easy-VQA and the doubled
fusion stack of MaRVL / NLVR2. Each trains on a small generated task past its accuracy before training; the
decoder's ranking equals scoring every answer separately in full; the doubled stack is the backbone's layers and
their copies taking the two images in turn; task folders keep their head; the NLVR domain-pretraining objective
builds the reference's examples and trains; the optimizer takes the config's betas."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.data import DataLoader

from cclm.config import DeepSpeedConfig, FinetuneTrainConfig, ModelConfig, load_config
from cclm.model.cross_view import CrossViewModel
from cclm.runtime.env import init_distributed
from cclm.runtime.sources import EpochBatches
from cclm.tasks import finetune
from cclm.tasks.batching import TaskCollator
from cclm.tasks.metrics import accuracy
from cclm.tasks.nlvr_fusion import TextAssignment, assignment_pairs
from cclm.tasks.task_model import TASK_CONFIG, TaskModel

from .conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

# Answers of a generated VQA task, one per image colour; "red" and "red square" share their first tokens.
COLOURS = {
    "red": (230, 20, 20),
    "red square": (110, 0, 0),
    "blue": (20, 20, 230),
    "green triangles": (20, 200, 20),
}
ANSWERS = list(COLOURS)


@pytest.fixture
def backbone(tiny_tokenizer) -> CrossViewModel:
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.text.encoder["vocab_size"] = len(tiny_tokenizer)
    torch.manual_seed(0)
    return CrossViewModel(cfg)


def solid(colour: tuple[int, int, int], noise: int = 0, seed: int = 0) -> torch.Tensor:
    """A 32 px uint8 image of one colour, plus some pixel noise."""
    image = torch.tensor(colour, dtype=torch.int16)[:, None, None].expand(3, 32, 32).clone()
    if noise:
        image += torch.randint(-noise, noise + 1, (3, 32, 32), generator=torch.Generator().manual_seed(seed))
    return image.clamp(0, 255).to(torch.uint8)


def vqa_items(copies: int = 4) -> list[dict]:
    return [
        {"images": solid(COLOURS[answer], 20, seed), "text": "which colour", "label": label}
        for label, answer in enumerate(ANSWERS)
        for seed in range(copies)
    ]


def pair_items(copies: int = 3) -> list[dict]:
    """Is the caption true: are both images the same colour? Half of the pairs are."""
    colours = [COLOURS["red"], COLOURS["blue"], COLOURS["green triangles"]]
    items = []
    for seed in range(copies):
        for i, left in enumerate(colours):
            for j, right in enumerate(colours):
                if i != j and (i - j) % 3 != 1 + seed % 2:  # 3 different pairs (of 6) per seed, 3 same
                    continue
                pair = torch.stack([solid(left, 20, 2 * seed), solid(right, 20, 2 * seed + 1)])
                items.append({"images": pair, "text": "the same colour", "label": int(i == j)})
    return items


def collator(model: TaskModel, tokenizer) -> TaskCollator:
    return TaskCollator.for_model(model.backbone, tokenizer)


def scored(model: TaskModel, items: list[dict], tokenizer, k: int = 128) -> float:
    loader = DataLoader(items, batch_size=8, collate_fn=collator(model, tokenizer))
    predictions, labels = finetune.predict(model, loader, torch.device("cpu"), k=k)
    return accuracy(predictions, labels)


def train(model: TaskModel, items: list[dict], tokenizer, tmp_path, steps: int, lr: float = 1e-3):
    source = EpochBatches(items, 8, collator(model, tokenizer), seed=0)
    settings = finetune.FinetuneSettings(lr=lr, max_steps=steps, warmup_ratio=0.0, eval_every=steps)
    trained, _ = finetune.finetune(
        model, source, lambda m: 0.0, settings, env=init_distributed("cpu"), output_dir=tmp_path / "run"
    )
    return trained


# -------------------------------------------------------------------------------------------- answer decoder
def test_answer_decoder_starts_from_the_backbone_and_learns_a_generated_vqa_task(
    backbone, tiny_tokenizer, tmp_path
):
    model = TaskModel(backbone, "xgqa", "single", ANSWERS, head="cclm")
    assert model.decodes_answers and model.head_parameter_names() == set()  # all copied: no new-lr parameters
    for copied, source in zip(model.head.layers, backbone.fusion.layers):
        assert copied is not source
        for (name, a), b in zip(copied.state_dict().items(), source.state_dict().values()):
            assert torch.equal(a, b), name
    head = model.head
    assert head.lm_head.decoder.weight is head.embeddings.word_embeddings.weight  # tied, as the MLM head
    assert head.embeddings.word_embeddings.weight is not backbone.text.embeddings.word_embeddings.weight

    items = vqa_items()
    # predict() tokenises the answers with the batches' collator
    before = scored(model, items, tiny_tokenizer)
    assert model.head.answer_ids.shape[0] == len(ANSWERS)
    expected = tiny_tokenizer(ANSWERS, padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(model.head.answer_ids, expected)
    trained = train(model, items, tiny_tokenizer, tmp_path, steps=80, lr=2e-3)
    after = scored(trained, items, tiny_tokenizer)
    assert after == 100.0 > before, (before, after)  # 4 answers: chance is 25%
    assert scored(trained, items, tiny_tokenizer, k=1) <= after  # k=1: the first token alone decides


def brute_force_scores(decoder, states, states_mask) -> torch.Tensor:
    """log p(answer | question) [B, A]: every answer alone (no padding, no batching), token by token."""
    scores = torch.zeros(states.shape[0], decoder.answer_ids.shape[0])
    for b in range(states.shape[0]):
        for a in range(decoder.answer_ids.shape[0]):
            ids = decoder.answer_ids[a][decoder.answer_mask[a].bool()][None]
            logits = decoder(ids, torch.ones_like(ids), states[b : b + 1], states_mask[b : b + 1])[0]
            log_probs = logits.float().log_softmax(dim=-1)
            scores[b, a] = sum(log_probs[t - 1, ids[0, t]] for t in range(1, ids.shape[1]))
    return scores


def test_ranking_equals_scoring_every_answer_in_full(backbone, tiny_tokenizer):
    answers = ["red", "red square", "blue", "green triangles", "a red circle", "a blue square", "two"]
    model = TaskModel(backbone, "xgqa", "single", answers, head="cclm").eval()
    model.set_answer_tokens(collator(model, tiny_tokenizer).tokenize)
    with torch.no_grad():  # a trained-looking decoder: random weights large enough to spread the scores
        for param in model.head.layers.parameters():
            param.add_(0.3 * torch.randn_like(param))
    batch = collator(model, tiny_tokenizer)(
        [
            {"images": solid(c, 30, i), "text": t}
            for i, (c, t) in enumerate(zip(COLOURS.values(), ["a", "two", "red", "the"]))
        ]
    )
    states = model.question_states(batch["images"], batch["text_ids"], batch["text_mask"])
    brute = brute_force_scores(model.head, states.detach(), batch["text_mask"])
    first_ids = model.head.answer_ids[:, 1]
    assert len(set(first_ids.tolist())) < len(answers)  # some answers share their first token

    ids, scores = model.rank_answers(batch, k=len(answers))
    expected_scores, expected_ids = brute.sort(dim=1, descending=True)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.predict_labels(batch, k=len(answers)), brute.argmax(dim=1))

    # k < A: the k answers whose first token is most probable, then the same full scores among them
    with torch.no_grad():
        start = model.head.answer_ids[:1, :1].expand(len(states), 1)
        first = model.head(start, torch.ones_like(start), states, batch["text_mask"])[:, 0].log_softmax(-1)
        first = first[:, first_ids]
    k = 3
    ids, scores = model.rank_answers(batch, k=k)
    for b in range(len(states)):
        candidates = first[b].topk(k).indices
        kept = brute[b, candidates].sort(descending=True)
        assert ids[b].tolist() == candidates[kept.indices].tolist()
        torch.testing.assert_close(scores[b], kept.values, atol=1e-4, rtol=1e-4)

    # the reference's score counts the first token's log-probability twice
    ids, scores = model.rank_answers(batch, k=len(answers), first_token_twice=True)
    reference = brute + first
    torch.testing.assert_close(scores, reference.gather(1, ids), atol=1e-4, rtol=1e-4)
    assert torch.equal(ids[:, 0], reference.argmax(dim=1))
    assert torch.equal(
        model.predict_labels(batch, k=len(answers), first_token_twice=True), reference.argmax(dim=1)
    )
    # and from a fine-tuning config (eval.first_token_twice) through the task's scoring
    batches = [{**batch, "labels": reference.argmax(dim=1)}]
    predicted, _ = finetune.predict(model, batches, torch.device("cpu"), "fp32", len(answers), True)
    assert torch.equal(predicted, reference.argmax(dim=1))


def test_answer_lm_loss_is_the_gold_answers_summed_token_nll(backbone, tiny_tokenizer):
    model = TaskModel(backbone, "easy_vqa", "single", ANSWERS, head="cclm").eval()
    model.set_answer_tokens(collator(model, tiny_tokenizer).tokenize)
    items = vqa_items(1)
    batch = collator(model, tiny_tokenizer)(items)
    loss = model(batch)["loss"]
    states = model.question_states(batch["images"], batch["text_ids"], batch["text_mask"])
    brute = brute_force_scores(model.head, states.detach(), batch["text_mask"])
    expected = -brute[torch.arange(len(items)), batch["labels"]].mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- doubled fusion stack
def test_doubled_fusion_takes_the_left_then_the_right_image_in_every_layer(backbone, tiny_tokenizer):
    model = TaskModel(backbone, "marvl", "pair", ["false", "true"], head="cclm").eval()
    fusion, copies = backbone.fusion, model.pair_fusion.layers
    assert len(copies) == len(fusion.layers)
    # key/value: one parameter for both images, as the reference
    for left, right in zip(fusion.layers, copies):
        assert right.crossattention.self.key.weight is left.crossattention.self.key.weight
        assert right.crossattention.self.value.bias is left.crossattention.self.value.bias
        assert right.crossattention.self.query.weight is not left.crossattention.self.query.weight
        assert right.attention.self.query.weight is not left.attention.self.query.weight
    assert model.head_parameter_names() == {n for n, _ in model.named_parameters() if "head.classifier." in n}

    red, blue = solid(COLOURS["red"], 30, 1), solid(COLOURS["blue"], 30, 2)
    batch = collator(model, tiny_tokenizer)(
        [
            {"images": torch.stack([red, blue]), "text": "a red circle"},
            {"images": torch.stack([red, red]), "text": "two"},
        ]
    )
    text, mask = batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        tokens, _ = backbone.encode_text(text, mask)
        image_tokens = {
            "red": backbone.encode_image(red[None])[0],
            "blue": backbone.encode_image(blue[None])[0],
        }
        # At initialisation a copy equals its layer: the doubled stack is every fusion layer applied twice, first
        # to the left image, then to the right one (by hand, with the backbone's own fusion stack).
        twice = copy.deepcopy(fusion)
        twice.layers = torch.nn.ModuleList([layer for layer in fusion.layers for _ in range(2)])
        same = twice(tokens[1:], mask[1:], image_tokens["red"])[:, 0]
        by_hand = tokens[:1]
        for layer in fusion.layers:
            by_hand = layer(
                by_hand, attention_mask=_additive(mask[:1]), encoder_hidden_states=image_tokens["red"]
            )
            by_hand = layer(
                by_hand, attention_mask=_additive(mask[:1]), encoder_hidden_states=image_tokens["blue"]
            )
        features = model.features(batch["images"], text, mask)
        torch.testing.assert_close(features[0], by_hand[0, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features[1], same[0], atol=1e-5, rtol=1e-5)
        # the order of the images matters: swapped, the caption reads them in the other order
        swapped = model.features(batch["images"].flip(1), text, mask)
        assert not torch.allclose(swapped[0], features[0], atol=1e-4)
        torch.testing.assert_close(swapped[1], features[1], atol=1e-6, rtol=1e-6)
        # copies that learnt something else: the right image goes through the copies, not the originals
        for right in copies:
            right.crossattention.self.query.weight.mul_(-1.0)
        moved = model.features(batch["images"], text, mask)
        by_hand = tokens[:1]
        for left, right in zip(fusion.layers, copies):
            by_hand = left(
                by_hand, attention_mask=_additive(mask[:1]), encoder_hidden_states=image_tokens["red"]
            )
            by_hand = right(
                by_hand, attention_mask=_additive(mask[:1]), encoder_hidden_states=image_tokens["blue"]
            )
        torch.testing.assert_close(moved[0], by_hand[0, 0], atol=1e-5, rtol=1e-5)


def _additive(mask: torch.Tensor) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def test_doubled_fusion_learns_a_generated_image_pair_task(backbone, tiny_tokenizer, tmp_path):
    model = TaskModel(backbone, "nlvr2", "pair", ["false", "true"], head="cclm")
    items = pair_items()
    assert sum(item["label"] for item in items) * 2 == len(items)  # chance is 50%
    before = scored(model, items, tiny_tokenizer)
    trained = train(model, items, tiny_tokenizer, tmp_path, steps=60)
    after = scored(trained, items, tiny_tokenizer)
    assert after == 100.0 > before, (before, after)


# ------------------------------------------------------------------------------------------------ save/load
@pytest.mark.parametrize(
    "task,kind,labels,head",
    [
        ("xgqa", "single", ANSWERS, "cclm"),
        ("marvl", "pair", ["false", "true"], "cclm"),
        ("xgqa", "single", ANSWERS, "iglue"),
        ("xvnli", "single", ["contradiction", "neutral", "entailment"], "cclm"),  # the classifier, as iglue
    ],
)
def test_task_folder_keeps_its_head(backbone, tiny_tokenizer, tmp_path, task, kind, labels, head):
    model = TaskModel(backbone, task, kind, labels, head=head).eval()
    model.set_answer_tokens(collator(model, tiny_tokenizer).tokenize)
    with torch.no_grad():  # trained weights, not the initial copies
        for param in model.head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save(tmp_path / "task", tiny_tokenizer)
    assert json.loads((tmp_path / "task" / TASK_CONFIG).read_text())["head"] == head
    loaded = TaskModel.load(tmp_path / "task").eval()
    assert (loaded.head_style, loaded.design, type(loaded.head)) == (head, model.design, type(model.head))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    items = pair_items(1) if kind == "pair" else vqa_items(1)
    batch = collator(model, tiny_tokenizer)(items)
    assert torch.equal(model.predict_labels(batch), loaded.predict_labels(batch))
    rebuilt = model.rebuilt()  # what a ZeRO-3 run loads its selected weights into
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval().predict_labels(batch), model.predict_labels(batch))
    if model.pair_fusion is not None:  # still one key/value parameter for both images after loading
        left, right = loaded.backbone.fusion.layers[0], loaded.pair_fusion.layers[0]
        assert right.crossattention.self.key.weight is left.crossattention.self.key.weight


def test_task_folder_without_a_head_style_is_iglue(backbone, tiny_tokenizer, tmp_path):
    TaskModel(backbone, "marvl", "pair", ["false", "true"]).save(tmp_path / "task", tiny_tokenizer)
    info = json.loads((tmp_path / "task" / TASK_CONFIG).read_text())
    del info["head"]  # a folder saved before head styles existed
    (tmp_path / "task" / TASK_CONFIG).write_text(json.dumps(info))
    loaded = TaskModel.load(tmp_path / "task")
    assert (loaded.head_style, loaded.design, loaded.pair_fusion) == ("iglue", "classifier", None)


def test_head_styles_are_checked(backbone):
    with pytest.raises(ValueError, match="unknown head style"):
        TaskModel(backbone, "xgqa", "single", ANSWERS, head="blip")
    with pytest.raises(ValueError, match="is for 'pair' tasks"):
        TaskModel(backbone, "marvl", "single", ["false", "true"], head="cclm")
    model = TaskModel(backbone, "xgqa", "single", ANSWERS, head="cclm")
    batch = {
        "images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
        "text_ids": torch.ones(1, 3, dtype=torch.long),
        "text_mask": torch.ones(1, 3, dtype=torch.long),
        "labels": torch.tensor([0]),
    }
    with pytest.raises(RuntimeError, match="no answer tokens"):
        model(batch)


# ------------------------------------------------------------------------------------ NLVR domain pretraining
def test_text_assignment_examples_follow_the_reference():
    features = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(200):
        left, right, labels = assignment_pairs(features, generator)
        rows = torch.arange(6)
        assert torch.equal(left[labels == 0], rows[labels == 0])  # own image on the left
        assert torch.equal(right[labels == 1], rows[labels == 1])  # own image on the right
        assert not ((left == rows) & (labels != 0)).any() and not ((right == rows) & (labels != 1)).any()
        assert not (left[labels == 2] == right[labels == 2]).any()  # two different negatives
        counts += torch.bincount(labels, minlength=3)
    shares = counts / counts.sum()  # 1/3 each: own image left, own image right, neither
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.05), shares


def test_text_assignment_pretraining_trains_the_doubled_layers(backbone, tiny_tokenizer):
    model = TaskModel(backbone, "marvl", "pair", ["false", "true"], head="cclm")
    with pytest.raises(ValueError, match="doubled fusion"):
        TextAssignment(TaskModel(copy.deepcopy(backbone), "marvl", "pair", ["false", "true"]))
    pretrain = TextAssignment(model, seed=0)
    captions = {
        "red": "a red circle",
        "blue": "a blue square",
        "green triangles": "two small green triangles",
    }
    batch = collator(model, tiny_tokenizer)(
        [{"images": solid(COLOURS[c], 20, s), "text": t} for c, t in captions.items() for s in range(2)]
    )

    def mean_loss() -> float:
        pretrain.sampling_generator.manual_seed(123)
        with torch.no_grad():
            return sum(float(pretrain(batch)["loss"]) for _ in range(8)) / 8

    before = mean_loss()
    right_copy = model.pair_fusion.layers[0].attention.self.query.weight.detach().clone()
    optimizer = torch.optim.AdamW(pretrain.parameters(), lr=1e-3)
    for _ in range(30):
        optimizer.zero_grad()
        pretrain(batch)["loss"].backward()
        optimizer.step()
    assert mean_loss() < before - 0.2
    assert not torch.equal(model.pair_fusion.layers[0].attention.self.query.weight, right_copy)


# ------------------------------------------------------------------------------------------- optimizer betas
def test_finetuning_takes_the_configs_betas(monkeypatch, backbone):
    train_cfg = FinetuneTrainConfig(betas=[0.9, 0.98], epochs=3, weight_decay=0.05)
    settings = finetune.FinetuneSettings.from_train_config(train_cfg, 2e-5)
    assert (settings.lr, settings.betas, settings.epochs, settings.weight_decay) == (
        2e-5,
        (0.9, 0.98),
        3,
        0.05,
    )
    default = finetune.FinetuneSettings(lr=1.0).betas
    assert default == (0.9, 0.999)  # the previous fixed value stays the default
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(finetune, "Trainer", fake_trainer)
    model = TaskModel(backbone, "xvnli", "single", ["contradiction", "neutral", "entailment"])
    with pytest.raises(Stop):
        finetune.finetune(
            model,
            EpochBatches([{}], 1, lambda items: items[0], seed=0),
            lambda m: 0.0,
            settings,
            env=init_distributed("cpu"),
            output_dir="unused",
        )
    assert list(seen["optimizer_cfg"].betas) == [0.9, 0.98]


@pytest.mark.parametrize(
    "task,kind,labels", [("xgqa", "single", ANSWERS), ("marvl", "pair", ["false", "true"])]
)
def test_zero3_fine_tuning_returns_the_trained_cclm_head(
    backbone, tiny_tokenizer, tmp_path, task, kind, labels
):
    """Under ZeRO-3 the selected weights come back into a rebuilt module: with the answer tokens, the tied
    decoder embeddings and the key/value projections shared by the two images."""
    model = TaskModel(backbone, task, kind, labels, head="cclm")
    items = pair_items(1) if kind == "pair" else vqa_items(1)
    snapshots = []

    def dev_score(m):
        snapshots.append({k: v.detach().clone().float() for k, v in m.state_dict().items()})
        return 1.0

    trained, _ = finetune.finetune(
        model,
        EpochBatches(items, 4, collator(model, tiny_tokenizer), seed=0),
        dev_score,
        finetune.FinetuneSettings(lr=1e-3, max_steps=2, eval_every=2),
        env=init_distributed("cpu"),
        output_dir=tmp_path / "run",
        deepspeed_cfg=DeepSpeedConfig(zero_stage=3),
    )
    assert trained is not model and trained.head_style == "cclm"
    for key, value in trained.state_dict().items():
        assert torch.equal(value.float(), snapshots[-1][key]), key
    batch = collator(trained, tiny_tokenizer)(items)
    assert trained.predict_labels(batch).shape == (len(items),)
