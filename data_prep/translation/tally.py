"""What a translation run counts, per output shard (kept in its progress record, so a resumed run still reports
the whole corpus) and in total."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cclm.data.skips import SkipCounter

# Per target language: source sentences to translate, translations written, translations that came out empty
# (not written), sources cut at --max-input-tokens, samples that already had a caption in the language (kept), and
# translations cut at their length cap before the model ended them (written: maybe half a sentence).
LANGUAGE_FIELDS = ("sentences", "translated", "empty_output", "truncated", "has_target", "capped_output")


@dataclass
class Tally:
    samples: int = 0  # samples written
    languages: Counter = field(default_factory=Counter)  # samples with text in each language (manifest)
    per_language: dict[str, Counter] = field(default_factory=dict)
    # (source, target) -> sentence pairs written (manifest ``language_pairs``, which lets a pretraining run refuse
    # a language filter that keeps no pair); None where a resumed shard's record predates the count.
    pairs: Counter | None = field(default_factory=Counter)
    skips: SkipCounter = field(default_factory=SkipCounter)
    # Where the rate-limited skip warnings are counted: a run passes one counter to every shard's tally, so that
    # the limit (and "N so far") holds across shards.
    warnings: SkipCounter = field(default_factory=lambda: SkipCounter(where="cclm prep translate"))

    def count(self, lang: str, what: str, n: int = 1) -> None:
        self.per_language.setdefault(lang, Counter())[what] += n

    def skip(self, reason: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` inputs not translated (kept unchanged, or lost when the input was damaged), with a
        rate-limited warning when there is a ``detail``."""
        self.skips.add(reason, n=n, warn=False)
        if detail:
            self.warnings.add(reason, detail, n)

    def add(self, other: Tally) -> None:
        self.samples += other.samples
        self.languages.update(other.languages)
        for lang, counts in other.per_language.items():
            self.per_language.setdefault(lang, Counter()).update(counts)
        for reason, n in other.skips.counts.items():
            self.skips.add(reason, n=n, warn=False)
        if self.pairs is None or other.pairs is None:
            self.pairs = None
        else:
            self.pairs.update(other.pairs)

    def pair_counts(self) -> dict[str, dict[str, int]] | None:
        """``{source: {target: n}}``, the shape of a manifest's ``language_pairs``; None where unknown."""
        if self.pairs is None:
            return None
        nested: dict[str, dict[str, int]] = {}
        for (src, tgt), n in sorted(self.pairs.items()):
            nested.setdefault(src, {})[tgt] = int(n)
        return nested

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "languages": dict(sorted(self.languages.items())),
            "per_language": {
                lang: {f: int(counts[f]) for f in LANGUAGE_FIELDS}
                for lang, counts in sorted(self.per_language.items())
            },
            "skipped": self.skips.as_dict(),
            **({"language_pairs": pairs} if (pairs := self.pair_counts()) is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Tally:
        tally = cls(samples=int(data["samples"]), languages=Counter(data["languages"]))
        tally.per_language = {lang: Counter(counts) for lang, counts in data["per_language"].items()}
        pairs = data.get("language_pairs")
        tally.pairs = (
            None
            if not isinstance(pairs, dict)
            else Counter({(src, tgt): int(n) for src, targets in pairs.items() for tgt, n in targets.items()})
        )
        for reason, n in data["skipped"].items():
            tally.skips.add(reason, n=n, warn=False)
        return tally

    def lines(self) -> list[str]:
        out = []
        for lang, c in sorted(self.per_language.items()):
            out.append(
                f"  {lang}: {c['sentences']} sentences, {c['translated']} translated, {c['empty_output']} empty "
                f"outputs, {c['truncated']} truncated sources, {c['has_target']} samples already had {lang} (kept), "
                f"{c['capped_output']} outputs cut at the length cap"
            )
        skipped = ", ".join(f"{r}={n}" for r, n in self.skips.as_dict().items()) or "none"
        out.append(f"  skipped: {skipped}")
        return out

    def capped_outputs(self) -> dict[str, int]:
        """Per target language, the translations cut at their length cap (where there are any)."""
        return {
            lang: int(c["capped_output"])
            for lang, c in sorted(self.per_language.items())
            if c["capped_output"]
        }
