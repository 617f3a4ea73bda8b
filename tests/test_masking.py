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


# ------------------------------------------------------------------------------------------ the count rule
# The CCLM reference (dataset/pretrain_dataset_multilingual.py, TextMaskingGenerator): captions 40 tokens / 12
# masks, parallel text 64 tokens / 20 masks, mask_prob 0.4, skipgram_prb 0.2, skipgram_size 3.
def count_spec(mask_prob=0.4, max_masks=None, skipgram_prob=0.0, skipgram_size=3, **kw):
    return MaskingSpec(
        mask_token_id=4,
        vocab_size=500,
        special_ids=SPECIAL,
        pad_token_id=1,
        rule="count",
        mask_prob=mask_prob,
        max_masks=max_masks,
        skipgram_prob=skipgram_prob,
        skipgram_size=skipgram_size,
        **kw,
    )


def rows_of_lengths(lengths, width=None, seed=0):
    """``<s>`` + ordinary tokens + ``</s>`` per row (a length-1 row is ``<s>`` alone), right-padded with <pad>."""
    width = width or max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), 1)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, 500, (n,), generator=g)
        ids[i, 0] = 0
        if n > 1:
            ids[i, n - 1] = 2
    return ids


def reference_masked_positions(n, mask_prob, max_masks, skipgram_prb, skipgram_size, rng):
    """A direct transcription of the reference's position choice (mask_whole_word=False), with Python's random:
    the reference computation the tests compare against."""
    n_pred = min(max_masks, max(1, int(round(n * mask_prob))))
    cand_pos = list(range(1, n))
    rng.shuffle(cand_pos)
    masked_pos = set()
    max_cand_pos = max(cand_pos)
    for pos in cand_pos:
        if len(masked_pos) >= n_pred:
            break
        if pos in masked_pos:
            continue
        if skipgram_prb > 0 and skipgram_size >= 2 and rng.random() < skipgram_prb:
            st_pos, end_pos = pos, pos + rng.randint(2, skipgram_size)
        else:
            st_pos, end_pos = pos, pos + 1
        for mp in range(st_pos, end_pos):
            if 0 < mp <= max_cand_pos:
                masked_pos.add(mp)
            else:
                break
    masked_pos = list(masked_pos)
    if len(masked_pos) > n_pred:
        rng.shuffle(masked_pos)
        masked_pos = masked_pos[:n_pred]
    return masked_pos


def expected_count(n, mask_prob, cap):
    if n < 2:
        return 0
    n_pred = max(1, int(round(n * mask_prob)))
    if cap is not None:
        n_pred = min(cap, n_pred)
    return min(n_pred, n - 1)


@pytest.mark.parametrize("cap", [None, 12, 20])
@pytest.mark.parametrize("skipgram_prob", [0.0, 0.2])
def test_count_rule_masks_exactly_n_pred_for_every_length(cap, skipgram_prob):
    lengths = list(range(1, 61)) * 20
    ids = rows_of_lengths(lengths, width=64)
    spec = count_spec(max_masks=cap, skipgram_prob=skipgram_prob)
    masked, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(5))
    chosen = labels != IGNORE_INDEX
    counts = chosen.sum(1).tolist()
    assert counts == [expected_count(n, 0.4, cap) for n in lengths]
    assert not chosen[:, 0].any()  # <s> is never masked
    assert not chosen[ids == 1].any()  # nor padding
    assert torch.equal(labels[chosen], ids[chosen])
    # spot values: round(25 * 0.4) = 10; 60 tokens -> 24, capped to 12 / 20
    assert counts[lengths.index(25)] == 10
    assert counts[lengths.index(60)] == {None: 24, 12: 12, 20: 20}[cap]
    # </s> is a candidate as in the reference: some rows mask it
    ends = torch.tensor([n - 1 for n in lengths])
    assert chosen[torch.arange(len(lengths)), ends][torch.tensor(lengths) > 1].any()


def test_count_rule_rounds_half_to_even_like_python():
    spec = count_spec(mask_prob=0.5)
    lengths = [5, 7, 9, 11]  # 2.5, 3.5, 4.5, 5.5 -> 2, 4, 4, 6
    _, labels = mask_tokens(rows_of_lengths(lengths), spec, torch.Generator().manual_seed(0))
    assert (labels != IGNORE_INDEX).sum(1).tolist() == [2, 4, 4, 6]


def test_count_rule_attention_mask_and_pad_id_agree_and_lengths_exclude_padding():
    lengths = [3, 17, 40, 64, 29]
    ids = rows_of_lengths(lengths, width=64)
    spec = count_spec(max_masks=20, skipgram_prob=0.2)
    a = mask_tokens(ids, spec, torch.Generator().manual_seed(9))
    b = mask_tokens(ids, spec, torch.Generator().manual_seed(9), attention_mask=(ids != 1).long())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    one = mask_tokens(ids[1], spec, torch.Generator().manual_seed(1))  # a single [L] row
    assert (one[1] != IGNORE_INDEX).sum() == expected_count(17, 0.4, 20)


def run_length_histogram(rows: list[list[int]], max_run=5) -> list[float]:
    """Fraction of masked positions lying in runs of contiguous masked positions of length 1, 2, ..., >= max_run."""
    counts = [0] * max_run
    for positions in rows:
        s = sorted(positions)
        run = 1
        for i in range(1, len(s) + 1):
            if i < len(s) and s[i] == s[i - 1] + 1:
                run += 1
                continue
            counts[min(run, max_run) - 1] += run
            run = 1
    total = sum(counts)
    return [c / total for c in counts]


@pytest.mark.parametrize(("length", "cap"), [(40, 12), (64, 20), (20, 100)])
def test_count_rule_ngram_statistics_match_the_reference_algorithm(length, cap):
    import random

    draws = 8000
    spec = count_spec(max_masks=cap, skipgram_prob=0.2, skipgram_size=3)
    _, labels = mask_tokens(rows_of_lengths([length] * draws), spec, torch.Generator().manual_seed(11))
    ours = [row.nonzero().squeeze(1).tolist() for row in labels != IGNORE_INDEX]
    rng = random.Random(11)
    ref = [reference_masked_positions(length, 0.4, cap, 0.2, 3, rng) for _ in range(draws)]
    ours_hist, ref_hist = run_length_histogram(ours), run_length_histogram(ref)
    assert max(abs(a - b) for a, b in zip(ours_hist, ref_hist)) < 0.012, (ours_hist, ref_hist)
    # n-grams do show: far more masked positions in runs than independent choices of the same count give
    _, plain = mask_tokens(
        rows_of_lengths([length] * draws), count_spec(max_masks=cap), torch.Generator().manual_seed(11)
    )
    plain_hist = run_length_histogram([row.nonzero().squeeze(1).tolist() for row in plain != IGNORE_INDEX])
    assert ours_hist[0] < plain_hist[0] - 0.05
    # and the same per-position frequencies (the edges differ from the middle: n-grams are cut at the end)
    ours_pos = position_frequencies(labels)
    ref_pos = torch.bincount(torch.tensor([p for row in ref for p in row]), minlength=length) / draws
    assert (ours_pos - ref_pos).abs().max() < 0.03


def position_frequencies(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).double().mean(0)


@pytest.mark.parametrize("rule", ["bernoulli", "count"])
def test_capped_masks_have_no_positional_bias(rule):
    length, draws = 30, 20000
    ids = rows_of_lengths([length] * draws)
    if rule == "bernoulli":
        spec = MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, mask_prob=0.9, max_masks=4)
    else:
        spec = count_spec(mask_prob=0.9, max_masks=12)
    _, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(13))
    assert ((labels != IGNORE_INDEX).sum(1) <= spec.max_masks).all()
    freq = position_frequencies(labels)
    # bernoulli masks the ordinary tokens 1..28; count also the closing </s> at 29
    inner = freq[1 : length - 1] if rule == "bernoulli" else freq[1:length]
    expected = spec.max_masks / len(inner)
    assert (inner - expected).abs().max() < 0.02, inner
    assert freq[0] == 0


def test_count_rule_never_leaves_a_row_without_masks():
    g = torch.Generator().manual_seed(17)
    for trial in range(20):
        lengths = torch.randint(2, 61, (64,), generator=g).tolist()
        ids = rows_of_lengths(lengths, width=64, seed=trial)
        for spec in (count_spec(mask_prob=0.01), count_spec(skipgram_prob=0.5, max_masks=1), count_spec()):
            _, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(trial))
            assert ((labels != IGNORE_INDEX).sum(1) >= 1).all()


@pytest.mark.parametrize("rule", ["bernoulli", "count"])
def test_80_10_10_for_both_rules(rule):
    if rule == "count":
        spec = count_spec(mask_prob=0.5, skipgram_prob=0.2)
    else:
        spec = MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, mask_prob=0.5)
    ids = rows_of_lengths([30] * 2000)
    masked, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(19))
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    as_mask = (masked[chosen] == 4).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    replaced = chosen & (masked != 4) & (masked != ids)
    assert abs(as_mask - 0.8) < 0.01
    assert abs(kept - 0.1) < 0.01  # plus the 1/495 of random draws that hit the same token
    assert abs(replaced.sum().item() / n - 0.1) < 0.01
    assert not torch.isin(masked[replaced], torch.tensor(SPECIAL)).any()
    assert torch.equal(masked[~chosen], ids[~chosen])


@pytest.mark.parametrize(
    "spec",
    [
        count_spec(max_masks=12, skipgram_prob=0.2),
        MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, max_masks=3),
        MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, span=True),
    ],
    ids=["count", "bernoulli-capped", "span"],
)
def test_masking_is_reproducible_from_the_generator_seed(spec):
    ids = rows_of_lengths(list(range(2, 42)))
    first = mask_tokens(ids, spec, torch.Generator().manual_seed(23))
    again = mask_tokens(ids, spec, torch.Generator().manual_seed(23))
    other = mask_tokens(ids, spec, torch.Generator().manual_seed(24))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"mask_prob": 0.0}, "mask_prob"),
        ({"mask_prob": 1.5}, "mask_prob"),
        ({"max_masks": 0}, "max_masks"),
        ({"mask_token_frac": 0.8, "random_token_frac": 0.3}, "sum <= 1"),
        ({"rule": "poisson"}, "rule"),
        ({"rule": "count", "skipgram_prob": 0.2, "skipgram_size": 1}, "skipgram_size"),
        ({"rule": "count", "skipgram_prob": 1.2}, "skipgram_prob"),
        ({"rule": "bernoulli", "skipgram_prob": 0.2}, "rule=count"),
        ({"rule": "count", "span": True}, "span"),
        ({"span": True, "span_mean_length": 0.5}, "span_mean_length"),
    ],
)
def test_bad_specs_are_refused_clearly(changes, match):
    with pytest.raises(ValueError, match=match):
        MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, **changes)


def test_spec_accepts_the_config_enum():
    from cclm.config import MaskRule

    spec = MaskingSpec(mask_token_id=4, vocab_size=500, special_ids=SPECIAL, rule=MaskRule.count)
    assert spec.rule == "count" and type(spec.rule) is str
