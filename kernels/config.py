"""Static configuration shared by the implementations: block sizes and the traced-once settings."""

from __future__ import annotations

import dataclasses

IMPLS = ("xla", "pallas_tpu", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the vocabulary sweep.

    block_rows: rows per program of the ``pallas_tpu`` kernels (a multiple of 8, the sublane
      count). The ``xla`` path sweeps all rows at once (one big matmul-shaped tile per step)
      and ``pallas_gpu`` runs one row per program, as Liger's kernels do: a few thousand rows
      already fill a GPU, and a 1-D row keeps every Triton tile a power of two.
    block_vocab: vocabulary entries per step. ``pallas_tpu`` needs a multiple of 128 (the lane
      count), ``pallas_gpu`` a power of two. Larger than V is allowed; it is clamped to V.
    """

    block_rows: int = 128
    block_vocab: int = 2048

    def __post_init__(self):
        for name in ("block_rows", "block_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    def check_for(self, impl: str) -> None:
        """Raises ValueError if these sizes cannot tile the given implementation's kernels."""
        if impl == "pallas_tpu":
            if self.block_rows % 8:
                raise ValueError(
                    f"pallas_tpu needs block_rows % 8 == 0 (sublanes), got {self.block_rows}"
                )
            if self.block_vocab % 128:
                raise ValueError(
                    f"pallas_tpu needs block_vocab % 128 == 0 (lanes), got {self.block_vocab}"
                )
        if impl == "pallas_gpu" and self.block_vocab & (self.block_vocab - 1):
            raise ValueError(
                f"pallas_gpu needs a power-of-two block_vocab (Triton tiles), got {self.block_vocab}"
            )


DEFAULT_BLOCK_SIZES = {
    # One [N, 4096] float32 tile per step: at N = 8192 that is 128 MiB, small next to the
    # [N, V] logits it walks over and large enough that the loop overhead is negligible.
    "xla": BlockSizes(block_rows=128, block_vocab=4096),
    # 128 x 2048 float32 = 1 MiB per input tile; two inputs, double-buffered, plus a handful of
    # same-sized temporaries stays well inside the 16 MiB default scoped VMEM of v5e.
    "pallas_tpu": BlockSizes(block_rows=128, block_vocab=2048),
    "pallas_gpu": BlockSizes(block_rows=1, block_vocab=4096),
}


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the traced program depends on besides the arrays (hashable: a jit cache key).

    interpret: run the Pallas kernels in the Pallas interpreter instead of compiling them (the
      caller's ``interpret=`` argument; always False for xla).
    poison: fill output buffers with NaN before the kernels write them (tests), so a tile the
      kernel forgets to write shows up as NaN instead of as stale zeros.
    """

    alpha: float
    temperature: float
    impl: str
    blocks: BlockSizes
    interpret: bool
    poison: bool = False
