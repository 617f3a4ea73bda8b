"""Conditional-MLM masking: ratio, 80/10/10, special tokens never masked, labels only where masked."""

import pytest
import torch

from cclm.data.masking import IGNORE_INDEX, MaskingSpec, mask_tokens

SPECIAL = (0, 1, 2, 3, 4)  # <s> <pad> </s> <unk> <mask>, XLM-R style


def _batch(n=400, length=30):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (n, length), generator=g)
    ids[:, 0] = 0
    lengths = torch.randint(5, length, (n,), generator=g)
    for i, end in enumerate(lengths.tolist()):
        ids[i, end] = 2
        ids[i, end + 1 :] = 1
    return ids


@pytest.mark.parametrize("span", [False, True])
def test_special_tokens_never_masked_and_ratio_met(span):
    spec = MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, mask_prob=0.4, span=span)
    ids = _batch()
    masked, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(SPECIAL))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any()
    assert torch.equal(masked[special], ids[special])
    ratio = chosen.sum() / (~special).sum()
    assert abs(ratio.item() - 0.4) < 0.04
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_80_10_10_split_and_random_tokens_are_ordinary():
    spec = MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, mask_prob=0.5)
    ids = _batch(1000)
    masked, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(2))
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    as_mask = (masked[chosen] == 4).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.02
    # "keep" = the 10% kept plus random draws that hit the same token by chance (1/495)
    assert abs(kept - 0.1) < 0.02
    replaced = chosen & (masked != 4) & (masked != ids)
    assert not torch.isin(masked[replaced], torch.tensor(SPECIAL)).any()


def test_max_masks_caps_each_row():
    spec = MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, mask_prob=0.9, max_masks=3)
    _, labels = mask_tokens(_batch(50), spec)
    assert ((labels != IGNORE_INDEX).sum(1) <= 3).all()


def test_model_mlm_loss_ignores_unmasked_positions(tiny_model_cfg):
    from cclm.model import CrossViewModel

    model = CrossViewModel(tiny_model_cfg).eval()
    vocab = tiny_model_cfg.text.encoder["vocab_size"]
    ids = torch.randint(5, vocab, (2, 8))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 5] = 7, 9
    batch = {
        "images": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "group_ids": torch.arange(2),
        "mlm_ids": ids,
        "mlm_labels": labels,
    }
    with torch.no_grad():
        first = model(batch, "image")["mlm"]
        # Changing the label of an unmasked position... there is none; changing *tokens* at unmasked positions
        # changes the context but a label of IGNORE_INDEX never enters the loss: compare with a direct computation.
        memory, _ = model.encode_image(batch["images"])
        fused = model.fuse(model.text(ids, batch["text_mask"]), batch["text_mask"], memory)
        logits = model.mlm_head(fused)
        direct = torch.nn.functional.cross_entropy(logits[[0, 1], [3, 5]], torch.tensor([7, 9]))
    assert torch.allclose(first, direct, atol=1e-5)


def test_span_masking_masks_contiguous_runs():
    spec = MaskingSpec(
        mask_token_id=4, vocab_size=500, special_ids=SPECIAL, mask_prob=0.4, span=True, span_mean_length=4.0
    )
    ids = torch.randint(5, 500, (300, 40))
    _, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(3))
    chosen = (labels != IGNORE_INDEX).long()
    runs = (chosen[:, 1:] - chosen[:, :-1] == 1).sum() + chosen[:, 0].sum()  # number of masked runs
    mean_run = chosen.sum() / runs
    assert mean_run > 2.5  # independent token masking at 0.4 would give ~1.67
