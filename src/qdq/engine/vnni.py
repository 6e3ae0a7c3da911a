"""Integer products with AVX-512 VNNI (`vpdpbusd`): the int8 instruction ONNX Runtime's MLAS
uses on this class of CPU, emitted through a Numba intrinsic.

`vpdpbusd` adds to each int32 lane the four products of unsigned bytes of one operand and
signed bytes of the other: 64 multiply-adds per instruction, four times a float32 FMA's 16.
LLVM does not emit it from a loop of byte products, so `_tile` writes the loop in LLVM IR:
for a tile of 6 rows of u8 activations by 16 or 32 columns of s8 weights, each step
broadcasts four activation bytes of a row and multiplies them into the weights of four terms
of 16 channels, the accumulators staying in registers. Sums wrap modulo 2^32: a result that
fits int32 is exact, whatever the partial sums did, so callers bound the final value only.
"""

from __future__ import annotations

import numpy as np

try:
    import llvmlite.binding as llvm
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic
except ImportError:  # without Numba the float path serves; `available()` says so
    llvm = None

ROWS = 6  # positions per tile: 6 rows x 2 blocks = 12 accumulators, within 32 registers
LANES = 16  # int32 lanes of one register, the output channels of a block


def available() -> bool:
    """Whether the CPU has AVX-512 VNNI and Numba is installed."""
    if llvm is None:
        return False
    return bool(llvm.get_host_cpu_features().get("avx512vnni", False))


def pack_weights(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Centred weights (K, M) as `gemm` reads them: (K4, M16, 4) int8, K rounded up to a
    multiple of 4 and M of 16 with zeros, and the int32 sum of each column (the zero-point
    correction); None where a weight does not fit int8."""
    if weights.size and (weights.min() < -128 or weights.max() > 127):
        return None
    k, m = weights.shape
    padded = np.zeros((-(-k // 4) * 4, -(-m // LANES) * LANES), np.int8)
    padded[:k, :m] = weights
    packed = padded.reshape(-1, 4, padded.shape[1]).transpose(0, 2, 1)
    return np.ascontiguousarray(packed).ravel(), weights.sum(axis=0).astype(np.int32)


def padded_terms(k: int) -> int:
    """The length of a row of activations `gemm` reads: K rounded up to a multiple of 4."""
    return -(-k // 4) * 4


if llvm is not None:
    _I32, _I64 = ir.IntType(32), ir.IntType(64)
    _VECTOR = ir.VectorType(_I32, LANES)

    def _tile_intrinsic(blocks: int):
        """out[r, 16 q + l] = the sum over k of a[r, k] * b[k, 16 q + l] for a tile of ROWS
        rows and `blocks` blocks of 16 columns: a (u8) from a_start, a row every a_step
        bytes; b packed by `pack_weights` from b_start, b_step bytes per four terms; `quads`
        steps of four terms; out (int32) from out_start, a row every out_step elements."""

        @intrinsic
        def tile(typingctx, a, a_start, a_step, b, b_start, b_step, quads, out, o_start, o_step):
            signature = types.void(
                a, a_start, a_step, b, b_start, b_step, quads, out, o_start, o_step
            )

            def codegen(context, builder, sig, args):
                a, a_start, a_step, b, b_start, b_step, quads, out, o_start, o_step = args
                a_data = context.make_array(sig.args[0])(context, builder, a).data
                b_data = context.make_array(sig.args[3])(context, builder, b).data
                out_data = context.make_array(sig.args[7])(context, builder, out).data
                name = "llvm.x86.avx512.vpdpbusd.512"
                dot = builder.module.globals.get(name) or ir.Function(
                    builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3), name
                )
                entry = builder.block
                body = builder.append_basic_block("vnni_terms")
                done = builder.append_basic_block("vnni_done")
                zero = ir.Constant(_VECTOR, None)
                builder.branch(body)
                builder.position_at_end(body)
                step = builder.phi(_I64)
                step.add_incoming(ir.Constant(_I64, 0), entry)
                sums = []
                for _ in range(ROWS * blocks):
                    phi = builder.phi(_VECTOR)
                    phi.add_incoming(zero, entry)
                    sums.append(phi)
                b_row = builder.add(b_start, builder.mul(step, b_step))
                columns = []
                for q in range(blocks):
                    at = builder.gep(b_data, [builder.add(b_row, ir.Constant(_I64, 64 * q))])
                    load = builder.load(builder.bitcast(at, _VECTOR.as_pointer()))
                    load.align = 1
                    columns.append(load)
                a_column = builder.add(a_start, builder.shl(step, ir.Constant(_I64, 2)))
                updated = []
                for r in range(ROWS):
                    row = builder.add(a_column, builder.mul(a_step, ir.Constant(_I64, r)))
                    at = builder.gep(a_data, [row])
                    word = builder.load(builder.bitcast(at, _I32.as_pointer()))
                    word.align = 1
                    first = builder.insert_element(zero, word, ir.Constant(_I32, 0))
                    broadcast = builder.shuffle_vector(first, zero, zero)  # all lanes = word
                    for q in range(blocks):
                        updated.append(
                            builder.call(dot, [sums[r * blocks + q], broadcast, columns[q]])
                        )
                following = builder.add(step, ir.Constant(_I64, 1))
                step.add_incoming(following, body)
                for phi, value in zip(sums, updated, strict=True):
                    phi.add_incoming(value, body)
                builder.cbranch(builder.icmp_signed("<", following, quads), body, done)
                builder.position_at_end(done)
                for r in range(ROWS):
                    row = builder.add(o_start, builder.mul(o_step, ir.Constant(_I64, r)))
                    for q in range(blocks):
                        at = builder.gep(out_data, [builder.add(row, ir.Constant(_I64, LANES * q))])
                        store = builder.store(
                            updated[r * blocks + q], builder.bitcast(at, _VECTOR.as_pointer())
                        )
                        store.align = 4
                return context.get_dummy_value()

            return signature, codegen

        return tile

    _tile32 = _tile_intrinsic(2)
    _tile16 = _tile_intrinsic(1)

    @njit(cache=True, nogil=True)
    def gemm(a, rows, length, b, columns, out):
        """out (rows, columns) int32, flat = a (rows, length) u8 @ the packed b, flat; rows
        a multiple of ROWS, length of 4 (`padded_terms`), columns of 16."""
        quads, b_step = length // 4, columns * 4
        for r in range(0, rows, ROWS):
            for m in range(0, columns - 31, 32):
                _tile32(
                    a, r * length, length, b, m * 4, b_step, quads, out, r * columns + m, columns
                )
            if columns % 32:
                m = columns - 16
                _tile16(
                    a, r * length, length, b, m * 4, b_step, quads, out, r * columns + m, columns
                )
