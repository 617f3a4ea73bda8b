"""What task loaders return: classification examples (one or two images + a text + a label) and retrieval sets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace

from cclm.tasks.images import ImageRef

# The label of an example whose gold answer is none of the task's classes (an XVNLI record labelled "-", an
# xGQA answer outside the answer vocabulary): no prediction equals it, so it is scored as wrong and stays in
# the denominator, as IGLUE scores such examples. Training leaves it out (without_no_gold_class).
NO_GOLD_CLASS = -1


@dataclass(frozen=True)
class ClassificationExample:
    uid: str
    text: str
    images: tuple[ImageRef, ...]  # one image (XVNLI, xGQA) or (left, right) (MaRVL, NLVR2)
    label: int
    language: str


@dataclass
class ClassificationData:
    file: str
    examples: list[ClassificationExample]
    records: int  # annotation records read (lines; xGQA questions), including skipped ones
    image_refs: set[ImageRef]  # every image the file references
    languages: set[str]
    skipped: Counter = field(default_factory=Counter)  # reason -> records left out (e.g. no gold label)
    # records kept but not made examples: xGQA read without an answer vocabulary (inspect, image checks)
    not_built: int = 0
    # reason -> examples kept with the label NO_GOLD_CLASS (scored as wrong)
    no_gold_class: Counter = field(default_factory=Counter)

    @property
    def used_image_refs(self) -> set[ImageRef]:
        """Images of the examples kept (what training or evaluation will open)."""
        return {ref for example in self.examples for ref in example.images}

    @property
    def usable(self) -> int:
        """Examples a run can train or score on: those with a gold class (a file of ``NO_GOLD_CLASS`` examples
        alone has nothing to score but wrong answers)."""
        return sum(example.label != NO_GOLD_CLASS for example in self.examples) + self.not_built

    def without_no_gold_class(self) -> ClassificationData:
        """The data with its ``NO_GOLD_CLASS`` examples left out and counted as skipped: for training, which
        has no class to teach them, and for scoring as the CCLM reference (``data.no_gold_label=drop``)."""
        if not self.no_gold_class:
            return self
        kept = [example for example in self.examples if example.label != NO_GOLD_CLASS]
        return replace(
            self, examples=kept, skipped=self.skipped + self.no_gold_class, no_gold_class=Counter()
        )

    def truncated(self, max_examples: int) -> ClassificationData:
        """The first ``max_examples`` examples (all when 0)."""
        if max_examples <= 0 or max_examples >= len(self.examples):
            return self
        return replace(self, examples=self.examples[:max_examples])


@dataclass
class RetrievalData:
    """Images and captions of a retrieval file: ``text_image[j]`` is the index of caption j's image."""

    file: str
    images: list[ImageRef]
    image_ids: list[str | int]
    texts: list[str]
    text_image: list[int]
    languages: set[str]

    @property
    def records(self) -> int:  # annotation records = captions
        return len(self.texts)

    @property
    def image_refs(self) -> set[ImageRef]:
        return set(self.images)

    @property
    def used_image_refs(self) -> set[ImageRef]:
        return set(self.images)

    @property
    def skipped(self) -> Counter:
        return Counter()

    @property
    def usable(self) -> int:
        """Captions a run can train or score on (an image without one cannot be ranked)."""
        return len(self.texts) if self.images else 0

    def grouped(self, keys: Sequence[Hashable]) -> RetrievalData:
        """The data with the images of equal ``keys[i]`` made one image holding all their captions: the first
        one's reference and id, images in order of first appearance, captions in their own order (``self`` when
        no two keys are equal). What makes two entries one image is the caller's: IGLUE's key or the image."""
        if len(keys) != len(self.images):
            raise ValueError(f"{self.file}: {len(keys)} keys for {len(self.images)} images")
        first: dict[Hashable, int] = {}
        kept: list[int] = []
        new_index: list[int] = []
        for i, key in enumerate(keys):
            if key not in first:
                first[key] = len(kept)
                kept.append(i)
            new_index.append(first[key])
        if len(kept) == len(self.images):
            return self
        return RetrievalData(
            self.file,
            [self.images[i] for i in kept],
            [self.image_ids[i] for i in kept],
            list(self.texts),
            [new_index[i] for i in self.text_image],
            set(self.languages),
        )

    def truncated(self, max_images: int) -> RetrievalData:
        """The first ``max_images`` images and their captions (smoke runs)."""
        if max_images <= 0 or max_images >= len(self.images):
            return self
        keep = [j for j, i in enumerate(self.text_image) if i < max_images]
        return RetrievalData(
            self.file,
            self.images[:max_images],
            self.image_ids[:max_images],
            [self.texts[j] for j in keep],
            [self.text_image[j] for j in keep],
            self.languages,
        )


def no_usable_example(data: ClassificationData | RetrievalData) -> str:
    """Why ``data`` holds nothing to train or score on: its records and what was skipped of them (examples
    without a gold class among them)."""
    left_out = data.skipped + getattr(data, "no_gold_class", Counter())
    skipped = ", ".join(f"{count} {reason}" for reason, count in left_out.items())
    return f"no usable example ({data.records} record(s) read" + (
        f"; skipped: {skipped})" if skipped else ")"
    )
