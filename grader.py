"""Grading a response: extract its final answer, normalize it, check it against the gold answer.

One module for training and evaluation: train.py's reward (check_answer), evaluate.py's Avg@k, Pass@k and maj@k, and
data.py's loader (a user solution's answer is its last box) all grade with these functions.

Choices (the papers are silent on these; each is ours, with its reasons in docs/choices.md):
  - Extraction: the last \\boxed{...} (or \\fbox{...}), braces matched with nesting, `\\boxed 12` read as 12; last_boxed
    is the one extractor, which data.py's loader also uses (docs/choices.md, choice 10).
  - Fallback when there is no box (`--no_fallback` turns it off): the answer the model declared after the last
    "answer is" / "answer:", never "the last number in the text" (docs/choices.md, choice 10).
  - Checking: a normalized string comparison, then math-verify; golds and verdicts cached (docs/choices.md, choice 51).
  - A time limit per answer (`timeout`, default 5 s) in any thread; answers too costly for any limit are compared as
    strings only (docs/choices.md, choice 52).
"""

import ctypes
import logging
import math
import re
import threading
from functools import lru_cache

# ---------------------------------------------------------------------------------------------
# the final answer of a text: its last \boxed{...}
# ---------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")  # \boxed, \fbox; not \boxedfoo
_ARG_SKIP = re.compile(r"[ \t]*(?:\r?\n[ \t]*)?")  # spaces and one line end, as TeX skips after a command
_UNBRACED = re.compile(r"[^\s${}]+")  # an argument without braces: up to a space, $, brace or line end


def braced_group(text, start):
    """Content of the {...} group opening at text[start] == '{', or None if it never closes.

    Braces nest; a backslash starts a control symbol or word, so \\{ and \\} are not braces and
    the \\\\ in "a\\\\}" does not escape the closing brace."""
    depth, j = 0, start
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # skip the escaped character (a control word's letters hold no braces)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:j]
        j += 1
    return None


def last_boxed(text):
    """The final answer in `text`: the content of its last \\boxed / \\fbox, or None if there is none.

    After the command, spaces (and one line end) are skipped, as TeX skips them; then a {...} group gives its content, braces nested (\\boxed{\\frac{1}{2}} gives \\frac{1}{2};
    \\{ and \\} are not braces). Without braces, the argument is the run of characters up to the
    next space, `$`, brace or line end, less trailing sentence punctuation: `\\boxed 5.` and
    `\\boxed5` give 5, `\\boxed \\pi` gives \\pi, and `\\boxed 12` gives 12. (TeX itself would box
    only the 1; a model that writes `\\boxed 12` means 12, and the MATH graders read it so.)
    "Last" means the last box command in the text, so a box nested in another wins. A box that holds nothing usable is skipped and the one before it is tried: a
    group that never closes (a truncated response), an empty or blank group, or a non-argument such
    as `\\boxed}` or `\\boxed$`. The result is stripped of surrounding whitespace.

    This is the one extractor of the project: data.to_row takes a user solution's answer from it
    and extract_answer grades responses with it.
    """
    for m in reversed(list(_BOX.finditer(text))):
        j = _ARG_SKIP.match(text, m.end()).end()
        if j >= len(text):
            continue
        if text[j] == "{":
            content = braced_group(text, j)
        else:
            run = _UNBRACED.match(text, j)  # None at $, } or a blank line: no argument
            content = run.group(0).rstrip(".,;:") if run else None
            content = None if content == "\\" else content  # a lone backslash at the very end
        if content is not None and content.strip():
            return content.strip()
    return None


# ---------------------------------------------------------------------------------------------
# answer extraction
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_MATH_SPAN = re.compile(r"\s*(?:\$\$?|\\\(|\\\[)(.+?)(?:\$\$?|\\\)|\\\])", re.DOTALL)


def _fallback_answer(text):
    """The fallback: after the last "answer is" / "answer:", the math span or number that follows it
    (docs/choices.md, choice 10)."""
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None
    rest = re.sub(r"^[\s:*]+", "", text[hits[-1].end():])  # "answer is: **5**" -> "5**"
    span = _MATH_SPAN.match(rest)
    if span and span.group(1).strip():
        return span.group(1).strip()
    clause = re.split(r"(?<!\d)\.(?!\d)|\n", rest[:200], maxsplit=1)[0]  # up to the end of the sentence
    if "=" in clause:  # "the answer is 10 + 2 = 12": the result, after the last "="
        rest = clause.rsplit("=", 1)[1].lstrip()
    num = _NUMBER.match(rest[:200])  # the number must come right after the phrase (or the "=")
    return num.group(0).replace(" ", "") if num else None


def extract_answer(text, *, fallback=True):
    """The final answer of a response: the last box, else (if fallback) the declared answer, else None
    (docs/choices.md, choice 10)."""
    boxed = last_boxed(text)
    if boxed is not None or not fallback:
        return boxed
    return _fallback_answer(text)


# ---------------------------------------------------------------------------------------------
# answer checking: normalized strings, then math-verify under a time limit
# ---------------------------------------------------------------------------------------------

MAX_ANSWER_CHARS = 400  # longer "answers" are string-compared only (docs/choices.md, choice 52)
DEFAULT_TIMEOUT = 5.0  # seconds per answer

# math-verify logs every failed parse / timeout (and warns once when its own timeout is off);
# as a reward function it sees thousands of garbage answers, so keep it quiet
logging.getLogger("math_verify").setLevel(logging.CRITICAL)
logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)


def normalize_answer(s):
    """A canonical string for an answer: drops $, \\text{}, \\left/\\right, spacing, units of degree/percent."""
    s = str(s).strip()
    s = re.sub(r"^\$+|\$+$", "", s)
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s)
    for _ in range(3):  # nested \text{\textbf{..}}
        s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\left|\\right|\\[,;:! ]|\\q?quad", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|\\%|%|\\\$|°", "", s)
    s = s.lower()
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = re.sub(r"^[a-z]=", "", s)  # "x=3" -> "3"
    while re.search(r"\d,\d{3}(?!\d)", s):
        s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)  # 1,000 -> 1000
    if re.fullmatch(r"-?\d+\.\d+", s):  # 2.50 -> 2.5, 3.0 -> 3
        s = s.rstrip("0").rstrip(".")
    return s


def _as_latex(s):
    """Wrap a bare answer so math-verify's LaTeX extractor finds it; leave $..$ / \\boxed{} alone."""
    return s if ("\\boxed" in s or "$" in s) else "\\boxed{" + s + "}"


@lru_cache(maxsize=8192)
def _parse(latex, seconds):
    """math-verify parse of one answer (cached: a gold is parsed once per run, not once per sample)."""
    from math_verify import parse

    return parse(_as_latex(latex), parsing_timeout=seconds)


@lru_cache(maxsize=65536)
def _math_equal(pred, gold, seconds):
    """math-verify verdict for one (pred, gold) pair; `seconds` is its own SIGALRM limit or None."""
    from math_verify import verify

    g, p = _parse(gold, seconds), _parse(pred, seconds)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=seconds))  # verify(gold, pred): not symmetric


class _Deadline(BaseException):
    """Raised inside a helper thread that overran its time limit (BaseException: math-verify's
    `except Exception` blocks must not swallow it)."""


def _call_with_deadline(fn, args, seconds):
    """fn(*args) in a helper thread; None if it is still running after `seconds` (then interrupted)."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException:  # noqa: BLE001 - a failed check is a wrong answer, never a crash
            box["value"] = None

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():  # raise _Deadline in it at its next bytecode, so it stops using the CPU
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(th.ident), ctypes.py_object(_Deadline))
        return None
    return box.get("value")


def too_costly(s):
    """Would sympy try to build a gigantic number from this answer? (towers, huge powers, huge factorials)

    Big-integer arithmetic runs in C, where neither a signal nor a thread interruption can stop it
    (8^{8^{8^{8}}} exhausts memory before any time limit fires), so such answers never reach sympy.
    """
    s = s.replace("**", "^")
    for m in re.finditer(r"\^\s*", s):
        j = m.end()
        if j < len(s) and s[j] == "{":
            exponent = braced_group(s, j) or ""
            end = j + len(exponent) + 2
        else:
            tok = re.match(r"[\w.]+", s[j:])
            exponent = tok.group(0) if tok else ""
            end = j + len(exponent)
        if "^" in exponent or "!" in exponent or s[end:].lstrip().startswith("^"):
            return True  # a power tower (9^{9^9}, 9^9^9) / a factorial in an exponent
        digits = re.sub(r"[\s,{}]", "", exponent)
        if digits.isdigit() and int(digits) > 100_000:
            return True
    if re.search(r"[)}\]]\s*!", s):  # (expression)! : size unknown before evaluating it
        return True
    return any(int(n) > 10_000 for n in re.findall(r"(\d+)\s*!", s))


def answers_match(pred, gold, *, timeout=DEFAULT_TIMEOUT):
    """Is the extracted answer `pred` equal to `gold`? String match, then math-verify under a time limit
    (docs/choices.md, choice 51; docs/choices.md, choice 52)."""
    if pred is None:
        return False
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    if len(pred) > MAX_ANSWER_CHARS or too_costly(pred):
        return False  # string comparison only (docs/choices.md, choice 52)
    if threading.current_thread() is threading.main_thread():
        # math-verify's own timeout: SIGALRM, whole seconds, main thread only
        seconds = max(1, math.ceil(timeout))
        try:
            return _math_equal(pred, gold, seconds)
        except Exception:  # noqa: BLE001
            return False
    # any other thread: no signals; math-verify with its timeout off, under our deadline
    return bool(_call_with_deadline(_math_equal, (pred, gold, None), timeout))


def grade(response_text, gold, *, fallback=True, timeout=DEFAULT_TIMEOUT):
    """(extracted answer or None, correct) for one response."""
    pred = extract_answer(response_text, fallback=fallback)
    return pred, answers_match(pred, str(gold), timeout=timeout)


def check_answer(response_text, gold, *, fallback=True, timeout=DEFAULT_TIMEOUT):
    """True if the response's final answer equals gold. This is also the training reward."""
    return grade(response_text, gold, fallback=fallback, timeout=timeout)[1]
