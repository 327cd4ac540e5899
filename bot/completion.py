"""``tgops completion bash|zsh``: a shell completion script, made from the CLI's parser.

The subcommands and their options come from the argparse parser itself, the words of
``tgops tg`` from the command grammar, so the script never lags behind the CLI. Install:
``tgops completion bash > /etc/bash_completion.d/tgops`` (or ``source <(tgops completion
bash)`` in ``~/.bashrc``); for zsh ``tgops completion zsh > "${fpath[1]}/_tgops"``.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bot.grammar import SPECS

SHELLS = ("bash", "zsh")


@dataclass(frozen=True, slots=True, kw_only=True)
class Words:
    """What can follow ``tgops``: subcommands with their options (and sub-actions)."""

    top: tuple[str, ...]
    options: Mapping[str, tuple[str, ...]]
    """Subcommand (``config check`` for nested ones) → its options."""
    actions: Mapping[str, tuple[str, ...]]
    """Subcommand with sub-actions (``config``) → the actions."""
    tg_first: tuple[str, ...]
    tg_second: Mapping[str, tuple[str, ...]]


def _subparsers(parser: argparse.ArgumentParser) -> Mapping[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to list them
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    found = [
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
    ]
    return tuple(sorted(found))


def words(parser: argparse.ArgumentParser) -> Words:
    top = [o for o in _options(parser) if o.startswith("--")]
    options: dict[str, tuple[str, ...]] = {}
    actions: dict[str, tuple[str, ...]] = {}
    commands = _subparsers(parser)
    for name, sub in commands.items():
        options[name] = _options(sub)
        nested = _subparsers(sub)
        if nested:
            actions[name] = tuple(nested)
            for action, leaf in nested.items():
                options[f"{name} {action}"] = _options(leaf)
    first: list[str] = []
    second: dict[str, list[str]] = {}
    for spec in SPECS:
        head, _, tail = spec.name.partition(" ")
        if head not in first:
            first.append(head)
        if tail:
            second.setdefault(head, []).append(tail)
    return Words(
        top=(*commands, *top),
        options=options,
        actions=actions,
        tg_first=tuple(first),
        tg_second={k: tuple(v) for k, v in second.items()},
    )


def _q(items: Sequence[str]) -> str:
    return shlex.quote(" ".join(items))


def bash_script(w: Words) -> str:
    cases = "\n".join(
        f"        {shlex.quote(name)}) opts={_q(opts)} ;;" for name, opts in w.options.items()
    )
    action_cases = "\n".join(
        f"        {shlex.quote(name)}) actions={_q(acts)} ;;" for name, acts in w.actions.items()
    )
    tg_cases = "\n".join(
        f"        {shlex.quote(head)}) tgwords={_q(tails)} ;;"
        for head, tails in w.tg_second.items()
    )
    return f"""# bash completion for tgops (made by `tgops completion bash`)
_tgops() {{
    local cur cmd action opts actions tgwords i word
    cur=${{COMP_WORDS[COMP_CWORD]}}
    cmd=""
    action=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        case $word in -*) continue ;; esac
        if [[ -z $cmd ]]; then cmd=$word; elif [[ -z $action ]]; then action=$word; fi
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W {_q(w.top)} -- "$cur"))
        return
    fi
    if [[ $cmd == tg ]]; then
        if [[ $cur == -* ]]; then
            opts={_q(w.options.get("tg", ()))}
            COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        elif [[ -z $action ]]; then
            COMPREPLY=($(compgen -W {_q(w.tg_first)} -- "$cur"))
        else
            tgwords=""
            case $action in
{tg_cases}
            esac
            COMPREPLY=($(compgen -W "$tgwords" -- "$cur"))
        fi
        return
    fi
    actions=""
    case $cmd in
{action_cases}
    esac
    if [[ -n $actions && -z $action && $cur != -* ]]; then
        COMPREPLY=($(compgen -W "$actions" -- "$cur"))
        return
    fi
    opts=""
    [[ -n $actions && -n $action ]] && cmd="$cmd $action"
    case $cmd in
{cases}
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _tgops tgops
"""


def zsh_script(w: Words) -> str:
    # zsh runs bash completion functions through bashcompinit; one script for both keeps
    # them the same
    return (
        "#compdef tgops\n"
        "# zsh completion for tgops (made by `tgops completion zsh`)\n"
        "autoload -Uz bashcompinit && bashcompinit\n" + bash_script(w).split("\n", 1)[1]
    )


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    if shell not in SHELLS:
        raise ValueError(f"{shell!r}: give one of {', '.join(SHELLS)}")
    w = words(parser)
    return bash_script(w) if shell == "bash" else zsh_script(w)
