"""The released models' T5 tokenisation: minimum-cost (unigram Viterbi) segmentation over ml-mdm's `t5.vocab`.

`t5.vocab` holds one `piece<TAB>log-prob` line per token id (the T5 SentencePiece pieces, then the extra ids).
A caption is segmented into pieces minimising the total cost sum(-log-prob), over the raw string: no
normalisation and no whitespace collapsing ('▁' in a piece stands for a space). Characters that no piece
covers are dropped rather than mapped to `<unk>`. Prompts get one leading space and a trailing `</s>`, so
the empty prompt is [▁, </s>] = [3, 1].
"""

from __future__ import annotations

import re
from pathlib import Path

PAD_ID = 0
EOS_ID = 1
_SPECIAL = re.compile(r"^(<pad>|</s>|<unk>|<extra_id_\d+>)$")
_DROP_COST = 1e9  # per dropped character: a segmentation drops characters only when no piece covers them


class UnigramTokenizer:
    """Token ids of captions under a unigram vocabulary (the ml-mdm `t5.vocab` convention)."""

    def __init__(self, pieces: list[tuple[str, float]]) -> None:
        self.cost: dict[str, tuple[int, float]] = {}
        for i, (piece, logp) in enumerate(pieces):
            if not _SPECIAL.match(piece):
                self.cost[piece.replace("▁", " ")] = (i, -logp)
        if not self.cost:
            raise ValueError("the vocabulary has no ordinary pieces")
        self.longest = max(len(p) for p in self.cost)
        self.vocab_size = len(pieces)

    @classmethod
    def from_file(cls, path: str | Path) -> UnigramTokenizer:
        """Read `piece<TAB>log-prob` lines (line index = token id)."""
        pieces = []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            parts = line.rsplit("\t", 1)
            try:
                pieces.append((parts[0], float(parts[1])))
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{n}: expected 'piece<TAB>log-prob', got {line!r}") from None
        return cls(pieces)

    def segment(self, text: str) -> list[int]:
        """Token ids of `text` with the least total cost; uncovered characters are dropped."""
        n = len(text)
        best = [0.0] + [float("inf")] * n
        back: list[tuple[int, int | None]] = [(0, None)] * (n + 1)
        for end in range(1, n + 1):
            best[end], back[end] = best[end - 1] + _DROP_COST, (end - 1, None)
            for start in range(max(0, end - self.longest), end):
                hit = self.cost.get(text[start:end])
                if hit is not None and best[start] + hit[1] < best[end]:
                    best[end], back[end] = best[start] + hit[1], (start, hit[0])
        ids, pos = [], n
        while pos > 0:
            pos, token = back[pos]
            if token is not None:
                ids.append(token)
        return ids[::-1]

    def __call__(self, prompt: str, max_length: int = 128, max_chars: int = 512) -> list[int]:
        """Ids of one prompt as the released models saw it: cut to `max_chars`, ' ' prepended, `</s>` appended."""
        ids = self.segment(" " + prompt[:max_chars])[: max_length - 1]
        return [*ids, EOS_ID]
