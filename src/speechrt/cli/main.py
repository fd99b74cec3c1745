"""``speechrt`` command line: a thin argparse layer over the Python API.

Every user error is one line on stderr (``speechrt: error: ...``) and a non-zero exit; a bad file in
a batch is reported and the others are still processed (exit status 1 then).
"""

from __future__ import annotations

import argparse
import sys

from speechrt.errors import SpeechrtError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        sys.stderr.write(f"speechrt: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from speechrt.cli import bench as bench_cmd
    from speechrt.cli import eval as eval_cmd
    from speechrt.cli import transcribe as transcribe_cmd

    parser = _Parser(
        prog="speechrt",
        description="Fast, exact speech recognition: WeNet Conformer, Whisper, Conformer-MoE.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    transcribe_cmd.add_parser(sub)
    eval_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except SpeechrtError as e:
        sys.stderr.write(f"speechrt: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("speechrt: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
