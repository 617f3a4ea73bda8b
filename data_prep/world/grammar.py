"""Per-language grammars of the synthetic world (:mod:`data_prep.world`).

Every language renders the same five sentence types from the same scene facts:

* ``single``   one object with size, colour, shape and position ("a big red circle on the left");
* ``count``    two or three identical objects ("two red circles");
* ``relation`` object A left of / above object B ("a red circle to the left of a blue square");
* ``exists``   "there is a red circle" / "there are two red circles" (entailment/contradiction hypotheses);
* ``neutral``  "the red circle is made of wood" (not decidable from the picture: neutral hypotheses).

Word order and agreement follow each language: German adjective declension by gender and case after the
indefinite article (nominative/accusative/dative, "links von einem blauen Quadrat"), French and Spanish gender and
number agreement with post-nominal colours (French size adjectives before the noun, Spanish after the colour),
elision ("d'un", "l'étoile"), Japanese postpositions with the located object last ("青い四角の左に赤い丸") and
Chinese classifiers ("两个红色的圆形").

English, German, French and Spanish share their sentence frames (:class:`ArticleGrammar`: a noun phrase with an
indefinite article, the position after it, "there is" before it); French and Spanish also share their agreement
rules (:class:`RomanceGrammar`). Each language class holds only its words and what is its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

COLOURS = ("red", "green", "blue", "yellow", "purple", "black")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("big", "small")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left_of", "above")
COUNTS = (2, 3)


class Grammar(ABC):
    lang = ""

    @abstractmethod
    def single(self, size: str, colour: str, shape: str, position: str) -> str: ...

    @abstractmethod
    def count(self, n: int, colour: str, shape: str) -> str: ...

    @abstractmethod
    def relation(self, a: tuple[str, str], relation: str, b: tuple[str, str]) -> str:
        """``a``/``b`` are (colour, shape)."""
        ...

    @abstractmethod
    def exists(self, n: int, colour: str, shape: str) -> str: ...

    @abstractmethod
    def neutral(self, colour: str, shape: str) -> str: ...

    @abstractmethod
    def thing(self, colour: str, shape: str, size: str | None = None) -> str:
        """One object on its own, as a region description ("a big red circle", "大きい赤い丸")."""
        ...

    @abstractmethod
    def colour_words(self, colour: str) -> tuple[str, ...]:
        """Every form of the colour word (for tests that check the caption names the drawn colour)."""
        ...


def join_words(*words: str) -> str:
    """The non-empty ``words`` separated by spaces, except after an elided word ("d'", "l'"), which is written
    together with the next one."""
    text = ""
    for word in filter(None, words):
        text += word if not text or text.endswith("'") else f" {word}"
    return text


class ArticleGrammar(Grammar):
    """Sentence frames of the languages with an indefinite article: "<NP> <position>", "<NP> <link> <NP>",
    "<there is> <NP | count>"."""

    POS: dict[str, str]  # position -> the words after the noun phrase
    LINK: dict[str, str]  # relation -> the words between the two noun phrases
    THERE_IS: str

    @abstractmethod
    def _np(self, colour: str, shape: str, size: str | None = None, case: str = "nom") -> str:
        """An indefinite noun phrase; ``case`` (nom, acc, dat) matters only where noun phrases decline (German)."""
        ...

    def single(self, size, colour, shape, position):
        return join_words(self._np(colour, shape, size), self.POS[position])

    def relation(self, a, relation, b):
        return join_words(self._np(*a), self.LINK[relation], self._np(*b, case="dat"))

    def thing(self, colour, shape, size=None):
        return self._np(colour, shape, size)

    def exists(self, n, colour, shape):
        thing = self._np(colour, shape, case="acc") if n == 1 else self.count(n, colour, shape)
        return join_words(self.THERE_IS, thing)


class English(ArticleGrammar):
    lang = "en"
    POS = {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "centre": "in the middle",
    }
    LINK = {"left_of": "to the left of", "above": "above"}
    NUM = {1: "one", 2: "two", 3: "three"}

    def _np(self, colour, shape, size=None, case="nom"):
        return join_words("a", size, colour, shape)

    def count(self, n, colour, shape):
        return f"{self.NUM[n]} {colour} {shape}s"

    def exists(self, n, colour, shape):  # the verb agrees in number
        return (
            f"there is {self._np(colour, shape)}" if n == 1 else f"there are {self.count(n, colour, shape)}"
        )

    def neutral(self, colour, shape):
        return f"the {colour} {shape} is made of wood"

    def colour_words(self, colour):
        return (colour,)


class German(ArticleGrammar):
    lang = "de"
    COLOUR = {
        "red": "rot",
        "green": "grün",
        "blue": "blau",
        "yellow": "gelb",
        "purple": "violett",
        "black": "schwarz",
    }
    SIZE = {"big": "groß", "small": "klein"}
    NOUN = {
        "circle": ("Kreis", "Kreise", "m"),
        "square": ("Quadrat", "Quadrate", "n"),
        "triangle": ("Dreieck", "Dreiecke", "n"),
        "star": ("Stern", "Sterne", "m"),
    }
    # Mixed declension after ein/eine: (article, adjective ending) by case and gender.
    INDEF = {
        ("nom", "m"): ("ein", "er"),
        ("nom", "n"): ("ein", "es"),
        ("nom", "f"): ("eine", "e"),
        ("acc", "m"): ("einen", "en"),
        ("acc", "n"): ("ein", "es"),
        ("acc", "f"): ("eine", "e"),
        ("dat", "m"): ("einem", "en"),
        ("dat", "n"): ("einem", "en"),
        ("dat", "f"): ("einer", "en"),
    }
    DEF_NOM = {"m": "der", "n": "das", "f": "die"}
    POS = {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "centre": "in der Mitte"}
    LINK = {"left_of": "links von", "above": "über"}
    THERE_IS = "es gibt"
    NUM = {2: "zwei", 3: "drei"}

    def _np(self, colour, shape, size=None, case="nom"):
        noun, _, gender = self.NOUN[shape]
        article, ending = self.INDEF[(case, gender)]
        adjectives = [self.SIZE[size] + ending] if size else []
        adjectives.append(self.COLOUR[colour] + ending)
        return " ".join([article, *adjectives, noun])

    def count(self, n, colour, shape):
        return f"{self.NUM[n]} {self.COLOUR[colour]}e {self.NOUN[shape][1]}"  # strong plural: -e

    def neutral(self, colour, shape):
        noun, _, gender = self.NOUN[shape]
        return f"{self.DEF_NOM[gender]} {self.COLOUR[colour]}e {noun} ist aus Holz"

    def colour_words(self, colour):
        return (self.COLOUR[colour],)


class RomanceGrammar(ArticleGrammar):
    """French and Spanish: articles and adjectives agree with the noun in gender and number; the colour follows
    the noun."""

    COLOUR: dict[str, tuple[str, str, str, str]]  # masculine, feminine singular; masculine, feminine plural
    SIZE: dict[str, tuple[str, str]]  # masculine, feminine
    NOUN: dict[str, tuple[str, str, str]]  # singular, plural, gender
    ARTICLE: tuple[str, str]  # indefinite: masculine, feminine
    SIZE_BEFORE_NOUN: bool
    NUM: dict[int, str]
    WOODEN: str  # the predicate of the neutral hypothesis

    @abstractmethod
    def _definite(self, noun: str, feminine: bool) -> str: ...

    def _np(self, colour, shape, size=None, case="nom"):
        noun, _, gender = self.NOUN[shape]
        fem = gender == "f"
        size_word = self.SIZE[size][fem] if size else None
        colour_word = self.COLOUR[colour][fem]
        if self.SIZE_BEFORE_NOUN:
            return join_words(self.ARTICLE[fem], size_word, noun, colour_word)
        return join_words(self.ARTICLE[fem], noun, colour_word, size_word)

    def count(self, n, colour, shape):
        _, plural, gender = self.NOUN[shape]
        return f"{self.NUM[n]} {plural} {self.COLOUR[colour][2 + (gender == 'f')]}"

    def neutral(self, colour, shape):
        noun, _, gender = self.NOUN[shape]
        fem = gender == "f"
        return join_words(self._definite(noun, fem), noun, self.COLOUR[colour][fem], self.WOODEN)

    def colour_words(self, colour):
        return self.COLOUR[colour]


class French(RomanceGrammar):
    lang = "fr"
    COLOUR = {
        "red": ("rouge", "rouge", "rouges", "rouges"),
        "green": ("vert", "verte", "verts", "vertes"),
        "blue": ("bleu", "bleue", "bleus", "bleues"),
        "yellow": ("jaune", "jaune", "jaunes", "jaunes"),
        "purple": ("violet", "violette", "violets", "violettes"),
        "black": ("noir", "noire", "noirs", "noires"),
    }
    SIZE = {"big": ("grand", "grande"), "small": ("petit", "petite")}
    NOUN = {
        "circle": ("cercle", "cercles", "m"),
        "square": ("carré", "carrés", "m"),
        "triangle": ("triangle", "triangles", "m"),
        "star": ("étoile", "étoiles", "f"),
    }
    ARTICLE = ("un", "une")
    SIZE_BEFORE_NOUN = True
    POS = {
        "left": "à gauche",
        "right": "à droite",
        "top": "en haut",
        "bottom": "en bas",
        "centre": "au centre",
    }
    LINK = {"left_of": "à gauche d'", "above": "au-dessus d'"}  # de + un(e) -> d'un(e)
    THERE_IS = "il y a"
    NUM = {2: "deux", 3: "trois"}
    WOODEN = "est en bois"

    def _definite(self, noun, feminine):
        return "l'" if noun[0] in "aeiouéè" else ("la" if feminine else "le")


class Spanish(RomanceGrammar):
    lang = "es"
    COLOUR = {
        "red": ("rojo", "roja", "rojos", "rojas"),
        "green": ("verde", "verde", "verdes", "verdes"),
        "blue": ("azul", "azul", "azules", "azules"),
        "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
        "purple": ("morado", "morada", "morados", "moradas"),
        "black": ("negro", "negra", "negros", "negras"),
    }
    SIZE = {"big": ("grande", "grande"), "small": ("pequeño", "pequeña")}
    NOUN = {
        "circle": ("círculo", "círculos", "m"),
        "square": ("cuadrado", "cuadrados", "m"),
        "triangle": ("triángulo", "triángulos", "m"),
        "star": ("estrella", "estrellas", "f"),
    }
    ARTICLE = ("un", "una")
    SIZE_BEFORE_NOUN = False
    POS = {
        "left": "a la izquierda",
        "right": "a la derecha",
        "top": "arriba",
        "bottom": "abajo",
        "centre": "en el centro",
    }
    LINK = {"left_of": "a la izquierda de", "above": "encima de"}
    THERE_IS = "hay"
    NUM = {2: "dos", 3: "tres"}
    WOODEN = "es de madera"

    def _definite(self, noun, feminine):
        return "la" if feminine else "el"


class Japanese(Grammar):
    lang = "ja"
    COLOUR = {
        "red": "赤い",
        "green": "緑の",
        "blue": "青い",
        "yellow": "黄色い",
        "purple": "紫の",
        "black": "黒い",
    }
    SIZE = {"big": "大きい", "small": "小さい"}
    NOUN = {"circle": "丸", "square": "四角", "triangle": "三角", "star": "星"}
    POS = {"left": "左", "right": "右", "top": "上", "bottom": "下", "centre": "真ん中"}
    NUM = {2: "二つ", 3: "三つ"}

    def _np(self, colour, shape, size=None):
        return f"{self.SIZE[size] if size else ''}{self.COLOUR[colour]}{self.NOUN[shape]}"

    def single(self, size, colour, shape, position):
        return f"{self.POS[position]}に{self._np(colour, shape, size)}"

    def thing(self, colour, shape, size=None):
        return self._np(colour, shape, size)

    def count(self, n, colour, shape):
        return f"{self._np(colour, shape)}が{self.NUM[n]}"

    def relation(self, a, relation, b):
        return f"{self._np(*b)}の{'左' if relation == 'left_of' else '上'}に{self._np(*a)}"

    def exists(self, n, colour, shape):
        return f"{self._np(colour, shape)}がある" if n == 1 else f"{self.count(n, colour, shape)}ある"

    def neutral(self, colour, shape):
        return f"{self._np(colour, shape)}は木でできている"

    def colour_words(self, colour):
        return (self.COLOUR[colour].rstrip("いの"),)


class Chinese(Grammar):
    lang = "zh"
    COLOUR = {
        "red": "红色",
        "green": "绿色",
        "blue": "蓝色",
        "yellow": "黄色",
        "purple": "紫色",
        "black": "黑色",
    }
    SIZE = {"big": "大", "small": "小"}
    NOUN = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
    POS = {"left": "左边", "right": "右边", "top": "上面", "bottom": "下面", "centre": "中间"}
    NUM = {1: "一", 2: "两", 3: "三"}

    def single(self, size, colour, shape, position):
        return f"{self.POS[position]}有一个{self.SIZE[size]}的{self.COLOUR[colour]}{self.NOUN[shape]}"

    def count(self, n, colour, shape):
        return f"{self.NUM[n]}个{self.COLOUR[colour]}的{self.NOUN[shape]}"

    def thing(self, colour, shape, size=None):  # as in `single`, and `count` without a size
        if size:
            return f"一个{self.SIZE[size]}的{self.COLOUR[colour]}{self.NOUN[shape]}"
        return f"一个{self.COLOUR[colour]}的{self.NOUN[shape]}"

    def relation(self, a, relation, b):
        side = "左边" if relation == "left_of" else "上面"
        (ca, sa), (cb, sb) = a, b
        return f"{self.COLOUR[cb]}{self.NOUN[sb]}的{side}有一个{self.COLOUR[ca]}{self.NOUN[sa]}"

    def exists(self, n, colour, shape):
        return f"有{self.NUM[n]}个{self.COLOUR[colour]}的{self.NOUN[shape]}"

    def neutral(self, colour, shape):
        return f"{self.COLOUR[colour]}{self.NOUN[shape]}是木头做的"

    def colour_words(self, colour):
        return (self.COLOUR[colour],)


GRAMMARS: dict[str, Grammar] = {
    g.lang: g for g in (English(), German(), French(), Spanish(), Japanese(), Chinese())
}


def grammar(lang: str) -> Grammar:
    if lang not in GRAMMARS:
        raise ValueError(
            f"the synthetic world has no grammar for language {lang!r} (have {sorted(GRAMMARS)})"
        )
    return GRAMMARS[lang]
