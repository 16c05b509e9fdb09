"""Loading the YAML config: `${ENV}` substitution, validation by pydantic into the classes of
`schema.py`, and errors that name file:line: field.

Operators edit this file by hand at 3 a.m.; every mistake must point at the exact line and field.
Only the processes that read config files import this module (and with it yaml and pydantic):
a single-process proxy, a supervisor, the CLI; never a worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
import threading
import types
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from .schema import ConfigError, ConfigIssue, LocatedError, ProxyConfig

log = logging.getLogger("failover_proxy")

WATCH_INTERVAL = 1.0

_VALIDATOR: TypeAdapter[ProxyConfig] = TypeAdapter(ProxyConfig)

# ---------------------------------------------------------------------------------------------
# Loading: YAML with line marks, environment substitution, located errors.


_RESOLVER = yaml.resolver.Resolver()
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, env: Mapping[str, str]) -> str:
    """Replace `${VAR}` and `${VAR:-default}`; an unset `${VAR}` without default is an error."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ValueError(f"environment variable {name} is not set")
            return default
        return value

    return _ENV_RE.sub(replace, text)


class _Located:
    """The YAML node tree kept beside the plain data, to turn a field path into a line."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    def line_of(self, loc: tuple[str | int, ...]) -> int:
        node = self.root
        if node is None:
            return 1
        line = node.start_mark.line + 1
        for part in loc:
            child = _child(node, part)
            if child is None:
                break
            node = child
            line = node.start_mark.line + 1
        return line


def _child(node: yaml.Node, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                found: yaml.Node = value
                return found
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        child: yaml.Node = node.value[part]
        return child
    return None


def _walk_nodes(
    node: yaml.Node, path: tuple[str | int, ...]
) -> Iterator[tuple[yaml.Node, tuple[str | int, ...]]]:
    yield node, path
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _walk_nodes(value, (*path, str(key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _walk_nodes(item, (*path, index))


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _prepare_tree(node: yaml.Node, env: Mapping[str, str], file: str) -> list[ConfigIssue]:
    """One walk over the parsed tree (thousands of backends make several walks count): keys
    read as names, duplicate keys found, `${VAR}` substituted in scalar values."""
    issues: list[ConfigIssue] = []
    for child, path in _walk_nodes(node, ()):
        if isinstance(child, yaml.MappingNode):
            seen: set[str] = set()
            for key, _ in child.value:
                if isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:bool":
                    # YAML 1.1 reads a plain `on:` or `no:` key as a boolean; as a key it is a
                    # name.
                    key.tag = "tag:yaml.org,2002:str"
                if key.value in seen:
                    where = _dotted((*path, key.value))
                    issues.append(ConfigIssue(file, key.start_mark.line + 1, where,
                                              "duplicate key"))
                seen.add(key.value)
        elif isinstance(child, yaml.ScalarNode) and "${" in child.value:
            issue = _substitute(child, path, env, file)
            if issue is not None:
                issues.append(issue)
    return issues


def _substitute(
    node: yaml.ScalarNode, path: tuple[str | int, ...], env: Mapping[str, str], file: str
) -> ConfigIssue | None:
    """Substitute `${VAR}` inside a scalar value in place (after parsing, so no YAML
    injection)."""
    try:
        node.value = substitute_env(node.value, env)
    except ValueError as exc:
        return ConfigIssue(file, node.start_mark.line + 1, _dotted(path), str(exc))
    if node.tag == "tag:yaml.org,2002:str" and node.style is None:
        # A plain scalar like ${PORT} should become an int when it now looks like one.
        node.tag = _RESOLVER.resolve(  # type: ignore[no-untyped-call]
            yaml.ScalarNode, node.value, (True, False)
        )
    return None


VALIDATION_NICENESS = 10

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser where PyYAML was built with it (about ten times faster: a config of
thousands of backends reloads in well under a second), else PyYAML's own."""


def parse_config(
    text: str, file: str = "<config>", env: Mapping[str, str] | None = None
) -> ProxyConfig:
    """Validate config text; raise ConfigError listing every problem with file:line: field."""
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(file, line, "(yaml)", f"invalid YAML: {problem}")]) from exc
    if root is None:
        raise ConfigError([ConfigIssue(file, 1, "(top level)", "the config file is empty")])
    issues = _prepare_tree(root, env, file)
    if issues:
        raise ConfigError(issues)
    loader = _LOADER("")
    try:
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(file, 1, "(yaml)", str(exc))]) from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, 1, "(top level)", "the config must be a mapping")])
    located = _Located(root)
    try:
        return _VALIDATOR.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(_issues_from_validation(exc, located, file)) from exc


def _issues_from_validation(
    exc: ValidationError, located: _Located, file: str
) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        context = error.get("ctx") or {}
        inner = context.get("error")
        if isinstance(inner, LocatedError):
            loc, message = loc + inner.loc, str(inner)
        else:
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
                message = "unknown field" + _did_you_mean(loc)
            elif error["type"] in ("missing", "missing_keyword_only_argument"):
                message = "field required"
            message = _CLASS_NAME.sub("a mapping of settings", message)
        issues.append(ConfigIssue(file, located.line_of(loc), _dotted(loc), message))
    return issues


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema: what editors complete and check a config file against."""
    schema: dict[str, Any] = _VALIDATOR.json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "failover-proxy config"
    return schema


_CLASS_NAME = re.compile(
    r"a (?:valid )?dictionary or (?:an )?instance of \w+|instance of \w+Config"
)
"""How pydantic names our classes in a message: an operator wrote YAML, not Python."""


def _did_you_mean(loc: tuple[str | int, ...]) -> str:
    """`; did you mean `health_check`?` for an unknown key close to a known one there."""
    import difflib

    known = _fields_at(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6) if loc else []
    return f"; did you mean `{close[0]}`?" if close else ""


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """The settings a config class at `loc` knows (none when `loc` is not a class)."""
    current: Any = ProxyConfig
    for part in loc:
        current = _member_type(current, part)
        if current is None:
            return []
    return [f.name for f in dataclasses.fields(current)] if dataclasses.is_dataclass(
        current) else []


def _member_type(container: Any, part: str | int) -> Any:
    """The type found at `part` of `container` (a config class, a list or a mapping of one)."""
    for candidate in (container, *typing.get_args(container)):
        if dataclasses.is_dataclass(candidate) and isinstance(part, str):
            hints = typing.get_type_hints(candidate)
            if part in hints:
                return _plain(hints[part])
        origin = typing.get_origin(candidate)
        if origin is list and isinstance(part, int):
            return _plain(typing.get_args(candidate)[0])
        if origin is dict and isinstance(part, str):
            return _plain(typing.get_args(candidate)[1])
    return None


def _plain(kind: Any) -> Any:
    """A type without its Annotated rules and without None (Optional)."""
    if typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        return _plain(args[0])
    return kind


def line_finder(text: str) -> Callable[[tuple[str | int, ...]], int]:
    """For text that parse_config accepted: the line of a field, by its path (what `audit`
    reports its findings at)."""
    return _Located(yaml.compose(text, Loader=_LOADER)).line_of


def read_config_text(path: str | Path) -> str:
    """A config file's text; a file that cannot be read is a ConfigError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), 1, "(file)", exc.strerror or str(exc))]) from exc


def summarize(config: ProxyConfig) -> str:
    """One line telling an operator what a valid config contains."""
    backends = [b for u in config.upstreams.values() for b in u.backends]
    providers = sorted({b.provider for b in backends})
    return (
        f"{len(config.upstreams)} upstream(s), {len(backends)} backend(s) over "
        f"{len(providers)} provider(s) ({', '.join(providers)}), {len(config.routes)} route(s), "
        f"listening on {config.listen.host}:{config.listen.port}"
    )


class ConfigSource:
    """The file a running proxy reloads from. What was last read of it is remembered, so a
    change is acted on once, whether SIGHUP, /reload or the watcher noticed it first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.text = read_config_text(path)
        self.digest = _digest(self.text.encode())

    async def read(self, running: ProxyConfig, source: str) -> tuple[ProxyConfig, list[str]]:
        """The file's config and a warning for each change that needs a restart; ConfigError
        when the file is bad (then the same content is not reported again by `watch`)."""
        text = await asyncio.to_thread(read_config_text, self.path)
        self.digest = _digest(text.encode())
        loop = asyncio.get_running_loop()
        new = await loop.run_in_executor(_parser(), parse_config, text, self.path)
        self.text = text
        warnings = new.restart_only_changes(running)
        for warning in warnings:
            log.warning("reload (%s): %s", source, warning)
        return new, warnings

    async def watch(self, reload: Callable[[str], Awaitable[object]]) -> None:
        """Reload when the file's content changes (polled: works on every filesystem)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                current = await asyncio.to_thread(Path(self.path).read_bytes)
            except OSError:
                continue  # being replaced, or gone: the next poll looks again
            if _digest(current) != self.digest:
                await reload("file changed")


@functools.cache
def _parser() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that validates reloads, at a lower CPU priority than everything else (Linux
    sets nice per thread): thousands of upstreams take a few hundred ms of CPU to validate, and
    on a machine the data plane keeps busy, that time should come from idle moments, not from
    requests. Meanwhile the event loop that called it goes on (probes, admin API)."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="config-validation", initializer=_lower_priority
    )


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):  # elsewhere than Linux: as it is
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), VALIDATION_NICENESS)


def _digest(content: bytes) -> bytes:
    return hashlib.sha256(content).digest()
