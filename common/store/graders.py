"""The answer-equivalence checks bin/regrade can re-score stored responses with, by grader name.

- `mathsft`: today's (common/grading.py `symbolic_equivalent`, after the in-process fast path).
- `cs336`: the semantics of the CS336 assignment 5 / Dr. GRPO reward (`r1_zero_reward_fn` in
  `cs336_alignment/drgrpo_grader.py`, from sail-sg/understand-r1-zero) in its default fast mode,
  with which leaderboard numbers are defined, written here from its published behaviour: correct
  when (1) the two answers are equal after the MATH (Hendrycks) normalisation, extended with
  unit words, matrix environments and relation symbols, or (2) the PRM800K grader says so:
  a second normalisation (LaTeX to text, units, `\\text{}`, case), then element by element for
  tuples and intervals (same brackets), fractions compared as written, an integer only equal to
  the same integer, anything else equal when sympy simplifies the difference to 0 (at most two
  unknown letters, no large powers). No math-verify.
- `math-verify`: math-verify's `verify(parse(truth), parse(answer))` alone.

All three share the format check and answer extraction of common/grading.py (the answer in the
last `<answer>...</answer>`, its last `\\boxed{}`), which for a response that ends at
`</answer>` (the engines stop there) is what the CS336 reward extracts. The checks run in the
grading pool's worker processes (common/grading.py Grader, `equivalent=`), under its timeout.
"""

from __future__ import annotations

import math
import re

from common.grading import strip_string, symbolic_equivalent

# ---- math-verify alone ---------------------------------------------------------------------------


def math_verify_equivalent(answer: str, truth: str) -> bool:
    from math_verify import parse, verify

    gold, predicted = (parse("\\boxed{" + text + "}", parsing_timeout=None) for text in (truth, answer))
    return bool(verify(gold, predicted, timeout_seconds=None))


# ---- cs336 (Dr. GRPO, fast mode) -----------------------------------------------------------------

# Unit words removed from a MATH answer before string comparison (the grader's MathQA unit list, in
# short; plural forms are matched too).
_UNIT_WORDS = ("degree", "mph", "kmph", "ft", "sq m", "deg", "mile", "inch", "inches", "feet", "foot", "yard",
               "meter", "metre", "cm", "mm", "km", "kg", "gm", "g", "lb", "hour", "hr", "minute", "min", "second",
               "sec", "day", "month", "year", "yr", "percent", "unit", "dollar", "cent", "liter", "litre", "gallon",
               "acre", "hectare", "square", "cubic", "am", "pm", "noon", "men", "women", "coin", "toy", "apple")
_UNIT_PATTERN = re.compile(r"(^|\W)(?:" + "|".join(re.escape(w) + "s?" for w in _UNIT_WORDS) + r")(?=$|\W)")
_WRAPPED_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")


def mathd_normalize(answer: str) -> str:
    """The MATH normalisation as the CS336 grader applies it: an enclosing `\\text{}` dropped,
    matrices and relation symbols unified, a trailing `\\text{...}` and unit words removed, then
    Hendrycks et al.'s `strip_string`."""
    answer = answer.strip()
    match = _WRAPPED_TEXT.search(answer)
    if match:
        answer = match.group("text").strip()
    answer = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", answer)
    answer = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", answer).replace("bmatrix", "pmatrix")
    answer = answer.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    without_text = re.sub(r"\\text\{.*?\}$", "", answer).strip()
    if without_text:
        answer = without_text
    without_units = _UNIT_PATTERN.sub(r"\1", answer)
    if without_units.strip():
        answer = without_units
    return strip_string(answer)


def _latex_to_text(expr: str) -> str:
    from pylatexenc import latex2text

    expr = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac").replace("\\frac", " \\frac")
    expr = latex2text.LatexNodes2Text().latex_to_text(expr)
    for symbol, name in (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*")):
        expr = expr.replace(symbol, name)
    return expr.strip()


def _is_float(text: str) -> bool:
    """A finite number ("inf" and "nan" parse as floats but are answers in words)."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _without_thousands_commas(expr: str) -> str:
    pattern = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
    while (stripped := pattern.sub(r"\1\3\4", expr)) != expr:
        expr = stripped
    return expr


def _integer_text(text: str) -> int | None:
    try:
        value = float(_without_thousands_commas(text))
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return round(value) if abs(value - round(value)) <= 1e-7 else None


def prm800k_normalize(expr: str) -> str:
    """The PRM800K grader's normalisation (the second half of the CS336 fast check)."""
    match = _WRAPPED_TEXT.search(expr)
    if match:
        expr = match.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    for word, power in (("million", "*10^6"), ("billion", "*10^9"), ("trillion", "*10^12")):
        expr = expr.replace(word, power)
    for unit in ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week", "month",
                 "year", "foot", "feet", "inch", "yard"):
        expr = re.sub(f"{unit}(es)?(s)? *(\\^[0-9]+)?", "", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    if expr.startswith("{") and expr.endswith("}"):
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    if _is_float(expr) and abs(float(expr) - round(float(expr))) <= 1e-7:
        expr = str(round(float(expr)))
    if "\\" in expr:
        try:
            expr = _latex_to_text(expr)
        except Exception:  # noqa: BLE001 -- pylatexenc raises many types on odd input; the grader keeps the text
            pass
    expr = re.sub("- *", "-", expr)
    expr = re.sub("([0-9]) +([0-9])", r"\1+\2", expr)  # a mixed number "7 3/4" is 7+3/4
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    integer = _integer_text(expr)
    return str(integer) if integer is not None else expr


def _sympy_allowed(expr: str) -> bool:
    letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    return len(letters) <= 2 and "^{" not in expr and "^(" not in expr and \
        not re.search(r"\^[0-9]+\^", expr) and not re.search(r"\^[0-9][0-9]+", expr)


def _sympy_zero_difference(truth: str, answer: str) -> bool:
    from sympy import simplify
    from sympy.parsing import sympy_parser

    expr = f"({truth})-({answer})"
    if not _sympy_allowed(expr):
        return False
    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
    try:
        return simplify(sympy_parser.parse_expr(expr.replace("^", "**"), transformations=transformations)) == 0
    except Exception:  # noqa: BLE001 -- sympy raises many types on odd input; unproven = not equal
        return False


def _tuple_elements(expr: str) -> list[str]:
    expr = _without_thousands_commas(expr)
    brackets = "()[]"
    if len(expr) > 2 and expr[0] in brackets and expr[-1] in brackets and not any(c in expr[1:-1] for c in brackets):
        return [element.strip() for element in expr[1:-1].split(",")]
    return [expr] if expr else []


def _is_fraction(expr: str) -> bool:
    return bool(re.search(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$", expr))


def prm800k_equal(answer: str, truth: str) -> bool:
    truth_normal, answer_normal = prm800k_normalize(truth), prm800k_normalize(answer)
    if truth_normal == answer_normal:
        return True
    if not answer_normal:
        return False
    truth_items, answer_items = _tuple_elements(truth_normal), _tuple_elements(answer_normal)
    if len(truth_items) > 1 and (truth_normal[0] != answer_normal[0] or truth_normal[-1] != answer_normal[-1]):
        return False  # an interval's or tuple's brackets must agree
    if len(truth_items) != len(answer_items):
        return False
    for truth_item, answer_item in zip(truth_items, answer_items):
        if _is_fraction(truth_item) and _is_fraction(answer_item):
            equal = truth_item == answer_item  # an unreduced fraction is not the answer
        elif (_integer_text(truth_item) is None) != (_integer_text(answer_item) is None):
            equal = False  # an integer answer must be matched by an integer
        else:
            equal = _sympy_zero_difference(truth_item, answer_item)
        if not equal:
            return False
    return True


def cs336_equivalent(answer: str, truth: str) -> bool:
    return mathd_normalize(answer) == mathd_normalize(truth) or prm800k_equal(answer, truth)


# name -> (equivalence check run in the pool's workers, whether mathsft's in-process fast path applies)
GRADERS = {
    "mathsft": (symbolic_equivalent, True),
    "cs336": (cs336_equivalent, False),
    "math-verify": (math_verify_equivalent, False),
}
