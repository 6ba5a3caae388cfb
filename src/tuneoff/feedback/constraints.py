"""Verifiable instructions: constraints a response either satisfies or not, checked exactly (IFEval, Zhou et al.
2023, arXiv:2311.07911). Each :class:`Constraint` has the instruction a person reads (appended to a prompt) and a
checker; a response's gold score is the fraction of its prompt's constraints it satisfies, strict or loose.

The kinds follow IFEval's ids and semantics:

| kind | instruction | passes when |
|---|---|---|
| ``length_constraints:number_words`` | answer with at least / less than N words | words (runs of ``\\w``) relation N |
| ``length_constraints:number_sentences`` | ... N sentences | sentences (ending in . ! ? or the text) relation N |
| ``length_constraints:number_paragraphs`` | exactly N paragraphs separated by ``***`` | N non-empty parts |
| ``keywords:existence`` | include the keywords K | every keyword appears (case-insensitive, whole word) |
| ``keywords:forbidden_words`` | do not include the words K | none appears |
| ``keywords:frequency`` | the word W at least / less than N times | its count relation N |
| ``punctuation:no_comma`` | no commas | no ``,`` |
| ``change_case:english_lowercase`` | all lowercase | no uppercase letter |
| ``change_case:english_capital`` | all capital letters | no lowercase letter (and some letter) |
| ``detectable_format:title`` | a title in double angular brackets | ``<<...>>`` somewhere |
| ``detectable_format:number_bullet_lists`` | exactly N bullet points (``* `` or ``- ``) | exactly N bullet lines |
| ``detectable_format:number_highlighted_sections`` | at least N sections highlighted ``*like this*`` | ≥ N |
| ``detectable_content:postscript`` | end with a postscript starting P.S. | a line starting ``P.S.`` |
| ``startend:end_checker`` | end with the exact phrase P | the stripped text ends with P |
| ``startend:quotation`` | wrap the whole response in double quotes | starts and ends with ``"`` |
| ``detectable_format:json_format`` | the whole output in JSON | parses as JSON (a fenced block allowed) |
| ``detectable_content:number_placeholders`` | at least N placeholders in square brackets | ≥ N ``[...]`` |

Loose checking is IFEval's: a constraint passes loosely when it passes on any of the response, the response
without its first line, without its last line, without both, and each of those with every ``*`` removed (markdown
emphasis a model adds around a title or a keyword). IFEval's checkers need nltk's punkt data, which cannot be
downloaded here; these reimplement its rules with regular expressions (sentences end at . ! ? followed by space
or the end of the text), and are tested on hand-made passing and failing responses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

RELATIONS = ("at least", "less than")
KINDS = (
    "length_constraints:number_words",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "punctuation:no_comma",
    "change_case:english_lowercase",
    "change_case:english_capital",
    "detectable_format:title",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_content:postscript",
    "startend:end_checker",
    "startend:quotation",
    "detectable_format:json_format",
    "detectable_content:number_placeholders",
)


def words(text: str) -> list[str]:
    """IFEval's word count: runs of word characters (nltk's RegexpTokenizer(r"\\w+"))."""
    return re.findall(r"\w+", text)


def sentences(text: str) -> list[str]:
    """Non-empty sentences: text up to . ! or ? (repeated) followed by whitespace or the end, and a last one."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p for p in parts if re.search(r"\w", p)]


def relation_holds(count: int, relation: str, n: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    return count >= n if relation == "at least" else count < n


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(r"\b" + re.escape(word) + r"\b", re.IGNORECASE)


@dataclass(frozen=True)
class Constraint:
    """One verifiable instruction: ``kind`` (one of KINDS) and its arguments."""

    kind: str
    n: int = 0
    relation: str = "at least"
    keywords: tuple[str, ...] = field(default_factory=tuple)
    phrase: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}")

    def instruction(self) -> str:
        """What the person (or model) is told, IFEval's wording where it has one."""
        k, n, rel = self.kind, self.n, self.relation
        listed = ", ".join(self.keywords)
        return {
            "length_constraints:number_words": f"Answer with {rel} {n} words.",
            "length_constraints:number_sentences": f"Your response should contain {rel} {n} sentences.",
            "length_constraints:number_paragraphs": f"There should be exactly {n} paragraphs. Paragraphs are "
            "separated with the markdown divider: ***",
            "keywords:existence": f"Include the keywords {listed} in the response.",
            "keywords:forbidden_words": f"Do not include the words {listed} in the response.",
            "keywords:frequency": f"In your response, the word {self.keywords[0] if self.keywords else ''} should "
            f"appear {rel} {n} times.",
            "punctuation:no_comma": "In your entire response, refrain from the use of any commas.",
            "change_case:english_lowercase": "Your entire response should be in English, and in all lowercase "
            "letters. No capital letters are allowed.",
            "change_case:english_capital": "Your entire response should be in English, and in all capital letters.",
            "detectable_format:title": "Your answer must contain a title, wrapped in double angular brackets, such "
            "as <<poem of joy>>.",
            "detectable_format:number_bullet_lists": f"Your answer must contain exactly {n} bullet points. Use the "
            "markdown bullet points such as:\n* This is point 1.\n* This is point 2",
            "detectable_format:number_highlighted_sections": f"Highlight at least {n} sections in your answer with "
            "markdown, i.e. *highlighted section*.",
            "detectable_content:postscript": "At the end of your response, please explicitly add a postscript "
            "starting with P.S.",
            "startend:end_checker": f"Finish your response with this exact phrase {self.phrase}. No other words "
            "should follow this phrase.",
            "startend:quotation": "Wrap your entire response with double quotation marks.",
            "detectable_format:json_format": "Entire output should be wrapped in JSON format. You can use markdown "
            "ticks such as ```.",
            "detectable_content:number_placeholders": f"The response must contain at least {n} placeholders "
            "represented by square brackets, such as [address].",
        }[k]

    def check(self, response: str) -> bool:
        """Whether ``response`` satisfies this constraint (strictly)."""
        k, text = self.kind, response
        if k == "length_constraints:number_words":
            return relation_holds(len(words(text)), self.relation, self.n)
        if k == "length_constraints:number_sentences":
            return relation_holds(len(sentences(text)), self.relation, self.n)
        if k == "length_constraints:number_paragraphs":
            parts = re.split(r"\s?\*\*\*\s?", text)
            return len(parts) == self.n and all(p.strip() for p in parts)
        if k == "keywords:existence":
            return all(_word_pattern(w).search(text) for w in self.keywords)
        if k == "keywords:forbidden_words":
            return not any(_word_pattern(w).search(text) for w in self.keywords)
        if k == "keywords:frequency":
            return relation_holds(len(_word_pattern(self.keywords[0]).findall(text)), self.relation, self.n)
        if k == "punctuation:no_comma":
            return "," not in text
        if k == "change_case:english_lowercase":
            return text == text.lower() and bool(re.search(r"[a-z]", text))
        if k == "change_case:english_capital":
            return text == text.upper() and bool(re.search(r"[A-Z]", text))
        if k == "detectable_format:title":
            return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", text))
        if k == "detectable_format:number_bullet_lists":
            bullets = re.findall(r"^\s*[*-][^\S\n]+\S", text, flags=re.MULTILINE)
            return len(bullets) == self.n
        if k == "detectable_format:number_highlighted_sections":
            highlighted = [h for h in re.findall(r"\*([^\n*]+)\*", text) if h.strip()]
            highlighted += [h for h in re.findall(r"\*\*([^\n*]+)\*\*", text) if h.strip()]
            return len(highlighted) >= self.n
        if k == "detectable_content:postscript":
            return bool(re.search(r"^\s*p\.\s?p?\.?\s?s\b", text.lower(), flags=re.MULTILINE))
        if k == "startend:end_checker":
            return text.strip().lower().endswith(self.phrase.strip().lower())
        if k == "startend:quotation":
            stripped = text.strip()
            return len(stripped) > 1 and stripped[0] == '"' and stripped[-1] == '"'
        if k == "detectable_format:json_format":
            body = text.strip()
            body = re.sub(r"^```(?:json|Json|JSON)?\s*", "", body)
            body = re.sub(r"\s*```$", "", body)
            try:
                json.loads(body)
            except ValueError:
                return False
            return True
        if k == "detectable_content:number_placeholders":
            return len(re.findall(r"\[.*?\]", text)) >= self.n
        raise AssertionError(k)  # every kind is handled above


def loose_variants(response: str) -> list[str]:
    """IFEval's loose versions of a response: without its first line, its last line, both; each also without
    asterisks."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [text.replace("*", "") for text in cut]


def follows(constraint: Constraint, response: str, loose: bool = False) -> bool:
    """Strict: the response as it is; loose: any of :func:`loose_variants` (an empty variant never passes)."""
    if not loose:
        return bool(response.strip()) and constraint.check(response)
    return any(text.strip() and constraint.check(text) for text in loose_variants(response))


def score(constraints: list[Constraint], response: str, loose: bool = False) -> float:
    """The gold score of a response: the fraction of ``constraints`` it follows (IFEval's instruction-level
    accuracy for one prompt)."""
    if not constraints:
        raise ValueError("a verifiable prompt needs at least one constraint")
    return sum(follows(c, response, loose) for c in constraints) / len(constraints)
