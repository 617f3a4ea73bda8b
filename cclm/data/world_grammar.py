"""Per-language grammars of the synthetic world (:mod:`cclm.data.synthetic`).

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
    def colour_words(self, colour: str) -> tuple[str, ...]:
        """Every form of the colour word (for tests that check the caption names the drawn colour)."""
        ...


class English(Grammar):
    lang = "en"
    POS = {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "centre": "in the middle",
    }
    NUM = {1: "one", 2: "two", 3: "three"}

    def _np(self, colour, shape, size=None):
        return " ".join(w for w in ("a", size, colour, shape) if w)

    def single(self, size, colour, shape, position):
        return f"{self._np(colour, shape, size)} {self.POS[position]}"

    def count(self, n, colour, shape):
        return f"{self.NUM[n]} {colour} {shape}s"

    def relation(self, a, relation, b):
        link = "to the left of" if relation == "left_of" else "above"
        return f"{self._np(*a)} {link} {self._np(*b)}"

    def exists(self, n, colour, shape):
        return (
            f"there is {self._np(colour, shape)}" if n == 1 else f"there are {self.count(n, colour, shape)}"
        )

    def neutral(self, colour, shape):
        return f"the {colour} {shape} is made of wood"

    def colour_words(self, colour):
        return (colour,)


class German(Grammar):
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
    NUM = {2: "zwei", 3: "drei"}

    def _np(self, case, colour, shape, size=None):
        noun, _, gender = self.NOUN[shape]
        article, ending = self.INDEF[(case, gender)]
        adjectives = [self.SIZE[size] + ending] if size else []
        adjectives.append(self.COLOUR[colour] + ending)
        return " ".join([article, *adjectives, noun])

    def single(self, size, colour, shape, position):
        return f"{self._np('nom', colour, shape, size)} {self.POS[position]}"

    def count(self, n, colour, shape):
        return f"{self.NUM[n]} {self.COLOUR[colour]}e {self.NOUN[shape][1]}"  # strong plural: -e

    def relation(self, a, relation, b):
        link = "links von" if relation == "left_of" else "über"
        return f"{self._np('nom', *a)} {link} {self._np('dat', *b)}"

    def exists(self, n, colour, shape):
        return f"es gibt {self._np('acc', colour, shape) if n == 1 else self.count(n, colour, shape)}"

    def neutral(self, colour, shape):
        noun, _, gender = self.NOUN[shape]
        return f"{self.DEF_NOM[gender]} {self.COLOUR[colour]}e {noun} ist aus Holz"

    def colour_words(self, colour):
        return (self.COLOUR[colour],)


class French(Grammar):
    lang = "fr"
    # colour: (m sg, f sg, m pl, f pl)
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
    POS = {
        "left": "à gauche",
        "right": "à droite",
        "top": "en haut",
        "bottom": "en bas",
        "centre": "au centre",
    }
    NUM = {2: "deux", 3: "trois"}

    def _np(self, colour, shape, size=None):
        noun, _, gender = self.NOUN[shape]
        fem = gender == "f"
        words = ["une" if fem else "un"]
        if size:
            words.append(self.SIZE[size][fem])
        words += [noun, self.COLOUR[colour][fem]]
        return " ".join(words)

    def single(self, size, colour, shape, position):
        return f"{self._np(colour, shape, size)} {self.POS[position]}"

    def count(self, n, colour, shape):
        _, plural, gender = self.NOUN[shape]
        return f"{self.NUM[n]} {plural} {self.COLOUR[colour][2 + (gender == 'f')]}"

    def relation(self, a, relation, b):
        link = "à gauche" if relation == "left_of" else "au-dessus"
        return f"{self._np(*a)} {link} d'{self._np(*b)}"  # de + un(e) -> d'un(e)

    def exists(self, n, colour, shape):
        return f"il y a {self._np(colour, shape) if n == 1 else self.count(n, colour, shape)}"

    def neutral(self, colour, shape):
        noun, _, gender = self.NOUN[shape]
        article = "l'" if noun[0] in "aeiouéè" else ("la " if gender == "f" else "le ")
        return f"{article}{noun} {self.COLOUR[colour][gender == 'f']} est en bois"

    def colour_words(self, colour):
        return self.COLOUR[colour]


class Spanish(Grammar):
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
    POS = {
        "left": "a la izquierda",
        "right": "a la derecha",
        "top": "arriba",
        "bottom": "abajo",
        "centre": "en el centro",
    }
    NUM = {2: "dos", 3: "tres"}

    def _np(self, colour, shape, size=None):
        noun, _, gender = self.NOUN[shape]
        fem = gender == "f"
        words = ["una" if fem else "un", noun, self.COLOUR[colour][fem]]
        if size:
            words.append(self.SIZE[size][fem])
        return " ".join(words)

    def single(self, size, colour, shape, position):
        return f"{self._np(colour, shape, size)} {self.POS[position]}"

    def count(self, n, colour, shape):
        _, plural, gender = self.NOUN[shape]
        return f"{self.NUM[n]} {plural} {self.COLOUR[colour][2 + (gender == 'f')]}"

    def relation(self, a, relation, b):
        link = "a la izquierda de" if relation == "left_of" else "encima de"
        return f"{self._np(*a)} {link} {self._np(*b)}"

    def exists(self, n, colour, shape):
        return f"hay {self._np(colour, shape) if n == 1 else self.count(n, colour, shape)}"

    def neutral(self, colour, shape):
        noun, _, gender = self.NOUN[shape]
        fem = gender == "f"
        return f"{'la' if fem else 'el'} {noun} {self.COLOUR[colour][fem]} es de madera"

    def colour_words(self, colour):
        return self.COLOUR[colour]


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
