"""`galaxy chat --weights-format` (as run and serve take it) and `--decode-threads` on every command that
decodes: parsed, refused when bad naming the option, and handed to Session.load."""

from __future__ import annotations

import pytest

from galaxy.cli import build_parser


def _parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "serve", "chat"])
def test_decode_threads_parses_and_a_count_below_one_is_refused_naming_it(command, capsys):
    assert build_parser().parse_args([command, "--decode-threads", "1"]).decode_threads == 1
    assert build_parser().parse_args([command]).decode_threads is None  # measured on each device at load
    assert "argument --decode-threads: 0 is below the minimum, 1" in _parse_error(capsys, [command, "--decode-threads",
                                                                                          "0"])


def test_bench_decode_takes_auto_and_counts_side_by_side(capsys):
    assert build_parser().parse_args(["bench", "decode", "--decode-threads", "auto,2"]).decode_threads == (0, 2)
    assert build_parser().parse_args(["bench", "decode"]).decode_threads == (0,)
    assert "argument --decode-threads" in _parse_error(capsys, ["bench", "decode", "--decode-threads", "auto,0"])


def test_chat_weights_format_parses_as_run_does_and_a_bad_one_is_refused_naming_it(capsys):
    for fmt in ("int4", "auto", "fp16"):
        assert build_parser().parse_args(["chat", "--weights-format", fmt]).weights_format == fmt
    err = _parse_error(capsys, ["chat", "--weights-format", "int3"])
    assert "argument --weights-format" in err and "int3" in err
    assert build_parser().parse_args(["chat"]).weights_format is None  # fp32, or the --plan's, as run


class _Loaded(Exception):
    pass


def test_chat_loads_in_the_weights_format_and_decode_threads_it_was_given(monkeypatch):
    loads = []

    class Session:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def load(self, source, **kwargs):
            loads.append(kwargs)
            raise _Loaded

    monkeypatch.setattr("galaxy.cli.chat.open_session", lambda args, n: Session())
    args = build_parser().parse_args(["chat", "--local", "1", "--weights-format", "auto", "--decode-threads", "1"])
    with pytest.raises(_Loaded):
        args.func(args)
    # auto: the embedded SmolLM2 Q4_1 GGUF runs in its compact counterpart, as `galaxy run` loads it
    assert loads[0]["weights_format"] == "int4" and loads[0]["decode_threads"] == 1
