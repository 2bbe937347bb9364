"""Running one Python block's code. This runs inside the block's child process (or, in
one-process mode, in the caller); it never touches the database."""

from __future__ import annotations

import functools
import linecache
import logging
import marshal
import sys
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

from pipelines import decorators, variables
from pipelines.execution.spec import COMPLETED, CONDITION_FAILED, FAILED, BlockSpec, ExecutionResult

DEFAULT_POKE_INTERVAL = 60.0


class BlockError(Exception):
    """A problem with the block itself (no function, wrong arity), reported without a
    traceback into our own code."""


def install_mage_alias() -> None:
    """Make `from mage_ai.data_preparation.decorators import ...` resolve to ours."""
    if "mage_ai.data_preparation.decorators" in sys.modules:
        return
    for name in ("mage_ai", "mage_ai.data_preparation"):
        module = sys.modules.get(name) or types.ModuleType(name)
        module.__path__ = []  # a package, so the submodule import is allowed
        sys.modules[name] = module
    sys.modules["mage_ai.data_preparation.decorators"] = decorators
    sys.modules["mage_ai.data_preparation"].decorators = decorators  # type: ignore[attr-defined]
    sys.modules["mage_ai"].data_preparation = sys.modules["mage_ai.data_preparation"]  # type: ignore[attr-defined]


def block_filename(spec: BlockSpec) -> str:
    return f"{spec.pipeline_uuid}/{spec.block_type}/{spec.block_uuid}.py"


def load_block_functions(spec: BlockSpec) -> dict[str, list[Callable[..., Any]]]:
    """Execute the block file and return its decorated functions by role, in the order
    they are defined."""
    install_mage_alias()
    filename = block_filename(spec)
    # Registered so tracebacks show the user's lines.
    linecache.cache[filename] = (len(spec.content), None, spec.content.splitlines(True), filename)
    namespace: dict[str, Any] = {"__name__": f"millrace_block_{spec.block_uuid}", "__file__": filename}
    namespace.update(decorators.DECORATORS)
    code = marshal.loads(spec.code) if spec.code else compile(spec.content, filename, "exec", dont_inherit=True)
    exec(code, namespace)  # noqa: S102 - running the user's block is the point
    found: dict[str, list[Callable[..., Any]]] = {}
    for value in namespace.values():
        role = getattr(value, decorators.ROLE_ATTR, None)
        if role and callable(value) and getattr(value, "__module__", None) == namespace["__name__"]:
            found.setdefault(role, []).append(value)
    return found


@functools.lru_cache(maxsize=256)
def compiled(content: str, filename: str) -> bytes | None:
    """A block's code compiled once in the long-lived caller and handed to each child
    in marshal form, instead of compiled again in every child, where the compiler's
    allocations also land on pages the child must first copy: in a forked child,
    loading the marshalled code takes a fraction of the time and of the page faults
    that compiling takes (see the README's performance section). None for code that
    does not compile: the child then compiles it and reports the error as it reports
    any other."""
    try:
        return marshal.dumps(compile(content, filename, "exec", dont_inherit=True))
    except (SyntaxError, ValueError):
        return None


def main_function(spec: BlockSpec, found: dict[str, list[Callable[..., Any]]]) -> Callable[..., Any]:
    if spec.block_type in found:
        return found[spec.block_type][-1]
    for role in decorators.MAIN_ROLES:
        if role in found:
            return found[role][-1]
    raise BlockError(
        f"Block {spec.block_uuid!r} defines no function decorated with @{spec.block_type}"
    )


def _call(function: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], *, what: str) -> Any:
    """Call with positional `args`, checking the count first, and with the keyword
    arguments the function can take."""
    positional, required, has_varargs, keywords = parameters(function)
    name = function.__name__
    if not has_varargs and len(args) > len(positional):
        raise BlockError(
            f"{what} {name}() takes {len(positional)} positional argument"
            f"{'' if len(positional) == 1 else 's'} but receives {len(args)}"
            " (one per upstream block, in edge order); add a parameter for each or use *args"
        )
    if len(args) < len(required):
        missing = ", ".join(required[len(args):])
        raise BlockError(
            f"{what} {name}() requires {len(required)} positional argument"
            f"{'' if len(required) == 1 else 's'} but receives {len(args)}; "
            f"nothing is passed for: {missing}"
        )
    if keywords is None:
        clash = next((p for p in positional[: len(args)] if p in kwargs), None)
        if clash is not None:
            raise BlockError(_clash_message(what, name, clash, positional.index(clash)))
        call_kwargs = kwargs
    else:
        taken = keywords - set(positional[: len(args)])
        call_kwargs = {k: v for k, v in kwargs.items() if k in taken}
    return function(*args, **call_kwargs)


# What every block receives by keyword, besides the runtime variables.
_BUILT_IN_KWARGS = frozenset({
    "execution_date", "ds", "hr", "event", "pipeline_uuid", "block_uuid", "pipeline_run_id", "retry",
    "logger", "context", "configuration", "status",
})


def _clash_message(what: str, function: str, name: str, index: int) -> str:
    kind = "the keyword argument" if name in _BUILT_IN_KWARGS else "the runtime variable"
    return (
        f"{what} {function}() receives the output of its upstream block #{index + 1} as its parameter {name!r}, "
        f"and {kind} {name!r} has the same name: rename the {'parameter' if name in _BUILT_IN_KWARGS else 'variable or the parameter'}"
    )


_CO_VARARGS = 0x04
_CO_VARKEYWORDS = 0x08


def parameters(function: Callable[..., Any]) -> tuple[list[str], list[str], bool, set[str] | None]:
    """(positional parameter names, those without a default, whether it takes *args,
    the names it takes by keyword or None when it takes **kwargs).

    A plain function is read off its code object; anything else (a wrapper, a partial, a
    callable object) goes through `inspect.signature`, which gives the same answer for
    plain functions but, in a freshly forked child, touches (and so copies) dozens of
    pages of the inspect module on every block."""
    code = getattr(function, "__code__", None)
    if type(function) is not types.FunctionType or code is None or hasattr(function, "__wrapped__") or hasattr(function, "__signature__"):
        return parameters_inspected(function)
    count = code.co_argcount
    names = code.co_varnames
    positional = list(names[:count])
    required = positional[: count - len(function.__defaults__ or ())]
    varkw = bool(code.co_flags & _CO_VARKEYWORDS)
    keywords = None if varkw else set(names[code.co_posonlyargcount: count + code.co_kwonlyargcount])
    return positional, required, bool(code.co_flags & _CO_VARARGS), keywords


def parameters_inspected(function: Callable[..., Any]) -> tuple[list[str], list[str], bool, set[str] | None]:
    import inspect

    params = list(inspect.signature(function).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    varkw = any(p.kind == p.VAR_KEYWORD for p in params)
    required = [p.name for p in positional if p.default is p.empty]
    keywords = None if varkw else {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return [p.name for p in positional], required, has_varargs, keywords


def outputs_of(value: Any) -> list[Any]:
    """Mage's rule: a list is the list of outputs, a tuple becomes one, None is none,
    anything else is a single output."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    return [value]


def input_value(outputs: list[dict]) -> Any:
    """What a downstream block receives from one upstream: its single output as it is,
    a list when it has several, None when it stored nothing."""
    values = [variables.read_value(meta) for meta in outputs]
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _run_sensor(function: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], spec: BlockSpec, logger: logging.Logger) -> None:
    interval = float(spec.configuration.get("poke_interval") or DEFAULT_POKE_INTERVAL)
    limit = spec.configuration.get("timeout") or spec.timeout
    deadline = time.monotonic() + float(limit) if limit else None
    polls = 0
    while True:
        polls += 1
        if _call(function, args, kwargs, what="Sensor"):
            logger.info("Sensor condition met after %d poll%s", polls, "" if polls == 1 else "s")
            return
        if deadline is not None and time.monotonic() + interval > deadline:
            raise TimeoutError(f"Sensor condition not met within {limit} s ({polls} polls)")
        time.sleep(interval)


def user_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the first frame in the block's own file, so the user sees
    their code and not the executor's."""
    frames = traceback.extract_tb(exc.__traceback__)
    start = next((i for i, frame in enumerate(frames) if frame.filename == filename), 0)
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames[start:])]
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def execute(spec: BlockSpec, logger: logging.Logger, context: dict[str, Any]) -> ExecutionResult:
    """Run the block: conditions, main function (sensor polling), tests, callbacks;
    store the outputs. Never raises: a failure is a result."""
    started = time.monotonic()
    variables.use_root(spec.data_dir)
    filename = block_filename(spec)
    kwargs = dict(spec.kwargs, logger=logger, context=context, configuration=spec.configuration)
    found: dict[str, list[Callable[..., Any]]] = {}
    try:
        found = load_block_functions(spec)
        function = main_function(spec, found)
        args = [input_value(upstream.outputs) for upstream in spec.inputs]
        for check in found.get("condition", []):
            if not _call(check, args, kwargs, what="Condition"):
                logger.info("Condition %s() is false: the block is skipped", check.__name__)
                return ExecutionResult(status=CONDITION_FAILED, error=f"Condition {check.__name__}() returned false")
        if spec.block_type == "sensor" or getattr(function, decorators.ROLE_ATTR, "") == "sensor":
            _run_sensor(function, args, kwargs, spec, logger)
            values: list[Any] = []
        else:
            values = outputs_of(_call(function, args, kwargs, what="Block function"))
        for check in found.get("test", []):
            _call(check, values or [None], kwargs, what="Test")
        metas = variables.write_outputs(spec.output_prefix, values, in_memory=spec.outputs_in_memory) if values else []
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, SystemExit included
        if isinstance(exc, BlockError | variables.VariableError):
            message, trace = str(exc), ""
        elif isinstance(exc, MemoryError) and spec.memory_limit_mb:
            message = f"The block used more than {spec.memory_limit_mb:,} MB of memory (MILLRACE_BLOCK_MEMORY_MB): {type(exc).__name__}: {exc}"
            trace = user_traceback(exc, filename)
        else:
            message = f"{type(exc).__name__}: {exc}"
            trace = user_traceback(exc, filename)
        _callbacks(found, ("on_failure", "callback"), kwargs, logger, status=FAILED)
        return ExecutionResult(
            status=FAILED, error=message, traceback=trace,
            metrics={"duration": time.monotonic() - started},
        )
    _callbacks(found, ("on_success", "callback"), kwargs, logger, status=COMPLETED)
    rows = sum(m["shape"][0] for m in metas if m["kind"] == variables.KIND_DATAFRAME)
    return ExecutionResult(
        status=COMPLETED, outputs=metas,
        metrics={"duration": time.monotonic() - started, "outputs": len(metas), "rows": rows},
    )


def _callbacks(found: dict[str, list[Callable[..., Any]]], roles: tuple[str, ...], kwargs: dict[str, Any], logger: logging.Logger, *, status: str) -> None:
    for role in roles:
        for function in found.get(role, []):
            try:
                _call(function, [], dict(kwargs, status=status), what="Callback")
            except Exception:  # noqa: BLE001 - a failing callback is logged, not fatal
                logger.exception("Callback %s() failed", function.__name__)
