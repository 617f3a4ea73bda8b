"""cclm language codes (ISO 639-1, or 639-3 where there is no two-letter code; ``cclm.data.languages``) mapped
to the codes each translation-model family uses:

* NLLB-200: FLORES-200 codes, ISO 639-3 + script (``de`` -> ``deu_Latn``, ``zh-Hant`` -> ``zho_Hant``); a
  macrolanguage maps to the individual language NLLB was trained on (``ar`` -> ``arb_Arab``, ``fa`` -> ``pes_Arab``);
* M2M100: the two-letter code itself (``de``), chosen through the ``__de__`` token as ``forced_bos_token_id``;
* Marian (OPUS-MT): one model per language pair (``opus-mt-en-de``); a multi-target model
  (``opus-mt-en-ROMANCE``) picks its target with a ``>>fra<<`` / ``>>fr<<`` token in front of the source, which
  may name the macrolanguage where NLLB names an individual language (``>>ara<<``) or the other way round
  (Mandarin ``>>cmn_Hans<<`` for Chinese).

Every function checks the code against what the model can actually produce and raises
:class:`UnsupportedLanguage` naming the model and what it supports.
"""

from __future__ import annotations

import re

from cclm.data.languages import base_language, normalize_language
from cclm.errors import UserError

# cclm base code -> FLORES-200 code NLLB-200 uses by default (a script subtag picks another script).
NLLB_CODES = dict(
    item.split(":")
    for item in """ace:ace_Latn af:afr_Latn ak:aka_Latn am:amh_Ethi ar:arb_Arab as:asm_Beng ast:ast_Latn
    ay:ayr_Latn az:azj_Latn ba:bak_Cyrl ban:ban_Latn be:bel_Cyrl bho:bho_Deva bg:bul_Cyrl bm:bam_Latn bn:ben_Beng
    bo:bod_Tibt bs:bos_Latn ca:cat_Latn ceb:ceb_Latn ckb:ckb_Arab crh:crh_Latn cs:ces_Latn cy:cym_Latn da:dan_Latn
    de:deu_Latn dz:dzo_Tibt ee:ewe_Latn el:ell_Grek en:eng_Latn eo:epo_Latn es:spa_Latn et:est_Latn eu:eus_Latn
    fa:pes_Arab ff:fuv_Latn fi:fin_Latn fil:tgl_Latn fj:fij_Latn fo:fao_Latn fr:fra_Latn fur:fur_Latn ga:gle_Latn
    gd:gla_Latn gl:glg_Latn gn:grn_Latn gu:guj_Gujr ha:hau_Latn he:heb_Hebr hi:hin_Deva hne:hne_Deva hr:hrv_Latn
    ht:hat_Latn hu:hun_Latn hy:hye_Armn id:ind_Latn ig:ibo_Latn ilo:ilo_Latn is:isl_Latn it:ita_Latn ja:jpn_Jpan
    jv:jav_Latn ka:kat_Geor kab:kab_Latn kg:kon_Latn ki:kik_Latn kk:kaz_Cyrl km:khm_Khmr kn:kan_Knda ko:kor_Hang
    kr:knc_Latn ks:kas_Arab ku:kmr_Latn ky:kir_Cyrl lb:ltz_Latn lg:lug_Latn li:lim_Latn lij:lij_Latn lmo:lmo_Latn
    ln:lin_Latn lo:lao_Laoo lt:lit_Latn ltg:ltg_Latn lv:lvs_Latn mag:mag_Deva mai:mai_Deva mg:plt_Latn mi:mri_Latn
    min:min_Latn mk:mkd_Cyrl ml:mal_Mlym mn:khk_Cyrl mni:mni_Beng mr:mar_Deva ms:zsm_Latn mt:mlt_Latn my:mya_Mymr
    nb:nob_Latn ne:npi_Deva nl:nld_Latn nn:nno_Latn no:nob_Latn nso:nso_Latn ny:nya_Latn oc:oci_Latn om:gaz_Latn
    or:ory_Orya pa:pan_Guru pag:pag_Latn pap:pap_Latn pl:pol_Latn ps:pbt_Arab pt:por_Latn qu:quy_Latn rn:run_Latn
    ro:ron_Latn ru:rus_Cyrl rw:kin_Latn sa:san_Deva sc:srd_Latn scn:scn_Latn sd:snd_Arab sg:sag_Latn shn:shn_Mymr
    si:sin_Sinh sk:slk_Latn sl:slv_Latn sm:smo_Latn sn:sna_Latn so:som_Latn sq:als_Latn sr:srp_Cyrl ss:ssw_Latn
    st:sot_Latn su:sun_Latn sv:swe_Latn sw:swh_Latn szl:szl_Latn ta:tam_Taml te:tel_Telu tg:tgk_Cyrl th:tha_Thai
    ti:tir_Ethi tk:tuk_Latn tl:tgl_Latn tn:tsn_Latn tpi:tpi_Latn tr:tur_Latn ts:tso_Latn tt:tat_Cyrl tum:tum_Latn
    tw:twi_Latn ug:uig_Arab uk:ukr_Cyrl ur:urd_Arab uz:uzn_Latn vec:vec_Latn vi:vie_Latn war:war_Latn wo:wol_Latn
    xh:xho_Latn yi:ydd_Hebr yo:yor_Latn yue:yue_Hant zh:zho_Hans zsm:zsm_Latn zu:zul_Latn""".split()
)
# cclm base code -> the other ISO 639-3 codes of the language, which OPUS-MT uses where NLLB does not: the
# macrolanguage where NLLB has an individual language (ar: ara for arb), and Mandarin for Chinese.
OTHER_ISO_CODES = dict(
    item.split(":")
    for item in """ar:ara ay:aym az:aze fa:fas ff:ful kr:kau ku:kur lv:lav mg:mlg mn:mon ms:msa ne:nep no:nor
    om:orm or:ori ps:pus qu:que sq:sqi sw:swa uz:uzb yi:yid zh:cmn""".split()
)
# Chinese regions written in Traditional characters.
_HANT_REGIONS = {"TW", "HK", "MO"}
_MARIAN_NAME = re.compile(r"opus-mt-(?:tc-(?:big|base)-)?([A-Za-z_]+)-([A-Za-z_]+)$")


class UnsupportedLanguage(UserError):
    """A language the model cannot read or write (or a code cclm does not know)."""


def cclm_code(code: str, what: str = "language") -> str:
    """The normalised cclm code, or a clear error for a code that is no language."""
    normalized = normalize_language(code)
    if normalized is None:
        raise UnsupportedLanguage(
            f"{what} {code!r} is not an ISO 639-1/639-3 language code (e.g. de, zh-Hant)"
        )
    return normalized


def _subtags(code: str) -> list[str]:
    return code.split("-")[1:]


def _script(code: str) -> str | None:
    """The script a code asks for: its script subtag (``zh-Hant``, ``ks-Deva``), or Traditional characters for a
    Chinese region that writes them (``zh-TW``); None for the language's usual one."""
    scripts = [s for s in _subtags(code) if len(s) == 4]
    if not scripts and base_language(code) == "zh" and any(s in _HANT_REGIONS for s in _subtags(code)):
        return "Hant"
    return scripts[0] if scripts else None


def nllb_code(code: str, supported: set[str], model: str) -> str:
    """``de`` -> ``deu_Latn``; a script subtag picks the script (``zh-Hant``, ``ks-Deva``), as does a Chinese
    region written in Traditional characters (``zh-TW``)."""
    base = base_language(code)
    default = NLLB_CODES.get(base)
    if default is None:
        raise UnsupportedLanguage(f"{code!r}: NLLB-200 has no such language (model {model})")
    script = _script(code)
    chosen = f"{default[:3]}_{script}" if script else default
    if chosen not in supported:
        near = sorted(c for c in supported if c.startswith(default[:3]))
        raise UnsupportedLanguage(
            f"{code!r} (NLLB code {chosen}) is not a language of model {model}"
            + (f"; it has {', '.join(near)}" if near else "")
        )
    return chosen


def m2m100_code(code: str, supported: set[str], model: str) -> str:
    """``de`` -> ``de`` (M2M100 has one code per language, no scripts or regions)."""
    base = base_language(code)
    if base not in supported:
        raise UnsupportedLanguage(
            f"{code!r} is not a language of M2M100 model {model} (it has {len(supported)}: "
            f"{', '.join(sorted(supported)[:12])}, ...)"
        )
    if _subtags(code):
        raise UnsupportedLanguage(
            f"{code!r}: M2M100 model {model} has one code per language ({base!r}); ask for {base!r}"
        )
    return base


def marian_pair(name: str, source_lang: str | None, target_lang: str | None) -> tuple[str | None, str | None]:
    """The (source, target) a Marian model translates: from its tokenizer config's ``source_lang`` /
    ``target_lang`` where set, else from an OPUS-MT name (``opus-mt-en-de``, ``opus-mt-tc-big-en-fr``); a side
    that is no single language (``mul``, ``ROMANCE``) is None."""
    match = _MARIAN_NAME.search(name.rstrip("/"))
    from_name = match.groups() if match else (None, None)
    from_config = (source_lang, target_lang)
    return tuple(_language(c) or _language(n) for c, n in zip(from_config, from_name))  # type: ignore[return-value]


def _language(code: str | None) -> str | None:
    """A cclm code from an ISO 639-1 or 639-3 code (``deu`` -> ``de``, as newer OPUS-MT configs write them)."""
    if not code:
        return None
    lower = code.lower()
    return (
        normalize_language(code)
        or next((k for k, v in NLLB_CODES.items() if v[:3] == lower), None)
        or next((k for k, v in OTHER_ISO_CODES.items() if v == lower), None)
    )


def marian_target_token(code: str, supported_tokens: list[str], model: str) -> str:
    """The ``>>xx<<`` token that makes a multi-target Marian model write ``code``: the code itself, or the
    language's ISO 639-1 / NLLB / other ISO 639-3 code (``>>deu<<``, ``>>ara<<``, ``>>cmn<<``), each first with
    the script (the one asked for, else NLLB's: ``>>cmn_Hans<<``, ``>>cmn_Hant<<`` for ``zh-TW``); never a
    token of another script."""
    base = base_language(code)
    nllb = NLLB_CODES.get(base, "")
    languages = [c for c in dict.fromkeys([base, nllb[:3], OTHER_ISO_CODES.get(base)]) if c]
    script = _script(code) or nllb[4:]
    candidates = [code.replace("-", "_"), *(f"{c}_{script}" for c in languages if script), *languages]
    for candidate in candidates:
        if f">>{candidate}<<" in supported_tokens:
            return f">>{candidate}<<"
    raise UnsupportedLanguage(
        f"{code!r} is not a target of Marian model {model} (its targets: "
        f"{', '.join(t.strip('<>') for t in supported_tokens[:20])}{', ...' if len(supported_tokens) > 20 else ''})"
    )
