"""Grade R1-zero responses against MATH answers: format reward, answer equivalence, a batch API.

A response is what the model wrote after the prompt's final "<think>", e.g.
" reasoning ... </think> <answer> \\frac{1}{2} </answer>" (the eval engine stops at "</answer>" and
keeps it). The reward is 1 only when the format is right AND the answer is equivalent:

- format_reward is 1 when the response contains "</think> <answer>" and "</answer>".
- The answer is the text inside the last "<answer> ... </answer>" (the last \\boxed{} in it, if any).
  The ground truth is a bare answer or a full solution (its last \\boxed{} is taken).
- Equivalence, cheapest first: (1) in this process, Hendrycks et al.'s MATH string normalisation
  (`strip_string`), then equal strings, or two plain numbers compared by value (`fast_verdict`);
  (2) the rest goes to a pool of worker processes (`symbolic_equivalent`, on pebble's ProcessPool):
  math-verify (which compares with sympy), then sympy on the raw LaTeX when math-verify cannot read
  a side. Each worker has an address-space limit (WORKER_MEMORY_LIMIT).
  A check that overruns `timeout_s` is interrupted by a timer in the worker (as math-verify's own
  timeout does) and graded wrong with grading_note 'timeout'; a worker stuck in C code that ignores
  the timer is killed by pebble HARD_KILL_GRACE_S later and replaced, and graded the same; a batch
  always returns. grading_note is 'worker_crashed' if a worker died mid-check, 'check_error' if the
  check raised (MemoryError at the limit, RecursionError on a huge answer), else ''. A Grader remembers the
  verdict of each (answer, ground truth) pair settled in the pool (timeouts are tried again): every
  checkpoint is graded on the same problems, and successive checkpoints often give the same answers.

format_failure_type (None when format_reward is 1) names the FIRST missing piece in reading order:
'missing_think_close' (no "</think>"), then 'missing_answer_open' ("</think>" is never followed by
" <answer>", e.g. "</think>\\n<answer>"), then 'missing_answer_close' (no "</answer>"). When the
engine cut the generation at max_tokens (finish_reason 'length') a failed format is reported as
'incomplete_generation' instead: the model never had the chance to close its tags.

Use: `grade_batch(responses, ground_truths)` (a module-level pool, made on first use, closed at
exit or by `shutdown()`), or own a `Grader` (`with Grader(workers=2) as g: g.grade(...)`).
Not thread-safe: one thread grades at a time.
Tests: bin/test tests/test_grading.py    Speed: python bench/grader.py
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import math
import multiprocessing
import os
import re
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction

import pebble
from pebble import ProcessExpired

from common.boxed import last_boxed

logger = logging.getLogger(__name__)

# The category / failure-type vocabulary of every verdict, defined once (the store, the records and
# the plots import it). Categories: correct (format 1, answer 1), wrong_answer (format 1, answer 0),
# format_failure (format 0), whose type is the first missing piece, or incomplete_generation.
CATEGORIES = ("correct", "wrong_answer", "format_failure")
# The grader's name and version go into every eval key (common/store/writer.py): bump the version
# with any change that can turn one verdict, so old and new numbers are never merged.
GRADER_NAME = "mathsft"
GRADER_VERSION = "1"
FORMAT_FAILURE_TYPES = ("missing_think_close", "missing_answer_open", "missing_answer_close", "incomplete_generation")


def categorize(format_reward: float, answer_reward: float) -> str:
    """The category of a verdict (see CATEGORIES)."""
    if format_reward < 1:
        return "format_failure"
    return "correct" if answer_reward >= 1 else "wrong_answer"


THINK_CLOSE = "</think>"
ANSWER_OPEN = "</think> <answer>"
ANSWER_CLOSE = "</answer>"

HARD_KILL_GRACE_S = 1.0  # after the worker's own timer: C loops (huge integer powers) ignore signals
START_TIMEOUT_S = 120.0  # spawning a worker and importing sympy takes ~2 s; this bounds a broken install
WORKER_MEMORY_LIMIT = 4 << 30  # bytes of address space: a runaway answer must not take the machine
VERDICT_CACHE_SIZE = 100_000  # (answer, truth) pairs remembered by a Grader
PROBE_HOLD_S = 0.05  # Grader.start's probe keeps its worker this long
POOL_ATTEMPTS = 3  # times a batch's unfinished checks are sent again after pebble declares the pool broken


# ---- format ----------------------------------------------------------------------------------


def has_format(response: str) -> bool:
    return ANSWER_OPEN in response and ANSWER_CLOSE in response


def format_failure_type(response: str, finish_reason: str) -> str | None:
    """None when the format is right, else why not (see the module docstring for the precedence)."""
    if has_format(response):
        return None
    if finish_reason == "length":
        return "incomplete_generation"
    if THINK_CLOSE not in response:
        return "missing_think_close"
    if ANSWER_OPEN not in response:
        return "missing_answer_open"
    return "missing_answer_close"


def extract_answer(response: str) -> str | None:
    """Text of the last complete <answer>...</answer> (its last \\boxed{} if any); None when absent."""
    close = response.rfind(ANSWER_CLOSE)
    start = response.rfind("<answer>", 0, max(close, 0))
    if close < 0 or start < 0:
        return None
    inner = response[start + len("<answer>"):close]
    boxed = last_boxed(inner)
    return (inner if boxed is None else boxed).strip()


def ground_truth_answer(ground_truth: str) -> str:
    """A bare answer as is; a full solution's last \\boxed{} content."""
    boxed = last_boxed(ground_truth)
    return (ground_truth if boxed is None else boxed).strip()


# ---- MATH string normalisation (Hendrycks et al., `math_equivalence.py`) ------------------------

_SPACING = ("\\qquad", "\\quad", "\\,", "\\;", "\\:", "\\!", "~")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_SHORT_VARIABLE = re.compile(r"[A-Za-z](?:_?\w)?|\\[A-Za-z]+")
_SLASH_ATOM = re.compile(r"-?\d+|\\sqrt\{\d+\}")


def strip_string(string: str) -> str:
    """Normalise a LaTeX answer so that equal strings mean equal answers (the MATH paper's rules)."""
    string = string.replace("\n", "").replace("\\\\", "\\")
    for spacing in _SPACING:
        string = string.replace(spacing, "")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "").replace("$", "")
    string = _remove_right_units(string)
    string = _TEXT_COMMAND.sub(r"\1", string)  # "\text{(C)}" -> "(C)"
    string = string.replace("\\%", "").replace("%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if string.startswith("."):
        string = "0" + string
    string = _drop_short_lhs(string)
    string = _fix_sqrt(string).replace(" ", "").rstrip(".")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def _remove_right_units(string: str) -> str:
    # MATH writes units as "\text{ cm}" (with the space) right of the number.
    parts = string.split("\\text{ ")
    return parts[0] if len(parts) == 2 else string


def _drop_short_lhs(string: str) -> str:
    # "x = 3" -> "3" when the left side is a short variable name.
    parts = string.split("=")
    if len(parts) == 2 and _SHORT_VARIABLE.fullmatch(parts[0].strip()):
        return parts[1]
    return string


def _fix_sqrt(string: str) -> str:
    # "\sqrt2" -> "\sqrt{2}"
    head, *rest = string.split("\\sqrt")
    pieces = [head]
    for split in rest:
        braced = split.startswith("{") or not split
        pieces.append("\\sqrt" + split if braced else "\\sqrt{" + split[0] + "}" + split[1:])
    return "".join(pieces)


def _fix_fracs(string: str) -> str:
    # "\frac12" -> "\frac{1}{2}", "\frac1{72}" -> "\frac{1}{72}"
    head, *rest = string.split("\\frac")
    pieces = [head]
    for split in rest:
        if split.startswith("{"):
            pieces.append("\\frac" + split)
        elif len(split) < 2:
            return string
        elif split[1] == "{":
            pieces.append("\\frac{" + split[0] + "}" + split[1:])
        else:
            pieces.append("\\frac{" + split[0] + "}{" + split[1] + "}" + split[2:])
    return "".join(pieces)


def _fix_a_slash_b(string: str) -> str:
    # "1/2" -> "\frac{1}{2}", "\sqrt{2}/2" -> "\frac{\sqrt{2}}{2}" (only whole-string atoms: no precedence to get wrong)
    parts = string.split("/")
    if len(parts) == 2 and all(_SLASH_ATOM.fullmatch(part) for part in parts):
        return "\\frac{" + parts[0] + "}{" + parts[1] + "}"
    return string


# ---- fast path (in this process) -------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")


def as_number(normalised: str) -> Fraction | None:
    """The exact value of a normalised plain number ("-12", "1,000", "0.25", "\\frac{3}{4}"), else None."""
    if len(normalised) > 60:  # no MATH answer is that long a number; keeps int() cheap
        return None
    if _PLAIN_NUMBER.fullmatch(normalised):
        return Fraction(normalised.replace(",", ""))
    match = _FRACTION.fullmatch(normalised)
    if match and int(match[3]) != 0:
        sign = -1 if match[1] else 1
        return sign * Fraction(int(match[2]), int(match[3]))
    return None


def numeric_form(normalised: str, is_list: bool) -> tuple[str, list[Fraction]] | None:
    """("number", [v]); ("(]", values) for an interval or tuple; ("set", sorted values) for \\{...\\}
    or a bare list "1,-3" (math-verify reads both as sets); None unless every entry is a plain number."""
    if not is_list and (value := as_number(normalised)) is not None:
        return "number", [value]
    opener = next((bracket for bracket in ("\\{", "(", "[") if normalised.startswith(bracket)), "")
    closer = next((bracket for bracket in ("\\}", ")", "]") if normalised.endswith(bracket)), "")
    if bool(opener) != bool(closer):
        return None
    values = [as_number(item) for item in normalised[len(opener):len(normalised) - len(closer)].split(",")]
    if len(values) < 2 or any(value is None for value in values):
        return None
    return ("set", sorted(values)) if opener in ("", "\\{") else (opener + closer, values)


def fast_verdict(answer: str, truth: str) -> bool | None:
    """True/False when normalisation settles it, None when it needs the symbolic check."""
    if not answer.strip():
        return False
    normal_answer, normal_truth = strip_string(answer), strip_string(truth)
    if normal_answer == normal_truth:
        return True
    if "%" in answer + truth:  # math-verify reads "50\\%" as 0.5
        return None
    # ", " marks a list: "-5, 100" is two numbers, "1,000" is one.
    left, right = numeric_form(normal_answer, ", " in answer), numeric_form(normal_truth, ", " in truth)
    if left is None or right is None or left[0] != right[0] or len(left[1]) != len(right[1]):
        return None
    gaps = [(abs(a - b), max(abs(a), abs(b))) for a, b in zip(left[1], right[1])]
    if not any(gap for gap, _ in gaps):
        return True
    # math-verify rounds to 6 decimals (0.333333 == 1/3) and compares 15 significant digits.
    return False if any(gap > max(Fraction(1, 10**5), size / 10**12) for gap, size in gaps) else None


# ---- symbolic check (in a worker process) ----------------------------------------------------


def symbolic_equivalent(answer: str, truth: str) -> bool:
    """math-verify; sympy on the raw LaTeX when math-verify cannot read a side. No timer: run it in a worker."""
    from math_verify import verify

    gold, pred = _parse_truth(_clean(truth)), _parse(_clean(answer))
    # Timeout None: math-verify's own signal.alarm would cancel the worker's timer.
    if verify(gold, pred, timeout_seconds=None):
        return True
    # When both sides parsed, math-verify already compared them with sympy (numerically, then simplify).
    both_parsed = all(any(not isinstance(item, str) for item in side) for side in (gold, pred))
    return not both_parsed and _sympy_equal(answer, truth)


def _clean(latex: str) -> str:
    # Also the sentence's full stop ("42."), which math-verify cannot parse.
    return latex.replace("\\$", "").replace("$", "").strip().rstrip(".")


def _parse(latex: str) -> list:
    from math_verify import parse

    return parse("\\boxed{" + latex + "}", parsing_timeout=None)


# Every checkpoint is graded against the same ground truths: parse each once per worker.
_parse_truth = functools.lru_cache(maxsize=20_000)(_parse)


def _sympy_equal(answer: str, truth: str) -> bool:
    import sympy
    from latex2sympy2_extended import latex2sympy

    try:
        left, right = latex2sympy(_clean(answer)), latex2sympy(_clean(truth))
        if not (isinstance(left, sympy.Expr) and isinstance(right, sympy.Expr)):
            return False  # sets, tuples, equations: only math-verify compares those
        return sympy.simplify(left - right) == 0
    except Exception:  # noqa: BLE001 -- latex2sympy/sympy raise many types on odd input; unproven = not equal
        logger.debug("sympy could not compare %.80r with %.80r", answer, truth, exc_info=True)
        return False


class _Deadline(BaseException):
    """Raised by the worker's timer; a BaseException so math-verify's `except Exception` lets it through."""


def _raise_deadline(signum, frame):
    raise _Deadline


def _check_with_deadline(answer: str, truth: str, timeout_s: float,
                         equivalent=symbolic_equivalent) -> tuple[bool, str]:
    """The task each worker runs: (equal, note), with the worker's own timer armed for timeout_s;
    `equivalent` is the check (another grader's for bin/regrade, common/store/graders.py)."""
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        return equivalent(answer, truth), ""
    except _Deadline:
        return False, "timeout"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # a check that raised must not leave the timer armed


# One of each common answer shape: the first parse of a new shape is several times slower.
_WARM_UP = [("\\frac{1}{2}", "0.5"), ("(1,2]", "[1,2)"), ("\\{1,2\\}", "1, 2"), ("x^2+2x+1", "(x+1)^2"),
            ("2\\sqrt{3}", "\\sqrt{12}"), ("(3,\\frac{\\pi}{2})", "(3,\\pi/2)"), ("30^\\circ", "\\frac{\\pi}{6}"),
            ("\\text{(C)}", "C"), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1,2)"), ("x \\in [-2,7]", "y=3"),
            ("-3+2i", "\\infty"), ("7", "4(3-x)(3+x)"), ("\\left( -\\dfrac{2}{3} \\right)", "-\\frac23")]


def _init_worker(equivalent=symbolic_equivalent) -> None:
    """pebble's initializer, once per worker: memory limit, the check's timer, warm parser caches."""
    import resource

    signal.signal(signal.SIGALRM, _raise_deadline)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = WORKER_MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(hard, WORKER_MEMORY_LIMIT)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timer is off: ours is on
    for answer, truth in _WARM_UP:  # import sympy and warm the LaTeX parser's caches before taking work
        equivalent(answer, truth)


def _worker_pid(hold_s: float) -> int:
    time.sleep(hold_s)  # so that one ready worker cannot answer every probe of Grader.start
    return os.getpid()


# ---- the worker pool (pebble) ----------------------------------------------------------------


class GraderError(RuntimeError):
    """The grading pool cannot run (its workers fail to start)."""


class Grader:
    """A persistent pebble.ProcessPool of grading workers, plus the fast path and remembered verdicts.

    pebble does the process bookkeeping: each check has a hard timeout (timeout_s + HARD_KILL_GRACE_S,
    counted from when a worker takes it); a worker that overruns it is killed (SIGTERM, SIGKILL 3 s
    later) and replaced, and a worker that dies is replaced. What is ours: the verdict of each outcome,
    rebuilding the pool when pebble declares it broken, and a deadline for the whole batch.
    """

    def __init__(self, workers: int = 2, fast_path: bool = True, equivalent=symbolic_equivalent):
        if workers < 1:
            raise ValueError(f"grading workers must be >= 1, got {workers}; set evaluation.grading_workers")
        self.workers = workers
        self.fast_path = fast_path  # False sends every formatted answer to the symbolic check (tests, bench)
        self.equivalent = equivalent  # the check the workers run (a module-level function: spawn pickles it by name)
        # (verdict, note) of each (answer, truth) pair settled in the pool (see the module docstring).
        self._verdicts: dict[tuple[str, str], tuple[bool, str]] = {}
        self._pool: pebble.ProcessPool | None = None

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (for logs, tests and the bench)."""
        # pebble has no public accessor for its worker processes: this is its manager's own table.
        return [] if self._pool is None else list(self._pool._pool_manager.worker_manager.workers)

    def start(self) -> None:
        """Start the workers and wait until each has answered (~2 s); GraderError if they cannot start."""
        pool, deadline, answered = self._running_pool(), time.monotonic() + START_TIMEOUT_S, set()
        try:
            while not answered or not set(self.pids) <= answered:  # one warming up takes no probe: ask again
                futures = [pool.schedule(_worker_pid, (PROBE_HOLD_S,)) for _ in range(self.workers)]
                answered.update(future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures)
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            self.close()
            raise GraderError(f"the grading workers did not start within {START_TIMEOUT_S:.0f} s; "
                              "the machine may be overloaded") from exc
        except BrokenProcessPool as exc:  # pebble's verdict when workers exit before taking any task
            self.close()
            raise GraderError("the grading workers exit during start-up; check that "
                              "`python -c 'import math_verify'` works in this environment") from exc

    def close(self) -> None:
        """Stop every worker (a check in flight is abandoned); the next batch starts fresh ones."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def _running_pool(self) -> pebble.ProcessPool:
        if self._pool is None:
            # spawn: fork is unsafe in a process with CUDA or threads (the eval daemon has both).
            self._pool = pebble.ProcessPool(self.workers, initializer=_init_worker, initargs=(self.equivalent,),
                                            context=multiprocessing.get_context("spawn"))
        return self._pool

    def grade(self, responses: list[str], ground_truths: list[str], timeout_s: float = 5.0,
              finish_reasons: list[str] | None = None) -> list[dict]:
        """Per response: format_reward, answer_reward, reward, format_failure_type, grading_note."""
        reasons = ["stop"] * len(responses) if finish_reasons is None else finish_reasons
        if not len(responses) == len(ground_truths) == len(reasons):
            raise ValueError(f"{len(responses)} responses, {len(ground_truths)} ground truths and {len(reasons)} "
                             "finish reasons; pass one of each per response")
        results = [_result(format_failure_type(response, reason)) for response, reason in zip(responses, reasons)]
        pending: dict[tuple[str, str], list[int]] = {}  # pairs for the pool; identical pairs are checked once
        for index, (response, ground_truth) in enumerate(zip(responses, ground_truths)):
            if results[index]["format_failure_type"] is None:
                pair = (extract_answer(response) or "", ground_truth_answer(ground_truth))
                verdict = self._quick_verdict(pair)
                if verdict is None:
                    pending.setdefault(pair, []).append(index)
                else:
                    _set_answer(results[index], *verdict)
        for (pair, indexes), (equal, note) in zip(pending.items(), self._check_in_pool(list(pending), timeout_s)):
            self._remember(pair, equal, note)
            for index in indexes:
                _set_answer(results[index], equal, note)
        timeouts = sum(result["grading_note"] == "timeout" for result in results)
        if timeouts:
            logger.warning("%d answers overran the %.1f s grading timeout and were graded wrong", timeouts, timeout_s)
        logger.debug("graded %d responses, %d distinct answers checked in the pool", len(responses), len(pending))
        return results

    def _quick_verdict(self, pair: tuple[str, str]) -> tuple[bool, str] | None:
        if pair in self._verdicts:
            return self._verdicts[pair]
        verdict = fast_verdict(*pair) if self.fast_path else None
        return None if verdict is None else (verdict, "")

    def _remember(self, pair: tuple[str, str], equal: bool, note: str) -> None:
        # Only settled verdicts: a timeout or a crash may be the machine's fault (load, OOM killer) and
        # is tried again next time. Huge answers would bloat memory.
        if note or len(pair[0]) + len(pair[1]) > 1_000:
            return
        self._verdicts[pair] = (equal, note)
        if len(self._verdicts) > VERDICT_CACHE_SIZE:
            del self._verdicts[next(iter(self._verdicts))]  # the oldest: dicts keep insertion order

    def _check_in_pool(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[tuple[bool, str]]:
        verdicts: dict[int, tuple[bool, str]] = {}
        # A stalled pool (every worker frozen before taking work) must not hang the evaluation.
        deadline = time.monotonic() + START_TIMEOUT_S + math.ceil(len(pairs) / self.workers) * (
            timeout_s + HARD_KILL_GRACE_S + pebble.CONSTS.term_timeout)
        try:
            for _ in range(POOL_ATTEMPTS):  # pebble may declare the pool broken (below): rebuild it, go on
                todo = [index for index in range(len(pairs)) if index not in verdicts]
                if not todo:
                    break
                pool = self._running_pool()
                try:
                    futures = [pool.schedule(_check_with_deadline, (*pairs[index], timeout_s, self.equivalent),
                                             timeout=timeout_s + HARD_KILL_GRACE_S) for index in todo]
                except RuntimeError:  # pebble refuses work once its pool is in ERROR (a worker died while idle)
                    logger.warning("the grading pool broke while idle; restarting it")
                    self.close()
                    continue
                for index, future in zip(todo, futures):
                    verdict = _verdict(future, deadline)
                    if verdict is not None:
                        verdicts[index] = verdict
                if time.monotonic() > deadline:
                    logger.warning("the grading pool took no work before the batch deadline; restarting it")
                if len(verdicts) < len(pairs) or time.monotonic() > deadline:
                    self.close()
        except BaseException:
            self.close()  # an interrupted batch must leave no check in flight for the next batch to misread
            raise
        return [verdicts.get(index, (False, "worker_crashed")) for index in range(len(pairs))]


def _verdict(future: pebble.ProcessFuture, deadline: float) -> tuple[bool, str] | None:
    """(equal, note) of one check; None when pebble broke the pool before running it (check it again)."""
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except (TimeoutError, concurrent.futures.TimeoutError):  # the same class from Python 3.11 on
        if future.done():  # pebble's hard timeout, not the batch deadline
            logger.warning("a grading worker ignored its timer and was killed and replaced")
        return False, "timeout"
    except BrokenProcessPool:  # pebble's verdict when a worker dies while no check runs (the OOM killer)
        return None
    except ProcessExpired as exc:  # the worker died mid-check: a segfault in C code, the OOM killer
        logger.warning("a grading worker died (exit code %s); its answer is graded wrong", exc.exitcode)
        return False, "worker_crashed"
    except Exception as exc:  # noqa: BLE001 -- the check raised in the worker (MemoryError at its limit,
        # RecursionError on a huge answer): the answer is unproven, so not equal; the worker goes on.
        logger.warning("a grading check raised %s; its answer is graded wrong", type(exc).__name__)
        return False, "check_error"


def _result(failure_type: str | None) -> dict:
    return {"format_reward": 1.0 if failure_type is None else 0.0, "answer_reward": 0.0, "reward": 0.0,
            "format_failure_type": failure_type, "grading_note": ""}


def _set_answer(result: dict, equal: bool, note: str) -> None:
    result["answer_reward"] = float(equal)
    result["reward"] = result["format_reward"] * float(equal)
    result["grading_note"] = note


# ---- module-level API ------------------------------------------------------------------------

_default_grader: Grader | None = None


def default_grader(workers: int = 2) -> Grader:
    """The module's pool, made on first use and remade when `workers` changes."""
    global _default_grader
    if _default_grader is not None and _default_grader.workers != workers:
        _default_grader.close()
        _default_grader = None
    if _default_grader is None:
        _default_grader = Grader(workers)
    return _default_grader


def grade_batch(responses: list[str], ground_truths: list[str], timeout_s: float = 5.0, workers: int = 2,
                finish_reasons: list[str] | None = None) -> list[dict]:
    """Grade a batch with the module's pool (see `Grader.grade`)."""
    return default_grader(workers).grade(responses, ground_truths, timeout_s, finish_reasons)


def r1_zero_reward(response: str, ground_truth: str) -> dict:
    """{'format_reward', 'answer_reward', 'reward'} (floats) for one response."""
    result = grade_batch([response], [ground_truth])[0]
    return {key: result[key] for key in ("format_reward", "answer_reward", "reward")}


@atexit.register
def shutdown() -> None:
    """Stop the module-level pool (also runs at interpreter exit)."""
    global _default_grader
    if _default_grader is not None:
        _default_grader.close()
        _default_grader = None
