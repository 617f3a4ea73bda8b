"""Benchmark bookkeeping: every benchmark adds its RESULTS.md line to its own section (not to whichever section
is last in the file), and bench-data's pipelines do the same work (open_clip's loader decoded ~6% more images
than cclm and was credited with 2,048 samples against cclm's 2,000)."""

from __future__ import annotations

import importlib.util
import multiprocessing
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"


def _load_script(name: str):
    """The benchmark script as a module, loaded once: a process pool pickles its functions by their module's
    name, which must find these very objects in ``sys.modules``."""
    path = REPO / "benchmarks" / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _section_of(text: str, marker: str) -> tuple[str, int, list[str]]:
    """(heading, index of the marker line, lines) of the section holding the line that contains ``marker``."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if marker in line)
    heading = max(i for i in range(at) if lines[i].startswith("## "))
    return lines[heading], at, lines


# benchmark -> how its section's heading starts (RESULTS.md's own heading may add a date after it)
SECTIONS = {
    "bench_data": "## Data loading (`make bench-data`)",
    "bench_eval": "## Retrieval evaluation (`make bench-eval`)",
    "bench_train": "## Training step and ZeRO memory (`make bench-train`)",
    "bench_translate": "## Translation step (`make bench-translate`",
    "bench_recipes": "## Language extension recipes (`make bench-recipes`)",
    "bench_easy_vqa": "## easy-VQA fine-tuning (`make bench-easy-vqa`",
}


def _append(name: str, path: Path, text: str) -> None:
    if name == "bench_gpu":
        _load_script(name).append_results(text.rstrip("\n"), path)
    else:
        _load_script(name).append_result_line(path, text)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_each_benchmark_adds_its_line_at_the_end_of_its_own_section(tmp_path, name):
    results = tmp_path / "RESULTS.md"
    shutil.copy(RESULTS, results)
    before = results.read_text(encoding="utf-8")
    marker = f"- marker line of {name}"
    _append(name, results, marker + "\n")
    after = results.read_text(encoding="utf-8")
    heading, at, lines = _section_of(after, marker)
    first = next(line for line in before.splitlines() if line.startswith(SECTIONS[name]))
    assert heading == first, f"{name}'s line landed in {heading!r}"
    rest = lines[at + 1 :]
    following = next((line for line in rest if line.strip()), "")
    assert not rest or following.startswith("## ") or following == "", "the section's last line"
    assert after.replace(marker + "\n", "", 1) == before, "nothing else changed"


def test_bench_eval_writes_its_own_line_into_the_retrieval_section(tmp_path):
    """The full line writer of bench-eval (the review's repro): before the fix it appended at the file's end,
    inside whichever section was last."""
    bench = _load_script("bench_eval")
    results = tmp_path / "RESULTS.md"
    shutil.copy(RESULTS, results)
    args = type("Args", (), {"threads": 1, "k": 128})()
    timed = bench.Timed
    bench.append_results_line(
        results, args, 1000, 5000, {"two_stage": timed(None, 4.0, 4.0)}, timed(None, 160.0, 160.0), True
    )
    heading, _, _ = _section_of(results.read_text(encoding="utf-8"), "per-query re-ranking 160.0")
    assert heading == "## Retrieval evaluation (`make bench-eval`)"


def test_gpu_and_cvil_lines_go_to_their_sections(tmp_path):
    results = tmp_path / "RESULTS.md"
    _append("bench_gpu", results, "- gpu run\n")  # no file yet: the section is made
    gpu = _load_script("bench_gpu")
    assert results.read_text(encoding="utf-8") == f"{gpu.SECTION}\n\n- gpu run\n"
    easy_vqa, recipes = _load_script("bench_easy_vqa"), _load_script("bench_recipes")
    assert (
        easy_vqa.CVIL_SECTION == recipes.SECTION
    )  # `--cvil` writes where bench-recipes writes its cViL line
    shutil.copy(RESULTS, results)
    from benchmarks.results_md import append_to_section

    append_to_section(results, easy_vqa.CVIL_SECTION, "- cvil marker\n")
    heading, _, _ = _section_of(results.read_text(encoding="utf-8"), "- cvil marker")
    assert heading == recipes.SECTION


def test_append_to_section_edge_cases(tmp_path):
    from benchmarks.results_md import append_to_section

    path = tmp_path / "R.md"
    append_to_section(path, "## A", "- one")  # new file; a missing newline is added
    assert path.read_text() == "## A\n\n- one\n"
    path.write_text("# R\n\n## A (x, 2026)\n\n- a1\n  more\n\n\n## B\n- b1")  # no newline at the end
    append_to_section(path, "## A (x)", "- a2\n- a3\n", match="## A")
    append_to_section(path, "## B", "- b2\n")
    append_to_section(path, "## C", "- c1\n")  # no such section: a new one at the end
    assert path.read_text() == (
        "# R\n\n## A (x, 2026)\n\n- a1\n  more\n- a2\n- a3\n\n\n## B\n- b1\n- b2\n\n## C\n\n- c1\n"
    )
    path.write_text("## Empty\n\n## Next\n\n- n\n")  # a heading with nothing under it
    append_to_section(path, "## Empty", "- e\n")
    assert path.read_text() == "## Empty\n\n- e\n\n## Next\n\n- n\n"
    with pytest.raises(ValueError):
        append_to_section(path, "Empty", "- e\n")


# ------------------------------------------------------------------------------------ bench-data: same work
def test_bench_data_refuses_a_layout_open_clip_would_overrun():
    bench = _load_script("bench_data")
    bench.check_exact_fit(2048, 64, 2, 64)  # the defaults: 16 shards of 64 per worker = 16 full batches each
    bench.check_exact_fit(1920, 64, 2, 64)  # 15 shards and 15 full batches per worker
    for layout in ((2000, 100, 2, 64), (2000, 64, 2, 64), (2048, 64, 3, 64), (2048, 32, 2, 48)):
        with pytest.raises(SystemExit, match="open_clip would decode"):
            bench.check_exact_fit(*layout)
    with pytest.raises(RuntimeError, match="did not do the same work"):
        bench.check_counts("open_clip", 2048, 2130, 2000)
    bench.check_counts("cclm", 2048, 2048, 2048)


def _count_in_child(fn):
    fn()


def test_decode_count_sums_forked_workers():
    bench = _load_script("bench_data")
    count = bench.DecodeCount()
    counted = count.wrap(lambda: None)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_count_in_child, args=(counted,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    counted()
    assert count.total == 4


@pytest.mark.slow
def test_bench_data_pipelines_decode_what_they_deliver(tmp_path):
    """With 100-image shards open_clip decodes images it drops (and re-reads shards to fill its last batch); in
    the benchmark's layout both pipelines decode each image once, and the counters see it."""
    pytest.importorskip("open_clip_train")
    bench = _load_script("bench_data")
    from cclm.data.tokenize import train_tokenizer

    tokenizer = train_tokenizer([" ".join(bench.WORDS)] * 50, tmp_path / "tok", vocab_size=200)
    misfit = tmp_path / "misfit"  # 40 images per worker: one batch of 32, 8 decoded and dropped, 32 re-read
    bench.make_shards(misfit, 80, per_shard=40)
    _, samples, decoded = bench.bench_open_clip(misfit, 80, workers=2, batch_size=32)
    assert samples == 128 and decoded > samples  # the rounding the review found: more work than cclm's 80
    assert bench.bench_cclm(misfit, tokenizer, workers=2, batch_size=32)[1:] == (80, 80)
    exact = tmp_path / "exact"
    bench.make_shards(exact, 128, per_shard=32)
    bench.check_exact_fit(128, 32, 2, 32)
    assert bench.bench_open_clip(exact, 128, workers=2, batch_size=32)[1:] == (128, 128)
    assert bench.bench_cclm(exact, tokenizer, workers=2, batch_size=32)[1:] == (128, 128)
