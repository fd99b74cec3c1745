"""WeNet symbol tables (``units.txt`` / ``words.txt``) and detokenisation (char or BPE units)."""

from __future__ import annotations

from pathlib import Path

from speechrt.errors import ModelFormatError

BPE_SPACE = "\u2581"  # SentencePiece's word-boundary mark


class SymbolTable:
    """Maps token ids to units and back; turns id sequences into text as WeNet does.

    Character models join units directly; BPE units (``▁`` marks a word start) become spaces.
    Special units (``<blank>``, ``<unk>``, ``<sos/eos>``, anything in angle brackets) never
    reach the text.
    """

    def __init__(self, units: dict[int, str]):
        self.id_to_unit = units
        self.unit_to_id = {u: i for i, u in units.items()}
        self.uses_bpe = any(u.startswith(BPE_SPACE) for u in units.values())

    @classmethod
    def load(cls, path: str | Path) -> SymbolTable:
        path = Path(path)
        if not path.is_file():
            raise ModelFormatError(f"symbol table not found: {path}")
        units: dict[int, str] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ModelFormatError(f"{path}:{n}: expected '<unit> <id>', got {line!r}")
            units[int(parts[1])] = parts[0]
        if not units:
            raise ModelFormatError(f"symbol table {path} is empty")
        return cls(units)

    def __len__(self) -> int:
        return len(self.id_to_unit)

    def is_special(self, unit: str) -> bool:
        return unit.startswith("<") and unit.endswith(">")

    def units(self, ids) -> list[str]:
        return [self.id_to_unit.get(int(i), "<unk>") for i in ids]

    def detokenize(self, ids) -> str:
        units = [u for u in self.units(ids) if not self.is_special(u)]
        text = "".join(units)
        if self.uses_bpe:
            text = text.replace(BPE_SPACE, " ").strip()
        return text
