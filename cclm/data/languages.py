"""Language codes: what counts as a known language, and how codes are normalised.

Codes are ISO 639-1 (two letters) or ISO 639-3 (three letters, for languages without a two-letter code), with an
optional region or script subtag (``pt-BR``, ``zh-Hans``, ``zh_TW``) that is kept in the normalised form but not
needed to recognise the language. Anything else (``xx``, ``english``, an empty string) is unknown: samples whose
only captions carry an unknown code are skipped and counted as ``unknown_language``.
"""

from __future__ import annotations

ISO_639_1 = frozenset(
    """aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz
    ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is
    it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt
    my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm
    sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh
    zu""".split()
)
# Three-letter codes of languages common in multilingual corpora (OPUS, WikiMatrix, FLORES) that have no
# two-letter code.
ISO_639_3_EXTRA = frozenset(
    """ace ast bal ban bho ceb ckb crh fil fur hak haw hsb hne ilo kab kbd lij lmo ltg mag mai min mni mzn nap
    nds nso pag pam pap pcm scn shn szl tpi tum vec war wuu yue zsm""".split()
)


def normalize_language(code: str) -> str | None:
    """``"EN"`` -> ``"en"``, ``"pt_BR"`` -> ``"pt-BR"``; ``None`` when the base code is not a known language."""
    if not isinstance(code, str):
        return None
    parts = code.strip().replace("_", "-").split("-")
    base = parts[0].lower()
    if base not in ISO_639_1 and base not in ISO_639_3_EXTRA:
        return None
    rest = [p.title() if len(p) == 4 else p.upper() for p in parts[1:] if p]
    return "-".join([base, *rest])


def base_language(code: str) -> str:
    """``"zh-Hans"`` -> ``"zh"``."""
    return code.split("-", 1)[0].lower()


def language_allowed(code: str, allowed: set[str] | frozenset[str]) -> bool:
    """Empty ``allowed`` = every language; otherwise the full code or its base code must be listed."""
    return not allowed or code in allowed or base_language(code) in allowed
