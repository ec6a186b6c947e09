"""Shell completion for `qspeech <command> <overrides>`. Hydra's completion script registers one program and,
on <TAB>, runs `<program> -sc query=bash` with the whole line in COMP_LINE; Hydra itself completes only a
line of one app's overrides. qspeech answers the command word and hands each command's Hydra app its line."""

from __future__ import annotations


def split_line(line: str, commands: list[str]) -> tuple[str | None, str]:
    """COMP_LINE -> (command, the line for its Hydra app) once the command word is complete:
    'qspeech run model=h' -> ('run', 'qspeech model=h'); while it is being typed, (None, the matching
    commands): 'qspeech ru' -> (None, 'run')."""
    program, _, rest = line.lstrip().partition(" ")
    word, sep, tail = rest.lstrip().partition(" ")
    if not sep:  # still typing the command (or nothing yet)
        return None, " ".join(c for c in commands if c.startswith(word))
    return word, f"{program} {tail}"


def hide_schemas(answer: str) -> str:
    """Hydra's candidates without the ConfigStore schema entries (model=_schema, quant=_schema_rtn, ...)."""
    return " ".join(w for w in answer.split() if not w.partition("=")[2].startswith("_schema"))
