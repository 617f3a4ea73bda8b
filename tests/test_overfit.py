"""A tiny model overfits one batch of 8 image-caption pairs and 8 parallel pairs: every loss falls >= 90%."""

import torch

from cclm.data.masking import MaskingSpec, mask_tokens
from cclm.model import CrossViewModel

from .conftest import SENTENCES


def _batches(tokenizer):
    gen = torch.Generator().manual_seed(0)
    spec = MaskingSpec.from_tokenizer(tokenizer, mask_prob=0.3)

    def encode(texts):
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    captions = SENTENCES[:8]
    ids, mask = encode(captions)
    mlm_ids, mlm_labels = mask_tokens(ids, spec, gen)
    image = {
        "images": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen),
        "text_ids": ids,
        "text_mask": mask,
        "mlm_ids": mlm_ids,
        "mlm_labels": mlm_labels,
        "group_ids": torch.arange(8),
    }
    src = SENTENCES[:8]
    tgt = [
        "un cerchio rosso",
        "un quadrato blu",
        "due triangoli verdi",
        "un piccolo cerchio giallo",
        "tre quadrati neri",
        "un triangolo grande",
        "un cerchio a sinistra",
        "due quadrati a destra",
    ]
    a_ids, a_mask = encode(src)
    b_ids, b_mask = encode(tgt)
    a_mlm, a_labels = mask_tokens(a_ids, spec, gen)
    text = {
        "text_ids": a_ids,
        "text_mask": a_mask,
        "mlm_ids": a_mlm,
        "mlm_labels": a_labels,
        "other_ids": b_ids,
        "other_mask": b_mask,
        "group_ids": torch.arange(8),
    }
    return {"image": image, "text": text}


def test_tiny_model_overfits_both_views(tiny_model_cfg, tiny_tokenizer):
    torch.manual_seed(0)
    model = CrossViewModel(tiny_model_cfg).train()
    for module in model.modules():  # overfitting is about capacity, not regularisation
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batches = _batches(tiny_tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    first, last = {}, {}
    for _step in range(300):
        for view, batch in batches.items():
            out = model(batch, view)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            for name, value in out.items():
                key = f"{view}/{name}"
                first.setdefault(key, value.item())
                last[key] = value.item()
    for key in first:
        assert last[key] <= 0.1 * first[key], f"{key}: {first[key]:.3f} -> {last[key]:.3f}"
