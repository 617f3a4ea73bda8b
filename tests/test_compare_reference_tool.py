"""``tools/compare_reference.py``: the parts that need no copy of the CCLM reference (argument errors, the MLM
batch-layout conversion, the scripted hard-negative sampler, the report table), and -- only when
``CCLM_REFERENCE_DIR`` names a clone of zengyan-97/CCLM -- one whole run of the tool."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "compare_reference.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("compare_reference", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cr = _load_tool()


# ------------------------------------------------------------------------------------------ reference dir
def test_a_missing_reference_dir_gives_one_clear_line_and_exit_2(tmp_path, capsys):
    assert cr.main(["--reference-dir", str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no such directory" in lines[0] and "nowhere" in lines[0]


def test_a_directory_that_is_not_the_reference_names_what_it_lacks(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "xvlm.py").write_text("")
    assert cr.main(["--reference-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "not the CCLM reference code" in lines[0] and "models/model_pretrain_cclm.py" in lines[0]
    assert "xvlm.py" not in lines[0]  # present, so not listed as missing


def test_the_script_itself_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOL), "--reference-dir", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ batch layout
def test_reference_mlm_layout_converts_to_cclm_labels():
    # row 0: positions 3 and 1 masked (the reference keeps them in draw order), two padding slots;
    # row 1: one masked position (the closing </s> at 4, as the reference allows), three padding slots
    masked_input = torch.tensor([[0, 4, 11, 4, 2, 1], [0, 12, 13, 14, 4, 1]])
    masked_pos = torch.tensor([[3, 1, 0, 0], [4, 0, 0, 0]])
    masked_ids = torch.tensor([[21, 20, -100, -100], [2, -100, -100, -100]])
    mlm_ids, labels = cr.reference_mlm_to_cclm(masked_input, masked_pos, masked_ids)
    assert torch.equal(mlm_ids, masked_input) and mlm_ids is not masked_input
    expected = torch.tensor([[-100, 20, -100, 21, -100, -100], [-100, -100, -100, -100, 2, -100]])
    assert torch.equal(labels, expected)
    # the padding slots point at position 0 (<s>) with label -100: <s> stays unlabelled
    assert int((labels != -100).sum()) == int((masked_ids != -100).sum())


def test_a_position_named_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        cr.reference_mlm_to_cclm(
            torch.zeros(1, 5, dtype=torch.long), torch.tensor([[2, 2]]), torch.tensor([[7, 8]])
        )


def test_the_mlm_loss_is_the_same_in_both_layouts():
    """The reference's CE over gathered masked positions (padding ids -100) equals cclm's CE over the
    positions whose label is not -100, for the same logits."""
    logits = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(0))
    masked_pos = torch.tensor([[3, 1, 0], [4, 0, 0]])
    masked_ids = torch.tensor([[5, 7, -100], [2, -100, -100]])
    gathered = torch.gather(logits, 1, masked_pos[:, :, None].expand(-1, -1, 9))
    reference = torch.nn.functional.cross_entropy(gathered.reshape(-1, 9), masked_ids.reshape(-1))
    _, labels = cr.reference_mlm_to_cclm(torch.zeros(2, 6, dtype=torch.long), masked_pos, masked_ids)
    selected = labels != -100
    ours = torch.nn.functional.cross_entropy(logits[selected], labels[selected])
    torch.testing.assert_close(ours, reference)


# ------------------------------------------------------------------------------------------ sampler
def test_the_scripted_sampler_draws_alike_row_by_row_and_by_matrix():
    weights = torch.softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    weights.fill_diagonal_(0)
    uniforms = [0.05, 0.5, 0.93, 0.31]
    original = torch.multinomial
    with cr.scripted_multinomial(uniforms) as one_by_one:
        rows = [torch.multinomial(weights[b], 1).item() for b in range(4)]  # the reference's way
    with cr.scripted_multinomial(uniforms) as matrix:
        picks = torch.multinomial(weights * 3.0, 1).squeeze(1).tolist()  # cclm's way; the scale is irrelevant
    assert torch.multinomial is original
    assert rows == picks == one_by_one.picks == matrix.picks
    assert all(pick != b for b, pick in enumerate(picks))  # a zero weight is never drawn
    cdf = torch.cumsum(weights[0] / weights[0].sum(), 0)
    assert picks[0] == int(torch.searchsorted(cdf, torch.tensor([0.05], dtype=cdf.dtype)))


# ------------------------------------------------------------------------------------------ report
def test_the_table_shows_status_and_prints_a_shared_note_once():
    rows = [
        cr.Row("loss", 1.0, 1.00001, 1e-5, 1e-4),
        cr.Row("other loss", 1.0, 1.1, 0.1, 1e-4, "why"),
        cr.Row("shown only", 3, 4, 1.0, None, "why"),
    ]
    assert [r.status for r in rows] == ["OK", "FAIL", "INFO"]
    table = cr.format_table(rows)
    assert "| other loss [1] |" in table and "| shown only [1] |" in table
    assert table.count("[1] why") == 1


def test_shares_are_compared_within_their_sampling_noise():
    close = cr.share_row("share", (4300, 10000), (4350, 10000))
    far = cr.share_row("share", (4300, 10000), (4700, 10000))
    assert close.status == "OK" and far.status == "FAIL"
    assert 0.03 < close.tol < 0.04  # 5 standard errors of a difference of two shares near 0.43


# ------------------------------------------------------------------------------------------ whole run
REFERENCE_DIR = os.environ.get("CCLM_REFERENCE_DIR")
# Its first run here found that cclm's TTM fused side A over side B where the reference fuses B over A; cclm
# now reads the pair as the reference does, so nothing may fail.
KNOWN_FAILS: tuple[str, ...] = ()


@pytest.mark.slow
@pytest.mark.skipif(
    not REFERENCE_DIR, reason="set CCLM_REFERENCE_DIR to a clone of zengyan-97/CCLM to run the whole tool"
)
def test_the_whole_tool_against_the_reference(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--reference-dir", REFERENCE_DIR, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: a difference, named below
    assert "| image view: ITC loss |" in result.stdout
    assert "| region view: BBOX loss |" in result.stdout
    import json

    report = json.loads(out.read_text())
    failed = [r["quantity"] for r in report["rows"] if r["status"] == "FAIL"]
    unexpected = [q for q in failed if not q.startswith(KNOWN_FAILS)]
    assert not unexpected, unexpected
    assert report["ok"] == (result.returncode == 0) == (not failed)
