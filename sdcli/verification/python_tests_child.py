"""The programs `python_tests` runs in the sandbox, and the value format they share with it.

Two programs, each run as main.py in a sandbox of its own (`python main.py runner|judge CONFIG`):

- the runner holds the code under test. It loads solution.py, evaluates each test's input
  expression (from inputs.json) and prints the value it got, one JSON line per test, in the
  format below. It never sees an expected value, so nothing it prints can claim a test passed:
  the trusted parent (python_tests_feedback.py) compares. Then, when there is `test_code`, it answers
  the judge's requests on two pipes: the code's top-level names, and calls, attributes, items,
  lengths and iterations on the code's objects.
- the judge runs the data's `test_code` (read from stdin), where each top-level name of the
  code (except those that start with "_" or shadow a builtin) is a proxy that asks the runner.
  So asserts are decided in the judge's process, which
  the code under test cannot reach, on values the runner sent. Only plain values and
  references cross; an object of the code never compares equal to a value (no __eq__ is
  forwarded), so an object that claims to equal everything passes nothing. The judge prints one
  JSON line: passed, or the error.

The value format (`encode` / `decode`): JSON for None, bool, str, finite floats, small ints and
lists; a one-key object for the rest: {"int": hex}, {"float": "nan"}, {"tuple": [...]},
{"set": [...]}, {"frozenset": [...]}, {"dict": [[k, v], ...]}, {"bytes": hex},
{"complex": [re, im]}; and {"ref": n, "type": name} for an object of the code, between runner
and judge only. Only these exact types cross: a subclass of int or str does not.

Imports the standard library only: it runs where sdcli cannot be imported (the sandbox does not
show the package's folder), which is also why it is one file: it is sent as main.py's source,
and the parent imports the value format from it, so both sides read one definition.
"""

import builtins
import json
import linecache
import os
import reprlib
import signal
import sys
import traceback

USER_FILES = frozenset({"solution.py", "<test>", "<test_code>"})
PRELOAD = ("json", "linecache", "reprlib", "signal", "traceback", "builtins")  # imported before the guard
MAX_DEPTH = 100
MAX_ITEMS = 100_000  # the most items an iteration of the code's object sends
MAX_MESSAGE = 16 << 20  # bytes per message between runner and judge


class NotPlain(Exception):
    """The value is not built from the plain types only (its message names the type)."""


class Timeout(BaseException):  # BaseException: `except Exception` in the code does not swallow it
    pass


class Unreachable(BaseException):  # the other side stopped answering
    pass


# ---------------------------------------------------------------------------------------------
# The value format


def encode(value, ref=None, depth=0):
    """`value` as JSON-able data. `ref(obj) -> int` names objects that are not plain; without it
    they raise NotPlain."""
    if depth > MAX_DEPTH:
        raise NotPlain("a value nested too deeply")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return value if value.bit_length() < 63 else {"int": hex(value)}
    if t is float:
        return value if value - value == 0 else {"float": repr(value)}  # nan and inf are not JSON
    if t is list:
        return [encode(v, ref, depth + 1) for v in value]
    if t in (tuple, set, frozenset):
        return {t.__name__: [encode(v, ref, depth + 1) for v in value]}
    if t is dict:
        return {"dict": [[encode(k, ref, depth + 1), encode(v, ref, depth + 1)] for k, v in value.items()]}
    if t is bytes:
        return {"bytes": value.hex()}
    if t is complex:
        return {"complex": [encode(value.real), encode(value.imag)]}
    if ref is not None:
        return {"ref": ref(value), "type": t.__name__}
    raise NotPlain(t.__name__)


def decode(data, remote=None, depth=0):
    """The value `data` encodes; `remote(n, type_name)` builds a proxy for a reference (else refused).
    Raises ValueError for anything not in the format."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(data)
    if data is None or t in (bool, str, int):
        return data
    if t is float:
        return data
    if t is list:
        return [decode(v, remote, depth + 1) for v in data]
    if t is not dict:
        raise ValueError(f"unexpected {t.__name__}")
    if remote is not None and set(data) == {"ref", "type"} and type(data["ref"]) is int:
        return remote(data["ref"], str(data["type"]))
    if len(data) != 1:
        raise ValueError(f"unexpected object with keys {sorted(data)}")
    ((tag, body),) = data.items()
    try:
        if tag == "int" and type(body) is str:
            return int(body, 16)
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if type(body) is not list:
            raise ValueError(f"{tag}: expected a list")
        items = [decode(v, remote, depth + 1) for v in body]
        if tag == "tuple":
            return tuple(items)
        if tag == "set":
            return set(items)
        if tag == "frozenset":
            return frozenset(items)
        if tag == "complex" and len(items) == 2 and all(type(x) is float for x in items):
            return complex(*items)
        if tag == "dict" and all(type(p) is list and len(p) == 2 for p in items):
            return dict((k, v) for k, v in items)
    except TypeError as e:  # an unhashable set item or dict key
        raise ValueError(str(e)) from None
    raise ValueError(f"unknown tag {tag!r}")


# ---------------------------------------------------------------------------------------------
# Shared by both programs


def _alarm(signum, frame):
    raise Timeout()


def guarded(fn, seconds):
    """(value, error text or None, timed out, error type name) of fn(), under a time limit; output is discarded."""
    signal.signal(signal.SIGALRM, _alarm)
    sys.stdout = sys.stderr = _Sink()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(), None, False, None
    except Timeout:
        return None, None, True, None
    except Unreachable:
        return None, "The code under test stopped answering (it exited, crashed or was killed).", False, None
    except SystemExit as e:
        return None, f"The code called sys.exit({e.code!r}).", False, "SystemExit"
    except BaseException as e:
        return None, describe(e), False, type(e).__name__
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


class _Sink:
    def write(self, s):
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False


def describe(e: BaseException) -> str:
    """The exception with the tail of its traceback, frames of the code and the tests only."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename in USER_FILES]
    head = ["Traceback (most recent call last):\n", *traceback.format_list(frames[-4:])] if frames else []
    text = "".join(head + traceback.format_exception_only(type(e), e)).rstrip()
    if isinstance(e, EOFError):
        text += "\n(The code called input(); the tests call the function directly instead.)"
    return text[-1000:]  # results count toward output_bytes: at most ~1 KB per test


def register(name: str, text: str) -> None:
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)


class Lines:
    """JSON lines over a pair of pipes."""

    def __init__(self, read_fd: int, write_fd: int):
        self.rfile = open(read_fd, "rb")
        self.wfile = open(write_fd, "wb")

    def send(self, message: dict) -> None:
        self.wfile.write(json.dumps(message).encode() + b"\n")
        self.wfile.flush()

    def receive(self):
        line = self.rfile.readline(MAX_MESSAGE)
        if not line.endswith(b"\n"):
            raise Unreachable()  # end of file, or a message past the size limit
        return json.loads(line)


# ---------------------------------------------------------------------------------------------
# The runner: holds the code under test


def runner(config: dict) -> None:
    out = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # what the code writes to fd 1 goes nowhere; results go to `out`

    def emit(**event):
        os.write(out, (json.dumps(event) + "\n").encode())

    with open("inputs.json", encoding="utf-8") as f:
        inputs = json.load(f)
    per_test, budget = config["per_test"], config["value_bytes"]
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    register("solution.py", source)
    ns = {"__name__": "solution", "__builtins__": builtins}  # not __main__: a main block does not run
    _, error, timed_out, _ = guarded(lambda: exec(compile(source, "solution.py", "exec"), ns), per_test)
    if timed_out:
        error = f"Loading the code timed out after {per_test:.1f}s (an endless loop or input() at the top level?)"
    elif error is not None:
        error = "The code failed before any test could run:\n" + error
    entry = config.get("entry_point")
    if error is None and entry and not callable(ns.get(entry)):
        error = f"The code does not define a function named `{entry}`, which the tests call."
    if error is not None:
        emit(load_error=error)
        return
    emit(loaded=True)

    stopped = False  # after a timeout the rest is not run: an endless loop usually repeats, and time is short
    for i, expression in enumerate(inputs):
        if stopped:
            emit(i=i, skipped=True)
            continue
        register("<test>", expression)
        code = compile(expression, "<test>", "eval")
        got, error, timed_out, _ = guarded(lambda: eval(code, ns), per_test)
        stopped = timed_out
        if timed_out or error is not None:
            emit(i=i, timeout=timed_out, error=error)
            continue
        try:
            value = encode(got)
        except NotPlain as e:
            emit(i=i, object=str(e))
            continue
        except ValueError as e:  # an int too long to write out, say
            emit(i=i, error=f"The result cannot be compared: {e}")
            continue
        text = json.dumps({"i": i, "value": value})
        if len(text) > budget:
            emit(i=i, too_large=len(text), preview=_short(got))
        else:
            os.write(out, (text + "\n").encode())
    if config.get("rpc"):
        serve(ns, Lines(*config["rpc"]), per_test, stopped)


def serve(ns: dict, lines: Lines, per_test: float, stopped: bool) -> None:
    """Answer the judge until it hangs up: names, then calls and attribute reads on the code's objects."""
    objects: list = []
    ids: dict[int, int] = {}

    def ref(obj) -> int:
        if id(obj) not in ids:
            ids[id(obj)] = len(objects)
            objects.append(obj)  # kept alive, so its id stays its own
        return ids[id(obj)]

    def answer(fn) -> dict:
        nonlocal stopped
        if stopped:
            return {"stopped": True}
        value, error, timed_out, kind = guarded(fn, per_test)
        if timed_out:
            stopped = True
            return {"timeout": True}
        if error is not None:
            return {"error": error, "type": kind}
        try:
            return {"value": encode(value, ref)}
        except (NotPlain, ValueError) as e:
            return {"error": f"The result cannot be sent to the tests: {e}", "type": "TypeError"}

    while True:
        try:
            request = lines.receive()
        except (Unreachable, ValueError):
            return
        op = request.get("op")
        if op == "names":
            reply = answer(lambda: {k: v for k, v in ns.items() if not k.startswith("__")})
            if "value" in reply:  # a dict of name -> value or reference, sent as its pairs
                reply = {"names": reply["value"]}
        else:
            try:
                target = objects[request["ref"]]
                args = [decode(a, lambda n, _t: objects[n]) for a in request.get("args", [])]
                kwargs = {k: decode(v, lambda n, _t: objects[n]) for k, v in request.get("kwargs", {}).items()}
                action = {
                    "call": lambda: target(*args, **kwargs),
                    "getattr": lambda: getattr(target, str(request["name"])),
                    "getitem": lambda: target[args[0]],
                    "len": lambda: len(target),
                    "bool": lambda: bool(target),
                    "list": lambda: _take(target),
                }[op]
            except (LookupError, TypeError, ValueError) as e:
                reply = {"error": f"bad request {op!r}: {e}", "type": "RuntimeError"}
            else:
                reply = answer(action)
        try:
            lines.send(reply)
        except OSError:
            return


def _take(iterable) -> list:
    items = []
    for item in iterable:
        items.append(item)
        if len(items) > MAX_ITEMS:
            raise ValueError(f"iterating gave more than {MAX_ITEMS} items")
    return items


def _short(value) -> str:
    short = reprlib.Repr()
    short.maxstring = short.maxother = 200
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 20
    return short.repr(value)


# ---------------------------------------------------------------------------------------------
# The judge: runs the data's test_code against proxies of the code's names


class RemoteError(Exception):
    """An exception of a type that is not builtin, raised by the code under test."""


def judge(config: dict) -> None:
    out = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)

    def emit(**event):
        os.write(out, (json.dumps(event) + "\n").encode())

    test_code = sys.stdin.read()
    lines = Lines(*config["rpc"])
    per_test = config["per_test"]
    Remote = _remote_class(lines)
    names = _names_of_the_code(lines, Remote, emit)
    if names is None:
        return
    ns = {"__name__": "tests", "__builtins__": builtins}
    # Not a name that shadows a builtin: `sorted = ...` in the code must not change what
    # `assert f(x) == sorted(x)` in the tests compares with.
    ns.update((k, v) for k, v in names.items() if type(k) is str and not k.startswith("_") and not hasattr(builtins, k))
    register("<test_code>", test_code)
    code = compile(test_code, "<test_code>", "exec")
    _, error, timed_out, _ = guarded(lambda: exec(code, ns), per_test)
    emit(passed=error is None and not timed_out, timeout=timed_out, error=error)


def _names_of_the_code(lines: Lines, Remote: type, emit) -> dict | None:
    """The code's top-level names, values and proxies; None, with the verdict emitted, when the runner gives none."""
    try:
        lines.send({"op": "names"})
        reply = lines.receive()  # after the runner's tests: no time limit but the sandbox's
    except (Unreachable, OSError, ValueError):
        emit(passed=False, unreachable=True)
        return None
    if reply.get("stopped") or reply.get("timeout"):
        emit(passed=False, skipped=True)
        return None
    try:
        return decode(reply["names"], Remote)
    except (KeyError, ValueError):
        emit(passed=False, unreachable=True)
        return None


def _remote_class(lines: Lines) -> type:
    """The class of the proxies for the code's names and objects, asking the runner over `lines`."""

    def ask(request: dict):
        lines.send(request)
        reply = lines.receive()
        if "value" in reply:
            return decode(reply["value"], Remote)
        if reply.get("timeout") or reply.get("stopped"):
            raise Timeout()
        kind = getattr(builtins, str(reply.get("type")), None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = RemoteError
        raise kind("in the code under test:\n" + str(reply.get("error")))

    def send(value):
        if isinstance(value, Remote):
            return {"ref": object.__getattribute__(value, "_ref"), "type": ""}
        try:
            return encode(value, _refuse)
        except NotPlain as e:
            raise TypeError(f"the tests pass {e} to the code under test; only plain values can cross") from None

    class Remote:
        """A name or object of the code under test; every use is a request to the runner."""

        __slots__ = ("_ref", "_type")

        def __init__(self, ref: int, type_name: str):
            object.__setattr__(self, "_ref", ref)
            object.__setattr__(self, "_type", type_name)

        def _ask(self, op, **fields):
            return ask({"op": op, "ref": object.__getattribute__(self, "_ref"), **fields})

        def __call__(self, *args, **kwargs):
            return self._ask("call", args=[send(a) for a in args], kwargs={k: send(v) for k, v in kwargs.items()})

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return self._ask("getattr", name=name)

        def __getitem__(self, key):
            return self._ask("getitem", args=[send(key)])

        def __len__(self):
            return self._ask("len")

        def __bool__(self):
            return self._ask("bool")

        def __iter__(self):
            return iter(self._ask("list"))

        def __repr__(self):
            return f"<{object.__getattribute__(self, '_type')} object of the code under test>"

    return Remote


def _refuse(value):
    raise NotPlain(f"an object of type {type(value).__name__}")


def main() -> None:
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    {"runner": runner, "judge": judge}[mode](config)


if __name__ == "__main__":
    main()
