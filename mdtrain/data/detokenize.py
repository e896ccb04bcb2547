"""Per-dataset detokenisers of the zero-shot perplexity suite (MDLM, SEDD and BD3-LM all apply the same ones).

PTB, WikiText and LM1B are distributed pre-tokenised ("don 't", "3 @.@ 5", "( a )"); before re-tokenising them with
a subword tokenizer, the papers undo that tokenisation with the rules below (MDLM's dataloader, Sahoo et al. 2024,
App. C), so that zero-shot perplexities are comparable with GPT-2's. ``mdtrain prepare --detokenize NAME`` applies
one to every document before tokenisation. The rules are the papers', quirks included (see ``wikitext``).

| set                                | --detokenize       | split the papers score |
|------------------------------------|--------------------|------------------------|
| Penn Treebank (ptb_text_only)      | ptb                | validation             |
| WikiText-2 / WikiText-103 (raw v1) | wikitext           | validation             |
| LM1B                               | lm1b               | test                   |
| LAMBADA (OpenAI's lambada_test)    | lambada            | test (the whole file)  |
| AG News                            | none               | test                   |
| PubMed / ArXiv (scientific_papers) | scientific_papers  | validation (`article`) |
| OpenWebText                        | none               | (last 100k documents)  |
"""
from __future__ import annotations

import re
from typing import Callable

from mdtrain.data.errors import DataError


class _Rules:
    """An ordered list of literal replacements and regular-expression substitutions, applied in turn."""

    def __init__(self, *steps):
        self.steps = [(re.compile(a), b, True) if kind == "re" else (a, b, False) for kind, a, b in steps]

    def __call__(self, text: str) -> str:
        for a, b, is_re in self.steps:
            text = a.sub(b, text) if is_re else text.replace(a, b)
        return text


def _lit(a: str, b: str):
    return ("lit", a, b)


def _re(a: str, b: str):
    return ("re", a, b)


def _bracket(open_: str, close: str) -> tuple:
    """``( inner )`` -> ``(inner)``: spaces inside one pair of brackets (or quotes) dropped, shortest match."""
    o, c = re.escape(open_), re.escape(close)
    return _re(o + r"\s*([^" + c + r"]*?)\s*" + c, open_.replace("\\", r"\\") + r"\1" + close)


wikitext = _Rules(
    _lit("s '", "s'"),
    # The papers' code escapes this pattern as a regex over the literal text "/' 0/" .. "/' 9/" and writes the
    # literal "/'[0-9]/" in its place; it (almost) never matches real text, but it is part of their preprocessing.
    _re(r"/' [0-9]/", "/'[0-9]/"),
    _lit(" @-@ ", "-"), _lit(" @,@ ", ","), _lit(" @.@ ", "."),  # number separators
    *(_lit(f" {p} ", f"{p} ") for p in ":;.!?,"),  # no space before punctuation
    _bracket("(", ")"), _bracket("[", "]"), _bracket("{", "}"), _bracket('"', '"'), _bracket("'", "'"),
    _lit("= = = =", "===="), _lit("= = =", "==="), _lit("= =", "=="),  # heading markers
    _lit(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    _lit(" \n", "\n"), _lit("\n ", "\n"),
    _lit(" N ", " 1 "),  # the number placeholder
    _lit(" 's", "'s"),
)

_ptb_head = _Rules(_lit(" 's", "'s"), _lit("s ' ", "s' "), _lit(" n't", "n't"), _lit(" \n ", "\n"),
                   _lit("\\/", "/"))
_ptb_tail = _Rules(_lit("$ 1", "$1"), _lit("# 1", "#1"), _lit("<unk>", "?"))


def ptb(text: str) -> str:
    text = _ptb_head(text)
    for _ in range(10):  # " N N N " overlaps itself: one pass leaves every other N (the papers repeat it 10x)
        text = text.replace(" N ", " 1 ")
    return _ptb_tail(text)


lm1b = _Rules(
    _lit("http : / / ", "http://"), _lit("https : / / ", "https://"),
    _re(r" '(\w+)", r"'\1"),  # contractions and possessives
    _re(r" (\w+) \. ", r" \1. "), _re(r" (\w+) \.$", r" \1."),
    _lit(" ? ", "? "), _re(r" \?$", "?"), _lit(" ! ", "! "), _re(r" \!$", "!"),
    _lit(" , ", ", "), _lit(" : ", ": "), _lit(" ; ", "; "), _lit(" / ", "/"),
    _re(r'\" ([^\"]+) \"', r'"\1"'), _re(r"\' ([^\']+) \'", r"'\1'"),
    _re(r"\( ([^\(\)]+) \)", r"(\1)"), _re(r"\[ ([^\[\]]+) \]", r"[\1]"),
    _lit("$ ", "$"), _lit("\N{POUND SIGN} ", "\N{POUND SIGN}"),
)


def lambada(text: str) -> str:
    """Curly double quotes made straight; the passage stripped and started on a new line (as GPT-2 scored it)."""
    return "\n" + text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace(
        "\N{RIGHT DOUBLE QUOTATION MARK}", '"').strip()


def scientific_papers(text: str) -> str:
    """PubMed and ArXiv articles: the WikiText rules, then the LM1B ones."""
    return lm1b(wikitext(text))


def identity(text: str) -> str:
    return text


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "none": identity, "wikitext": wikitext, "ptb": ptb, "lm1b": lm1b, "lambada": lambada,
    "scientific_papers": scientific_papers,
}


def get_detokenizer(name: str) -> Callable[[str], str]:
    try:
        return DETOKENIZERS[name]
    except KeyError:
        raise DataError(f"unknown --detokenize {name!r}; choose one of {', '.join(DETOKENIZERS)}") from None
